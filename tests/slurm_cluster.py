"""A throw-away single-node SLURM cluster (munged, slurmctld, slurmd) for tests.

Debian's packages (slurm-wlm, munge), daemons started as plain child
processes (no systemd), every file under one temporary directory, stopped by PID. Needs root
(slurmd runs jobs as the submitting user) and the fixed ports 6817/6818, so one at a time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["mungekey", "munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol", "scancel"]
PORTS = (6817, 6818)

# Every file under the cluster's base directory; the slurmd files per node name (%n), so the
# same text serves one slurmd here and one per node in tests/cluster/netns_slurm.py
SLURM_CONF = """\
ClusterName={cluster}
SlurmctldHost={host}({address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket,cred_expire=5
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{nodes}
PartitionName={partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def _install_packages() -> str | None:
    """apt-get install the packages (updating the package lists if needed); why not, on failure."""
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # fresh machines often have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"installing {' '.join(PACKAGES)} failed: {last}"
    return None


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None; installs the packages when they are missing."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: slurmd runs jobs as the submitting user and packages must be installed"
    if any(shutil.which(p) is None for p in PROGRAMS):
        reason = _install_packages()
        if reason:
            return reason
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if missing:
            return f"after installing {' '.join(PACKAGES)}, still missing: {' '.join(missing)}"
    busy = [port for port in PORTS if _port_in_use(port)]
    if busy:
        return f"port(s) {busy} in use: another SLURM seems to be running here"
    return None


class SlurmCluster:
    """munged + slurmctld + slurmd in a fresh temporary directory; use as a context manager.

    ``env`` is the environment for client commands (sbatch, squeue, ...): it names the config.
    The directory is removed on stop unless ``keep`` is set.
    """

    ports = PORTS

    def __init__(self, keep: bool = False, prefix: str = "fedmpi-slurm-"):
        # Not pytest's tmp_path: munged wants every directory above its socket world-executable,
        # and pytest's are private (0700). mkdtemp's parent (/tmp) is.
        self.base = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "w")
        # Own session: a Ctrl-C in the test's terminal must not hit the daemons before stop().
        self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                              env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemons and wait until the node is idle."""
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        (self.base / "munge").chmod(0o755)  # munged refuses a socket directory others cannot enter
        munge = self.base / "munge"
        subprocess.run(["mungekey", "--create", f"--keyfile={munge}/munge.key"], check=True,
                       capture_output=True)
        self._spawn("munged", ["munged", "--foreground", f"--key-file={munge}/munge.key",
                               f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                               f"--seed-file={munge}/munge.seed",
                               f"--log-file={self.base}/log/munged.log"])
        self.conf.write_text(self.config_text())
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self.start_slurmds()
        self._wait_for(self.nodes_idle, timeout, "the nodes idle")

    # ---- what a cluster of other nodes changes (tests/cluster/netns_slurm.py) ----------------
    def config_text(self) -> str:
        nodes = f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN"
        return SLURM_CONF.format(cluster="testcluster", host=self.node, address="127.0.0.1", base=self.base,
                                 ports=self.ports, nodes=nodes, partition="debug", names=self.node)

    def start_slurmds(self) -> None:
        (self.base / "spool" / self.node).mkdir(exist_ok=True)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])

    def nodes_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], env=self.env,
                                capture_output=True, text=True)
        return result.stdout.strip() == "idle"

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout} s"
                raise RuntimeError(f"SLURM test cluster did not start: {problem}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.base / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop slurmd, slurmctld and munged by PID, in that order."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            # Only this cluster's jobs: the client talks to our slurmctld through SLURM_CONF.
            subprocess.run(["scancel", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=10)
            # the jobs' slurmstepds are no children of ours: let the slurmds end them first
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout.strip():
                time.sleep(0.3)
        for name in [n for n in self.daemons if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            daemon = self.daemons.pop(name, None)
            if daemon is None or daemon.poll() is not None:
                continue
            daemon.terminate()
            try:
                daemon.wait(timeout=10)  # reaps it: no zombie stays behind
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
