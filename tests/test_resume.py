"""``--resume`` cannot destroy, checkpoints are data, and ``--out`` is checked before data loads
(docs/interface.md, "Resuming a run" and "Checkpoints").

Every refusal is checked on the bytes of the files it concerns (sha256 before and after): a
results file of another config, one with rounds but no checkpoint, a finished one asked for
another config, a checkpoint of another config or in the old pickle format (which must not be
unpickled: a planted payload would create a file), and results paths under /proc, /sys and /dev.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch

from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.engine.checkpoint import ServerState, read_checkpoint, write_checkpoint
from helpers import (BATCH_SCRIPT, Streaming, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results,
                     write_config)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Planted:
    """Unpickling this runs ``touch marker``: what a planted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------ checkpoints as data
def rich_state() -> dict:
    shared = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {
        "weights": {"fc1.weight": shared, "fc1.bias": np.array([0.5, -0.0, np.nan], np.float64)},
        "masks": {"fc1.weight": shared > 4},
        "velocity": None,
        "also_weights": shared,                                   # the same array under two names
        "best": {0: np.float64(0.25), 7: 0.5, 2**40: float("inf")},
        "client_masks": {3: {"fc1.weight": ((3, 4), np.packbits(np.ones(12, bool)))}},
        "nets": [OrderedDict([("w", torch.randn(2, 3)), ("h", torch.arange(4, dtype=torch.bfloat16))])],
        "misc": ("text", b"\x00\xff", True, -3, [np.int8(-1), np.uint64(2**63)], np.zeros((0, 2), np.uint16)),
    }


def assert_same_tree(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.view(-1).view(torch.uint8).numpy().tobytes() == b.view(-1).view(torch.uint8).numpy().tobytes(), where
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), where
    else:
        assert a == b, where


def test_checkpoint_is_data_and_round_trips_exactly(tmp_path):
    cfg = load_config(None, [])
    path = tmp_path / "run.ckpt"
    state = ServerState(round=4, client_states={5: {"importance": np.ones(3, np.float32), "uploaded": 2}},
                        known_masks={5: {"fc1.weight": ((3, 4), np.packbits(np.ones(12, bool)))}})
    state.totals.upload_bytes, state.totals.wall_seconds = 123, 0.1
    algorithm = rich_state()
    write_checkpoint(path, state, algorithm, cfg)

    raw = path.read_bytes()
    assert raw[:1] != b"\x80" and raw[:4] == b"PK\x03\x04"      # an .npz archive, not a pickle
    with np.load(path, allow_pickle=False) as archive:           # every member is plain data
        manifest = json.loads(bytes(archive["manifest"]).decode())
        assert all(archive[name].dtype == np.uint8 for name in archive.files)
    assert manifest["version"] == 1
    assert not path.with_suffix(".ckpt.tmp").exists()

    restored, restored_algorithm = read_checkpoint(path, cfg)
    assert restored.round == 4 and restored.totals == state.totals
    assert_same_tree(algorithm, restored_algorithm, "algorithm")
    assert_same_tree(state.client_states, restored.client_states, "client_states")
    assert_same_tree(state.known_masks, restored.known_masks, "known_masks")
    # shared before, shared after: an in-place update through one name shows through the other
    assert restored_algorithm["also_weights"] is restored_algorithm["weights"]["fc1.weight"]


@pytest.mark.parametrize("bad, where, kind", [
    ({1, 2}, "algorithm['weights']['fc1.weight']", "set"),
    (Planted("x"), "algorithm['weights']['fc1.weight']", "test_resume.Planted"),
    (np.array(["a"]), "algorithm['weights']['fc1.weight']", "<U1"),
    (np.array([object()]), "algorithm['weights']['fc1.weight']", "object"),
    (torch.zeros(2, dtype=torch.complex64), "algorithm['weights']['fc1.weight']", "complex64"),
    ({np.int64(3): 1.0}, "algorithm['weights']['fc1.weight']", "int64"),
], ids=["set", "object", "str_array", "object_array", "complex_tensor", "numpy_int_key"])
def test_state_of_another_type_is_refused_naming_where_it_is(tmp_path, bad, where, kind):
    cfg = load_config(None, [])
    path = tmp_path / "run.ckpt"
    write_checkpoint(path, ServerState(round=1), {"weights": {"fc1.weight": np.ones(2)}}, cfg)
    before = sha(path)
    with pytest.raises(TypeError) as caught:
        write_checkpoint(path, ServerState(round=2), {"weights": {"fc1.weight": bad}}, cfg)
    message = str(caught.value)
    assert where in message and kind in message and "docs/extending.md" in message, message
    assert sha(path) == before                                   # the previous checkpoint is intact
    assert not path.with_suffix(".ckpt.tmp").exists()


