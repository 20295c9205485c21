"""fedmpi across two nodes: the namespace cluster of tests/cluster/netns_cluster.py (two network +
UTS namespaces on a tbf-shaped bridge), ranks started on both by mpiexec's ssh launcher.

P = 3 with the server and one worker on fedmpi-node1 and one worker on fedmpi-node2: the metrics
are those of the same run on one node, the bytes through node2's link are at least the payload
that node2's rank exchanged, and a rank killed on node2 ends the whole job.
P = 4 with two ranks on each node: ``mpi.share_data`` reads the data set once per node (each
rank's opens logged by a Python audit hook, each node seeing its own copy of the data directory), and a data root missing on node2
only stops the job with status 2 naming node2 and the path.
Needs root, ``ip netns``, ``tc`` and mpiexec; skipped otherwise.
"""
from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster import netns_cluster
from helpers import (MPIEXEC, PY, REPO, Streaming, assert_all_columns_identical, assert_same_metrics, env,
                     fedmpi, needs_mpiexec, read_results, write_config, write_idx)

UNAVAILABLE = netns_cluster.unavailable_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("namespace_cluster"),   # one worker, one cluster (make test: --dist loadgroup)
    needs_mpiexec,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no namespace cluster here: {UNAVAILABLE}"),
]

NODE1, NODE2 = netns_cluster.NODES
RANKS_PER_NODE = [2, 1]        # ranks 0 (server) and 1 on node1, rank 2 on node2
REMOTE_RANK = 2
FEDDST = {"algorithm": "feddst", "sparsity": 0.8, "feddst": {"alpha": 0.3, "readjust_every": 2, "r_end": 5}}


@pytest.fixture(scope="module")
def cluster():
    with netns_cluster.NetnsCluster(rate="1gbit") as made:
        yield made


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("two_nodes")


def two_node_command(cluster, args: list[str], ranks_per_node=RANKS_PER_NODE) -> list[str]:
    return [MPIEXEC, *cluster.mpiexec_args(ranks_per_node), PY, "-m", "fedmpi", *args]


def two_node_env(mounts: dict | None = None) -> dict:
    """The run's environment; ``mounts``: file-system views of single nodes
    (``netns_cluster.node_mounts_env``)."""
    return {**env(), **netns_cluster.MPI_ENV, **netns_cluster.node_mounts_env(mounts or {})}


def run_both(cluster, work: Path, name: str, **changes):
    """The same config at P = 3 on one node and across both; (one node, two nodes, bytes that
    crossed node2's link during the two-node run: by the link's counters, by its tbf shapers')."""
    config = write_config(work / f"{name}.yaml", **changes)
    one_node = work / f"{name}_one_node.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(one_node), "--quiet"], ranks=3, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_nodes = work / f"{name}_two_nodes.h5"
    before = cluster.link_bytes(NODE2), cluster.shaped_bytes(NODE2)
    proc = subprocess.run(two_node_command(cluster, ["run", str(config), "--out", str(two_nodes), "--quiet"]),
                          cwd=REPO, env=two_node_env(), capture_output=True, text=True, timeout=120)
    crossed = cluster.link_bytes(NODE2) - before[0], cluster.shaped_bytes(NODE2) - before[1]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(one_node), read_results(two_nodes), crossed


