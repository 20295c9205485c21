"""``local.client_batch``: several clients of a rank trained at once (fedmpi/training/multi_client.py).

Grouped training must give every client exactly what ``LocalTrainer.train`` gives it, bit for bit
(weights, loss, samples), for the models and settings it groups; blocks of clients are assigned
whole, and with ``client_batch`` = 1 the assignment is the per-client one it always was; end to end,
a run with ``client_batch`` > 1 has the same metrics as one without, whatever the rank count.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from fedmpi.config import DEFAULTS
from fedmpi.engine.messages import assign_clients, client_blocks
from fedmpi.errors import DivergenceError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.training import LocalTrainer, OptimizerSpec
from fedmpi.training import multi_client
from fedmpi.training.multi_client import Member, group_unsupported, train_group

from helpers import assert_same_metrics, fedmpi, needs_mpiexec, read_results, write_config


def local_cfg(**changes) -> dict:
    cfg = copy.deepcopy(DEFAULTS["local"])
    cfg.update(changes)
    return cfg


def make_trainer(model_name: str, shape, **local) -> LocalTrainer:
    torch.manual_seed(0)
    return LocalTrainer(build_model(model_name, shape, 10), local_cfg(**local))


def initial_weights(trainer) -> dict[str, np.ndarray]:
    return {n: t.detach().numpy().copy() for n, t in trainer.model.state_dict().items()}


def members_for(trainer, shape, sizes, *, masked=False, density=0.5, seed=0) -> list[Member]:
    g = torch.Generator().manual_seed(seed)
    base = initial_weights(trainer)
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        # clients start from slightly different weights, as after a personalised download
        weights = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in base.items()}
        masks = None
        if masked:
            masks = {k: rng.random(weights[k].shape) < density for k in maskable_parameter_names(trainer.model)}
        out.append(Member(100 + i, weights, torch.randn(n, *shape, generator=g),
                          torch.randint(0, 10, (n,), generator=g), seed=1000 + i, masks=masks))
    return out


def one_by_one(trainer, members, round_=1, **kwargs):
    return [trainer.train(m.weights, m.x, m.y, seed=m.seed, round_=round_, client_id=m.client_id,
                          masks=m.masks, **kwargs) for m in members]


def assert_identical(expected, got):
    assert len(expected) == len(got)
    for i, ((w1, l1, p1), (w2, l2, p2)) in enumerate(zip(expected, got)):
        assert list(w1) == list(w2)
        for name in w1:
            a, b = w1[name], w2[name]
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), (
                f"member {i} {name}: max |diff| {np.abs(a.astype(np.float64) - b).max()}")
        assert l1 == l2, (i, l1, l2)
        assert p1 == p2


def refuse(*args, **kwargs):
    """Stands in for LocalTrainer.train: train_group must really train as a group."""
    raise AssertionError("train_group fell back to LocalTrainer.train")


# ------------------------------------------------------------------------------ bit-exactness
CASES = {
    "sgd": dict(lr=0.05),
    "momentum+wd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mlp_group_equals_one_by_one_bit_for_bit(case, monkeypatch):
    """Uneven client sizes (sub-groups by size), a partial last batch, two epochs."""
    trainer = make_trainer("mlp", (60,), batch_size=16, epochs=2, **CASES[case])
    members = members_for(trainer, (60,), [40, 40, 37, 40, 37, 21])
    expected = one_by_one(trainer, members)
    assert group_unsupported(trainer) is None
    monkeypatch.setattr(trainer, "train", refuse)
    assert_identical(expected, train_group(trainer, members, round_=1))


def test_mnistnet_group_equals_one_by_one_bit_for_bit(monkeypatch):
    """Convolutions, max-pooling, a partial batch, momentum and weight decay."""
    trainer = make_trainer("mnistnet", (1, 28, 28), batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    members = members_for(trainer, (1, 28, 28), [20, 20, 20])
    expected = one_by_one(trainer, members)
    monkeypatch.setattr(trainer, "train", refuse)
    assert_identical(expected, train_group(trainer, members, round_=1))


def test_masks_and_proximal_term_bit_for_bit(monkeypatch):
    """FedDST's masked training and FedProx's proximal term, together."""
    trainer = make_trainer("mlp", (60,), batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)
    members = members_for(trainer, (60,), [40, 40, 40, 33], masked=True)
    expected = one_by_one(trainer, members, prox_mu=0.05)
    monkeypatch.setattr(trainer, "train", refuse)
    got = train_group(trainer, members, round_=1, prox_mu=0.05)
    assert_identical(expected, got)
    for m, (weights, _, _) in zip(members, got):
        for name, mask in m.masks.items():
            assert np.all(weights[name][~mask] == 0)


def test_unsupported_settings_train_one_by_one():
    trainer = make_trainer("mlp", (60,), batch_size=16, optimizer="adam", lr=1e-3)
    assert "adam" in group_unsupported(trainer)
    members = members_for(trainer, (60,), [40, 40])
    assert_identical(one_by_one(trainer, members), train_group(trainer, members, round_=1))
    assert "step hooks" in group_unsupported(trainer, optimizer=OptimizerSpec(), hooks=[object()])
    assert "steps" in group_unsupported(trainer, optimizer=OptimizerSpec(), steps=5)


class SequenceModel(torch.nn.Module):
    """A linear layer applied to 3-D per-sample input: not covered by the per-client kernels."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(30, 10)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], 2, 30)).mean(1)


