"""Campaigns on a real (single-node, throw-away) SLURM cluster: array job, re-submission, srun
launch, requeue after the time-limit warning, cancellation.

Starts the cluster when this machine allows it (root; slurm-wlm and munge installable); otherwise
skips with the reason. Run alone with ``pytest -m slurm -s`` to see the timings.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest
import yaml

from slurm_cluster import SlurmCluster, unavailable_reason

from fedmpi.campaigns import load_campaign, run_name
from fedmpi.results import run_status

# one worker runs them all (make test: --dist loadgroup), rather than workers queueing on the cluster's lock
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm_cluster")]
REPO = Path(__file__).resolve().parent.parent
TINY_CAMPAIGN = REPO / "examples" / "campaign-tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    if int(os.environ.get("PMI_SIZE", "1")) > 1:
        pytest.skip("one SLURM cluster per machine: not under mpiexec")
    # one cluster at a time (fixed ports): another pytest-xdist worker's waits for this one to stop
    with open(Path(tempfile.gettempdir()) / "fedmpi-slurm-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        yield from _cluster()


def _cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    with SlurmCluster() as slurm:
        print(f"\nSLURM cluster up in {time.monotonic() - started:.1f} s")
        yield slurm


def sweep(cluster, campaign: Path, *args: str, timeout: float = 110) -> subprocess.CompletedProcess:
    """``fedmpi sweep CAMPAIGN ARGS`` as a user would type it, talking to the test cluster."""
    command = [sys.executable, "-m", "fedmpi", "sweep", str(campaign), *args]
    result = subprocess.run(command, cwd=campaign.parent, env={**cluster.env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=timeout)
    print(result.stdout, result.stderr, sep="\n")
    return result


def test_tiny_campaign_completes_as_array_job_and_resubmitting_runs_nothing(cluster, tmp_path):
    campaign_file = tmp_path / "campaign.yaml"
    spec = yaml.safe_load(TINY_CAMPAIGN.read_text())
    spec["results_dir"] = "results"
    campaign_file.write_text(yaml.safe_dump(spec))
    campaign = load_campaign(campaign_file)
    assert len(campaign.runs) == 3

    started = time.monotonic()
    first = sweep(cluster, campaign_file, "--slurm", "--wait")
    job_seconds = time.monotonic() - started
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "results" / "slurm").glob("*.out")))
    assert first.returncode == 0, f"{first.stderr}\n{logs}\n{cluster.logs()}"
    assert "submitted array job" in first.stdout
    assert [run_status(run.result) for run in campaign.runs] == ["finished"] * 3, logs
    tables = list((tmp_path / "results" / "slurm").glob("*.tasks"))
    assert len(tables) == 1
    assert len(list((tmp_path / "results" / "slurm").glob("*.out"))) == 3
    print(f"3-run array job submitted and finished in {job_seconds:.1f} s")

    again = sweep(cluster, campaign_file, "--slurm")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert "submitted" not in again.stdout
    assert list((tmp_path / "results" / "slurm").glob("*.tasks")) == tables


SIGNALLED_ROUNDS = 200


def one_run_campaign(tmp_path: Path, name: str, rounds: int = SIGNALLED_ROUNDS, mpi: str = "mpiexec"):
    """A campaign of one run; 200 rounds (a few seconds) are long enough to signal it while it trains."""
    spec = yaml.safe_load(TINY_CAMPAIGN.read_text())
    del spec["grid"], spec["runs"]
    spec.update(name=name, results_dir="results", set={"rounds": rounds})
    spec["slurm"]["mpi"] = mpi
    campaign_file = tmp_path / "campaign.yaml"
    campaign_file.write_text(yaml.safe_dump(spec))
    (run,) = load_campaign(campaign_file).runs
    return campaign_file, run


def signal_when_training(cluster, run, job_name: str, *scancel_args: str) -> None:
    """Once rounds are being appended (so every rank handles SIGTERM), scancel the job's task."""
    deadline = time.monotonic() + 60
    while not run.result.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    created = run.result.stat().st_mtime_ns
    while run.result.stat().st_mtime_ns == created and time.monotonic() < deadline:
        time.sleep(0.1)
    task = subprocess.run(["squeue", "-h", "--name", job_name, "-o", "%i"],
                          env=cluster.env, capture_output=True, text=True).stdout.split()
    assert len(task) == 1, task
    subprocess.run(["scancel", *scancel_args, task[0]], env=cluster.env, check=True)


def test_ranks_started_by_srun(cluster, tmp_path):
    """`mpi: srun`: the ranks start as srun tasks (--mpi=pmi2) and see each other."""
    campaign_file, run = one_run_campaign(tmp_path, "srun", rounds=3, mpi="srun")
    result = sweep(cluster, campaign_file, "--slurm", "--wait")
    assert result.returncode == 0, result.stderr
    with h5py.File(run.result, "r") as f:
        assert "finished" in f.attrs and f.attrs["mpi_size"] == 2


