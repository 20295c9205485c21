"""SLURM across the namespace cluster (tests/cluster): slurmctld in the root namespace, a slurmd in
each node, ``fedmpi sweep --slurm`` submitting runs whose ranks SLURM places on both nodes.

- a campaign with ``slurm: {nodes: 2, tasks_per_node: 2, mpi: srun}`` runs FedDST with two ranks
  on each node, started by ``srun --mpi=pmi2``, bit-identical to the same run on one node;
- with the default launcher (MPICH's mpiexec inside the allocation, its proxies started by srun),
  SIGKILL of the rank on node2 fails the array task promptly, the log naming the rank, the results
  file readable; ``scontrol requeue`` of the failed task starts attempt 2, which resumes from the
  checkpoint and ends bit-identical to the uninterrupted run on one node.
Needs root, ``ip netns``, ``tc``, mpiexec and Debian's slurm-wlm and munge; skipped otherwise.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster import netns_cluster, netns_slurm
from helpers import (REPO, TINY, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results,
                     write_config)
from test_two_nodes import FEDDST, fedmpi_ranks_on

UNAVAILABLE = netns_cluster.unavailable_reason() or netns_slurm.unavailable_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("namespace_cluster"),   # one worker, one cluster (make test: --dist loadgroup)
    needs_mpiexec,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no SLURM on a namespace cluster here: {UNAVAILABLE}"),
]
NODE1, NODE2 = netns_cluster.NODES


@pytest.fixture(scope="module")
def cluster():
    with netns_cluster.NetnsCluster(rate="1gbit") as made:
        yield made


@pytest.fixture(scope="module")
def slurm(cluster):
    with netns_slurm.NetnsSlurm(cluster) as started:
        yield started


def campaign_file(path: Path, name: str, config: dict, ranks: int, slurm: dict) -> Path:
    """A campaign of one run (seed 0) of ``config``."""
    spec = {"name": name, "config": config, "ranks": ranks, "seeds": [0], "results_dir": "results",
            "runs": [{}], "slurm": {"time": "00:05:00", **slurm}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "campaign.yaml").write_text(yaml.safe_dump(spec))
    return path / "campaign.yaml"


def sweep(slurm, campaign: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``fedmpi sweep CAMPAIGN --slurm ARGS`` as a user would type it, on the namespace cluster. The
    ranks reach each other over the nodes' links with UCX's TCP transport."""
    environment = {**slurm.env, **netns_cluster.MPI_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fedmpi", "sweep", str(campaign), "--slurm", *args],
                          cwd=campaign.parent, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def task_logs(campaign: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((campaign.parent / "results" / "slurm").glob("*.out")))


def one_node_run(work: Path, name: str, config: dict, ranks: int) -> dict:
    out = work / f"{name}_one_node.h5"
    proc, _ = fedmpi(["run", str(write_config(work / f"{name}.yaml", **config)), "--out", str(out), "--quiet"],
                     ranks=ranks, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)


def only_result(campaign: Path) -> Path:
    (result,) = (campaign.parent / "results").glob("*.h5")
    return result


def test_a_slurm_job_on_two_nodes_runs_its_steps_inside_each_node(cluster, slurm):
    """``sbatch -N 2`` allocates both nodes and ``srun`` starts a task in each, which sees the
    node's name and address."""
    script = slurm.base / "hostnames.sh"
    script.write_text("#!/bin/sh\necho \"nodes $SLURM_JOB_NODELIST\"\n"
                      "srun sh -c 'echo \"$(hostname) $(ip -o -4 addr show fedmpi-eth0 | awk \"{print \\$4}\")\"'\n")
    out = slurm.base / "hostnames.out"
    proc = subprocess.run(["sbatch", "-N", "2", "--wait", "-o", str(out), str(script)], env=slurm.env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, slurm.logs())
    lines = out.read_text().splitlines()
    assert lines[0] == "nodes fedmpi-node[1-2]", lines
    assert sorted(lines[1:]) == [f"{node} {netns_cluster.node_address(i)}/24" for i, node in enumerate((NODE1, NODE2))]


def test_feddst_swept_onto_two_nodes_by_srun_matches_one_node(cluster, slurm, tmp_path):
    config = {**TINY, **FEDDST, "rounds": 5}
    campaign = campaign_file(tmp_path / "srun", "feddst-two-nodes", config, ranks=4,
                             slurm={"nodes": 2, "tasks_per_node": 2, "mpi": "srun"})
    before = cluster.link_bytes(NODE2)
    started = time.monotonic()
    result = sweep(slurm, campaign, "--wait")
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{task_logs(campaign)}\n{slurm.logs()}"
    crossed = cluster.link_bytes(NODE2) - before
    two_nodes = read_results(only_result(campaign))
    assert "finished" in two_nodes["attrs"] and two_nodes["attrs"]["mpi_size"] == 4
    assert_all_columns_identical(one_node_run(tmp_path, "feddst", config, 4), two_nodes, "srun on two nodes")
    # node2's two ranks exchanged their model traffic over its link, not through shared memory
    node2_payload = int(np.sum(two_nodes["clients"]["upload_bytes"][two_nodes["clients"]["rank"] >= 2]))
    assert crossed >= node2_payload > 0, (crossed, node2_payload)
    print(f"sweep --slurm on 2 nodes x 2 ranks (srun --mpi=pmi2): {seconds:.1f} s; {crossed} bytes "
          f"crossed node2's link, node2's ranks uploaded {node2_payload}")


def wait_for_rounds(path: Path, rounds: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                if len(read_results(path)["rounds"]["round"]) >= rounds:
                    return
            except (OSError, KeyError):
                pass
        time.sleep(0.2)
    pytest.fail(f"{path} did not reach round {rounds} in {timeout} s")


def job_states(slurm, name: str) -> list[str]:
    shown = subprocess.run(["squeue", "-h", "--name", name, "-o", "%i %T"], env=slurm.env,
                           capture_output=True, text=True)
    return shown.stdout.split()


def wait_until_gone(slurm, name: str, timeout: float) -> float:
    started = time.monotonic()
    while job_states(slurm, name):
        assert time.monotonic() - started < timeout, f"job {name} still queued after {timeout} s: {slurm.logs()}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_sigkill_on_node2_fails_the_task_and_a_requeue_resumes_it_bit_identically(cluster, slurm, tmp_path):
    config = {**TINY, "rounds": 20, "checkpoint": {"every": 1},
              "local": {"epochs": 4, "batch_size": 16, "lr": 0.05}}
    campaign = campaign_file(tmp_path / "kill", "killed-two-nodes", config, ranks=3, slurm={"nodes": 2})
    job = "fedmpi-killed-two-nodes"
    submitted = sweep(slurm, campaign)
    assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}"
    result = campaign.parent / "results" / "seed=0.h5"
    wait_for_rounds(result, 2, timeout=90)
    remote = fedmpi_ranks_on(cluster, NODE2)
    assert len(remote) == 1, (remote, task_logs(campaign))       # ranks 0, 1 on node1; rank 2 on node2
    os.kill(remote[0], signal.SIGKILL)
    ended_after = wait_until_gone(slurm, job, timeout=30)
    log = task_logs(campaign)
    assert ended_after < 15, (ended_after, log)
    # the process manager names the dead process by host and PID; fedmpi's placement line, written
    # when the ranks span hosts, says which rank that is
    assert f"{NODE2}: rank 2 (pid {remote[0]})" in log, log
    assert f"PID {remote[0]} RUNNING AT {NODE2}" in log, log
    assert "exited with status 0" not in log, log
    partial = read_results(result)
    assert "finished" not in partial["attrs"]
    done = len(partial["rounds"]["round"])
    assert 2 <= done < 20, done
    np.testing.assert_array_equal(partial["rounds"]["round"], np.arange(1, done + 1))

    # the requeue path: the failed array task goes back to the queue and runs its line again
    job_id = submitted.stdout.split("submitted array job ", 1)[1].split()[0]
    subprocess.run(["scontrol", "requeue", f"{job_id}_0"], env=slurm.env, check=True, capture_output=True)
    wait_until_gone(slurm, job, timeout=90)
    log = task_logs(campaign)
    assert "(attempt 2)" in log and "exited with status 0" in log, log
    resumed = read_results(result)
    assert "finished" in resumed["attrs"]
    assert_all_columns_identical(one_node_run(tmp_path, "killed", config, 3), resumed,
                                 "killed on node2, requeued, resumed")
    print(f"task failed {ended_after:.1f} s after the SIGKILL (round {done} of 20 written); attempt 2 "
          f"resumed and matched the one-node run")