def test_layer_calls_outside_the_per_client_kernels_train_one_by_one(monkeypatch):
    torch.manual_seed(0)
    trainer = LocalTrainer(SequenceModel(), local_cfg(batch_size=16, lr=0.05, momentum=0.9))
    members = members_for(trainer, (60,), [40, 40, 40])
    expected = one_by_one(trainer, members)
    assert group_unsupported(trainer) is None          # only the forward shows it
    calls = []
    original = trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert_identical(expected, train_group(trainer, members, round_=1))
    assert len(calls) == len(members)


def test_models_with_buffers_or_odd_layers_are_not_grouped():
    bn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert "buffers" in multi_client.model_unsupported(bn)
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    assert "outside Linear/Conv2d" in multi_client.model_unsupported(emb)
    drop = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    assert "not known to act per sample" in multi_client.model_unsupported(drop)
    assert multi_client.model_unsupported(build_model("mnistnet", (1, 28, 28), 10)) is None


def test_divergence_names_the_client_the_one_by_one_loop_names():
    trainer = make_trainer("mlp", (60,), batch_size=16, lr=0.05)
    members = members_for(trainer, (60,), [32, 32, 32, 32])
    for i in (1, 3):
        members[i].x[5, 0] = float("inf")
    with pytest.raises(DivergenceError) as expected:
        one_by_one(trainer, members, round_=7)
    with pytest.raises(DivergenceError) as got:
        train_group(trainer, members, round_=7)
    assert str(got.value) == str(expected.value)
    assert "client 101" in str(got.value)


# ------------------------------------------------------------------------------ assignment
def assign_one_by_one(clients, sizes, ranks):
    """The per-client assignment as it was before blocks existed (the reference)."""
    load = {r: 0 for r in ranks}
    assignment = {r: [] for r in ranks}
    for c in sorted(clients, key=lambda c: (-sizes[c], c)):
        target = min(ranks, key=lambda r: (load[r], r))
        assignment[target].append(c)
        load[target] += sizes[c]
    return {r: sorted(cs) for r, cs in assignment.items()}


@pytest.mark.parametrize("ranks", [[0], [1, 2], [1, 2, 3, 4], list(range(1, 8))])
def test_client_batch_1_assigns_exactly_as_before(ranks):
    rng = random.Random(3)
    for _ in range(50):
        clients = rng.sample(range(200), rng.randint(1, 60))
        sizes = {c: rng.choice([5, 20, 20, 60, 61, 300]) for c in range(200)}
        assert assign_clients(clients, sizes, ranks) == assign_one_by_one(clients, sizes, ranks)
        assert assign_clients(clients, sizes, ranks, 1) == assign_one_by_one(clients, sizes, ranks)


@pytest.mark.parametrize("group", [2, 3, 5, 16])
@pytest.mark.parametrize("ranks", [[0], [1, 2], [1, 2, 3, 4]])
def test_blocks_are_never_split_and_each_rank_can_recover_them(group, ranks):
    rng = random.Random(group)
    for _ in range(30):
        clients = rng.sample(range(300), rng.randint(1, 80))
        sizes = {c: rng.randint(1, 100) for c in range(300)}
        blocks = client_blocks(clients, group)
        assert [c for b in blocks for c in b] == sorted(clients)
        assert all(len(b) == group for b in blocks[:-1])
        assignment = assign_clients(clients, sizes, ranks, group)
        assert sorted(c for cs in assignment.values() for c in cs) == sorted(clients)
        recovered = []
        for r, cs in assignment.items():
            assert cs == sorted(cs)
            recovered += [cs[i:i + group] for i in range(0, len(cs), group)]   # what the worker does
        assert sorted(recovered) == sorted(blocks)
        # the same whatever order the clients come in
        assert assign_clients(rng.sample(clients, len(clients)), sizes, ranks, group) == assignment


