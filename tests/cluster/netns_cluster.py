"""A throw-away two-node cluster on one machine: network + UTS namespaces joined by a bridge.

Each node is a network namespace (``ip netns``: ``fedmpi-node1``, ``fedmpi-node2``) with a
persistent UTS namespace of its own, so ``hostname`` there says the node's name. A veth pair
joins each node to a bridge in the root namespace; the bridge holds the gateway address, so
mpiexec running in the root namespace (the "login node") reaches every node and the nodes reach
each other only across their veth links. Both ends of every veth pair are shaped with ``tc tbf``
(1 Gbit/s unless told otherwise), so node-to-node traffic is limited in both directions.

Every name made here starts with ``fedmpi`` (namespaces, links, the bridge, the state directory
/run/fedmpi-netns), and ``up`` refuses to start when any of them already exists: ``down`` removes
exactly what this module makes and nothing else, also after a failed test.

Ranks are started on the nodes by MPICH hydra's ssh launcher with ``launch_in_node.sh`` as the
"ssh" (``mpiexec_args``). Needs root, ``ip``, ``tc``, ``unshare``, ``nsenter``.

    python tests/cluster/netns_cluster.py up [--rate 10gbit]   # leaves the cluster up
    python tests/cluster/netns_cluster.py down                 # removes it
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "fedmpi"
NODES = ("fedmpi-node1", "fedmpi-node2")
BRIDGE = "fedmpi-br0"
NODE_LINK = "fedmpi-eth0"            # the node's end of its veth pair, inside its namespace
SUBNET = "10.221.21"                 # a private /24: .1 the bridge (gateway), .11, .12, ... the nodes
GATEWAY = f"{SUBNET}.1"
STATE = Path("/run/fedmpi-netns")    # the nodes' UTS namespaces are bind-mounted here
LAUNCHER = Path(__file__).resolve().parent / "launch_in_node.sh"
PROGRAMS = ["ip", "tc", "unshare", "nsenter", "mount", "umount", "sh"]
LOCK = Path("/run/fedmpi-netns.lock")   # one cluster at a time (pytest-xdist workers queue here)
# The environment of a run across the nodes. UCX (MPICH's default) sees one machine (one boot id)
# and would pass messages through shared memory, past the veth links; restricted to TCP it uses
# the nodes' interfaces. (MPIR_CVAR_CH4_NETMOD=ofi, libfabric's TCP provider, works too.)
MPI_ENV = {"UCX_TLS": "tcp"}
MOUNTS_VARIABLE = "FEDMPI_NODE_MOUNTS"   # read by launch_in_node.sh


def node_mounts_env(mounts: dict[str, list[tuple[str | Path, str | Path]]]) -> dict:
    """The environment entry giving nodes file-system views of their own (``launch_in_node.sh``):
    ``{node: [(source, target), ...]}`` mounts ``source`` (a directory, or ``"tmpfs"`` for an empty
    one) over ``target`` for the ranks started on ``node`` only."""
    entries = []
    for node, pairs in mounts.items():
        if node not in NODES and not re.fullmatch(rf"{PREFIX}-node\d", node):
            raise ValueError(f"{node} is not a namespace node")
        for source, target in pairs:
            for path in (str(source), str(target)):
                if re.search(r"[\s'\":=]", path):
                    raise ValueError(f"{path!r}: the launcher takes paths without spaces, quotes, : or =")
            entries.append(f"{node}={source}:{target}")
    return {MOUNTS_VARIABLE: " ".join(entries)}


def node_address(index: int) -> str:
    return f"{SUBNET}.{11 + index}"


def host_link(node: str) -> str:
    """The root-namespace end of ``node``'s veth pair (fedmpi-node1 -> fedmpi-n1)."""
    return f"{PREFIX}-n{node.rsplit('node', 1)[1]}"


def uts_file(node: str) -> Path:
    return STATE / node


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_node(node: str, *argv: str) -> list[str]:
    """``argv`` run in ``node``'s network and UTS namespaces, through ``ip netns exec`` (as
    launch_in_node.sh): it mounts the node's own /sys, where UCX finds the node's network devices,
    so MPI ranks started by a slurmd made this way can reach the other node."""
    return ["nsenter", f"--uts={uts_file(node)}", "--", "ip", "netns", "exec", node, *argv]


