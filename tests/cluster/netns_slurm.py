"""SLURM on the namespace cluster (netns_cluster.py): a slurmd in each node, slurmctld and munged in
the root namespace, every file under one temporary directory, daemons stopped by PID.

slurmctld listens on the bridge's address (the gateway), each slurmd on its node's address, so a
job's steps start inside the nodes (``srun hostname`` prints the node names) and their traffic
crosses the veth links. Ports 6917/6918, not SLURM's 6817/6818: tests/slurm_cluster.py's
one-node cluster may be running beside this one. Needs root and Debian's slurm-wlm and munge.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from . import netns_cluster

PROGRAMS = ["mungekey", "munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "srun"]
PORTS = (6917, 6918)      # slurmctld (on the gateway), slurmd (on each node's own address)

SLURM_CONF = """\
ClusterName=fedmpinetns
SlurmctldHost={host}({gateway})
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
PartitionName=nodes Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def unavailable_reason() -> str | None:
    """Why no SLURM can be started on the namespace cluster here, or None (installs nothing)."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"missing programs: {' '.join(missing)} (Debian: slurmctld slurmd slurm-client munge)"
    busy = [port for port in PORTS if _port_in_use(port)]
    if busy:
        return f"port(s) {busy} in use"
    return None


class NetnsSlurm:
    """munged + slurmctld in the root namespace, one slurmd in each node of ``cluster`` (a running
    NetnsCluster); a context manager. ``env``: the environment for sbatch, squeue, ..."""

    def __init__(self, cluster: netns_cluster.NetnsCluster):
        self.cluster = cluster
        # not pytest's tmp_path: munged wants every directory above its socket world-executable
        self.base = Path(tempfile.mkdtemp(prefix="fedmpi-netns-slurm-"))
        self.conf = self.base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> "NetnsSlurm":
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
        self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True)
        log.close()

    def start(self, timeout: float = 40.0) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        munge = self.base / "munge"
        munge.chmod(0o755)
        subprocess.run(["mungekey", "--create", f"--keyfile={munge}/munge.key"], check=True, capture_output=True)
        # a socket on the file system: the nodes reach it whatever their network namespace
        self._spawn("munged", ["munged", "--foreground", f"--key-file={munge}/munge.key",
                               f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                               f"--seed-file={munge}/munge.seed", f"--log-file={self.base}/log/munged.log"])
        nodes = self.cluster.nodes
        lines = [f"NodeName={node} NodeAddr={netns_cluster.node_address(i)} CPUs={os.cpu_count() or 1} "
                 f"RealMemory=1000 State=UNKNOWN" for i, node in enumerate(nodes)]
        self.conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0],
                                               gateway=netns_cluster.GATEWAY, base=self.base, ports=PORTS,
                                               nodes="\n".join(lines), names=",".join(nodes)))
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in nodes:
            (self.base / "spool" / node).mkdir()
            self._spawn(f"slurmd-{node}", netns_cluster.in_node(node, "slurmd", "-D", "-N", node, "-f", str(self.conf)))
        self._wait_for(self._nodes_idle, timeout, f"nodes {', '.join(nodes)} idle")

    def _nodes_idle(self) -> bool:
        shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in shown.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.cluster.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, p in self.daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                problem = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout} s"
                raise RuntimeError(f"SLURM on the namespace cluster did not start: {problem}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        parts = []
        for log in sorted((self.base / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the slurmds, slurmctld and munged by PID."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", str(os.getuid())], env=self.env, capture_output=True, timeout=10)
            # the jobs' slurmstepds are no children of ours: let the slurmds end them first
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h"], env=self.env, capture_output=True, text=True).stdout.strip():
                time.sleep(0.3)
        order = [n for n in self.daemons if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            daemon = self.daemons.pop(name, None)
            if daemon is None or daemon.poll() is not None:
                continue
            daemon.terminate()
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)
        shutil.rmtree(self.base, ignore_errors=True)
