"""PruneFL's initial-pruning budget (the authors' 10 fixed batches of k₀'s data, recorded in the
results) and the authors' loss, ``local.loss: bce_onehot``: against a hand computation, through
every training path (trainer, explicit MLP, grouped clients), in the config and in the shipped
PruneFL campaigns."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import PRUNEFL, fedmpi, read_results, same_bits

from fedmpi.config import DEFAULTS, load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.training import LocalTrainer

ROOT = Path(__file__).resolve().parent.parent

PF = PRUNEFL


def hand_bce(logits, labels) -> float:
    """mean over batch × classes of −[t·log σ(z) + (1 − t)·log(1 − σ(z))], t = 1 at the label."""
    logits = np.asarray(logits, dtype=np.float64)
    total = 0.0
    for row, label in zip(logits, labels):
        for c, z in enumerate(row):
            p = 1.0 / (1.0 + math.exp(-z))
            t = 1.0 if c == int(label) else 0.0
            total += -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))
    return total / logits.size


def local_cfg(**changes) -> dict:
    cfg = copy.deepcopy(DEFAULTS["local"])
    cfg.update(changes)
    return cfg


def learnable_data(n=64, dim=60, classes=10, seed=0):
    """Labels from a fixed linear teacher, so a model can lower the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    teacher = torch.randn(dim, classes, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def mlp_weights(seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", (60,), 10)
    return model, {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}


# ------------------------------------------------------------------------------ the loss
def test_bce_onehot_is_the_authors_formula_by_hand():
    from fedmpi.training.objectives import bce_onehot

    logits = [[0.5, -1.0, 2.0, 0.0], [-0.3, 0.8, -2.5, 1.2], [3.0, 0.1, -0.4, -1.1]]
    labels = [2, 0, 0]
    # one term by hand, as a check of the helper itself: the first row's label logit 2.0
    assert math.isclose(-math.log(1 / (1 + math.exp(-2.0))), 0.126928, abs_tol=1e-6)
    got = bce_onehot(torch.tensor(logits), torch.tensor(labels))
    assert got.dim() == 0
    assert math.isclose(float(got), hand_bce(logits, labels), rel_tol=1e-6)
    # not softmax cross-entropy
    ce = float(torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)))
    assert abs(float(got) - ce) > 0.1
    # a multi-exit model: the sum over its exits, like the cross-entropy default
    second = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 0.5, 0.5]]
    both = bce_onehot([torch.tensor(logits), torch.tensor(second)], torch.tensor(labels))
    assert math.isclose(float(both), hand_bce(logits, labels) + hand_bce(second, labels), rel_tol=1e-6)


def test_trainer_minimises_bce_onehot_and_it_decreases():
    """The trainer's reported loss is the BCE of the model it starts from (one full batch), the
    loss falls over training, and local.backward auto (whose explicit MLP path is cross-entropy
    only) gives the autograd path's bits."""
    model, weights = mlp_weights()
    x, y = learnable_data()
    with torch.no_grad():
        start = hand_bce(model(x).numpy(), y.numpy())
    trainer = LocalTrainer(model, local_cfg(loss="bce_onehot", batch_size=64, lr=0.5, backward="autograd"))
    _, first_loss, processed = trainer.train(weights, x, y, seed=3, round_=1, client_id=0, steps=1)
    assert processed == 64
    assert math.isclose(first_loss, start, rel_tol=1e-5)
    trained, _, _ = trainer.train(weights, x, y, seed=3, round_=1, client_id=0, epochs=300)
    with torch.no_grad():
        after = hand_bce(build_and_load(trained)(x).numpy(), y.numpy())
    assert after < 0.5 * start
    results = {}
    for backward in ("auto", "autograd"):
        again = LocalTrainer(mlp_weights()[0], local_cfg(loss="bce_onehot", batch_size=16, lr=0.5,
                                                         backward=backward))
        results[backward] = again.train(weights, x, y, seed=5, round_=2, client_id=1, epochs=2)
    assert results["auto"][1] == results["autograd"][1]
    assert all(same_bits(results["auto"][0][n], results["autograd"][0][n]) for n in weights)


