"""Every tiered method keeps fedmpi's two run-level promises: per-round metrics identical bit for
bit at P = 1, 2 and 4, and a run killed with SIGKILL that resumes from its checkpoint ends
identical to the uninterrupted run. HypeMeFed's own tests (test_hypemefed.py) and the extension
tests (test_extensions.py: DepthFL and HeteroFL) check the rank counts of theirs; here the rest,
and the SIGKILL + ``--resume`` of every tiered method but HypeMeFed (whose test also checks its
saved hypernetworks)."""
from __future__ import annotations

import os
import signal

import pytest

from helpers import (Streaming, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results)

pytestmark = pytest.mark.slow     # end-to-end runs (tiered_runs)

RANK_COUNTS_ELSEWHERE = {"hypemefed", "depthfl", "heterofl"}
TIERED = ["hypemefed", "depthwise_avg", "depthfl", "fedavg_s", "fedavg_capable", "fedavg", "heterofl", "scalefl"]


@needs_mpiexec
@pytest.mark.parametrize("algorithm", [a for a in TIERED if a not in RANK_COUNTS_ELSEWHERE])
def test_identical_for_1_2_4_ranks(tiered_runs, algorithm):
    _, base = tiered_runs(algorithm, 1)
    # fedavg_capable: only the clients of the deepest tier train; fedavg (the upper bound) has no tiers
    if algorithm != "fedavg":
        assert set(base["clients"]["tier"].tolist()) == ({3} if algorithm == "fedavg_capable" else {1, 2, 3})
    for ranks in (2, 4):
        _, other = tiered_runs(algorithm, ranks)
        assert_all_columns_identical(base, other, f"{algorithm} P=1 vs P={ranks}")


RESUME = ["--set", "rounds=5", "--set", "local.epochs=2", "--set", "checkpoint.every=1"]


@pytest.mark.parametrize("algorithm", [a for a in TIERED if a != "hypemefed"])
def test_sigkill_then_resume_is_bit_identical(tiered_cfg, tmp_path, algorithm):
    args = ["run", str(tiered_cfg), "--set", f"algorithm={algorithm}", *RESUME]
    reference = tmp_path / "reference.h5"
    proc, _ = fedmpi([*args, "--out", str(reference), "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed.h5"
    run = Streaming([*args, "--out", str(out), "--progress"])
    try:
        run.wait_for_line(r"^round 2/5", timeout=240)
        if run.proc.poll() is not None:
            pytest.fail("the run finished before it could be killed; make rounds slower")
        os.kill(run.proc.pid, signal.SIGKILL)
        rc, _ = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == -signal.SIGKILL
    assert out.with_suffix(".ckpt").exists()
    assert "finished" not in read_results(out)["attrs"]

    proc, _ = fedmpi([*args, "--out", str(out), "--quiet", "--resume"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(out)
    assert "finished" in resumed["attrs"] and not out.with_suffix(".ckpt").exists()
    assert_all_columns_identical(read_results(reference), resumed, f"{algorithm} resumed after SIGKILL")
