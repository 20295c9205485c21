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
from pathlib import Path

from slurm_cluster import SLURM_CONF, SlurmCluster, _port_in_use

from . import netns_cluster

PROGRAMS = ["mungekey", "munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "srun"]
PORTS = (6917, 6918)      # slurmctld (on the gateway), slurmd (on each node's own address)



def unavailable_reason() -> str | None:
    """Why no SLURM can be started on the namespace cluster here, or None (installs nothing)."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"missing programs: {' '.join(missing)} (Debian: slurmctld slurmd slurm-client munge)"
    busy = [port for port in PORTS if _port_in_use(port)]
    if busy:
        return f"port(s) {busy} in use"
    return None


def cgroup_mounts() -> list[str]:
    """Shell commands mounting this host's cgroup file systems (at /sys/fs/cgroup and below) again,
    in a mount namespace whose /sys lacks them. slurmd refuses a mix of cgroup versions other than
    the host's, so the layout is copied, not chosen."""
    commands = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target, kind, options = line.split()[:4]
        if target == "/sys/fs/cgroup" or target.startswith("/sys/fs/cgroup/"):
            if kind not in ("tmpfs", "cgroup", "cgroup2"):
                continue
            commands += [f"mkdir -p {target}", f"mount -t {kind} -o {options} {source} {target}"]
    return commands


class NetnsSlurm(SlurmCluster):
    """tests/slurm_cluster.py's cluster with one slurmd in each node of ``cluster`` (a running
    NetnsCluster) instead of one on this host; a context manager. ``env``: the environment for
    sbatch, squeue, ..."""

    ports = PORTS

    def __init__(self, cluster: netns_cluster.NetnsCluster):
        super().__init__(prefix="fedmpi-netns-slurm-")
        self.cluster = cluster

    def config_text(self) -> str:
        nodes = self.cluster.nodes
        lines = [f"NodeName={node} NodeAddr={netns_cluster.node_address(i)} CPUs={os.cpu_count() or 1} "
                 f"RealMemory=1000 State=UNKNOWN" for i, node in enumerate(nodes)]
        return SLURM_CONF.format(cluster="fedmpinetns", host=socket.gethostname().split(".")[0],
                                 address=netns_cluster.GATEWAY, base=self.base, ports=self.ports,
                                 nodes="\n".join(lines), partition="nodes", names=",".join(nodes))

    def start_slurmds(self) -> None:
        hosts = self.base / "etc" / "hosts"
        names = [f"{netns_cluster.node_address(i)} {node}" for i, node in enumerate(self.cluster.nodes)]
        hosts.write_text("\n".join([Path("/etc/hosts").read_text().rstrip("\n"), *names]) + "\n")
        for node in self.cluster.nodes:
            (self.base / "spool" / node).mkdir()
            # in_node gives the node a /sys of its own, without the cgroup file systems slurmd
            # checks for: mount the host's again there, the same kinds with the same options
            # and an /etc/hosts naming the nodes, for the job's processes alone: mpiexec's
            # proxies started by srun connect back to the batch node by its name
            start = " && ".join([*cgroup_mounts(), f"mount --bind '{hosts}' /etc/hosts",
                                 f"exec slurmd -D -N {node} -f '{self.conf}'"])
            self._spawn(f"slurmd-{node}", netns_cluster.in_node(node, "sh", "-c", start))

    def nodes_idle(self) -> bool:
        shown = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in shown.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in self.cluster.nodes)