def build_and_load(weights):
    model = build_model("mlp", (60,), 10)
    model.load_state_dict({n: torch.from_numpy(v) for n, v in weights.items()})
    return model


def test_grouped_clients_fall_back_to_one_by_one_under_bce_onehot():
    """local.client_batch: the grouped kernels are cross-entropy only, so with bce_onehot the group
    trains one by one: the same bits as LocalTrainer.train with that loss, not cross-entropy's."""
    from fedmpi.training.multi_client import Member, group_unsupported, train_group

    _, weights = mlp_weights()
    members = []
    for c in range(3):
        x, y = learnable_data(n=32, seed=10 + c)
        members.append(Member(c, weights, x, y, seed=100 + c))
    cfg = local_cfg(loss="bce_onehot", batch_size=8, lr=0.3, backward="autograd")
    trainer = LocalTrainer(mlp_weights()[0], cfg)
    assert "cross-entropy" in group_unsupported(trainer)
    grouped = train_group(trainer, members, round_=1)
    for m, (w, loss, processed) in zip(members, grouped):
        alone = LocalTrainer(mlp_weights()[0], cfg).train(m.weights, m.x, m.y, seed=m.seed, round_=1,
                                                          client_id=m.client_id)
        ce = LocalTrainer(mlp_weights()[0], local_cfg(batch_size=8, lr=0.3, backward="autograd")).train(
            m.weights, m.x, m.y, seed=m.seed, round_=1, client_id=m.client_id)
        assert (loss, processed) == (alone[1], alone[2]) and loss != ce[1]
        assert all(same_bits(w[n], alone[0][n]) for n in weights)


def test_local_loss_is_checked_before_the_run():
    cfg = load_config(None, extra={"local": {"loss": "bce_onehot"}})
    assert cfg["local"]["loss"] == "bce_onehot"
    assert load_config(None)["local"]["loss"] == "cross_entropy"
    with pytest.raises(ConfigError) as err:
        load_config(None, extra={"local": {"loss": "hinge"}})
    assert "local.loss" in str(err.value) and "bce_onehot" in str(err.value)
    # methods whose clients minimise their own objective refuse another loss
    for algorithm in ("heterofl", "scalefl"):
        with pytest.raises(ConfigError) as err:
            load_config(None, extra={"algorithm": algorithm, "model": "multiexit_vgg_small",
                                     "local": {"loss": "bce_onehot"}})
        assert "local.loss" in str(err.value) and "cross_entropy" in str(err.value)


