"""fedmpi.training: local training assembled from parts (optimizer, objective, step hooks, model
variants), each checked against a plain PyTorch loop written out here."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmpi.config import DEFAULTS
from fedmpi.models import build_model
from fedmpi.training import LocalTrainer, OptimizerSpec, SquaredGradientAccumulator, weighted_exits


def local_cfg(**changes) -> dict:
    cfg = copy.deepcopy(DEFAULTS["local"])
    cfg.update(changes)
    return cfg


def data(n=40, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def state_of(model) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in model.state_dict().items() if t.is_floating_point()}


def manual_loop(model, x, y, *, seed, batch_size, epochs, make_optimizer, loss_of, after_backward=None):
    """The reference: what the trainer must do, step for step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = make_optimizer(model.parameters())
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            loss = loss_of(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward:
                after_backward(model, len(batch))
            optimizer.step()
    return state_of(model)


def test_adam_with_a_two_exit_joint_loss_matches_a_plain_loop():
    """A level-2 multi-exit client trained with Adam on CE(exit 1) + CE(exit 2)."""
    torch.manual_seed(0)
    build = lambda **v: build_model("multiexit_vgg", (1, 28, 28), 10, **v)  # noqa: E731
    reference = build(level=2)
    weights = state_of(reference)
    x, y = data()
    cfg = local_cfg(optimizer="adam", lr=5e-4, weight_decay=5e-5, batch_size=16, epochs=2)
    trainer = LocalTrainer(build(), cfg, build_variant=build)
    trained, loss, processed = trainer.train(weights, x, y, seed=11, round_=1, client_id=3, variant={"level": 2})
    assert processed == 2 * len(y) and np.isfinite(loss)
    assert set(trained) == set(weights)          # the variant's tensors only, not the full model's
    expected = manual_loop(
        reference, x, y, seed=11, batch_size=16, epochs=2,
        make_optimizer=lambda p: torch.optim.Adam(p, lr=5e-4, weight_decay=5e-5),
        loss_of=lambda out, yb: F.cross_entropy(out[0], yb) + F.cross_entropy(out[1], yb))
    for name in expected:
        np.testing.assert_array_equal(trained[name], expected[name], err_msg=name)
    # the variant module is built once and reused
    assert trainer.model_for({"level": 2}) is trainer.model_for({"level": 2})
    assert trainer.model_for({"level": 2}) is not trainer.model


def test_weighted_exits_objective_trains_only_the_weighted_exit():
    torch.manual_seed(1)
    model = build_model("multiexit_vgg", (1, 28, 28), 10)
    weights = state_of(model)
    x, y = data(n=16)
    trainer = LocalTrainer(model, local_cfg(batch_size=16, lr=0.1))
    trained, _, _ = trainer.train(weights, x, y, seed=2, round_=1, client_id=0,
                                  objective=weighted_exits([0.0, 0.0, 1.0]))
    # exit heads 1 and 2 get no gradient from the loss: they stay as they were
    for head in ("exits.0.linear.weight", "exits.1.linear.weight"):
        np.testing.assert_array_equal(trained[head], weights[head])
    assert not np.array_equal(trained["exits.2.linear.weight"], weights["exits.2.linear.weight"])


@pytest.mark.parametrize("spec", [OptimizerSpec("sgd", 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                  OptimizerSpec("sgd", 0.05, momentum=0.9, weight_decay=1e-3),
                                  OptimizerSpec("sgd", 0.05),
                                  OptimizerSpec("adamw", 1e-3, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)])
def test_optimizer_spec_builds_the_configured_optimizer(spec):
    torch.manual_seed(2)
    model = build_model("mnistnet", (1, 28, 28), 10)
    weights = state_of(model)
    x, y = data(n=24)
    trained, _, _ = LocalTrainer(copy.deepcopy(model), local_cfg(batch_size=8)).train(
        weights, x, y, seed=5, round_=1, client_id=0, optimizer=spec)
    torch_cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[spec.name]
    kwargs = ({"lr": 0.05, "momentum": spec.momentum, "nesterov": spec.nesterov, "weight_decay": spec.weight_decay}
              if spec.name == "sgd" else {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.8, 0.99), "eps": 1e-6})
    expected = manual_loop(model, x, y, seed=5, batch_size=8, epochs=1,
                           make_optimizer=lambda p: torch_cls(p, **kwargs), loss_of=F.cross_entropy)
    for name in expected:
        np.testing.assert_array_equal(trained[name], expected[name], err_msg=name)


@pytest.mark.parametrize("nesterov", [False, True])
def test_own_sgd_steps_as_torch_optim_sgd_bit_for_bit_including_parameters_without_gradients(nesterov):
    from fedmpi.training.optim import SGD

    torch.manual_seed(4)
    spec = OptimizerSpec("sgd", 0.03, momentum=0.8, nesterov=nesterov, weight_decay=2e-3)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    own = SGD(ours, spec)
    reference = torch.optim.SGD(theirs, lr=0.03, momentum=0.8, nesterov=nesterov, weight_decay=2e-3)
    for step in range(6):
        grads = [torch.randn_like(t) for t in ours]
        for opt, params in ((own, ours), (reference, theirs)):
            opt.zero_grad(set_to_none=True)
            for j, (p, g) in enumerate(zip(params, grads)):
                if not (j == 1 and step in (0, 3)):    # the bias has no gradient in steps 0 and 3
                    p.grad = g.clone()
            opt.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), step
    assert torch.equal(own.buffers[1], reference.state[theirs[1]]["momentum_buffer"])


