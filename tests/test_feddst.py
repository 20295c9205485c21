"""FedDST and RandomMask: bytes against the formula, masks, equivalences, rank invariance."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from collections import Counter

from fedmpi import rng
from fedmpi.aggregate import sparse_weighted_average
from fedmpi.algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from fedmpi.comm.codec import ModelUpdate, decode, encode, mask_bytes
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.sparsity import cosine_readjust_fraction, layer_densities
from fedmpi.training import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
TINY = {
    "data": {"name": "synthetic", "partition": "natural"},
    "model": "mlp",
    "clients": {"total": 8, "per_round": 4},
    "rounds": 6,
    "local": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001},
    "eval": {"every": 1},
    "algorithm": "feddst",
    "sparsity": 0.8,
    "feddst": {"alpha": 0.3, "readjust_every": 2, "r_end": 5},
}


def write_config(tmp_path: Path, name: str, **overrides) -> Path:
    """TINY with ``section__key=value`` overrides, as a YAML file."""
    cfg = copy.deepcopy(TINY)
    for key, value in overrides.items():
        node = cfg
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def run_fedmpi(tmp_path: Path, name: str, ranks: int = 1, **overrides) -> Path:
    config = write_config(tmp_path, name, **overrides)
    out = tmp_path / f"{name}.h5"
    cmd = [sys.executable, "-m", "fedmpi", "run", str(config), "--out", str(out), "--quiet"]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return out


def read(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as f:
        return ({k: v[:] for k, v in f["rounds"].items()}, {k: v[:] for k, v in f["clients"].items()})


def tiny_cfg(**cfg_overrides) -> dict:
    """TINY, validated, with ``section.key`` overrides applied before validation."""
    extra = copy.deepcopy(TINY)
    for key, value in cfg_overrides.items():
        section, _, leaf = key.rpartition(".")
        (extra.setdefault(section, {}) if section else extra)[leaf] = value
    return load_config(None, extra=extra)


def tiny_setup(**cfg_overrides):
    cfg = tiny_cfg(**cfg_overrides)
    model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    info = ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (60,)))
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    return cfg, model, info, weights


METRICS = ("test_accuracy", "client_accuracy", "test_loss", "upload_bytes", "download_bytes", "density")


# --------------------------------------------------------------------------- unit level
def test_client_upload_bytes_match_formula_on_readjustment_round():
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    trainer = LocalTrainer(model, cfg["local"])
    received = algorithm.download(2, 0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 60, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    for round_, readjusts in ((2, True), (3, False)):
        assert algorithm.is_readjustment_round(round_) == readjusts
        result = algorithm.local_update(ClientTask(round_, 0, received, {}, x, y, seed=7), trainer)
        upload = encode(result.update, received.masks)
        nnz = sum(int(m.sum()) for m in result.update.masks.values())
        dense = sum(v.size for n, v in result.update.values.items() if n not in result.update.masks)
        changed = [n for n, m in result.update.masks.items() if not np.array_equal(m, received.masks[n])]
        mask_part = sum(mask_bytes(m.size, int(m.sum())) for n, m in result.update.masks.items() if n in changed)
        assert upload.nbytes == 4 * nnz + 4 * dense + mask_part
        assert bool(changed) == readjusts
        # the active count per layer is back at its target after prune/grow
        assert {n: int(m.sum()) for n, m in result.update.masks.items()} == algorithm.counts
        # decoding on the server gives exactly what the client sent
        back = decode(upload, received.masks)
        for name in result.update.values:
            assert np.array_equal(back.values[name], result.update.values[name])


def test_grown_weights_are_zero_and_pruned_weights_stay_zero():
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    received = algorithm.download(2, 0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 60, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    result = algorithm.local_update(ClientTask(2, 0, received, {}, x, y, seed=3), LocalTrainer(model, cfg["local"]))
    grown_any = False
    for name, mask in result.update.masks.items():
        values = result.update.values[name]
        assert np.all(values[~mask] == 0)
        grown = mask & ~received.masks[name]
        grown_any |= bool(grown.any())
        assert np.all(values[grown] == 0)
    assert grown_any


def test_server_prunes_back_to_layer_counts():
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    assert {n: int(m.sum()) for n, m in algorithm.masks.items()} == algorithm.counts
    trainer = LocalTrainer(model, cfg["local"])
    results = []
    for c in range(3):
        gen = torch.Generator().manual_seed(10 + c)
        x, y = torch.randn(32, 60, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        results.append(algorithm.local_update(ClientTask(2, c, algorithm.download(2, c), {}, x, y, seed=c), trainer))
    for r in results:  # what the server decodes
        r.update = decode(encode(r.update))
    old_masks = dict(algorithm.masks)
    averaged, votes = sparse_weighted_average([r.update.values for r in results],
                                              [r.update.masks for r in results],
                                              [r.num_samples for r in results])
    algorithm.aggregate(2, results)
    assert {n: int(m.sum()) for n, m in algorithm.masks.items()} == algorithm.counts
    grown_kept = 0
    for name, mask in algorithm.masks.items():
        assert np.all(algorithm.weights[name][~mask] == 0)
        union = np.logical_or.reduce([r.update.masks[name] for r in results])
        assert not np.any(mask & ~union)  # only weights some client kept
        # kept by magnitude first; among zero-valued (freshly grown) candidates, by votes
        dropped = union & ~mask
        if mask.any() and dropped.any():
            assert np.abs(averaged[name][mask]).min() >= np.abs(averaged[name][dropped]).max()
        zero_kept = mask & (averaged[name] == 0)
        zero_dropped = dropped & (averaged[name] == 0)
        if zero_kept.any() and zero_dropped.any():
            assert votes[name][zero_kept].min() >= votes[name][zero_dropped].max()
        grown_kept += int((mask & ~old_masks[name]).sum())
    assert grown_kept > 0  # weights pruned by every client were replaced by grown ones


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def feddst_p1(tmp_path_factory):
    return run_fedmpi(tmp_path_factory.mktemp("dst"), "feddst")


def test_upload_bytes_per_round_kind(feddst_p1):
    """Ordinary rounds: 4·nnz + dense bytes exactly; readjustment rounds (2, 4): plus masks,
    within the paper's (32(1−S)+1)·n bits; after r_end = 5 (round 6): ordinary again."""
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    n = sum(int(np.prod(info.shapes[m])) for m in info.maskable)
    dense = sum(int(np.prod(s)) for name, s in info.shapes.items() if name not in info.maskable)
    ordinary = 4 * sum(algorithm.counts.values()) + 4 * dense
    bound = (32 * (1 - cfg["sparsity"]) + 1) * n / 8 + 4 * dense
    _, clients = read(feddst_p1)
    for round_ in range(1, 7):
        uploads = clients["upload_bytes"][clients["round"] == round_]
        if round_ in (2, 4):
            assert np.all(uploads > ordinary) and np.all(uploads <= bound), (round_, uploads, bound)
        else:
            assert np.all(uploads == ordinary), (round_, uploads, ordinary)
    fedavg_upload = 4 * sum(int(np.prod(s)) for s in info.shapes.values())
    assert ordinary <= 0.21 * fedavg_upload + 4 * dense


