"""FedDST and RandomMask: bytes against the formula, masks, equivalences, rank invariance."""
from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from collections import Counter

from fedmpi import rng
from fedmpi.aggregation import average_over_holders
from fedmpi.algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from fedmpi.comm.codec import decode, encode, mask_bytes
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.algorithms.feddst_readjustment import cosine_readjust_fraction
from fedmpi.sparsity import layer_densities
from fedmpi.training import LocalTrainer
from fedmpi.update import ModelUpdate
from helpers import command, env, needs_mpiexec

ROOT = Path(__file__).resolve().parent.parent
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
    proc = subprocess.run(command(["run", str(config), "--out", str(out), "--quiet"], ranks), cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=env())
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
    reference = {n: np.zeros(np.shape(v), np.float32) for n, v in results[0].update.values.items()}
    averaged, votes = average_over_holders([r.update for r in results], [r.num_samples for r in results],
                                           reference, missing="zero")
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@needs_mpiexec
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.slow
def test_feddst_metrics_identical_across_rank_counts(feddst_p1, tmp_path, ranks):
    a, ca = read(feddst_p1)
    b, cb = read(run_fedmpi(tmp_path, f"dst{ranks}", ranks=ranks))
    for key in METRICS:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert np.array_equal(ca["train_loss"], cb["train_loss"])
    assert np.array_equal(ca["upload_bytes"], cb["upload_bytes"])


# --------------------------------------------------------------------------- review defects
def tiny_data(seed: int, n: int = 48):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 60, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def maskable_total(info) -> int:
    return sum(int(np.prod(info.shapes[n])) for n in info.maskable)


def run_main(tmp_path: Path, name: str, **overrides) -> Path:
    """One rank, in this process, through the CLI's main."""
    from fedmpi.cli import main

    config = write_config(tmp_path, name, **overrides)
    out = tmp_path / f"{name}.h5"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    return out


def test_default_feddst_config_readjusts():
    cfg = load_config(None, ["algorithm=feddst", "sparsity=0.8"])
    _, _, info, _ = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    assert [r for r in range(1, cfg["rounds"] + 1) if algorithm.is_readjustment_round(r)] == [5]
    assert algorithm.readjust_fraction(5) > 0