def test_cluster_nodes_have_their_own_names_and_shaped_links(cluster):
    for node in (NODE1, NODE2):
        name = subprocess.run(netns_cluster.in_node(node, "hostname"), capture_output=True, text=True)
        assert name.stdout.strip() == node
        qdisc = subprocess.run(["tc", "qdisc", "show", "dev", netns_cluster.host_link(node)],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc


def assert_same_run(one_node: dict, two_nodes: dict, what: str):
    assert int(two_nodes["attrs"]["mpi_size"]) == 3
    assert REMOTE_RANK in set(two_nodes["clients"]["rank"].tolist())    # node2's rank trained clients
    assert_same_metrics(one_node, two_nodes, what=f"{what} one node vs two nodes: ")
    assert np.all(np.isfinite(two_nodes["rounds"]["test_accuracy"]))


# One test per run pair (not one per check): under pytest-xdist each worker would repeat the runs.
def test_fedavg_on_two_nodes_matches_one_node_and_its_payload_crossed_the_link(cluster, work):
    """Dense FedAvg: node2's rank received each round's broadcast model once and sent its
    clients' uploads; all of it must have gone through node2's veth link (shared memory between
    the namespaces would leave the link nearly idle), through its bandwidth shapers."""
    one_node, two_nodes, (crossed, shaped) = run_both(cluster, work, "fedavg")
    assert_same_run(one_node, two_nodes, "fedavg")
    clients = two_nodes["clients"]
    remote = clients["rank"] == REMOTE_RANK
    downloads = sum(int(clients["download_bytes"][clients["round"] == r][0]) for r in two_nodes["rounds"]["round"])
    node2_payload = int(clients["upload_bytes"][remote].sum()) + downloads
    assert node2_payload > 0
    assert crossed >= node2_payload, (crossed, node2_payload)
    assert shaped >= node2_payload, (shaped, node2_payload)
    # and the counted payload of the whole run (rank 0's count) covers node2's share
    assert int(two_nodes["rounds"]["mpi_payload_bytes"].sum()) >= node2_payload
    print(f"node2's link: {crossed} bytes (tbf: {shaped}) for node2's payload of {node2_payload}")


def test_feddst_on_two_nodes_matches_one_node(cluster, work):
    one_node, two_nodes, _ = run_both(cluster, work, "feddst", **FEDDST)
    assert_same_run(one_node, two_nodes, "feddst")


class TwoNodeRun(Streaming):
    """Streaming, started across the cluster instead of by helpers.command."""

    def __init__(self, cluster, args: list[str], ranks_per_node=RANKS_PER_NODE, mounts: dict | None = None,
                 extra_env: dict | None = None):
        self.proc = subprocess.Popen(two_node_command(cluster, args, ranks_per_node), cwd=REPO,
                                     env={**two_node_env(mounts), **(extra_env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()


def fedmpi_ranks_on(cluster, node: str) -> list[int]:
    """PIDs of the fedmpi ranks (python -m fedmpi) running on ``node``."""
    pids = []
    for pid in cluster.pids_on(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"fedmpi"]:
            pids.append(pid)
    return pids


def test_sigkill_of_a_rank_on_node2_ends_the_job(cluster, work):
    config = write_config(work / "killed.yaml", rounds=8, local={"epochs": 4, "batch_size": 16, "lr": 0.05})
    out = work / "killed.h5"
    run = TwoNodeRun(cluster, ["run", str(config), "--out", str(out), "--progress"])
    try:
        run.wait_for_line(r"^round 2/8", timeout=90)
        if run.proc.poll() is not None:
            pytest.fail("the run finished before a rank could be killed; make rounds slower")
        remote = fedmpi_ranks_on(cluster, NODE2)
        assert len(remote) == 1, remote
        assert not set(remote) & set(fedmpi_ranks_on(cluster, NODE1))
        os.kill(remote[0], signal.SIGKILL)
        killed_at = time.monotonic()
        rc, stderr = run.finish(timeout=30)     # a job that missed the death would hang here
        ended_after = time.monotonic() - killed_at
    finally:
        run.kill()
    assert rc != 0, stderr
    assert ended_after < 15, (ended_after, stderr[-2000:])
    # mpiexec names the dead process by host and PID (on stdout), fedmpi's placement line the rank
    assert f"{NODE2}: rank {REMOTE_RANK} (pid {remote[0]})" in stderr, stderr
    # mpiexec may return while node1's ranks, already signalled, are still exiting
    deadline = time.monotonic() + 10
    while fedmpi_ranks_on(cluster, NODE1) + fedmpi_ranks_on(cluster, NODE2):
        assert time.monotonic() < deadline, "ranks left running after the job ended"
        time.sleep(0.1)
    print(f"mpiexec status {rc}, {ended_after:.1f} s after the SIGKILL:\n{stderr[-1500:]}")
    partial = read_results(out)
    assert "finished" not in partial["attrs"]
    done = len(partial["rounds"]["round"])
    assert 1 <= done < 8
    np.testing.assert_array_equal(partial["rounds"]["round"], np.arange(1, done + 1))


# ------------------------------------------------------------------ the data set on each node
PAIRS = [2, 2]                 # ranks 0, 1 on node1 and 2, 3 on node2: a node-shared copy on each
IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def mnist_data(root: Path) -> dict:
    return {"name": "mnist", "root": str(root), "partition": "dirichlet", "alpha": 1.0}


def run_pairs(cluster, args: list[str], mounts: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(two_node_command(cluster, args, PAIRS), cwd=REPO, env=two_node_env(mounts),
                          capture_output=True, text=True, timeout=timeout)


# Loaded by every rank (PYTHONPATH) in the share_data test: a Python audit hook that logs each
# open of a file under the data root with the rank's host name. Unlike inotify, whose identical
# events coalesce when two ranks open a file at once, it sees every open.
OPEN_LOGGER = """\
import os, socket, sys
_log, _root = os.environ.get("FEDMPI_TEST_OPEN_LOG"), os.environ.get("FEDMPI_TEST_OPEN_ROOT")
if _log and _root:
    def _logged(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(_root):
            fd = os.open(os.path.join(_log, f"{socket.gethostname()}-{os.getpid()}"),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, (os.path.basename(args[0]) + "\\n").encode())
            os.close(fd)
    sys.addaudithook(_logged)
"""


class FileOpens:
    """Opens of files under ``root`` by the ranks started with ``env()``'s variables, counted per
    (host, file name) from the logs OPEN_LOGGER writes."""

    def __init__(self, work: Path, root: Path):
        self.hook, self.logs, self.root = work / "open_hook", work / "open_logs", root
        self.hook.mkdir(exist_ok=True)
        (self.hook / "sitecustomize.py").write_text(OPEN_LOGGER)

    def env(self) -> dict:
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir()
        pythonpath = os.pathsep.join([str(self.hook), env()["PYTHONPATH"]])
        return {"PYTHONPATH": pythonpath, "FEDMPI_TEST_OPEN_LOG": str(self.logs),
                "FEDMPI_TEST_OPEN_ROOT": str(self.root)}

    def take(self) -> collections.Counter:
        opened = collections.Counter()
        for log in self.logs.iterdir():
            host = log.name.rsplit("-", 1)[0]
            for name in log.read_text().split():
                opened[host, name] += 1
        return opened


def shared_data_segments(cluster, node: str, size: range) -> dict[int, set]:
    """For each fedmpi rank on ``node``: the shared memory mappings (``/proc/<pid>/maps``: mode
    ``s``) whose length lies in ``size``, as (device, inode) pairs."""
    segments = {}
    for pid in fedmpi_ranks_on(cluster, node):
        found = set()
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if fields[1].endswith("s") and high - low in size:
                found.add((fields[3], fields[4]))
        segments[pid] = found
    return segments


def test_share_data_reads_the_data_set_once_on_each_node_with_the_bits_of_every_rank_reading_it(cluster, work):
    """Each node sees its own copy of the data directory (bind-mounted over the config's
    data.root by the launcher), so the opens of each copy are that node's reads. With
    ``mpi.share_data`` each node's files are opened once (one reader for its two ranks) and, during
    the run, both ranks of a node map one shared memory segment of the data's size, another one
    than the other node's; with it off, each file is opened twice (which shows the count sees every
    rank's reads) and no rank maps such a segment. The results are identical."""
    copies = {node: write_idx(work / f"mnist_{node}") for node in (NODE1, NODE2)}
    root = work / "mnist_root"                  # empty here; each node mounts its copy over it
    root.mkdir()
    mounts = {node: [(copy, root)] for node, copy in copies.items()}
    rounds = 8                                  # time to read the ranks' maps after round 1
    config = write_config(work / "share.yaml", rounds=rounds,
                          data=mnist_data(root))
    # the images as float32 (180 train + 60 test, 1x28x28), plus the labels and page rounding
    images = (180 + 60) * 28 * 28 * 4
    window = range(images, images + 64 * 1024)
    opens = FileOpens(work, root)
    results, counted, mapped = {}, {}, {}
    for share in ("true", "false"):
        out = work / f"share_{share}.h5"
        run = TwoNodeRun(cluster, ["run", str(config), "--out", str(out), "--progress",
                                   "--set", f"mpi.share_data={share}"], PAIRS, mounts, extra_env=opens.env())
        try:
            run.wait_for_line(rf"^round 1/{rounds}", timeout=90)
            mapped[share] = {node: shared_data_segments(cluster, node, window) for node in (NODE1, NODE2)}
            rc, stderr = run.finish(timeout=90)
        finally:
            run.kill()
        assert rc == 0, stderr[-3000:]
        counted[share] = opens.take()
        results[share] = read_results(out)
    print(f"opens: { {share: sorted(c.items()) for share, c in counted.items()} }; segments: {mapped}")
    for share, readers in (("true", 1), ("false", 2)):
        for node in copies:
            seen = {name: n for (host, name), n in counted[share].items() if host == node}
            assert seen == dict.fromkeys(IDX_FILES, readers), (share, node, seen)
    node_segments = []
    for node in (NODE1, NODE2):
        ranks = mapped["true"][node]
        assert len(ranks) == 2, (node, ranks)
        assert all(len(found) == 1 for found in ranks.values()), (node, ranks)
        assert len(set.union(*ranks.values())) == 1, (node, ranks)       # the same segment in both
        node_segments.append(set.union(*ranks.values()))
        assert not set.union(*mapped["false"][node].values()), (node, mapped["false"][node])
    assert node_segments[0] != node_segments[1]
    assert int(results["true"]["attrs"]["mpi_size"]) == 4
    assert {2, 3} & set(results["true"]["clients"]["rank"].tolist())      # node2's ranks trained
    assert_all_columns_identical(results["true"], results["false"], "share_data true vs false on two nodes")


def test_a_data_root_missing_on_node2_only_stops_every_rank_with_status_2_naming_node2(cluster, work):
    """node2 gets an empty tmpfs over the data root's parent: the root is missing there only.
    Every rank stops with status 2 before round 1, and the message says on which node and which
    path."""
    hidden = work / "hidden_on_node2"
    root = write_idx(hidden / "mnist")
    config = write_config(work / "missing_on_node2.yaml", data=mnist_data(root))
    out = work / "missing_on_node2.h5"
    started = time.monotonic()
    proc = run_pairs(cluster, ["run", str(config), "--out", str(out), "--progress"],
                     {NODE2: [("tmpfs", hidden)]}, timeout=90)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("fedmpi: ")]
    assert len(message) == 1, proc.stderr[-3000:]
    assert NODE2 in message[0] and str(root) in message[0] and "does not exist" in message[0], message
    assert NODE1 not in message[0]
    assert "round 1" not in proc.stderr + proc.stdout
    assert not out.exists()
    assert not fedmpi_ranks_on(cluster, NODE1) + fedmpi_ranks_on(cluster, NODE2)
    print(f"status 2 after {seconds:.1f} s: {message[0]}")