def test_blocks_are_balanced_by_samples():
    sizes = {c: 60 for c in range(1000)}
    assignment = assign_clients(list(range(100)), sizes, [1, 2, 3, 4], 25)
    assert [len(cs) for cs in assignment.values()] == [25, 25, 25, 25]
    assignment = assign_clients(list(range(100)), sizes, [1, 2], 10)
    assert [len(cs) for cs in assignment.values()] == [50, 50]


# ------------------------------------------------------------------------------ the algorithms' side
def test_only_the_local_update_a_fast_path_was_written_for_trains_together():
    """``Algorithm.local_update_group`` takes the fast path ``local_update_together`` only where
    ``trains_together``: the FedAvg and FedDST families; a subclass with its own ``local_update``
    (and every other method) trains one by one, through its ``local_update``."""
    from fedmpi.algorithms import ALGORITHMS, ModelInfo
    from fedmpi.algorithms.fedavg import FedAvg

    together = {n for n, cls in ALGORITHMS.items() if ALGORITHMS.origin(n).source == "builtin" and cls.trains_together()}
    assert together == {"fedavg", "fedavgm", "fedprox", "feddst", "randommask"}

    class Grouped(FedAvg):
        def local_update(self, task, trainer):
            return ("one", task)

        def local_update_together(self, tasks, trainer):
            return [("together", t) for t in tasks]

    class Inherits(Grouped):
        pass

    class OwnUpdate(Grouped):   # Grouped's fast path does not train this local_update
        def local_update(self, task, trainer):
            return ("own", task)

    info = ModelInfo(shapes={"w": (2,)}, maskable=[], layer_flops={})
    inherits, own = Inherits({}, info), OwnUpdate({}, info)
    assert inherits.trains_together() and not own.trains_together()
    assert inherits.local_update_group(["a", "b"], None) == [("together", "a"), ("together", "b")]
    assert inherits.local_update_group(["a"], None) == [("one", "a")]   # a block of one
    assert own.local_update_group(["a", "b"], None) == [("own", "a"), ("own", "b")]


# ------------------------------------------------------------------------------ end to end
E2E = {
    "data": {"name": "synthetic", "partition": "iid"},
    "clients": {"total": 12, "per_round": 8},
    "rounds": 3,
    "local": {"epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.001},
    "sparsity": 0.5,
    "feddst": {"readjust_every": 2, "r_end": 3},   # round 2 readjusts the masks
}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    work = tmp_path_factory.mktemp("client_batch")
    cache = {}

    def get(algorithm: str, client_batch: int, ranks: int):
        key = (algorithm, client_batch, ranks)
        if key not in cache:
            cfg = write_config(work / f"{algorithm}.yaml", **copy.deepcopy(E2E), algorithm=algorithm)
            out = work / f"{algorithm}_cb{client_batch}_p{ranks}.h5"
            proc, _ = fedmpi(["run", str(cfg), "--out", str(out), "--quiet", "--set",
                              f"local.client_batch={client_batch}"], ranks, timeout=240)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[key] = read_results(out)
        return cache[key]

    return get


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "feddst"])
@pytest.mark.slow
def test_client_batch_run_equals_one_by_one_run(e2e, algorithm):
    one, grouped = e2e(algorithm, 1, 1), e2e(algorithm, 3, 1)
    assert_same_metrics(one, grouped, what=f"{algorithm} client_batch 1 vs 3: ")
    assert np.all(np.isfinite(one["rounds"]["test_accuracy"]))
    # the worker really trained blocks: a block's compute time is shared by sample count
    clients = grouped["clients"]
    for r in np.unique(clients["round"]):
        this = clients["round"] == r
        per_sample = clients["compute_seconds"][this] / clients["num_samples"][this]
        assert np.allclose(per_sample[:3], per_sample[0])


@needs_mpiexec
@pytest.mark.parametrize("algorithm", ["fedavg", "feddst"])
@pytest.mark.slow
def test_client_batch_same_metrics_whatever_the_rank_count(e2e, algorithm):
    base = e2e(algorithm, 3, 1)
    for ranks in (2, 4):
        other = e2e(algorithm, 3, ranks)
        assert_same_metrics(base, other, what=f"{algorithm} client_batch 3, P=1 vs P={ranks}: ")
        # blocks of 3 in client order stay on one rank
        clients = other["clients"]
        for r in np.unique(clients["round"]):
            ids = clients["client_id"][clients["round"] == r]
            ranks_of = dict(zip(ids.tolist(), clients["rank"][clients["round"] == r].tolist()))
            for block in client_blocks(sorted(ranks_of), 3):
                assert len({ranks_of[c] for c in block}) == 1