def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """SIGUSR1 to the batch shell, as --signal=B:USR1@120 sends before the time limit: the run
    checkpoints and exits 75, the task requeues itself, and the next attempt finishes the run."""
    campaign_file, run = one_run_campaign(tmp_path, "preempt")
    command = [sys.executable, "-m", "fedmpi", "sweep", str(campaign_file), "--slurm", "--wait"]
    started = time.monotonic()
    sweeper = subprocess.Popen(command, cwd=tmp_path, env={**cluster.env, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        signal_when_training(cluster, run, "fedmpi-preempt", "--batch", "--signal=USR1")
        output, _ = sweeper.communicate(timeout=100)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    print(output)
    print(f"time-limited run requeued and finished in {time.monotonic() - started:.1f} s")

    log = "\n".join(p.read_text() for p in (tmp_path / "results" / "slurm").glob("*.out"))
    assert sweeper.returncode == 0, f"{output}\n{log}"
    assert "checkpoint written" in log and "requeueing" in log and "(attempt 2)" in log, log
    assert run_status(run.result) == "finished"
    with h5py.File(run.result, "r") as f:
        assert list(f["rounds/round"][:]) == list(range(1, SIGNALLED_ROUNDS + 1))
    assert not run.result.with_suffix(".ckpt").exists()


def test_cancelled_task_stays_cancelled(cluster, tmp_path):
    """scancel: the run checkpoints and exits 75, but the task is not requeued. (And while the
    job is queued, the campaign is not submitted a second time.)"""
    campaign_file, run = one_run_campaign(tmp_path, "cancel")
    submitted = sweep(cluster, campaign_file, "--slurm")
    assert submitted.returncode == 0, submitted.stderr
    twice = sweep(cluster, campaign_file, "--slurm")
    assert twice.returncode == 1 and "still queued or running" in twice.stderr
    signal_when_training(cluster, run, "fedmpi-cancel")
    (log,) = (tmp_path / "results" / "slurm").glob("*.out")
    deadline = time.monotonic() + 60
    while "exited with status" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert "exited with status 75" in text and "requeueing" not in text, text
    queue = subprocess.run(["squeue", "-h", "--name", "fedmpi-cancel", "-t", "PENDING"],
                           env=cluster.env, capture_output=True, text=True).stdout
    assert not queue.strip(), queue
    assert run_status(run.result) == "partial"
    assert run.result.with_suffix(".ckpt").exists()


def test_dependent_array_job_waits_for_its_producers_and_takes_their_final_density(cluster,
                                                                                 tmp_path):
    """IMP takes SNIP's final density (from_run): a second array job, --dependency=afterok on the
    SNIP tasks; each IMP task reads the value of its seed when it starts. A producer that fails
    (its data directory is missing: exit 2 when it starts; its config passes the sweep's check)
    gets its dependents cancelled (--kill-on-invalid-dep)."""
    spec = yaml.safe_load(TINY_CAMPAIGN.read_text())
    del spec["grid"]
    take = {"from_run": "algorithm=snip_snip.density=0.3", "column": "density"}
    spec.update(name="depends", results_dir="results", seeds=[0, 1], runs=[
        {"algorithm": "imp", "imp.prunes": 1, "imp.every": 1, "imp.density": take},
        {"algorithm": "snip", "snip.density": 0.3}])
    campaign_file = tmp_path / "campaign.yaml"
    campaign_file.write_text(yaml.safe_dump(spec))
    campaign = load_campaign(campaign_file)

    done = sweep(cluster, campaign_file, "--slurm", "--wait")
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "results" / "slurm").glob("*.out")))
    assert done.returncode == 0, f"{done.stderr}\n{logs}\n{cluster.logs()}"
    assert "(2 tasks, after 2 producer task(s) succeed)" in done.stdout
    assert all(run_status(run.result) == "finished" for run in campaign.runs), logs
    for seed in (0, 1):
        with h5py.File(tmp_path / "results" / f"algorithm=snip_snip.density=0.3_seed={seed}.h5") as f:
            density = float(f["rounds/density"][-1])
        with h5py.File(tmp_path / "results" / f"algorithm=imp_imp.every=1_imp.prunes=1_seed={seed}.h5") as f:
            assert json.loads(f.attrs["config"])["imp"]["density"] == density

    no_data = {"data.name": "fashion_mnist", "data.partition": "iid", "data.root": "/nonexistent"}
    spec.update(name="depends-failed", results_dir="failed", seeds=[0], runs=[
        {"algorithm": "imp", "imp.density": {**take, "from_run": run_name(
            {"algorithm": "snip", "snip.density": 0.3, **no_data})}},
        {"algorithm": "snip", "snip.density": 0.3, **no_data}])
    campaign_file.write_text(yaml.safe_dump(spec))
    failed = sweep(cluster, campaign_file, "--slurm", "--wait")
    assert failed.returncode == 1, failed.stdout
    assert not (tmp_path / "failed" / "algorithm=imp_seed=0.h5").exists()
    assert len(list((tmp_path / "failed" / "slurm").glob("*.out"))) == 1   # the IMP task never ran