def unavailable_reason() -> str | None:
    """Why no cluster can be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, veth links, tc)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"missing programs: {' '.join(missing)}"
    if _run("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns list` fails: no network namespace support"
    return None


def existing_names() -> list[str]:
    """Namespaces and links here whose names start with the prefix (ours, or another cluster's)."""
    names = _run("ip", "netns", "list").stdout.split()
    links = [line.split(":", 2)[1].strip().split("@")[0]
             for line in _run("ip", "-o", "link", "show").stdout.splitlines()]
    found = [n for n in names + links if n.startswith(PREFIX)]
    if STATE.exists():
        found.append(str(STATE))
    return found


class NetnsCluster:
    """Two (or more) namespace nodes on a shaped bridge; a context manager (``up`` / ``down``)."""

    def __init__(self, rate: str = "1gbit", nodes: int = 2):
        if not 1 <= nodes <= 9:
            raise ValueError(f"nodes must be 1..9, not {nodes}")
        _rate_bits(rate)                            # a bad rate fails here, before anything is made
        self.rate = rate
        self.nodes = list(NODES) if nodes == 2 else [f"{PREFIX}-node{i + 1}" for i in range(nodes)]
        self.made: list[tuple[str, str]] = []      # what up() made, in order: (kind, name)
        self._lock = None

    def __enter__(self) -> "NetnsCluster":
        """Wait (at most 10 minutes) until no other NetnsCluster of this machine is up,
        then make this one."""
        self._take_lock(timeout=600)
        try:
            self.up()
        except BaseException:
            try:
                self.down()
            finally:
                self._release_lock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._release_lock()

    def _take_lock(self, timeout: float) -> None:
        self._lock = open(LOCK, "a")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._release_lock()
                    raise RuntimeError(f"another namespace cluster held {LOCK} for {timeout} s") from None
                time.sleep(0.5)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()      # closing drops the flock; the file stays (removing it would race)
            self._lock = None

    # -- making --------------------------------------------------------------------------
    def up(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot make a namespace cluster: {reason}")
        clash = existing_names()
        if clash:
            raise RuntimeError(f"{', '.join(clash)} already exist(s): another fedmpi namespace cluster is up "
                               f"(remove it with `python {__file__} down`)")
        STATE.mkdir(mode=0o755)
        self.made.append(("dir", str(STATE)))
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.made.append(("link", BRIDGE))
        _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for index, node in enumerate(self.nodes):
            self._make_node(index, node)

    def _make_node(self, index: int, node: str) -> None:
        _run("ip", "netns", "add", node)
        self.made.append(("netns", node))
        uts = uts_file(node)
        uts.touch()
        # a UTS namespace that outlives this command: unshare bind-mounts it on the file
        _run("unshare", f"--uts={uts}", "hostname", node)
        self.made.append(("uts", str(uts)))
        outside = host_link(node)
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", NODE_LINK, "netns", node)
        self.made.append(("link", outside))
        _run("ip", "link", "set", outside, "master", BRIDGE)
        _run("ip", "link", "set", outside, "up")
        inside = ["ip", "netns", "exec", node]
        _run(*inside, "ip", "addr", "add", f"{node_address(index)}/24", "dev", NODE_LINK)
        _run(*inside, "ip", "link", "set", NODE_LINK, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "route", "add", "default", "via", GATEWAY)
        _shape_node(node, self.rate, "add")

    # -- removing ------------------------------------------------------------------------
    def down(self) -> None:
        """Remove what ``up`` made, newest first; every step is tried even when one fails."""
        errors = []
        for kind, name in reversed(self.made):
            try:
                _remove(kind, name)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.made = []
        if errors:
            raise RuntimeError("namespace cluster teardown: " + "; ".join(errors))

    # -- using ---------------------------------------------------------------------------
    def link_bytes(self, node: str) -> int:
        """Bytes that crossed ``node``'s veth link so far, both directions (the root-side end's
        counters: what the node received plus what it sent)."""
        stats = Path(f"/sys/class/net/{host_link(node)}/statistics")
        return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())

    def shaped_bytes(self, node: str) -> int:
        """Bytes that went through the tbf shapers of ``node``'s link so far: the root-side end's
        (towards the node) plus the node-side end's (from the node)."""
        total = 0
        for argv in (["tc", "-s", "qdisc", "show", "dev", host_link(node)],
                     ["ip", "netns", "exec", node, "tc", "-s", "qdisc", "show", "dev", NODE_LINK]):
            shown = _run(*argv).stdout
            if " tbf " not in shown:
                raise RuntimeError(f"no tbf qdisc on {node}'s link: {shown}")
            total += int(re.search(r"Sent (\d+) bytes", shown).group(1))
        return total

    def mpiexec_args(self, ranks_per_node: list[int]) -> list[str]:
        """mpiexec options placing ``ranks_per_node[i]`` consecutive ranks on node i."""
        hosts = ",".join(f"{node}:{n}" for node, n in zip(self.nodes, ranks_per_node) if n)
        return ["-launcher", "ssh", "-launcher-exec", str(LAUNCHER), "-hosts", hosts,
                "-localhost", GATEWAY, "-n", str(sum(ranks_per_node))]

    def set_rate(self, rate: str) -> None:
        """Reshape every node's link, both directions, to ``rate`` (the cluster stays up)."""
        _rate_bits(rate)
        for node in self.nodes:
            _shape_node(node, rate, "replace")
        self.rate = rate

    def pids_on(self, node: str) -> list[int]:
        """Processes running in ``node``'s network namespace."""
        target = os.stat(f"/run/netns/{node}").st_ino
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.stat(entry / "ns" / "net").st_ino == target:
                        pids.append(int(entry.name))
                except OSError:          # ended meanwhile, or a kernel thread
                    continue
        return sorted(pids)


def _tbf(rate: str) -> list[str]:
    """tbf arguments for ``rate``: a bucket of 4 ms of traffic (at least 64 KiB, above one GSO
    packet) and a queue of 20 ms before packets are dropped."""
    bits = _rate_bits(rate)
    burst = max(bits // 8 // 250, 64 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "20ms"]


def _rate_bits(rate: str) -> int:
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if rate.endswith(unit) and rate[:-len(unit)].isdigit():
            return int(rate[:-len(unit)]) * factor
    raise ValueError(f"rate {rate!r}: write a whole number with kbit, mbit or gbit (e.g. 1gbit, 10gbit)")


def _shape_node(node: str, rate: str, verb: str) -> None:
    """tc qdisc ``verb`` (add, replace): a tbf of ``rate`` on both ends of ``node``'s link."""
    _run("tc", "qdisc", verb, "dev", host_link(node), "root", *_tbf(rate))
    _run("ip", "netns", "exec", node, "tc", "qdisc", verb, "dev", NODE_LINK, "root", *_tbf(rate))


def _remove(kind: str, name: str) -> None:
    if kind == "link":
        # deleting one end of a veth pair deletes both; a missing link is already gone
        if Path(f"/sys/class/net/{name}").exists():
            _run("ip", "link", "del", name)
    elif kind == "netns":
        if Path(f"/run/netns/{name}").exists():
            _run("ip", "netns", "del", name)
    elif kind == "uts":
        if os.path.ismount(name):
            _run("umount", name)
        Path(name).unlink(missing_ok=True)
    elif kind == "dir":
        if Path(name).exists():
            Path(name).rmdir()       # empty by now: refuses (an error) if something else is in it


def remove_leftovers() -> list[str]:
    """Remove every fedmpi namespace-cluster object here (the CLI's ``down``, after a cluster
    left up with ``up`` or by a killed test); returns what it removed. Only the names this module
    makes: the bridge, fedmpi-n<i> links, fedmpi-node<i> namespaces, /run/fedmpi-netns."""
    removed = []
    for line in _run("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name == BRIDGE or re.fullmatch(rf"{PREFIX}-n\d", name):
            _remove("link", name)
            removed.append(name)
    for name in _run("ip", "netns", "list").stdout.split():
        if re.fullmatch(rf"{PREFIX}-node\d", name):
            _remove("netns", name)
            removed.append(name)
    if STATE.exists():
        for uts in STATE.iterdir():
            if re.fullmatch(rf"{PREFIX}-node\d", uts.name):
                _remove("uts", str(uts))
                removed.append(str(uts))
        _remove("dir", str(STATE))
        removed.append(str(STATE))
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--rate", default="1gbit", help="bandwidth of each node's link (1gbit, 10gbit, ...)")
    args = parser.parse_args(argv)
    if args.action == "down":
        removed = remove_leftovers()
        print("removed: " + (" ".join(removed) if removed else "nothing (no fedmpi namespace cluster here)"))
        return 0
    cluster = None
    try:
        cluster = NetnsCluster(rate=args.rate)     # a bad rate: ValueError
        cluster.up()                               # unavailable here, or already up: RuntimeError
    except (RuntimeError, ValueError) as exc:
        if cluster is not None:
            cluster.down()
        print(f"cannot make a namespace cluster: {exc}", file=sys.stderr)
        return 2
    for index, node in enumerate(cluster.nodes):
        print(f"{node} {node_address(index)} link {host_link(node)} rate {args.rate}")
    print("mpiexec " + " ".join(cluster.mpiexec_args([1] * len(cluster.nodes))) + " ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
