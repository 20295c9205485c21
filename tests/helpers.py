"""Helpers shared by the test modules: ``from helpers import fedmpi, read_results, ...``.

Test modules import from here (pytest puts ``tests/`` on ``sys.path``), never from one another;
the expensive end-to-end runs that several modules share are session fixtures in conftest.py.

- finding ``mpiexec`` (the one lookup of the test suite) and ``needs_mpiexec``;
- running ``python -m fedmpi`` in a subprocess (``fedmpi``, ``Streaming``, ``sigkill_and_resume``)
  and reading and comparing its results files;
- the tiny synthetic config (``TINY``) and the tiered multi-exit config (``TIERED``, ``write_idx``).
"""
from __future__ import annotations

import gzip
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def load_bench_script(name: str):
    """bench/<name>.py as a module (the benchmark scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ mpiexec
def find_mpiexec() -> str | None:
    """``$MPIEXEC`` if set (the Makefile passes its own choice: the venv's MPICH, or the cluster's
    under ``MPI=system``), else the ``mpiexec`` beside this Python (the venv's), else the one on
    PATH; None when there is none."""
    chosen = os.environ.get("MPIEXEC")
    if chosen:
        # a bare name is looked up on PATH; a path (the Makefile's .venv/bin/mpiexec) is made
        # absolute, as the runs start in other directories. Set but not found: used as given, so
        # the runs fail saying so instead of being skipped.
        if os.sep not in chosen:
            return shutil.which(chosen) or chosen
        return os.path.abspath(chosen)
    beside = Path(PY).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec found (set MPIEXEC)")


# ------------------------------------------------------------------------------ running fedmpi
TINY = {
    "data": {"name": "synthetic", "partition": "natural"},
    "model": "mlp",
    "clients": {"total": 8, "per_round": 4},
    "rounds": 3,
    "local": {"epochs": 1, "batch_size": 16, "lr": 0.05},
    "algorithm": "fedavg",
    "eval": {"every": 1},
}

# per-round metrics that must agree bit for bit whatever the rank count
ROUND_METRICS = ["round", "test_accuracy", "client_accuracy", "test_loss", "upload_bytes", "download_bytes",
                 "cum_upload_bytes", "cum_download_bytes", "density", "header_bytes", "train_flops"]
CLIENT_METRICS = ["round", "client_id", "num_samples", "train_loss", "upload_bytes", "download_bytes"]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["MPLBACKEND"] = "Agg"
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("SLURM_JOB_ID", None)
    return e


def command(args: list[str], ranks: int = 1, module: bool = True) -> list[str]:
    base = [PY, "-m", "fedmpi", *args] if module else [PY, *args]
    if ranks == 1:
        return base
    if MPIEXEC is None:
        pytest.skip("no mpiexec found (set MPIEXEC)")
    return [MPIEXEC, "-n", str(ranks), *base]


_zygote = None


def fedmpi(args: list[str], ranks: int = 1, timeout: float = 120, module: bool = True):
    """Run to completion; returns (CompletedProcess, seconds). On one rank the run is forked from
    a preloaded interpreter (zygote.py: it spares each run 1.2 s of imports) unless the tests'
    environment has changed since that interpreter started; on several ranks mpiexec starts them."""
    global _zygote
    started = time.monotonic()
    if ranks == 1:
        from zygote import Zygote

        if _zygote is None:
            _zygote = Zygote(PY, REPO, env())
        if _zygote.can_run_with(env()):
            return _zygote.run(args, module, timeout, env()), time.monotonic() - started
    proc = subprocess.run(command(args, ranks, module), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - started


def write_config(path: Path, **changes) -> Path:
    """TINY with whole top-level keys replaced by ``changes``, as a YAML file."""
    import yaml

    cfg = json.loads(json.dumps(TINY))
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_results(path: Path) -> dict:
    """Everything in a results file. SWMR first: a killed writer leaves the file flagged as open."""
    try:
        f = h5py.File(path, "r", swmr=True)
    except OSError:
        f = h5py.File(path, "r")
    with f:
        return {"attrs": {k: f.attrs[k] for k in f.attrs},
                "rounds": {k: f["rounds"][k][:] for k in f["rounds"]},
                "clients": {k: f["clients"][k][:] for k in f["clients"]}}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a.tobytes() == b.tobytes()


def assert_same_metrics(a: dict, b: dict, rounds=None, what=""):
    for name in ROUND_METRICS:
        x, y = a["rounds"][name], b["rounds"][name]
        if rounds is not None:
            x, y = x[:rounds], y[:rounds]
        assert same_bits(x, y), f"{what}rounds/{name}: {x} != {y}"
    for name in CLIENT_METRICS:
        x, y = a["clients"][name], b["clients"][name]
        assert same_bits(x, y), f"{what}clients/{name}: {x} != {y}"


# machine state and how the work was spread over the ranks, not results
TIMING_COLUMNS = {"wall_seconds", "cum_wall_seconds", "compute_seconds", "mpi_payload_bytes", "mpi_control_bytes",
                  "server_peak_rss_bytes", "rank"}


def assert_all_columns_identical(a: dict, b: dict, what: str):
    """Every column of both results bit for bit, timing and rank columns aside."""
    for group in ("rounds", "clients"):
        assert set(a[group]) == set(b[group])
        for name in a[group]:
            if name not in TIMING_COLUMNS:
                assert same_bits(a[group][name], b[group][name]), f"{what}: {group}/{name}"


def selected_clients(seed: int, round_: int, total: int, per_round: int) -> list[int]:
    """The server's client sampling, recomputed from (seed, round) as fedmpi.rng defines it."""
    from fedmpi import rng

    return sorted(int(c) for c in rng.generator(seed, rng.SAMPLING, round_).choice(total, size=per_round,
                                                                                   replace=False))


def mlp_parameter_count() -> int:
    from fedmpi.config import DEFAULTS
    from fedmpi.models import build_model

    syn = DEFAULTS["data"]["synthetic"]
    model = build_model("mlp", (syn["dim"],), syn["classes"])
    return sum(p.numel() for p in model.parameters())


# Many short CLI invocations share one interpreter (each would otherwise pay the torch import):
# the script calls fedmpi.cli.main -- what ``python -m fedmpi`` runs -- once per argv.
BATCH_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from fedmpi.cli import main

    results = []
    for argv in json.loads(open(sys.argv[1]).read()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code
        results.append({"rc": rc, "stderr": err.getvalue()})
    print(json.dumps(results))
""")


# ------------------------------------------------------------------------------ runs in the background
class Streaming:
    """A run in the background whose stderr lines arrive on a queue (readline would block)."""

    def __init__(self, args, ranks: int = 1):
        self.proc = subprocess.Popen(command(args, ranks), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no line matching {pattern!r} within {timeout}s: {''.join(self.seen)}")
            if line is None:
                pytest.fail(f"run ended (rc={self.proc.wait()}) before {pattern!r}: {''.join(self.seen)}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not end within {timeout}s")
        while True:
            try:
                line = self.lines.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
        return rc, "".join(self.seen)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sigkill_and_resume(config, work, args, kill_after: str) -> tuple[dict, dict]:
    """Run ``config`` once uninterrupted and once SIGKILLed when ``kill_after`` (a progress-line
    pattern) is printed, then resumed; returns (uninterrupted results, resumed results)."""
    reference = work / "resume_reference.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(reference), "--quiet", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = work / "resume_killed.h5"
    run = Streaming(["run", str(config), "--out", str(killed), "--progress", *args])
    run.wait_for_line(kill_after, timeout=240)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before it could be killed")
    os.kill(run.proc.pid, signal.SIGKILL)
    rc, _ = run.finish(timeout=30)
    assert rc == -signal.SIGKILL
    proc, _ = fedmpi(["run", str(config), "--out", str(killed), "--quiet", "--resume", *args], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(killed)
    assert "finished" in resumed["attrs"] and "resumed" in resumed["attrs"]
    return read_results(reference), resumed


# ------------------------------------------------------------------------------ tiered multi-exit runs
TIERED = {
    "seed": 2, "rounds": 2, "model": "multiexit_vgg",
    "data": {"name": "mnist", "partition": "dirichlet", "alpha": 1.0, "local_test_fraction": 0.25},
    "clients": {"total": 9, "per_round": 6},
    "local": {"epochs": 1, "batch_size": 16, "lr": 0.001, "optimizer": "adam"},
    "eval": {"every": 1, "batch_size": 40},
    # 3 server epochs, not 25: the tests check HypeMeFed's bytes, generation and bits, which do not
    # depend on how long the hypernetworks train (25 would be 2.4 s of every 3.7 s round here)
    "hypemefed": {"epochs": 3},
}


# PruneFL's and LotteryFL's small synthetic configs, shared by their test modules
PRUNEFL = {
    **TINY, "rounds": 7, "algorithm": "prunefl",
    # c0 of a few dense rounds' traffic keeps the model from collapsing on the laptop profile
    "prunefl": {"local_steps": 5, "reconfigure_every": 2, "ip_interval": 10, "ip_max_iterations": 120,
                "ip_patience": 3, "time_constant": 0.05},
}
LOTTERYFL = {**TINY, "rounds": 8, "algorithm": "lotteryfl",
             "lotteryfl": {"acc_threshold": 0.1, "target_density": 0.1, "local_steps": 5}}


def toy_dataset(n_per_class=40, classes=10, n_test_per_class=7, seed=0):
    """A Dataset of 2 zero features, labels shuffled so that label order and index order differ."""
    from fedmpi.data import Dataset
    rs = np.random.default_rng(seed)
    y_train = rs.permutation(np.repeat(np.arange(classes), n_per_class)).astype(np.int64)
    y_test = rs.permutation(np.repeat(np.arange(classes), n_test_per_class)).astype(np.int64)
    return Dataset("toy", np.zeros((len(y_train), 2), np.float32), y_train,
                   np.zeros((len(y_test), 2), np.float32), y_test, classes, (2,))


def submodel_predictions(weights: dict, x, model: str = "multiexit_vgg", shape=(1, 28, 28), classes=10,
                         **variant) -> tuple[np.ndarray, np.ndarray]:
    """(argmax at the deepest exit, top-2 margin) of the submodel ``variant`` (level, width): the
    leading block of every global tensor, loaded into a model the builder makes with ``variant``."""
    import torch
    from fedmpi.models import build_model
    net = build_model(model, shape, classes, **variant)
    state = {n: torch.from_numpy(np.ascontiguousarray(weights[n][tuple(slice(0, d) for d in t.shape)]))
             for n, t in net.state_dict().items() if t.is_floating_point()}
    net.load_state_dict(state, strict=False)
    net.eval()
    with torch.no_grad():
        logits = net(x)[-1]
    top2 = torch.topk(logits, 2, dim=1).values
    return logits.argmax(dim=1).numpy(), (top2[:, 0] - top2[:, 1]).numpy()


def write_idx(root, n_train=180, n_test=60, seed=0):
    """A small MNIST-format dataset (IDX, gzipped) with a learnable pattern per label."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = g.integers(0, 10, n).astype(np.uint8)
        images = g.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 6, 4:24] = 250
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def variant_sizes(**variant) -> dict[str, int]:
    """Element count of every floating-point tensor of multiexit_vgg on 1x28x28 inputs."""
    from fedmpi.models import build_model

    model = build_model("multiexit_vgg", (1, 28, 28), 10, **variant)
    return {n: t.numel() for n, t in model.state_dict().items() if t.is_floating_point()}