def test_pickle_checkpoint_is_refused_without_unpickling_it(tmp_path):
    cfg = load_config(None, [])
    marker = tmp_path / "code_ran"
    path = tmp_path / "run.ckpt"
    path.write_bytes(pickle.dumps({"round": 1, "algorithm": Planted(marker)}, protocol=4))
    with pytest.raises(ConfigError) as caught:
        read_checkpoint(path, cfg)
    message = str(caught.value)
    assert "older fedmpi in pickle format" in message and "--force" in message and str(path) in message
    assert not marker.exists()


# ------------------------------------------------------------------------------ what --resume refuses
def partial_copy(finished, path, rounds=None):
    """A copy of a finished results file without the finished mark (a run killed before its first
    checkpoint); with ``rounds=0``, one killed before its first round."""
    shutil.copyfile(finished, path)
    with h5py.File(path, "r+") as f:
        del f.attrs["finished"]
        if rounds == 0:
            for group in ("rounds", "clients"):
                for ds in f[group].values():
                    ds.resize((0,))
    return path


def plant_checkpoint(out, config, sets=(), marker=None, protocol=None):
    """A checkpoint beside ``out``: of ``config`` with ``sets``, or a pickle that creates ``marker``."""
    ckpt = out.with_suffix(".ckpt")
    if marker is not None:
        ckpt.write_bytes(pickle.dumps({"round": 1, "algorithm": Planted(marker)}, protocol=protocol))
    else:
        write_checkpoint(ckpt, ServerState(round=2), {"weights": {}, "masks": {}}, load_config(str(config), list(sets)))
    return ckpt


