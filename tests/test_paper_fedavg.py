"""FedAvg in a tiered comparison (docs/methods/hypemefed.md, "Which FedAvg"): ``fedavg_capable``
trains the full-depth model on the deepest tier's clients only and scores every client on the
submodel its tier can run; ``fedavg`` on a multi-exit model (every client at full depth) is named
the upper bound in the heterogeneous figures and table; ScaleFL's defaults are the authors' CIFAR
settings (distillation weight 0)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fake_results import MIB, make_config, make_rounds, write_run_with_writer
from helpers import REPO, TIERED, assert_same_metrics, needs_mpiexec, same_bits, submodel_predictions, write_idx

from fedmpi.config import load_config

NAN = math.nan


def multiexit_float_values(channels=(32, 64, 128, 256), in_channels=1, side=28, classes=10) -> int:
    """Float state_dict entries of the full-depth multi-exit VGG, counted by hand: per block two
    3x3 convs (weight + bias) and two BNs (weight, bias, running mean, running var); exit e after
    block e flattens channels x (side // 2^(e+1))^2 into a linear layer to the classes."""
    total, c_in = 0, in_channels
    for c in channels:
        total += (c_in * c * 9 + c) + (c * c * 9 + c) + 2 * 4 * c
        c_in = c
    for e in (1, 2, 3):
        features = channels[e] * (side // 2 ** (e + 1)) ** 2
        total += features * classes + classes
    return total


# ------------------------------------------------------------------------------ who trains, what
@pytest.mark.slow
def test_only_the_full_depth_tier_trains_and_it_trains_the_whole_model(tiered_runs):
    """TIERED: 9 clients in three equal tiers at levels 1, 2, 3, 6 a round: the 3 level-3 clients
    are the only ones that can hold the full model, so every round trains exactly those 3, each
    sending and receiving the whole network (1,220,990 float values, 4 bytes each)."""
    assert multiexit_float_values() == 1_219_070 + 2 * (32 + 32 + 64 + 64 + 128 + 128 + 256 + 256)   # params + BN stats
    _, res = tiered_runs("fedavg_capable", 1)
    clients = res["clients"]
    assert np.all(clients["tier"] == 3)
    ids_per_round = [sorted(clients["client_id"][clients["round"] == r]) for r in (1, 2)]
    assert [len(ids) for ids in ids_per_round] == [3, 3]
    assert ids_per_round[0] == ids_per_round[1]
    full_bytes = 4 * multiexit_float_values()
    assert np.all(clients["upload_bytes"] == full_bytes)
    assert np.all(clients["download_bytes"] == full_bytes)
    # the clients that never train are scored too: every tier has an accuracy
    for t in (1, 2, 3):
        assert np.all(np.isfinite(res["rounds"][f"tier_accuracy[{t}]"])), t
    assert np.all(np.isfinite(res["rounds"]["client_accuracy"]))


@needs_mpiexec
@pytest.mark.slow
def test_the_same_bits_on_one_and_two_ranks(tiered_runs):
    _, one = tiered_runs("fedavg_capable", 1)
    _, two = tiered_runs("fedavg_capable", 2)
    assert_same_metrics(one, two, what="fedavg_capable P=1 vs P=2: ")
    for name in ("tier_accuracy[1]", "tier_accuracy[2]", "tier_accuracy[3]", "exit_accuracy[1]"):
        assert same_bits(one["rounds"][name], two["rounds"][name]), name


# ------------------------------------------------------------------------------ how it is scored
def test_a_client_that_cannot_hold_the_full_model_is_scored_at_its_own_exit(tmp_path):
    """Each client's local test labels are set to what the global model predicts at its own tier's
    exit (blocks 0..e, exit e), so scoring every client there gives 1 in every tier; scoring the
    level-1 clients at the full model's exit 3 would not (checked first)."""
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator
    from fedmpi.engine.context import build_context
    from fedmpi.engine.evaluation import Evaluator

    cfg = copy.deepcopy(TIERED)
    cfg["data"]["root"] = str(write_idx(tmp_path / "mnist"))
    ctx = build_context(load_config(None, extra={**cfg, "algorithm": "fedavg_capable"}))
    algo = ctx.algorithm
    # exit heads scaled up, so no top-2 near-tie lets the evaluator's batching flip a prediction
    algo.init_server({n: w * 1000 if n.startswith("exits.") else w.copy() for n, w in ctx.initial_weights.items()},
                     np.random.default_rng(0))
    levels = [int(v["level"]) for v in algo.variants]
    assert levels == [1, 2, 3]

    (x_train, y_train), (x_test, y_test) = ctx.train, ctx.test
    full, _ = submodel_predictions(algo.weights, x_train, level=3)
    y_local, differs = y_train.clone(), 0
    for tier, level in enumerate(levels):
        predicted, margin = submodel_predictions(algo.weights, x_train, level=level)
        for c in np.flatnonzero(algo.tier == tier):
            rows = ctx.partition.test_indices[c]
            assert len(rows) and margin[rows].min() > 1e-3
            y_local[torch.from_numpy(rows)] = torch.from_numpy(predicted[rows])
            if level == 1:
                differs += int(np.count_nonzero(predicted[rows] != full[rows]))
    assert differs > 0, "the case does not tell exit 1 from the full model's exit"

    evaluator = Evaluator(Communicator(MPI.COMM_WORLD), ctx.trainer,
                          {"test": (x_test, y_test), "train": (x_train, y_local)}, ctx.partition, 40)
    metrics = algo.evaluation_metrics(1, evaluator.run(algo.evaluation_models(1)))
    assert [metrics[f"tier_accuracy[{t}]"] for t in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert metrics["client_accuracy"] == 1.0


# ------------------------------------------------------------------------------ the upper bound, named
def write_hetero(path, algorithm, model, seed=0, exits=True):
    rounds = make_rounds([0.3, NAN, 0.6 + 0.01 * seed], MIB)
    extra = {f"exit_accuracy[{e}]": ("float64", [0.1, NAN, 0.5]) for e in (1, 2, 3)} if exits else {}
    config = make_config(algorithm=algorithm, seed=seed, experiment="tiers", rounds=3, clients_total=10,
                         per_round=5, model=model)
    write_run_with_writer(path, config, rounds, extra_rounds=extra)


def table_rows(path: Path) -> list[str]:
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ")][1:]   # after the header
    return [l.strip("|").split("|")[0].strip() for l in lines]


def test_full_depth_fedavg_on_the_multiexit_model_is_named_the_upper_bound(tmp_path):
    from fedmpi.figures import draw_all
    from fedmpi.figures.heterogeneous import method_name
    from fedmpi.results import group_runs, read_runs

    results, plots = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    write_hetero(results / "hyp.h5", "hypemefed", "multiexit_vgg_small")
    for seed in (0, 1):
        write_hetero(results / f"fedavg{seed}.h5", "fedavg", "multiexit_vgg_small", seed, exits=False)
    write_hetero(results / "fedprox.h5", "fedprox", "mnistnet", exits=False)   # no depths: no bound
    draw_all(results, plots)
    rows = table_rows(plots / "tiers_heterogeneous_table.md")
    fedavg = [r for r in rows if r.startswith("FedAvg")]
    assert fedavg == ["FedAvg (upper bound: every client at full depth)"], rows
    assert [r for r in rows if r.startswith("FedProx")] == ["FedProx (full depth)"], rows
    assert "HypeMeFed" in rows
    # the bars' tick labels come from the same name
    names = {g.algorithm: method_name(g) for g in group_runs(read_runs(results))}
    assert "upper bound" in names["fedavg"] and "upper bound" not in names["hypemefed"]


# ------------------------------------------------------------------------------ campaigns
@pytest.mark.parametrize("campaign", ["hypemefed_fmnist_campaign.yaml", "hypemefed_fmnist_long_campaign.yaml"])
def test_the_fmnist_campaigns_run_the_constrained_fedavg_beside_the_upper_bound(campaign):
    text = (REPO / "bench" / campaign).read_text()
    algorithms = [run["algorithm"] for run in yaml.safe_load(text)["runs"]]
    assert "fedavg_capable" in algorithms and "fedavg" in algorithms and "fedavg_s" in algorithms
    assert "upper bound" in text.lower()


# ------------------------------------------------------------------------------ ScaleFL's CIFAR settings
def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_scalefl_defaults_are_the_authors_cifar_settings(tmp_path):
    """git-disl/scale-fl: --KD_gamma defaults to 0 and the CIFAR commands keep it, --KD_T to 3,
    distillation starts after a quarter of the rounds. With γ = 0, a round after the start trains
    on Σ_j (j+1)·CE_j / Σ_j (j+1) alone: checked against numpy on fixed logits."""
    cfg = load_config(None, ["algorithm=scalefl", "model=multiexit_vgg", "rounds=8"])
    assert cfg["scalefl"]["kd_gamma"] == 0.0
    assert cfg["scalefl"]["kd_temperature"] == 3.0 and cfg["scalefl"]["kd_after"] == 0.25

    tiered = copy.deepcopy(TIERED)
    tiered["data"]["root"] = str(write_idx(tmp_path / "mnist"))
    from fedmpi.engine.context import build_context
    algo = build_context(load_config(None, extra={**tiered, "algorithm": "scalefl", "rounds": 8})).algorithm
    objective = algo.objective_for(8, 2)     # round 8 > 0.25 · 8: distillation would be on

    exits = [np.array([[2.0, -1.0, 0.5], [0.1, 0.3, -0.2]]),
             np.array([[0.0, 1.5, -0.5], [1.0, -1.0, 2.0]]),
             np.array([[3.0, 0.0, -3.0], [-0.5, 0.5, 1.5]])]
    y = np.array([0, 2])
    ce = [-log_softmax(z)[np.arange(2), y].mean() for z in exits]
    expected = (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    got = objective([torch.tensor(z, dtype=torch.float64) for z in exits], torch.tensor(y))
    assert float(got) == pytest.approx(expected, rel=1e-12)
