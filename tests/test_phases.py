"""``FEDMPI_PHASE_TIMES=1`` (fedmpi/engine/phases.py): every rank reports where each round went,
and the phases of rank 0 add up to the round time in the results file."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from helpers import REPO, command, env, needs_mpiexec, read_results, write_config

pytestmark = pytest.mark.slow     # every test is an end-to-end run of several seconds

LINE = re.compile(r"^fedmpi phases rank (\d+): (.*)$", re.MULTILINE)


def run_with_phases(tmp_path, ranks: int, enabled: bool = True, **changes):
    cfg = write_config(tmp_path / "cfg.yaml", **changes)
    out = tmp_path / "run.h5"
    extra = {"FEDMPI_PHASE_TIMES": "1"} if enabled else {}
    proc = subprocess.run(command(["run", str(cfg), "--out", str(out), "--quiet"], ranks), cwd=REPO,
                          env={**env(), **extra}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(rank): json.loads(rounds) for rank, rounds in LINE.findall(proc.stderr)}, read_results(out)


@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=needs_mpiexec)])
def test_every_rank_reports_each_round_and_rank_0_adds_up_to_the_round_time(tmp_path, ranks):
    phases, results = run_with_phases(tmp_path, ranks, aggregation={"sum": "fixed_point", "where": "workers"})
    assert sorted(phases) == list(range(ranks))
    wall = results["rounds"]["wall_seconds"]
    for rank, rounds in phases.items():
        assert len(rounds) == len(wall) == 3
        assert all(seconds >= 0 for r in rounds for seconds in r.values())
        expected = {"train", "sum: scales", "sum: partial sums"} if (rank > 0 or ranks == 1) else \
            {"prepare", "send", "wait for reports", "sum: max-reduce", "merge", "write results"}
        assert expected <= set(rounds[0]), (rank, rounds[0])
    for r, seconds in zip(phases[0], wall):
        # rank 0's round: every phase but the results writing, which follows the timed round
        inside = sum(v for k, v in r.items() if k != "write results")
        assert abs(inside - seconds) <= 0.005 + 0.05 * seconds, (r, seconds)


def test_off_by_default(tmp_path):
    phases, _ = run_with_phases(tmp_path, 1, enabled=False)
    assert phases == {}