def test_optimizer_comes_from_the_config():
    spec = OptimizerSpec.from_config(local_cfg(optimizer="adam", lr=5e-4, betas=[0.5, 0.9], eps=1e-7))
    assert spec == OptimizerSpec("adam", 5e-4, 0.0, False, 0.0, (0.5, 0.9), 1e-7)


def test_squared_gradient_hook_accumulates_every_step_for_every_parameter():
    """PruneFL's per-step importance: Σ_steps g²·batch size, inactive (masked) weights included."""
    torch.manual_seed(3)
    model = build_model("mnistnet", (1, 28, 28), 10)
    weights = state_of(model)
    mask = np.random.default_rng(0).random(weights["fc1.weight"].shape) < 0.3
    weights["fc1.weight"] = np.where(mask, weights["fc1.weight"], np.float32(0))
    x, y = data(n=30)
    names = ["conv1.weight", "fc1.weight"]
    hook = SquaredGradientAccumulator(names)
    LocalTrainer(copy.deepcopy(model), local_cfg(batch_size=8, lr=0.05)).train(
        weights, x, y, seed=9, round_=1, client_id=0, masks={"fc1.weight": mask}, hooks=[hook], steps=6)

    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters() if n in names}
    model.load_state_dict({n: torch.from_numpy(v) for n, v in weights.items()}, strict=False)
    torch_mask = torch.from_numpy(mask)
    torch.manual_seed(9)
    generator = torch.Generator().manual_seed(9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = 0
    while steps < 6:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 8):
            if steps == 6:
                break
            batch = order[start:start + 8]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            for n, p in model.named_parameters():
                if n in expected:
                    expected[n] += p.grad.double() ** 2 * len(batch)
            optimizer.step()
            with torch.no_grad():
                model.fc1.weight.masked_fill_(~torch_mask, 0)
            steps += 1
    got = hook.result()
    for n in names:
        np.testing.assert_allclose(got[n], expected[n].float().numpy(), rtol=1e-6, atol=0)
    # pruned positions collect importance too (dense gradients), so PruneFL can regrow them
    assert np.all(got["fc1.weight"][~mask].sum() > 0)


def test_steps_counts_minibatch_steps_across_passes():
    torch.manual_seed(4)
    model = build_model("mlp", (12,), 3)
    weights = state_of(model)
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    _, _, processed = LocalTrainer(model, local_cfg(batch_size=4)).train(weights, x, y, seed=1, round_=1,
                                                                        client_id=0, steps=5)
    assert processed == 4 + 4 + 2 + 4 + 4    # 5 steps: a pass of 3 batches, then 2 of the next pass


