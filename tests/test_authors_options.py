"""The HypeMeFed authors' small behaviours as options: ``tiers.leftover`` (who gets the per-round
slots left over from the even split over tiers) and ``local.drop_last`` (skip each epoch's last
partial batch), in the plain trainer, the MLP without autograd and grouped training."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.algorithms.heterogeneous import TieredAlgorithm
from fedmpi.config import DEFAULTS, load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model
from fedmpi.training import LocalTrainer
from fedmpi.training.multi_client import Member, train_group


# ---------------------------------------------------------------------------- tiers.leftover
def slots_drawn(k: int, tiers: int, leftover: str | None, per_tier: int = 20) -> list[int]:
    """How many clients of each tier ``TieredAlgorithm.select_clients`` draws for one round."""
    tier = np.repeat(np.arange(tiers), per_tier)
    cfg = {"clients": {"per_round": k}, "tiers": {"mix": [1.0] * tiers}}
    if leftover is not None:
        cfg["tiers"]["leftover"] = leftover
    algo = SimpleNamespace(cfg=cfg, num_tiers=tiers, tier=tier)
    chosen = TieredAlgorithm.select_clients(algo, 1, np.random.default_rng(0))
    return [int(np.sum(tier[chosen] == t)) for t in range(tiers)]


# (k, tiers) -> per-tier counts, by hand. lowest: k // T each, one more for each of the first
# k mod T tiers. authors (main.py, select_participants): k // T each, all k mod T to level 2.
BY_HAND = [
    (10, 3, [4, 3, 3], [3, 4, 3]),
    (11, 3, [4, 4, 3], [3, 5, 3]),
    (6, 3, [2, 2, 2], [2, 2, 2]),
    (7, 2, [4, 3], [3, 4]),
    (13, 4, [4, 3, 3, 3], [3, 4, 3, 3]),
    (15, 4, [4, 4, 4, 3], [3, 6, 3, 3]),
    (5, 1, [5], [5]),
]


@pytest.mark.parametrize("k,tiers,lowest,authors", BY_HAND)
def test_leftover_slots_by_hand(k, tiers, lowest, authors):
    assert slots_drawn(k, tiers, None) == lowest           # the default stays the old rule
    assert slots_drawn(k, tiers, "lowest") == lowest
    assert slots_drawn(k, tiers, "authors") == authors


def test_leftover_rule_is_validated():
    assert load_config(None, ["algorithm=depthfl", "model=multiexit_vgg",
                              "tiers.leftover=authors"])["tiers"]["leftover"] == "authors"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algorithm=depthfl", "model=multiexit_vgg", "tiers.leftover=level2"])
    assert "tiers.leftover" in str(err.value) and "authors" in str(err.value)


# ---------------------------------------------------------------------------- local.drop_last
def make_trainer(backward="autograd", **local) -> LocalTrainer:
    cfg = copy.deepcopy(DEFAULTS["local"])
    cfg.update(backward=backward, **local)
    torch.manual_seed(0)
    return LocalTrainer(build_model("mlp", (12,), 10), cfg)


def data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def start_weights(trainer):
    return {n: t.detach().numpy().copy() for n, t in trainer.model.state_dict().items()}


@pytest.mark.parametrize("backward", ["autograd", "auto"])   # auto: the MLP without autograd
@pytest.mark.parametrize("n,drop_last,per_epoch", [(10, True, 8), (10, False, 10), (3, True, 3), (8, True, 8)])
def test_samples_trained_per_epoch(backward, n, drop_last, per_epoch):
    """Batch 4: 10 samples train 8 an epoch with drop_last (the authors' DataLoader), 10 without;
    3 samples (fewer than a batch) train as one batch of 3 (the authors cap the batch size)."""
    trainer = make_trainer(backward, batch_size=4, epochs=2, drop_last=drop_last)
    seen = []
    handle = trainer.model.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    x, y = data(n)
    try:
        _, _, processed = trainer.train(start_weights(trainer), x, y, seed=5, round_=1, client_id=0)
    finally:
        handle.remove()
    assert processed == 2 * per_epoch    # samples_processed: what train_flops and sim_seconds count
    if backward == "autograd":           # the explicit MLP runs its own forward, without the hook
        assert sum(seen) == 2 * per_epoch
        assert drop_last is False or all(s == min(4, n) for s in seen)   # whole batches only


def reference_sgd(trainer, x, y, *, seed, epochs, batch, drop_last):
    """Plain torch.optim.SGD over a fresh randperm per epoch, written out here."""
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 10)
    model.load_state_dict(trainer.model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=trainer.local["lr"])
    generator = torch.Generator().manual_seed(seed)
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if drop_last and len(idx) < batch:
                continue
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("drop_last", [False, True])
def test_weights_match_a_written_out_loop(drop_last):
    """drop_last false is every sample every epoch, as before; true skips exactly the tail batch."""
    trainer = make_trainer("autograd", batch_size=4, epochs=2, drop_last=drop_last)
    x, y = data(10)
    start = start_weights(trainer)
    expected = reference_sgd(trainer, x, y, seed=5, epochs=2, batch=4, drop_last=drop_last)
    weights, _, _ = trainer.train(start, x, y, seed=5, round_=1, client_id=0)
    for name in expected:
        assert weights[name].tobytes() == expected[name].tobytes(), name


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouped_training_drops_the_same_batches(drop_last, monkeypatch):
    """``local.client_batch`` blocks train as a group and give the one-by-one bits and counts."""
    trainer = make_trainer("autograd", batch_size=4, epochs=2, drop_last=drop_last)
    start = start_weights(trainer)
    members = []
    for i in range(3):
        x, y = data(10, seed=i)
        members.append(Member(100 + i, start, x, y, seed=1000 + i))
    alone = [trainer.train(m.weights, m.x, m.y, seed=m.seed, round_=1, client_id=m.client_id) for m in members]

    def refuse(*args, **kwargs):
        raise AssertionError("train_group fell back to one by one")

    monkeypatch.setattr(trainer, "train", refuse)
    grouped = train_group(trainer, members, round_=1)
    for (w1, l1, p1), (w2, l2, p2) in zip(alone, grouped):
        assert p1 == p2 == (16 if drop_last else 20)
        assert l1 == l2
        assert all(w1[k].tobytes() == w2[k].tobytes() for k in w1)