# ------------------------------------------------------------------------------ initial-pruning budget
class RecordingTrainer(LocalTrainer):
    """A LocalTrainer that keeps the data and steps of every ``train`` call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def train(self, weights, x, y, **kwargs):
        out = super().train(weights, x, y, **kwargs)
        self.calls.append((x.clone(), y.clone(), kwargs["steps"], out[2]))
        return out


def test_initial_pruning_trains_on_ten_fixed_batches_of_k0_by_default():
    """Default settings: k₀ (500 samples) trains every initial-pruning iteration on the same
    10 × 16 = 160 of its samples, and the result records iterations and samples that match."""
    from fedmpi.algorithms import ClientTask, ModelInfo, build_algorithm
    from fedmpi.update import ModelUpdate

    model, weights = mlp_weights()
    info = ModelInfo({n: tuple(t.shape) for n, t in model.state_dict().items()}, maskable_parameter_names(model),
                     layer_flops(model, (60,)), num_clients=8, model="mlp", input_shape=(60,), num_classes=10)
    cfg = load_config(None, extra=copy.deepcopy(PF))
    algorithm = build_algorithm(cfg, info)
    trainer = RecordingTrainer(model, cfg["local"])
    x, y = learnable_data(n=500, seed=7)
    result = algorithm.local_update(ClientTask(1, 3, ModelUpdate(weights), {}, x, y, 11), trainer)

    assert trainer.calls, "initial pruning did not train"
    first_x, first_y = trainer.calls[0][0], trainer.calls[0][1]
    assert len(first_y) == 10 * 16
    rows = {tuple(r) for r in x.numpy().round(6).tolist()}
    assert len({tuple(r) for r in first_x.numpy().round(6).tolist()} & rows) == 160   # k₀'s own, distinct
    for cx, cy, _, _ in trainer.calls:                  # the same samples at every iteration
        assert torch.equal(cx, first_x) and torch.equal(cy, first_y)
    iterations = sum(steps for _, _, steps, _ in trainer.calls)
    processed = sum(p for _, _, _, p in trainer.calls)
    assert processed == 16 * iterations                 # 160 samples are whole batches of 16
    assert result.metrics["ip_iterations"] == iterations
    assert result.metrics["ip_samples"] == 160
    assert result.metrics["ip_samples_processed"] == processed == result.samples_processed


@pytest.mark.slow
def test_round_one_records_initial_prunings_iterations_and_samples(tmp_path):
    """The results file: round 1 and k₀'s client row hold ip_iterations, ip_samples and
    ip_samples_processed (2 batches of 16 here), −1 elsewhere."""
    cfg = copy.deepcopy(PF)
    cfg.update({"rounds": 2})
    cfg["prunefl"].update({"adaptive": False, "ip_data_batches": 2, "ip_max_iterations": 40})
    path = tmp_path / "pf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pf.h5"
    proc, _ = fedmpi(["run", str(path), "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = read_results(out)
    rounds, clients = res["rounds"], res["clients"]
    first = clients["round"] == 1
    iterations = int(rounds["ip_iterations"][0])
    assert 10 <= iterations <= 40
    assert int(rounds["ip_samples"][0]) == int(clients["ip_samples"][first][0]) == 32
    assert int(rounds["ip_samples_processed"][0]) == int(clients["ip_samples_processed"][first][0]) \
        == 16 * iterations
    assert int(rounds["ip_samples"][1]) == -1 and np.all(clients["ip_samples"][~first] == -1)


# ------------------------------------------------------------------------------ the shipped campaigns
# the fixes campaign takes these choices back one at a time, on purpose
CAMPAIGNS = sorted(p for p in ROOT.glob("bench/prunefl_*_campaign.yaml") if not p.name.endswith("_fixes_campaign.yaml"))


@pytest.mark.parametrize("path", CAMPAIGNS, ids=[p.name for p in CAMPAIGNS])
def test_prunefl_campaigns_keep_the_papers_budget_use_bce_and_run_initial_pruning_only(path, tmp_path):
    """≤ 20 % of one client's FL iterations for initial pruning (the paper: at most 10,000 against
    10,000 rounds × 5), on 10 batches; bce_onehot; and an "initial pruning only" run (mask fixed)."""
    from fedmpi.campaigns.campaign import load_campaign

    campaign = load_campaign(path, results_dir=tmp_path)
    configs = []
    for run in campaign.runs:
        taken = {i.key: 0.5 for i in run.inputs}
        configs.append(load_config(campaign.base, campaign.set_args(run, taken), extra=campaign.inline_config))
    prunefl = [c for c in configs if c["algorithm"] == "prunefl"]
    assert all(c["local"]["loss"] == "bce_onehot" for c in configs)
    ip_runs = [c for c in prunefl if c["prunefl"]["initial_pruning"]]
    only = [c for c in ip_runs if not c["prunefl"]["adaptive"]]
    assert ip_runs and only, f"{path.name}: no initial-pruning-only run"
    for c in ip_runs:
        pf = c["prunefl"]
        assert c["clients"]["per_round"] == c["clients"]["total"]     # every client trains every round
        fl_iterations = (c["rounds"] - 1) * pf["local_steps"]
        assert pf["ip_max_iterations"] <= 0.2 * fl_iterations, path.name
        assert pf["ip_data_batches"] == 10
    # "initial pruning only" has the same FL rounds as PruneFL
    assert {c["rounds"] for c in only} == {c["rounds"] for c in ip_runs if c["prunefl"]["adaptive"]}