def test_unknown_variant_tensor_is_refused():
    model = build_model("mlp", (12,), 3)
    trainer = LocalTrainer(model, local_cfg())
    with pytest.raises(KeyError, match="not part of model variant"):
        trainer.load({"nope": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="has no variants"):
        trainer.model_for({"level": 1})


# ------------------------------------------------------------------ the MLP without autograd
EXPLICIT_CASES = {
    "plain": dict(local={}, train={}),
    "momentum_decay": dict(local=dict(momentum=0.9, weight_decay=1e-3), train={}),
    "nesterov": dict(local=dict(momentum=0.9, nesterov=True, weight_decay=5e-4), train={}),
    "partial_batches_two_epochs": dict(local=dict(batch_size=7, momentum=0.5), train=dict(epochs=2)),
    "steps": dict(local=dict(batch_size=8, momentum=0.9), train=dict(steps=7)),
    "masks": dict(local=dict(momentum=0.9, weight_decay=1e-3), train=dict(masks=True)),
    "one_sample_batches": dict(local=dict(batch_size=1), train={}),
}


def explicit_and_autograd(case: str, shape=(1, 28, 28), n=45, lr=0.05):
    """(weights, loss, processed) of the same client trained with local.backward auto and autograd."""
    spec = EXPLICIT_CASES[case]
    torch.manual_seed(11)
    model = build_model("mlp", shape, 10)
    weights = state_of(model)
    x, y = data(n, shape)
    train = dict(spec["train"])
    if train.pop("masks", False):
        g = torch.Generator().manual_seed(5)
        train["masks"] = {name: (torch.rand(w.shape, generator=g) < 0.3).numpy()
                          for name, w in weights.items() if name.endswith("weight")}
    results = {}
    for backward in ("auto", "autograd"):
        trainer = LocalTrainer(build_model("mlp", shape, 10), local_cfg(lr=lr, backward=backward, **spec["local"]))
        results[backward] = trainer.train(weights, x, y, seed=9, round_=2, client_id=4, **train)
    return results["auto"], results["autograd"]


@pytest.mark.parametrize("case", list(EXPLICIT_CASES))
def test_the_mlp_trained_without_autograd_has_the_bits_of_autograd(case, monkeypatch):
    from fedmpi.training import explicit

    steps = []
    real_step = explicit.ExplicitMLP.backward_step
    monkeypatch.setattr(explicit.ExplicitMLP, "backward_step",
                        lambda self, saved: (steps.append(1), real_step(self, saved)))
    (w_explicit, loss_explicit, n_explicit), (w_autograd, loss_autograd, n_autograd) = explicit_and_autograd(case)
    assert steps, "local.backward auto did not take the explicit path for the MLP"
    assert (loss_explicit, n_explicit) == (loss_autograd, n_autograd)
    assert w_explicit.keys() == w_autograd.keys()
    for name in w_explicit:
        assert np.array_equal(w_explicit[name], w_autograd[name]), name
    if case == "masks":   # the masks were applied: about 70 % of every weight matrix is exactly 0
        for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
            assert 0.6 < np.mean(w_explicit[name] == 0) < 0.8, name


@pytest.mark.parametrize("setting", ["prox", "adam", "hook", "cnn"])
def test_settings_the_explicit_mlp_does_not_cover_train_through_autograd(setting, monkeypatch):
    from fedmpi.training import explicit

    monkeypatch.setattr(explicit.ExplicitMLP, "backward_step",
                        lambda self, saved: pytest.fail("explicit path taken for an uncovered setting"))
    torch.manual_seed(3)
    model = build_model("mnistnet" if setting == "cnn" else "mlp", (1, 28, 28), 10)
    x, y = data(20)
    local = local_cfg(optimizer="adam", lr=1e-3) if setting == "adam" else local_cfg()
    kwargs = {"prox_mu": 0.1} if setting == "prox" else {}
    if setting == "hook":
        kwargs["hooks"] = [SquaredGradientAccumulator([n for n, _ in model.named_parameters()])]
    LocalTrainer(model, local).train(state_of(model), x, y, seed=1, round_=1, client_id=0, **kwargs)


def test_a_diverging_mlp_without_autograd_names_its_round_and_client():
    from fedmpi.errors import DivergenceError

    torch.manual_seed(2)
    model = build_model("mlp", (1, 28, 28), 10)
    x, y = data(64)
    with pytest.raises(DivergenceError, match="round 3, client 8"):
        LocalTrainer(model, local_cfg(lr=1e12, batch_size=8)).train(state_of(model), x * 1e3, y, seed=1,
                                                                     round_=3, client_id=8, epochs=3)