def test_download_mask_only_when_client_copy_differs(feddst_p1):
    _, clients = read(feddst_p1)
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    dense = sum(int(np.prod(s)) for name, s in info.shapes.items() if name not in info.maskable)
    values_only = 4 * sum(algorithm.counts.values()) + 4 * dense
    # round 1: nobody holds a mask yet; round 2 (no mask change since round 1's aggregation):
    # clients seen in round 1 get values only
    first = clients["download_bytes"][clients["round"] == 1]
    assert np.all(first > values_only)
    seen = set(clients["client_id"][clients["round"] == 1])
    r2 = clients["round"] == 2
    for c, down in zip(clients["client_id"][r2], clients["download_bytes"][r2]):
        assert (down == values_only) == (c in seen), (c, down)


def test_feddst_sparsity_zero_is_fedavg_bit_for_bit(tmp_path):
    a, ca = read(run_fedmpi(tmp_path, "dst0", sparsity=0.0))
    b, cb = read(run_fedmpi(tmp_path, "avg", algorithm="fedavg", sparsity=0.0))
    for key in METRICS:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert np.array_equal(ca["train_loss"], cb["train_loss"])


def test_randommask_mask_never_changes(tmp_path):
    rounds, clients = read(run_fedmpi(tmp_path, "rm", algorithm="randommask"))
    # every upload is values only (the mask never differs from what the client received), and
    # every client download after its first carries no mask
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm({**cfg, "algorithm": "randommask"}, info)
    dense = sum(int(np.prod(s)) for name, s in info.shapes.items() if name not in info.maskable)
    values_only = 4 * sum(algorithm.counts.values()) + 4 * dense
    assert np.all(clients["upload_bytes"] == values_only)
    seen = set()
    for c, down in zip(clients["client_id"], clients["download_bytes"]):
        assert (down == values_only) == (c in seen)
        seen.add(c)


@pytest.mark.parametrize("ranks", [2, 4])
def test_feddst_metrics_identical_across_rank_counts(feddst_p1, tmp_path, ranks):
    a, ca = read(feddst_p1)
    b, cb = read(run_fedmpi(tmp_path, f"dst{ranks}", ranks=ranks))
    for key in METRICS:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert np.array_equal(ca["train_loss"], cb["train_loss"])
    assert np.array_equal(ca["upload_bytes"], cb["upload_bytes"])
