"""Real sparse kernels (fedmpi.sparse_kernels) against the masked dense layers they replace.

Tolerance. A float32 sum of K products, in any order, differs from the exact sum by at most
γ_K · Σ|terms| with γ_K = K·u/(1 − K·u) ≈ K·u, u = 2⁻²⁴ (Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1); fused multiply-adds and blocking only lower it. The sparse kernel
sums the active products of each output in another order than the dense GEMM/convolution, so
both must lie within that bound of a float64 reference, elementwise: |y − y₆₄| ≤ K·u·(|W|·|x|),
where |W|·|x| is the same layer run in float64 on absolute values (and its backward pass with
|gy| gives the bounds of both gradients). K: fan-in C·kh·kw (or in_features) for the output,
fan-out O·kh·kw (out_features) for the input gradient, B·H_out·W_out (batch) for the weight
gradient. A wrong index or a missing term breaks the bound by orders of magnitude.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmpi.config import DEFAULTS
from fedmpi.models import build_model
from fedmpi.sparse_kernels import (SparseKernelPolicy, SparseKernels, SparseStructure, simd, sparse_conv2d,
                                   sparse_linear, supports)
from fedmpi.training import LocalTrainer, SquaredGradientAccumulator

U = 2.0 ** -24


def random_mask(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def reference(op, x, w, b, gy, mask):
    """(y, gx, gw, gb) in float64, and the same on absolute values (the error scale)."""
    out = []
    for absolute in (False, True):
        f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
        xr = f(x).requires_grad_()
        wr = (f(w) * mask).requires_grad_()
        br = f(b).requires_grad_() if b is not None else None
        y = op(xr, wr, br)
        y.backward(f(gy))
        out.append((y.detach(), xr.grad, wr.grad, br.grad if br is not None else None))
    return out


def within(value, exact, scale, k, what):
    if value.numel() == 0:
        return
    err = (value.detach().double() - exact).abs()
    bound = 1.01 * k * U * scale + 1e-30
    worst = float((err / bound).max())
    assert worst <= 1.0, f"{what}: error {float(err.max()):.3g} exceeds the γ_K bound (ratio {worst:.2f})"


@pytest.fixture
def weight_grad_path(request, monkeypatch):
    """The kernel mode of a parametrised test; for "active", the weight gradient's path forced:
    ``sampled`` (sampled_addmm) or ``gathered`` (row blocks of the dense product, blocks of 64
    values so that most cases span several blocks, the last one partial)."""
    mode = request.param
    if mode.startswith("active-"):
        import fedmpi.sparse_kernels.kernels as kernels

        gathered = mode == "active-gathered"
        monkeypatch.setattr(SparseStructure, "gathers", lambda self, k: gathered)
        monkeypatch.setattr(kernels, "BLOCK_VALUES", 64)
        return "active"
    return mode


@pytest.fixture(params=["mkl", "simd"])
def product_path(request, monkeypatch):
    """Which CSR products a Linear layer runs: MKL's (torch.sparse.mm, sampled_addmm or the
    gathered blocks) or csr_simd.c's (one torch thread, as fedmpi's ranks run; skipped where the
    extension is not built or the CPU lacks AVX-512F)."""
    if request.param == "mkl":
        monkeypatch.setattr(simd, "usable", lambda *args: False)
    else:
        if not simd.available():
            pytest.skip(f"csr_simd not usable here: {simd.unavailable_because()}")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    return request.param


GRAD_MODES = ["dense", "active-sampled", "active-gathered"]
LINEAR_CASES = [  # (batch, in, out, density); batches 16, 17, 33, 64: every padded width of csr_simd.c,
    # 65: past it (MKL runs)
    (20, 300, 70, 0.1), (7, 64, 33, 0.5), (5, 40, 10, 0.0), (3, 17, 9, 1.0), (16, 50, 40, 0.3),
    (17, 129, 31, 0.2), (33, 70, 90, 0.15), (64, 45, 21, 0.4), (65, 30, 12, 0.3)]
CONV_CASES = [  # (batch, C, H, W, O, kernel, stride, padding, dilation, density)
    (4, 8, 14, 14, 16, 5, 1, 2, 1, 0.2), (3, 6, 11, 9, 12, 3, 2, 1, 1, 0.3),
    (2, 5, 12, 13, 7, (3, 2), (2, 1), (1, 0), (1, 2), 0.5), (2, 16, 2, 2, 32, 3, 1, 1, 1, 0.05),
    (2, 1, 28, 28, 8, 5, 1, 2, 1, 0.4)]


@pytest.mark.parametrize("weight_grad_path", GRAD_MODES, indirect=True)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_sparse_linear_matches_masked_dense_forward_and_gradients(case, weight_grad_path, product_path):
    weight_grad = weight_grad_path
    batch, fan_in, fan_out, density = case
    torch.manual_seed(1)
    layer = nn.Linear(fan_in, fan_out)
    mask = random_mask(layer.weight.shape, density, 2)
    with torch.no_grad():
        layer.weight.mul_(mask)
    x = torch.randn(batch, fan_in, requires_grad=True)
    structure = SparseStructure(mask)
    source = layer.weight if weight_grad == "dense" else nn.Parameter(structure.values(layer.weight))
    y = sparse_linear(x, source, layer.bias, structure, weight_grad)
    gy = torch.randn_like(y)
    y.backward(gy)
    (y64, gx64, gw64, gb64), (ya, gxa, gwa, gba) = reference(F.linear, x.detach(), layer.weight.detach(),
                                                             layer.bias.detach(), gy, mask.double())
    within(y, y64, ya, fan_in, "output")
    within(x.grad, gx64, gxa, fan_out, "input gradient")
    within(layer.bias.grad, gb64, gba, batch, "bias gradient")
    if weight_grad == "dense":   # every position, as the masked dense layer gives
        within(layer.weight.grad, gw64, gwa, batch, "weight gradient")
    else:                        # the compact values' gradient: the active positions, CSR order
        assert layer.weight.grad is None
        within(source.grad, gw64.reshape(-1)[structure.flat], gwa.reshape(-1)[structure.flat], batch,
               "weight gradient (active)")


@pytest.mark.parametrize("weight_grad_path", GRAD_MODES, indirect=True)
@pytest.mark.parametrize("case", CONV_CASES)
def test_sparse_conv2d_matches_masked_dense_forward_and_gradients(case, weight_grad_path):
    weight_grad = weight_grad_path
    batch, channels, height, width, out_channels, kernel, stride, padding, dilation, density = case
    torch.manual_seed(3)
    conv = nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation)
    mask = random_mask(conv.weight.shape, density, 4)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(batch, channels, height, width, requires_grad=True)
    structure = SparseStructure(mask)
    source = conv.weight if weight_grad == "dense" else nn.Parameter(structure.values(conv.weight))
    y = sparse_conv2d(x, source, conv.bias, structure, weight_grad, stride=stride,
                      padding=padding, dilation=dilation)
    dense = conv(x.detach())
    assert y.shape == dense.shape
    gy = torch.randn_like(y)
    y.backward(gy)

    def op(xx, ww, bb):
        return F.conv2d(xx, ww, bb, stride, padding, dilation)

    # the reference's weight gradient covers every position, as the masked dense layer's does
    (y64, gx64, gw64, gb64), (ya, gxa, gwa, gba) = reference(op, x.detach(), conv.weight.detach(),
                                                             conv.bias.detach(), gy, mask.double())
    kh, kw = conv.kernel_size
    positions = y.shape[2] * y.shape[3]
    within(y, y64, ya, channels * kh * kw, "output")
    within(x.grad, gx64, gxa, out_channels * kh * kw, "input gradient")
    within(conv.bias.grad, gb64, gba, batch * positions, "bias gradient")
    if weight_grad == "dense":
        within(conv.weight.grad, gw64, gwa, batch * positions, "weight gradient")
    else:
        assert conv.weight.grad is None
        within(source.grad, gw64.reshape(-1)[structure.flat], gwa.reshape(-1)[structure.flat],
               batch * positions, "weight gradient (active)")


def test_weight_gradient_path_follows_the_measured_costs():
    """The cost model's choices where bench/sampled_paths.py measured a clear winner (idle Intel
    Xeon machine, ms): fc1 of the FEMNIST CNN (3136 → 2048) at batch 20 takes the row blocks at
    density 0.1 (1.93 against sampled_addmm's 2.41) and sampled_addmm at 0.03 (0.77 against
    1.56); at batch 64, density 0.1, sampled_addmm (3.40 against 4.54); conv2 (64 × 800 weights, 20
    images of 14×14: k = 3920) the row blocks even at density 0.01 (1.76 against 6.60:
    sampled_addmm first copies the 3920 × 800 columns)."""
    def structure(shape, density):
        return SparseStructure(random_mask(shape, density, 0))

    fc1 = {d: structure((2048, 3136), d) for d in (0.03, 0.1)}
    assert fc1[0.1].gathers(20) and not fc1[0.03].gathers(20) and not fc1[0.1].gathers(64)
    assert structure((64, 32, 5, 5), 0.01).gathers(20 * 14 * 14)


def test_first_layer_needs_no_input_gradient_and_active_grads_accumulate():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    mask = random_mask(layer.weight.shape, 0.4, 0)
    with torch.no_grad():
        layer.weight.mul_(mask)
    structure = SparseStructure(mask)
    values = nn.Parameter(structure.values(layer.weight))
    x = torch.randn(6, 12)                      # no requires_grad: the model input
    for _ in range(2):                          # two backward passes, no zero_grad in between
        sparse_linear(x, values, layer.bias, structure, "active").sum().backward()
    expected = 2 * (torch.ones(6, 5).t() @ x)
    torch.testing.assert_close(values.grad, expected.reshape(-1)[structure.flat], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="active values"):   # the dense weight is not the compact vector
        sparse_linear(x, layer.weight, layer.bias, structure, "active")


def test_active_plan_trains_compact_values_and_writes_them_back():
    model = build_model("femnist_cnn", (1, 28, 28), 10)
    mask = random_mask(model.fc1.weight.shape, 0.1, 0)
    with torch.no_grad():
        model.fc1.weight.mul_(mask)
    kernels = SparseKernels().plan({"fc1.weight": model.fc1}, {"fc1.weight": mask}, "active")
    values = kernels.compact_parameters()["fc1.weight"]
    flat = kernels._structures["fc1.weight"].flat
    assert torch.equal(values.detach(), model.fc1.weight.detach().reshape(-1)[flat])   # taken from the weight
    with torch.no_grad():
        values.add_(1.0)                                    # a "training step" on the compact values
    kernels.write_back()
    weight = model.fc1.weight.detach()
    assert torch.equal(weight.reshape(-1)[flat], values.detach())
    assert torch.count_nonzero(weight[~mask]) == 0
    assert SparseKernels().plan({"fc1.weight": model.fc1}, {"fc1.weight": mask}).compact_parameters() == {}


def test_structure_indices_describe_the_mask_and_its_transpose():
    mask = random_mask((7, 2, 3), 0.4, 9)
    s = SparseStructure(mask)
    values = torch.arange(mask.numel(), dtype=torch.float32).reshape(mask.shape)
    m2 = mask.reshape(7, 6)
    torch.testing.assert_close(s.csr(s.values(values)).to_dense(), values.reshape(7, 6) * m2)
    torch.testing.assert_close(s.csr_t(s.values(values)).to_dense(), (values.reshape(7, 6) * m2).t())
    assert s.nnz == int(mask.sum()) and s.density == s.nnz / mask.numel()


def test_swapped_forward_is_restored_and_unsupported_layers_refused():
    model = build_model("femnist_cnn", (1, 28, 28), 10)
    masks = {"fc1.weight": random_mask(model.fc1.weight.shape, 0.1, 0)}
    kernels = SparseKernels().plan({"fc1.weight": model.fc1}, masks)
    with kernels:
        assert "forward" in model.fc1.__dict__
    assert "forward" not in model.fc1.__dict__
    assert not supports(nn.Conv2d(4, 4, 3, groups=2)) and not supports(nn.Conv1d(2, 2, 3))
    # structures are reused while the mask does not change, rebuilt when it does
    again = kernels.structure("fc1.weight", masks["fc1.weight"].clone())
    assert again is kernels._structures["fc1.weight"]
    other = kernels.structure("fc1.weight", ~masks["fc1.weight"])
    assert other is not again


def test_policy_uses_break_even_densities():
    model = build_model("femnist_cnn", (1, 28, 28), 10)
    from fedmpi.sparse_kernels import masked_weight_modules

    modules = masked_weight_modules(model)
    densities = {"conv2.weight": 0.05, "fc1.weight": 0.05, "fc2.weight": 0.5}
    policy = SparseKernelPolicy("auto", {"conv2.weight": 0.0, "fc1.weight": 0.2, "fc2.weight": 0.3},
                                {"fc1.weight": 0.01})
    assert policy.choose(modules, densities, "dense") == ["fc1.weight"]
    assert policy.choose(modules, densities, "active") == []
    assert SparseKernelPolicy("always").choose(modules, {**densities, "conv1.weight": 1.0}) == \
        ["conv2.weight", "fc1.weight", "fc2.weight"]
    assert SparseKernelPolicy("off").choose(modules, densities) == []


def _trainer_case():
    torch.manual_seed(0)
    build = lambda: build_model("femnist_cnn", (1, 28, 28), 10)  # noqa: E731
    weights = {n: t.detach().numpy().copy() for n, t in build().state_dict().items()}
    rng = np.random.default_rng(0)
    masks = {n: rng.random(weights[n].shape) < d for n, d in
             (("conv1.weight", 0.5), ("conv2.weight", 0.2), ("fc1.weight", 0.1), ("fc2.weight", 0.3))}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 1, 28, 28, generator=g), torch.randint(0, 10, (50,), generator=g)
    cfg = copy.deepcopy(DEFAULTS["local"])
    cfg.update(batch_size=20, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return build, weights, masks, x, y, cfg


@pytest.mark.parametrize("with_hook", [False, True])
def test_trainer_with_sparse_kernels_gives_the_same_weights(with_hook, product_path):
    """3 local steps of SGD with momentum and weight decay, every masked layer sparse. Tolerance:
    the layer outputs differ by float rounding (≤ γ_K, see the module doc: relative ~1e-5 at
    K = 3136); through three steps at lr 0.05 that moves a weight by far less than 1e-6, while a
    wrong gradient at even one position moves it by lr·|g| ≳ 1e-4."""
    build, weights, masks, x, y, cfg = _trainer_case()
    dense = LocalTrainer(build(), cfg)
    sparse = LocalTrainer(build(), cfg, sparse_kernels=SparseKernelPolicy("always"))
    hooks_d = [SquaredGradientAccumulator(list(weights))] if with_hook else []
    hooks_s = [SquaredGradientAccumulator(list(weights))] if with_hook else []
    a, loss_a, n_a = dense.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=3, hooks=hooks_d)
    b, loss_b, n_b = sparse.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=3,
                                  hooks=hooks_s)
    assert sparse._kernels[()].layers == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert n_a == n_b == 50 and abs(loss_a - loss_b) < 1e-5
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
        if name in masks:
            assert np.all(b[name][~masks[name]] == 0)
    if with_hook:   # dense weight gradients: the importance of inactive weights too. A gradient
        # entry that cancels to ~0 carries the rounding of its terms, not of itself: absolute
        # tolerance relative to the largest entry
        ra, rb = hooks_d[0].result(), hooks_s[0].result()
        for name in ra:
            np.testing.assert_allclose(rb[name], ra[name], rtol=1e-4, atol=1e-6 * float(ra[name].max()),
                                       err_msg=name)
            if name in masks:
                assert np.count_nonzero(rb[name][~masks[name]]) > 0
    assert all("forward" not in m.__dict__ for m in sparse.model.modules())


def test_trainer_sparse_layers_argument_and_default_off():
    build, weights, masks, x, y, cfg = _trainer_case()
    trainer = LocalTrainer(build(), cfg)
    trainer.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=1)
    assert trainer._kernels[()].layers == []          # no policy: dense kernels
    trainer.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=1, sparse_layers=["fc1.weight"])
    assert trainer._kernels[()].layers == ["fc1.weight"]
    auto = LocalTrainer(build(), cfg, sparse_kernels=SparseKernelPolicy(
        "auto", {"conv2.weight": 0.1, "fc1.weight": 0.2}, {"fc1.weight": 0.05, "fc2.weight": 0.9}))
    auto.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=1)
    assert auto._kernels[()].layers == ["fc2.weight"]      # no hooks: active-gradient break-evens
    auto.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=1,
               hooks=[SquaredGradientAccumulator(["fc1.weight"])])
    assert auto._kernels[()].layers == ["fc1.weight"]      # a hook: dense-gradient break-evens
    with pytest.raises(ValueError, match="fc1.bias"):
        trainer.train(weights, x, y, seed=5, round_=1, client_id=0, masks=masks, steps=1,
                      sparse_layers=["fc1.bias"])