NO_DATA = ["--set", "data.name=fashion_mnist", "--set", "data.root={empty}"]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_runs):
    """Each refused --resume (and each special --out) once, in one interpreter: (exit status,
    stderr, sha256 of the files before, after) per case."""
    work = tmp_path_factory.mktemp("resume")
    finished = tiny_runs()[0]                     # helpers.TINY, 3 rounds, finished (read-only)
    config = write_config(work / "tiny.yaml")
    empty = work / "no_data_here"
    empty.mkdir()
    out = {name: work / f"{name}.h5" for name in (
        "partial_other_config", "partial_no_checkpoint", "finished_other_config", "finished_same_config",
        "zero_rounds_other_config", "checkpoint_other_config", "checkpoint_alone", "checkpoint_alone_no_resume",
        "pickle", "pickle_protocol_0")}
    for name in ("partial_other_config", "partial_no_checkpoint", "checkpoint_other_config", "pickle",
                 "pickle_protocol_0"):
        partial_copy(finished, out[name])
    for name in ("finished_other_config", "finished_same_config"):
        shutil.copyfile(finished, out[name])
    partial_copy(finished, out["zero_rounds_other_config"], rounds=0)
    plant_checkpoint(out["checkpoint_other_config"], config, ["local.lr=0.3"])
    plant_checkpoint(out["checkpoint_alone"], config)
    plant_checkpoint(out["checkpoint_alone_no_resume"], config)
    plant_checkpoint(out["pickle"], config, marker=work / "ran_pickle", protocol=5)
    plant_checkpoint(out["pickle_protocol_0"], config, marker=work / "ran_pickle_protocol_0", protocol=0)
    cases = {
        "partial_other_config": ["--set", "rounds=2", "--set", "local.lr=0.3"],
        "partial_no_checkpoint": [],
        "finished_other_config": ["--set", "local.lr=0.1"],
        "finished_same_config": [],
        "zero_rounds_other_config": ["--set", "local.lr=0.3"],
        "checkpoint_other_config": [],
        "checkpoint_alone": [],
        "pickle": [],
        "pickle_protocol_0": [],
    }
    argv = {name: ["run", str(config), "--out", str(out[name]), "--quiet", "--resume", *args]
            for name, args in cases.items()}
    argv["checkpoint_alone_no_resume"] = ["run", str(config), "--out", str(out["checkpoint_alone_no_resume"]),
                                          "--quiet"]
    special = {"proc": "/proc/fedmpi_test.h5", "sys": "/sys/fedmpi_test.h5", "sys_kernel": "/sys/kernel/fedmpi_test.h5",
               "dev": "/dev/fedmpi_test.h5"}
    for name, path in special.items():     # a data set that is not there: loading it would fail first
        argv[f"special_{name}"] = ["run", str(config), "--out", path, "--quiet",
                                   *[a.format(empty=empty) for a in NO_DATA]]
    argv["special_sys_synthetic"] = ["run", str(config), "--out", special["sys"], "--quiet"]
    def files(name):
        return [p for p in (out[name], out[name].with_suffix(".ckpt")) if p.exists()] if name in out else []

    before = {name: {str(p): sha(p) for p in files(name)} for name in argv}
    script = work / "batch.py"
    script.write_text(BATCH_SCRIPT)
    argv_file = work / "argv.json"
    argv_file.write_text(json.dumps(list(argv.values())))
    proc, _ = fedmpi([str(script), str(argv_file)], timeout=240, module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    after = {name: {str(p): sha(p) for p in files(name)} for name in argv}
    return {name: (res["rc"], res["stderr"], before[name], after[name]) for name, res in zip(argv, results)} | {
        "_work": work, "_empty": str(empty)}


def refused(refusals, case, *needles):
    rc, stderr, before, after = refusals[case]
    assert rc == 2, f"{case}: exit {rc}: {stderr[-2000:]}"
    for needle in needles:
        assert needle in stderr, f"{case}: {needle!r} not in {stderr[-2000:]!r}"
    assert "Traceback" not in stderr, stderr
    assert before and after == before, f"{case}: the files changed"
    return stderr


@pytest.mark.slow
def test_partial_file_of_another_config_is_refused_naming_the_keys(refusals):
    """The reported case: 3 completed rounds, no checkpoint, resumed with other settings."""
    refused(refusals, "partial_other_config", "local.lr: 0.05 → 0.3", "rounds: 3 → 2", "--force")


@pytest.mark.slow
def test_partial_file_without_checkpoint_is_refused_and_force_starts_it_over(refusals, tiny_runs):
    refused(refusals, "partial_no_checkpoint", "3 completed rounds", "no checkpoint", "--force")
    out = refusals["_work"] / "partial_no_checkpoint.h5"
    config = refusals["_work"] / "tiny.yaml"
    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet", "--resume", "--force"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"--force: starting {out} over" in proc.stderr
    again = read_results(out)
    assert "finished" in again["attrs"] and list(again["rounds"]["round"]) == [1, 2, 3]
    assert_all_columns_identical(again, read_results(tiny_runs()[0]), "started over with --force")


@pytest.mark.slow
def test_finished_file_of_another_config_is_refused_and_of_the_same_is_left_alone(refusals):
    refused(refusals, "finished_other_config", "local.lr: 0.05 → 0.1", "--force")
    rc, stderr, before, after = refusals["finished_same_config"]
    assert rc == 0 and "already finished" in stderr and after == before


@pytest.mark.slow
def test_file_without_rounds_restarts_only_for_its_own_config(refusals):
    refused(refusals, "zero_rounds_other_config", "local.lr: 0.05 → 0.3")
    out = refusals["_work"] / "zero_rounds_same_config.h5"
    partial_copy(refusals["_work"] / "finished_same_config.h5", out, rounds=0)
    proc, _ = fedmpi(["run", str(refusals["_work"] / "tiny.yaml"), "--out", str(out), "--quiet", "--resume"],
                     timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(read_results(out)["rounds"]["round"]) == [1, 2, 3]


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused_naming_the_keys(refusals):
    refused(refusals, "checkpoint_other_config", "checkpoint", "local.lr: 0.3 → 0.05")


@pytest.mark.slow
@pytest.mark.parametrize("case, needles", [
    ("checkpoint_alone", ["no results file"]),
    ("checkpoint_alone_no_resume", ["without its results file", "--force"]),
])
def test_checkpoint_without_its_results_file_is_kept(refusals, case, needles):
    refused(refusals, case, *needles)
    assert not (refusals["_work"] / f"{case}.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case, needles", [
    ("pickle", ["older fedmpi in pickle format", "--force"]),
    ("pickle_protocol_0", ["truncated or corrupt"]),
])
def test_planted_pickle_checkpoint_is_refused_and_never_unpickled(refusals, case, needles):
    refused(refusals, case, *needles)
    assert not (refusals["_work"] / f"ran_{case}").exists(), "the planted pickle ran"


@pytest.mark.slow
@pytest.mark.parametrize("case, path", [
    ("special_proc", "/proc/fedmpi_test.h5"), ("special_sys", "/sys/fedmpi_test.h5"),
    ("special_sys_kernel", "/sys/kernel/fedmpi_test.h5"), ("special_dev", "/dev/fedmpi_test.h5"),
    ("special_sys_synthetic", "/sys/fedmpi_test.h5"),
])
def test_out_on_a_kernel_filesystem_exits_2_before_loading_data(refusals, case, path):
    rc, stderr, _, _ = refusals[case]
    assert rc == 2, f"{case}: exit {rc}: {stderr[-2000:]}"
    assert f"--out {path}" in stderr and "writable path" in stderr and "Traceback" not in stderr, stderr
    assert refusals["_empty"] not in stderr, "the data set was looked for before --out was checked"
    assert not os.path.exists(path)


# ------------------------------------------------------------------------------ under mpiexec
@needs_mpiexec
@pytest.mark.slow
@pytest.mark.parametrize("case", ["partial_other_config", "checkpoint_other_config", "pickle"])
def test_refusals_end_every_rank_with_exit_2_under_mpiexec(tmp_path, tiny_runs, case):
    config = write_config(tmp_path / "tiny.yaml")
    out = partial_copy(tiny_runs()[0], tmp_path / "run.h5")
    marker = tmp_path / "ran_pickle"
    sets, needle = [], "local.lr: 0.05 → 0.3"
    if case == "partial_other_config":
        sets = ["--set", "local.lr=0.3"]
    elif case == "checkpoint_other_config":
        plant_checkpoint(out, config, ["local.lr=0.3"])
        needle = "local.lr: 0.3 → 0.05"
    else:
        plant_checkpoint(out, config, marker=marker, protocol=5)
        needle = "pickle format"
    files = [p for p in (out, out.with_suffix(".ckpt")) if p.exists()]
    before = [sha(p) for p in files]
    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet", "--resume", *sets], ranks=2, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len([line for line in proc.stderr.splitlines() if needle in line]) == 1, proc.stderr   # rank 0, once
    assert [sha(p) for p in files] == before and not marker.exists()


# ------------------------------------------------------------------------------ resumed runs stay exact
FEDDST = {"algorithm": "feddst", "sparsity": 0.8, "rounds": 6,
          "feddst": {"alpha": 0.3, "readjust_every": 2, "r_end": 5},
          "local": {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001}}
RESUME = ["--set", "checkpoint.every=1", "--set", "feddst.server_momentum=0.5"]


@pytest.mark.slow
def test_feddst_resumed_from_its_data_checkpoint_after_sigkill_is_bit_identical(tmp_path):
    """FedDST keeps masks and server momentum across rounds: both come back from the checkpoint."""
    config = write_config(tmp_path / "feddst.yaml", **FEDDST)
    reference = tmp_path / "reference.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(reference), "--quiet", *RESUME], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed.h5"
    run = Streaming(["run", str(config), "--out", str(out), "--progress", *RESUME])
    run.wait_for_line(r"^round 3/6", timeout=120)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before it could be killed")
    os.kill(run.proc.pid, signal.SIGKILL)
    rc, _ = run.finish(timeout=30)
    assert rc == -signal.SIGKILL
    ckpt = out.with_suffix(".ckpt")
    with np.load(ckpt, allow_pickle=False) as archive:      # data, not a pickle
        header = json.loads(bytes(archive["manifest"]).decode())["header"]
    assert 2 <= header["round"] < 6
    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet", "--resume", *RESUME], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = read_results(out)
    assert "finished" in resumed["attrs"] and "resumed" in resumed["attrs"] and not ckpt.exists()
    assert_all_columns_identical(read_results(reference), resumed, "feddst resumed after SIGKILL")

