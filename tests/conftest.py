"""Fixtures shared by the test modules, and the markers' meaning.

Markers (registered in pyproject.toml):
  slow   an end-to-end run (``python -m fedmpi`` in subprocesses) of more than a few seconds;
         ``make test-unit`` leaves these out
  mpi    runs inside ``mpiexec -n 2`` / ``-n 4`` with pytest-mpi (``--with-mpi``): ``make test-mpi``
  slurm  starts a single-node SLURM cluster

mpiexec is found once, in helpers.find_mpiexec: ``$MPIEXEC`` (the Makefile passes its own), else
the venv's, else the one on PATH. The end-to-end runs that several modules share run once per
session here (``tiny_runs``, ``tiered_runs``).
"""
from __future__ import annotations

import hashlib
import json

import pytest

from helpers import MPIEXEC, TIERED, fedmpi, read_results, write_config, write_idx


def pytest_report_header(config):
    return f"mpiexec: {MPIEXEC or 'none found: runs on several ranks are skipped'}"


SHARED_RUNS = {"tiny_runs", "tiered_runs"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A test that uses the shared end-to-end runs below (even through another fixture) is slow,
    marked or not: ``-m "not slow"`` never starts them."""
    for item in items:
        if SHARED_RUNS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """``tiny_runs(*sets, ranks=1, **changes)``: ``fedmpi run`` of helpers.TINY with top-level keys
    replaced by ``changes`` and ``--set`` each of ``sets``; (results path, results, CompletedProcess).

    Each resolved config runs at most once per session and rank count, whichever module asks
    first: test_run's FedAvg on one rank and test_partial_sums' float64 sum on the server (the
    defaults) are one run. Read-only: a test that changes a results file makes its own run."""
    from fedmpi.config import load_config

    work = tmp_path_factory.mktemp("tiny_runs")
    cache: dict = {}

    def get(*sets: str, ranks: int = 1, timeout: float = 240, **changes):
        config = write_config(work / f"tiny_{_digest(changes)}.yaml", **json.loads(json.dumps(changes)))
        resolved = load_config(config, list(sets))
        key = (_digest(resolved), ranks)
        if key not in cache:
            out = work / f"run_{key[0]}_p{ranks}.h5"
            args = ["run", str(config), "--out", str(out), "--quiet"]
            for setting in sets:
                args += ["--set", setting]
            proc, _ = fedmpi(args, ranks, timeout=timeout)
            assert proc.returncode == 0, f"{sets} {changes} P={ranks} failed:\n{proc.stderr[-3000:]}"
            cache[key] = (out, read_results(out), proc)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiered_cfg(tmp_path_factory):
    """helpers.TIERED (multiexit_vgg, 9 clients in 3 tiers) on a small MNIST-format dataset."""
    import yaml

    work = tmp_path_factory.mktemp("tiered")
    cfg = dict(TIERED, data={**TIERED["data"], "root": str(write_idx(work / "mnist"))})
    path = work / "tiered.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiered_runs(tmp_path_factory, tiered_cfg):
    """``tiered_runs(algorithm, ranks, script=None)``: ``fedmpi run`` of ``tiered_cfg`` with
    ``algorithm`` on ``ranks`` ranks, through the Python source ``script`` (which registers its own
    algorithm classes and calls fedmpi.cli.main) if given; (results path, results), each run at
    most once per session (test_extensions and test_hypemefed share them)."""
    work = tmp_path_factory.mktemp("tiered_runs")
    cache: dict = {}

    def get(algorithm: str, ranks: int, script: str | None = None):
        key = (algorithm, ranks, script)
        if key not in cache:
            name = f"{algorithm}_{_digest(script) if script else 'cli'}_p{ranks}"
            out = work / f"{name}.h5"
            args = ["run", str(tiered_cfg), "--out", str(out), "--quiet", "--set", f"algorithm={algorithm}"]
            if script:
                path = work / f"{name}.py"
                path.write_text(script)
                proc, _ = fedmpi([str(path), *args], ranks, timeout=300, module=False)
            else:
                proc, _ = fedmpi(args, ranks, timeout=300)
            assert proc.returncode == 0, f"{algorithm} P={ranks} failed:\n{proc.stderr[-3000:]}"
            cache[key] = (out, read_results(out))
        return cache[key]

    return get
