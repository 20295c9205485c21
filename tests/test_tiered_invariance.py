"""Every tiered method keeps fedmpi's two run-level promises: per-round metrics identical bit for
bit at P = 1, 2 and 4, and a run killed with SIGKILL that resumes from its checkpoint ends
identical to the uninterrupted run. HypeMeFed's own tests (test_hypemefed.py) check both for it
(with its saved hypernetworks); the extension tests (test_extensions.py) check DepthFL's and
HeteroFL's P = 1, 2, 4. Here every other tiered method, in one chain of runs per method: the
session's P = 1 run is the reference; a P = 1 run killed after its first round resumes on 2 ranks
(the resumed round is P = 2's) and the whole run on 4 ranks comes from the session's runs."""
from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import (TIERED, Streaming, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results)

pytestmark = pytest.mark.slow     # end-to-end runs (tiered_runs)

RANK_COUNTS_ELSEWHERE = {"depthfl", "heterofl"}
TIERED_METHODS = ["depthwise_avg", "depthfl", "fedavg_s", "fedavg_capable", "fedavg", "heterofl", "scalefl"]


@needs_mpiexec
@pytest.mark.parametrize("algorithm", TIERED_METHODS)
def test_killed_run_resumed_on_2_ranks_and_a_4_rank_run_match_1_rank(tiered_runs, tiered_cfg, tmp_path,
                                                                     algorithm):
    _, base = tiered_runs(algorithm, 1)
    # fedavg_capable: only the clients of the deepest tier train; fedavg (the upper bound) has no tiers
    if algorithm != "fedavg":
        assert set(base["clients"]["tier"].tolist()) == ({3} if algorithm == "fedavg_capable" else {1, 2, 3})

    args = ["run", str(tiered_cfg), "--set", f"algorithm={algorithm}", "--set", "checkpoint.every=1"]
    out = tmp_path / "killed.h5"
    run = Streaming([*args, "--out", str(out), "--progress"])
    try:
        run.wait_for_line(rf"^round 1/{TIERED['rounds']}", timeout=240)
        # the progress line comes before the round's checkpoint (written atomically, by rename)
        deadline = time.monotonic() + 60
        while not out.with_suffix(".ckpt").exists() and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if run.proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; make rounds slower")
        os.kill(run.proc.pid, signal.SIGKILL)
        rc, _ = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == -signal.SIGKILL
    assert out.with_suffix(".ckpt").exists()
    assert "finished" not in read_results(out)["attrs"]

    proc, _ = fedmpi([*args, "--out", str(out), "--quiet", "--resume"], 2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(out)
    assert "finished" in resumed["attrs"] and not out.with_suffix(".ckpt").exists()
    assert_all_columns_identical(base, resumed, f"{algorithm} killed at P=1, resumed at P=2")

    if algorithm not in RANK_COUNTS_ELSEWHERE:
        _, other = tiered_runs(algorithm, 4)
        assert_all_columns_identical(base, other, f"{algorithm} P=1 vs P=4")
