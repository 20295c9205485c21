"""bench/kernel_steps.py: the whole training steps it times do what the trainer's steps do — the
dense-masked step and the sparse steps end with the same weights — and its PruneFL masks have
the density asked for."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from helpers import load_bench_script

from fedmpi.algorithms.prunefl import PruneFL
from fedmpi.config.defaults import DEFAULTS
from fedmpi.models import build_model
from fedmpi.timing.measure import exact_mask
from fedmpi.training.optim import OptimizerSpec


kernel_steps = load_bench_script("kernel_steps")

OPTIMIZERS = {
    "sgd": OptimizerSpec("sgd", lr=0.5),
    "sgd_momentum_decay": OptimizerSpec("sgd", lr=0.3, momentum=0.9, weight_decay=0.05),
}


def _layer(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        module, x = nn.Linear(12, 8), torch.randn(5, 12)
    else:
        module, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5)
    x.requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn(module(x).shape)
    mask = exact_mask(tuple(module.weight.shape), 0.3, torch.Generator().manual_seed(1))
    return module, x, gy, mask


def _after(step, name: str, steps: int = 3):
    step.load()
    for _ in range(steps):
        step.part(name)()
    return step.weight(), step.module.bias.detach().clone()


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_dense_and_sparse_whole_steps_end_with_the_same_weights(layer, optimizer):
    module, x, gy, mask = _layer(layer)
    start = module.weight.detach() * mask
    steps = kernel_steps.kernel_steps(module, "weight", x, gy, mask, OPTIMIZERS[optimizer])
    dense_w, dense_b = _after(steps["dense"], "step")
    assert not torch.equal(dense_w, start)                       # the steps train
    assert torch.all(dense_w[~mask] == 0)                        # re-masked
    for kernel in ("sparse", "sparse_active"):
        w, b = _after(steps[kernel], "step")
        torch.testing.assert_close(w, dense_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, dense_b, rtol=1e-5, atol=1e-5)
    # rounds that gather importance: the hook reads gradients, the weights are the same
    imp_w, _ = _after(steps["sparse"], "step_importance")
    torch.testing.assert_close(imp_w, dense_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_after(steps["dense"], "step_importance")[0], dense_w, rtol=1e-5, atol=1e-5)


def test_one_dense_step_is_masked_sgd():
    """The dense baseline against SGD written out: w ← (w⊙m − lr·gyᵀx)⊙m, b ← b − lr·Σgy."""
    module, x, gy, mask = _layer("linear")
    w0, b0 = (module.weight.detach() * mask).clone(), module.bias.detach().clone()
    step = kernel_steps.kernel_steps(module, "weight", x, gy, mask, OPTIMIZERS["sgd"])["dense"]
    w, b = _after(step, "step", steps=1)
    torch.testing.assert_close(w, (w0 - 0.5 * gy.t() @ x.detach()) * mask)
    torch.testing.assert_close(b, b0 - 0.5 * gy.sum(0))


def _prunefl_settings(**changes):
    local = {**DEFAULTS["local"], "batch_size": 10, "lr": 0.1}
    settings = {**PruneFL.defaults, "ip_interval": 2, "ip_data_batches": 5, **changes}
    return local, settings


@pytest.mark.parametrize("settle", [0, 2])
def test_prunefl_masks_have_the_requested_density(settle):
    torch.manual_seed(0)
    model = build_model("mlp", (20,), 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 20, generator=g), torch.randint(0, 4, (200,), generator=g)
    local, settings = _prunefl_settings()
    masks = kernel_steps.prunefl_masks(model, "fc1.weight", x, y, [0.3, 0.1, 0.05], local=local,
                                       settings=settings, settle=settle)
    n = model.fc1.weight.numel()
    assert sorted(masks) == [0.05, 0.1, 0.3]
    for density, mask in masks.items():
        assert mask.shape == tuple(model.fc1.weight.shape) and mask.dtype == bool
        assert int(mask.sum()) == round(density * n)


def _config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"config": {
        "model": "mlp", "data": {"name": "synthetic"},
        "local": {"batch_size": 10, "lr": 0.1, "momentum": 0.5},
        "prunefl": {"ip_interval": 2, "ip_data_batches": 3}}}))
    return path


def test_the_script_reports_every_mask_density_and_kernel(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert kernel_steps.main(["--config", str(_config(tmp_path)), "--repeats", "2", "--min-time", "1e-4",
                              "--settle", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["mask"], r["density"]): r for r in report["rows"]}
    assert sorted(rows) == [(k, d) for k in ("prunefl", "uniform") for d in (0.05, 0.1, 0.2)]
    n = 60 * 200   # the MLP's fc1 on LEAF Synthetic's 60 features
    for (kind, density), row in rows.items():
        assert row["nnz"] == round(density * n)
        for kernel in ("sparse", "sparse_active"):
            for part in ("step", "fwd_bwd"):
                ratio = row["kernels"][kernel][part]["paired_ratio"]
                assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
                assert row["kernels"][kernel][part]["seconds"]["min"] > 0
        assert "step_importance" in row["kernels"]["sparse"]
        assert "step_importance" not in row["kernels"]["sparse_active"]
    assert set(report["target"]) == {"prunefl", "uniform"}
    assert report["settings"]["optimizer"]["momentum"] == 0.5
    assert "whole step" in capsys.readouterr().out


def test_bad_input_exits_2_before_measuring_and_keeps_existing_results(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert kernel_steps.main(["--densities", "0.1,2", "--json", str(out)]) == 2
    assert "--densities" in capsys.readouterr().err and not out.exists()
    out.write_text("earlier results")
    assert kernel_steps.main(["--config", str(_config(tmp_path)), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert out.read_text() == "earlier results"
    assert kernel_steps.main(["--config", str(tmp_path / "missing.yaml"), "--json", str(tmp_path / "x.json")]) == 2
    assert "--config" in capsys.readouterr().err