@pytest.mark.parametrize("sets, key", [
    (["rounds=4"], "feddst.readjust_every"),                  # R_end = 2, ΔR = 5
    (["feddst.readjust_every=10"], "feddst.readjust_every"),  # the old defaults
    (["feddst.r_end=1"], "feddst.r_end"),
    (["feddst.readjust_rule=public", "feddst.readjust_every=3", "feddst.r_end=1"], "feddst.r_end"),
])
def test_feddst_without_a_readjustment_round_is_a_config_error(sets, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm=feddst", "sparsity=0.8", *sets])
    assert info.value.key == key
    assert "feddst.readjust_every" in info.value.problem and "feddst.r_end" in info.value.problem
    # a static mask and a dense FedDST never readjust by design
    load_config(None, ["algorithm=randommask", "sparsity=0.8", *sets])
    load_config(None, ["algorithm=feddst", "sparsity=0.0", *sets])


def test_config_error_without_readjustment_exits_2(tmp_path, capsys):
    from fedmpi.cli import main

    config = write_config(tmp_path, "static", feddst__readjust_every=10)  # r_end 5
    assert main(["run", str(config), "--out", str(tmp_path / "static.h5"), "--quiet"]) == 2
    assert "feddst.readjust_every" in capsys.readouterr().err
    assert not (tmp_path / "static.h5").exists()


def test_layer_erk_made_dense_keeps_its_trained_weights():
    cfg, model, info, weights = tiny_setup()
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    assert algorithm.densities["fc3.weight"] == 1.0 and algorithm.masks["fc3.weight"].all()
    trainer = LocalTrainer(model, cfg["local"])
    received = algorithm.download(2, 0)
    x, y = tiny_data(4)
    # same seed, so the same local training; only round 2 readjusts
    assert algorithm.is_readjustment_round(2) and not algorithm.is_readjustment_round(3)
    readjusted = algorithm.local_update(ClientTask(2, 0, received, {}, x, y, seed=5), trainer)
    plain = algorithm.local_update(ClientTask(3, 0, received, {}, x, y, seed=5), trainer)
    dense = readjusted.update.values["fc3.weight"]
    np.testing.assert_array_equal(dense, plain.update.values["fc3.weight"])
    assert np.count_nonzero(dense) == dense.size
    assert readjusted.update.masks["fc3.weight"].all()
    for name in ("fc1.weight", "fc2.weight"):  # the sparse layers did move
        assert not np.array_equal(readjusted.update.masks[name], received.masks[name])


def _update(values, masks):
    return ModelUpdate({n: np.where(masks[n], v, np.float32(0)) if n in masks else v.copy()
                        for n, v in values.items()}, {n: m.copy() for n, m in masks.items()})


def test_server_momentum_velocity_is_masked_so_pruned_weights_stay_dead():
    cfg, model, info, weights = tiny_setup(**{"feddst.server_momentum": 0.9})
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    name = "fc1.weight"
    flat = algorithm.weights[name].reshape(-1)
    p = int(np.argmax(np.abs(flat)))                                 # the largest active weight
    q = int(np.flatnonzero(~algorithm.masks[name].reshape(-1))[0])   # an inactive position
    theta_p = float(flat[p])

    # round A: every client prunes p and grows q (at 0): p leaves the mask with velocity θ_p
    masks = {n: m.copy() for n, m in algorithm.masks.items()}
    masks[name].reshape(-1)[[p, q]] = [False, True]
    algorithm.aggregate(1, [ClientResult(c, 30, _update(algorithm.weights, masks), 0.0, 30) for c in (0, 1)])
    assert not algorithm.masks[name].reshape(-1)[p]
    for n, mask in algorithm.masks.items():
        assert np.all(algorithm.velocity[n][~mask] == 0)
        assert np.all(algorithm.weights[n][~mask] == 0)

    # round B: every client grows p again at 0. A stale velocity would set it to -0.9·θ_p and
    # give it a magnitude no grown weight has.
    masks = {n: m.copy() for n, m in algorithm.masks.items()}
    masks[name].reshape(-1)[p] = True
    algorithm.aggregate(2, [ClientResult(c, 30, _update(algorithm.weights, masks), 0.0, 30) for c in (0, 1)])
    assert theta_p != 0 and algorithm.weights[name].reshape(-1)[p] == 0
    for n, mask in algorithm.masks.items():
        assert np.all(algorithm.velocity[n][~mask] == 0)


def test_regrowth_gradient_batch_order_comes_from_the_regrowth_stream():
    cfg, model, info, weights = tiny_setup(seed=3)
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    seeds = []

    class Spy(LocalTrainer):
        def gradients(self, *args, seed, **kwargs):
            seeds.append(seed)
            return super().gradients(*args, seed=seed, **kwargs)

    trainer = Spy(model, cfg["local"])
    x, y = tiny_data(5)
    for round_, client, task_seed in ((2, 3, 11), (2, 3, 99), (4, 1, 11)):
        algorithm.local_update(ClientTask(round_, client, algorithm.download(round_, client), {}, x, y,
                                          seed=task_seed), trainer)
    expected = [rng.torch_seed(3, rng.REGROWTH, 2, 3)] * 2 + [rng.torch_seed(3, rng.REGROWTH, 4, 1)]
    assert seeds == expected  # the task's training seed plays no part
    assert len(set(expected + [11, 12, 99, 100])) == 6


@pytest.mark.parametrize("algorithm", ["feddst", "randommask"])
def test_no_run_reports_a_density_below_its_target(tmp_path, algorithm):
    rounds, _ = read(run_main(tmp_path, algorithm, algorithm=algorithm))
    cfg, model, info, weights = tiny_setup(algorithm=algorithm)
    counts = build_algorithm(cfg, info).counts
    target = sum(counts.values()) / maskable_total(info)
    np.testing.assert_array_equal(rounds["density"], np.full(6, target))   # the mask's density
    assert np.all(rounds["nonzero_density"] <= rounds["density"])
    per_layer = sum(rounds[f"mask_changed[{n}]"] for n in info.maskable)
    np.testing.assert_array_equal(per_layer, rounds["mask_changed"])
    assert np.all(rounds["mask_changed[fc3.weight]"] == 0)   # dense: never readjusted
    moved = rounds["mask_changed"] > 0
    expected = [False, True, False, True, False, False] if algorithm == "feddst" else [False] * 6
    np.testing.assert_array_equal(moved, expected)


# --------------------------------------------------------------------------- public-code deviations
PUBLIC = {"distribution": "erk_public", "constant_alpha": True, "grow_over_all": True,
          "aggregation_weight": "batches2", "sample_with_replacement": True, "detached_prox": True,
          "readjust_rule": "public", "server_reprune": "public"}


def test_deviations_are_off_by_default_and_public_code_sets_them_all():
    paper = load_config(None, ["algorithm=feddst", "sparsity=0.8"])["feddst"]
    assert {k: paper[k] for k in PUBLIC} == {
        "distribution": "erk", "constant_alpha": False, "grow_over_all": False,
        "aggregation_weight": "samples", "sample_with_replacement": False, "detached_prox": False,
        "readjust_rule": "paper", "server_reprune": "paper"}
    assert paper["public_code"] is False and paper["regrow_pruned"] is True
    public = tiny_cfg(**{"feddst.public_code": True})
    assert {k: public["feddst"][k] for k in PUBLIC} == PUBLIC
    assert public["feddst"]["regrow_pruned"] is True   # moot under grow_over_all: left alone
    assert load_config(None, extra=copy.deepcopy(public)) == public   # resolving again changes nothing
    with pytest.raises(ConfigError) as info:
        tiny_cfg(**{"feddst.public_code": True, "feddst.regrow_pruned": False})
    assert info.value.key == "feddst.regrow_pruned"
    for key, bad in (("aggregation_weight", "batches"), ("readjust_rule", "code"),
                     ("server_reprune", "code"), ("distribution", "er")):
        with pytest.raises(ConfigError) as info:
            tiny_cfg(**{f"feddst.{key}": bad})
        assert info.value.key == f"feddst.{key}"


def test_public_code_run_writes_every_resolved_key(tmp_path):
    out = run_main(tmp_path, "public", feddst__public_code=True)
    with h5py.File(out, "r") as f:
        config = json.loads(f.attrs["config"])
        assert {k: config["feddst"][k] for k in PUBLIC} == PUBLIC
        clients = f["clients"]["round"][:]
        density = f["rounds"]["density"][:]
    assert all(1 <= np.count_nonzero(clients == r) <= 4 for r in range(1, 7))
    cfg, model, info, weights = tiny_setup(**{"feddst.public_code": True})
    algorithm = build_algorithm(cfg, info)
    assert np.all(density <= sum(algorithm.counts.values()) / maskable_total(info) + 1e-12)


def test_erk_public_distribution():
    cfg, model, info, weights = tiny_setup(**{"feddst.distribution": "erk_public"})
    shapes = {n: info.shapes[n] for n in info.maskable}
    assert build_algorithm(cfg, info).densities == layer_densities(shapes, 0.8, "erk_public")


def test_constant_alpha_readjusts_alpha_until_r_end():
    cfg, model, info, weights = tiny_setup(**{"feddst.constant_alpha": True})
    algorithm = build_algorithm(cfg, info)
    assert [algorithm.readjust_fraction(r) for r in (2, 4)] == [0.3, 0.3]
    paper = build_algorithm(tiny_cfg(), info)
    assert paper.readjust_fraction(2) == cosine_readjust_fraction(0.3, 2, 5) < 0.3


def test_readjust_rule_public_counts_rounds_as_the_public_code():
    sets = {"rounds": 20, "feddst.readjust_every": 5, "feddst.r_end": 10}
    _, _, info, _ = tiny_setup()
    paper = build_algorithm(tiny_cfg(**sets), info)
    public = build_algorithm(tiny_cfg(**sets, **{"feddst.readjust_rule": "public"}), info)
    assert [r for r in range(1, 21) if paper.is_readjustment_round(r)] == [5]
    # dst.py: (server_round - 1) % 5 == 0 and server_round < 10, server_round = r - 1
    assert [r for r in range(1, 21) if public.is_readjustment_round(r)] == [2, 7]
    assert public.readjust_fraction(7) == cosine_readjust_fraction(0.3, 6, 10)
    assert paper.readjust_fraction(5) == cosine_readjust_fraction(0.3, 5, 10)


@pytest.mark.parametrize("sets, expected", [
    ({}, {"regrow_pruned": True, "grow_over_all_positions": False}),
    ({"feddst.regrow_pruned": False}, {"regrow_pruned": False, "grow_over_all_positions": False}),
    ({"feddst.grow_over_all": True}, {"regrow_pruned": True, "grow_over_all_positions": True}),
])
def test_growth_options_reach_prune_and_grow(monkeypatch, sets, expected):
    import fedmpi.algorithms.feddst as feddst_module

    calls = []
    real = feddst_module.prune_and_grow

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(feddst_module, "prune_and_grow", spy)
    cfg, model, info, weights = tiny_setup(**sets)
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    x, y = tiny_data(6)
    result = algorithm.local_update(ClientTask(2, 0, algorithm.download(2, 0), {}, x, y, seed=1),
                                    LocalTrainer(model, cfg["local"]))
    assert calls == [{"counts": algorithm.counts, **expected}]
    if not expected["grow_over_all_positions"]:   # growth fills every layer back to its count
        assert {n: int(m.sum()) for n, m in result.update.masks.items()} == algorithm.counts


def test_aggregation_weight_batches2_is_twice_the_local_batch_count():
    sizes = (10, 40)   # batch 16: 1 and 3 local batches
    averages = {}
    for rule in ("samples", "batches2"):
        cfg, model, info, weights = tiny_setup(**{"feddst.aggregation_weight": rule})
        algorithm = build_algorithm(cfg, info)
        algorithm.init_server(weights, np.random.default_rng(0))
        gen = np.random.default_rng(1)
        values = [{n: gen.standard_normal(v.shape).astype(np.float32) for n, v in algorithm.weights.items()}
                  for _ in sizes]
        results = [ClientResult(c, n, _update(values[c], algorithm.masks), 0.0, n) for c, n in enumerate(sizes)]
        assert [algorithm.partial_sum_weight(r.client_id, r.num_samples) for r in results] == \
            ([10, 40] if rule == "samples" else [2, 6])
        algorithm.aggregate(1, results)
        averages[rule] = algorithm.weights["fc1.bias"]
    w = {"samples": (10, 40), "batches2": (2, 6)}
    for rule, (a, b) in w.items():
        want = (a * values[0]["fc1.bias"].astype(np.float64) + b * values[1]["fc1.bias"]) / (a + b)
        np.testing.assert_allclose(averages[rule], want.astype(np.float32), rtol=1e-6)


def test_sample_with_replacement_counts_a_client_drawn_twice_twice():
    cfg, model, info, weights = tiny_setup(**{"feddst.sample_with_replacement": True})
    algorithm = build_algorithm(cfg, info)
    algorithm.init_server(weights, np.random.default_rng(0))
    seed = next(s for s in range(100)
                if len(set(np.random.default_rng(s).choice(8, size=4, replace=True))) < 4)
    draws = Counter(int(c) for c in np.random.default_rng(seed).choice(8, size=4, replace=True))
    chosen = algorithm.select_clients(1, np.random.default_rng(seed))
    assert chosen == sorted(draws) and len(chosen) < 4
    gen = np.random.default_rng(2)
    values = {c: {n: gen.standard_normal(v.shape).astype(np.float32) for n, v in algorithm.weights.items()}
              for c in chosen}
    results = [ClientResult(c, 30, _update(values[c], algorithm.masks), 0.0, 30) for c in chosen]
    assert algorithm.partial_sum_weights({c: 30 for c in chosen}) == {c: 30 * draws[c] for c in chosen}
    algorithm.aggregate(1, results)
    want = sum(draws[c] * values[c]["fc1.bias"].astype(np.float64) for c in chosen) / 4
    np.testing.assert_allclose(algorithm.weights["fc1.bias"], want.astype(np.float32), rtol=1e-6)
    # without the option: K distinct clients, each counted once
    paper = build_algorithm(tiny_cfg(), info)
    distinct = paper.select_clients(1, np.random.default_rng(seed))
    assert len(set(distinct)) == 4
    assert paper.partial_sum_weights({c: 30 for c in distinct}) == {c: 30 for c in distinct}


def test_detached_prox_trains_as_if_mu_were_zero():
    x, y = tiny_data(7)
    _, model, info, weights = tiny_setup()
    uploads = {}
    for label, sets in (("mu0", {}), ("mu", {"feddst.prox_mu": 0.5}),
                        ("detached", {"feddst.prox_mu": 0.5, "feddst.detached_prox": True})):
        cfg = tiny_cfg(**sets)
        algorithm = build_algorithm(cfg, info)
        algorithm.init_server(weights, np.random.default_rng(0))
        cfg_local = dict(cfg["local"], epochs=3)
        result = algorithm.local_update(ClientTask(3, 0, algorithm.download(3, 0), {}, x, y, seed=2),
                                        LocalTrainer(model, cfg_local))
        uploads[label] = result.update.values
    for name in uploads["mu0"]:
        np.testing.assert_array_equal(uploads["detached"][name], uploads["mu0"][name])
    assert any(not np.array_equal(uploads["mu"][n], uploads["mu0"][n]) for n in uploads["mu0"])


def test_server_reprune_public_can_leave_the_mask_below_target_until_clients_regrow():
    name = "fc1.weight"
    kept = {}
    for rule in ("paper", "public"):
        cfg, model, info, weights = tiny_setup(**{"feddst.server_reprune": rule})
        algorithm = build_algorithm(cfg, info)
        algorithm.init_server(weights, np.random.default_rng(0))
        flat = algorithm.masks[name].reshape(-1)
        p = int(np.flatnonzero(flat)[0])            # an active weight every client prunes
        low = np.flatnonzero(~flat)[:2]             # each client grows one low-index zero
        results = []
        for c, q in enumerate(low):
            masks = {n: m.copy() for n, m in algorithm.masks.items()}
            masks[name].reshape(-1)[[p, q]] = [False, True]
            results.append(ClientResult(c, 30, _update(algorithm.weights, masks), 0.0, 30))
        algorithm.aggregate(2, results)
        kept[rule] = int(algorithm.masks[name].sum())
        target = sum(algorithm.counts.values()) / maskable_total(info)
        if rule == "paper":
            assert kept[rule] == algorithm.counts[name] and algorithm.density() == target
        else:
            # union = c + 1 positions; its 2 grown zeros rank with the zeros outside it, the
            # lowest indices go first: both grown positions are cut, one short of the count
            assert kept[rule] == algorithm.counts[name] - 1 and algorithm.density() < target
            # the next readjustment grows the layer back to its count
            x, y = tiny_data(8)
            result = algorithm.local_update(ClientTask(4, 0, algorithm.download(4, 0), {}, x, y, seed=3),
                                            LocalTrainer(model, cfg["local"]))
            assert int(result.update.masks[name].sum()) == algorithm.counts[name]
