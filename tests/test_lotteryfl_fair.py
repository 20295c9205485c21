"""LotteryFL, fairly: the prune decision uses a validation split of the client's own training data,
disjoint from the reported local test samples and drawn from (seed, client) alone; the
best-so-far personalised accuracy takes in the post-training accuracy as the public code's does;
the upload-to-target table of the LotteryFL campaign."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from helpers import LOTTERYFL
import torch

from fedmpi.algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from fedmpi.algorithms.evaluation import EvalOutcome
from fedmpi.config import load_config
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.training import LocalTrainer
from fedmpi.update import ModelUpdate

LF = LOTTERYFL


def config(*sets):
    return load_config(None, extra=copy.deepcopy(LF), overrides=list(sets))


class Recorder:
    """Stands in for the trainer and the accuracy check: records the samples each sees."""

    def __init__(self, algorithm):
        self.checked, self.trained = [], None
        self.device = "cpu"
        algorithm._accuracy = self.accuracy

    def accuracy(self, trainer, weights, masks, x, y):
        self.checked.append((x.clone(), y.clone()))
        return 0.0

    def train(self, weights, x, y, **kwargs):
        self.trained = (x.clone(), y.clone())
        return {n: np.array(v, copy=True) for n, v in weights.items()}, 0.5, len(y)


def rows(x) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def decide(cfg, client: int, round_: int):
    """(the run's context, the recorder, the result) of one client's local update, as any rank runs it."""
    from fedmpi.engine.context import build_context
    from fedmpi.engine.worker import make_client_task

    ctx = build_context(cfg)
    algorithm = build_algorithm(cfg, ctx.info)
    recorder = Recorder(algorithm)
    task = make_client_task(ctx, round_, client, ModelUpdate(ctx.initial_weights), {})
    result = algorithm.local_update(task, recorder)
    return ctx, recorder, result


@pytest.mark.parametrize("local_test_fraction", [0.0, 0.25])
def test_the_prune_decision_uses_a_validation_split_disjoint_from_the_reported_samples(local_test_fraction):
    cfg = config(f"data.local_test_fraction={local_test_fraction}")
    for client in range(8):
        ctx, seen, result = decide(cfg, client, round_=3)
        x_train, _ = ctx.train
        own = rows(x_train[ctx.partition.train_indices[client]])
        x_report, y_report = ctx.train if ctx.partition.local_test_in_train else ctx.test
        reported = rows(x_report[ctx.partition.test_indices[client]])
        decision = rows(seen.checked[0][0])
        assert not decision & reported, f"client {client}: the decision saw reported samples"
        assert decision <= own, f"client {client}: the decision samples are not the client's training data"
        # the authors' 90/10 split: ⌊0.1·n⌋ samples (at least 1) held out, and not trained on
        n = len(own)
        assert len(decision) == len(seen.checked[0][1]) == max(1, int(0.1 * n))
        trained = rows(seen.trained[0])
        assert not trained & decision and trained | decision == own
        assert result.num_samples == len(seen.trained[1]) == n - len(decision)
        # the post-training check is on the reported samples, all of them, in partition order
        rows_index = torch.from_numpy(ctx.partition.test_indices[client])
        assert torch.equal(seen.checked[1][0], x_report[rows_index])
        assert torch.equal(seen.checked[1][1], y_report[rows_index])


def test_the_validation_split_depends_on_seed_and_client_alone():
    first = [decide(config(), c, round_=3)[1].checked[0] for c in range(8)]
    # another round, another context (what another rank builds): the same samples
    again = [decide(config(), c, round_=7)[1].checked[0] for c in range(8)]
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # another seed: the partition of the synthetic data changes too, so compare the draw itself
    from fedmpi.data.partition import validation_split

    train0, held0 = validation_split(40, 0.1, 0, 5)
    train1, held1 = validation_split(40, 0.1, 1, 5)
    other_client = validation_split(40, 0.1, 0, 6)[1]
    assert not np.array_equal(held0, held1) and not np.array_equal(held0, other_client)
    for train, held in ((train0, held0), (train1, held1)):
        assert len(held) == 4 and np.array_equal(np.sort(np.concatenate([train, held])), np.arange(40))
        assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    np.testing.assert_array_equal(validation_split(40, 0.1, 0, 5)[1], held0)


@pytest.mark.parametrize("n, fraction, held", [(40, 0.1, 4), (40, 0.0, 0), (2, 0.1, 1), (1, 0.5, 0),
                                               (0, 0.5, 0), (5, 0.99, 4), (15, 0.1, 1)])
def test_validation_split_sizes(n, fraction, held):
    from fedmpi.data.partition import validation_split

    train, validation = validation_split(n, fraction, 0, 0)
    assert len(validation) == held and len(train) == n - held


def test_validation_fraction_0_decides_on_the_reported_set_and_trains_on_all():
    cfg = config("lotteryfl.validation_fraction=0")
    ctx, seen, result = decide(cfg, 2, round_=3)
    x_test, _ = ctx.test
    assert torch.equal(seen.checked[0][0], x_test[torch.from_numpy(ctx.partition.test_indices[2])])
    assert result.num_samples == len(seen.trained[1]) == len(ctx.partition.train_indices[2])


def test_a_bad_validation_fraction_is_a_config_error():
    from fedmpi.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lotteryfl.validation_fraction.*must be in \[0, 1\)"):
        config("lotteryfl.validation_fraction=1")
    assert config("lotteryfl.validation_fraction=0.5")["lotteryfl"]["validation_fraction"] == 0.5


# ------------------------------------------------------------------------------ best so far
def mlp_setup(*sets):
    cfg = config(*sets)
    model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    info = ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (60,)), num_clients=8,
                     model="mlp", input_shape=(60,), num_classes=10)
    return cfg, model, info


class Returns:
    """A trainer whose training returns the given weights: the client's trained model."""

    def __init__(self, model, cfg, trained):
        self.real = LocalTrainer(model, cfg["local"])
        self.device = self.real.device
        self.trained = trained

    def load(self, weights, variant=None):
        return self.real.load(weights, variant)

    def train(self, weights, x, y, **kwargs):
        return {n: np.array(v, copy=True) for n, v in self.trained.items()}, 0.5, len(y)


def constant_predictor(info, label: int):
    """Weights of an MLP that predicts ``label`` for every input: all zero but that output's bias."""
    weights = {n: np.zeros(s, np.float32) for n, s in info.shapes.items()}
    output_bias = [n for n, s in info.shapes.items() if s == (10,)][-1]
    weights[output_bias][label] = 1.0
    return weights


def test_the_client_reports_its_trained_models_accuracy_on_the_reported_local_test_set():
    cfg, model, info = mlp_setup("lotteryfl.acc_threshold=1")    # never prunes
    algorithm = build_algorithm(cfg, info)
    received = constant_predictor(info, 5)
    trained = constant_predictor(info, 3)
    # reported local test set: 3 of its 8 labels are 3 → the trained model scores 3/8 there
    local_test = (torch.randn(8, 60), torch.tensor([3, 0, 3, 1, 2, 3, 4, 5]))
    x, y = torch.randn(40, 60), torch.full((40,), 5)   # the received model is right on all of them
    task = ClientTask(3, 2, ModelUpdate(received), {}, x, y, 7, local_test=local_test)
    result = algorithm.local_update(task, Returns(model, cfg, trained))
    assert result.metrics["post_accuracy"] == 3 / 8
    assert result.metrics["pre_accuracy"] == 1.0   # the received model on the validation split
    # no local test samples: no post-training accuracy (the evaluator has none for it either)
    empty = ClientTask(3, 2, ModelUpdate(received), {}, x, y, 7, local_test=(torch.randn(0, 60), y[:0]))
    assert math.isnan(algorithm.local_update(empty, Returns(model, cfg, trained)).metrics["post_accuracy"])


def outcome(correct_of: dict[int, list[bool]]) -> EvalOutcome:
    return EvalOutcome([np.array([True, False])], np.array([0.1, 0.2]),
                       {c: [np.array(v, bool)] for c, v in correct_of.items()})


def test_best_so_far_takes_in_the_post_training_accuracy():
    cfg, _, info = mlp_setup()
    algorithm = build_algorithm(cfg, info)
    theta = {n: np.zeros(s, np.float32) for n, s in info.shapes.items()}
    algorithm.init_server(theta, None)

    def result(client, post):
        return ClientResult(client, 10, ModelUpdate(theta), 0.0, 10, metrics={"pruned": 0, "post_accuracy": post})

    # round 1: clients 0 and 1 score 0.9 and 0.2 after training
    algorithm.aggregate(1, [result(0, 0.9), result(1, 0.2)])
    algorithm.round_metrics(1)
    # the evaluation: the personalised models score 0.5, 0.6 and 0.4
    evaluated = outcome({0: [True, False], 1: [True, True, True, False, False], 2: [True, True, False, False, False]})
    metrics = algorithm.evaluation_metrics(1, {"global": evaluated})
    assert metrics["personal_accuracy"] == pytest.approx((0.5 + 0.6 + 0.4) / 3)
    # best so far: client 0 its post-training 0.9, client 1 its evaluated 0.6, client 2 its 0.4
    assert metrics["personal_accuracy_best"] == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    # round 2: client 2 reaches 0.8 after training, client 0 only 0.3, client 7 has no local test set
    algorithm.aggregate(2, [result(0, 0.3), result(2, 0.8), result(7, math.nan)])
    metrics = algorithm.evaluation_metrics(2, {"global": evaluated})
    assert metrics["personal_accuracy_best"] == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    # and it survives a checkpoint
    restored = build_algorithm(cfg, info)
    restored.load_state_dict(copy.deepcopy(algorithm.state_dict()))
    assert restored.evaluation_metrics(3, {"global": evaluated})["personal_accuracy_best"] == \
        pytest.approx((0.9 + 0.6 + 0.8) / 3)


# ------------------------------------------------------------------------------ the campaign's table
def fake_run(algorithm, seed, accuracy, upload_bytes, best=None):
    from pathlib import Path

    from fedmpi.results.reader import RunResult

    n = len(accuracy)
    column = "personal_accuracy" if algorithm == "lotteryfl" else "client_accuracy"
    rounds = {"round": np.arange(1, n + 1), column: np.asarray(accuracy, float),
              "cum_upload_bytes": np.cumsum(np.asarray(upload_bytes, float))}
    if best is not None:
        rounds["personal_accuracy_best"] = np.asarray(best, float)
    config = {"algorithm": algorithm, "seed": seed, "rounds": n, "experiment": "toy-lotteryfl",
              "model": "mnistnet", "clients": {"total": 4, "per_round": 2}}
    return RunResult(path=Path(f"{algorithm}{seed}.h5"), config=config, finished=True, rounds=rounds, attrs={})


def test_upload_to_target_table():
    from fedmpi.figures.lotteryfl import upload_to_target_table
    from fedmpi.results import group_runs

    nan = float("nan")
    mib = 2**20
    runs = [
        # FedAvg: finals 0.70 and 0.74 → target 0.72 − 0.01 = 0.71; 4 MiB uploaded per round (1 MiB per
        # client); seed 0 reaches 0.71 at round 4 (4 MiB/client), seed 1 at round 2 (2 MiB/client)
        fake_run("fedavg", 0, [nan, 0.6, nan, 0.71, 0.70], [4 * mib] * 5),
        fake_run("fedavg", 1, [nan, 0.72, nan, 0.73, 0.74], [4 * mib] * 5),
        # LotteryFL: half of FedAvg's upload per round; reaches 0.71 at round 2 (1 MiB/client) and
        # round 4 (2 MiB/client) → 1.5 MiB/client, half FedAvg's 3
        fake_run("lotteryfl", 0, [nan, 0.8, nan, 0.9, 0.95], [2 * mib] * 5, best=[nan, 0.8, nan, 0.9, 0.96]),
        fake_run("lotteryfl", 1, [nan, 0.5, nan, 0.85, 0.85], [2 * mib] * 5, best=[nan, 0.5, nan, 0.88, 0.9]),
        fake_run("randommask", 0, [nan, 0.1, nan, 0.2, 0.3], [mib] * 5),
    ]
    groups = group_runs(runs)
    table = upload_to_target_table(groups)
    assert "Target personalised accuracy 0.7100" in table
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| ") and "method" not in line}
    lottery = next(v for k, v in cells.items() if k.startswith("LotteryFL"))
    fedavg = next(v for k, v in cells.items() if k.startswith("FedAvg"))
    random = next(v for k, v in cells.items() if k.startswith("RandomMask"))
    assert lottery == ["2", "0.9000 ± 0.0707", "0.9300 ± 0.0424", "2.50", "2/2", "1.50", "3", "0.50"]
    assert fedavg[1:] == ["0.7200 ± 0.0283", "—", "5.00", "2/2", "3.00", "3", "1.00"]
    assert random[4:6] == ["0/1", "not reached"]
    # no reference: no target
    assert "no target" in upload_to_target_table(group_runs(runs[2:]))


def test_the_table_is_drawn_for_an_experiment_with_lotteryfl_only(tmp_path):
    from fedmpi.figures.lotteryfl import draw
    from fedmpi.results import group_runs

    fedavg = fake_run("fedavg", 0, [0.5], [1.0])
    assert draw("toy", group_runs([fedavg]), {}, tmp_path, "toy") == []
    written = draw("toy", group_runs([fedavg, fake_run("lotteryfl", 0, [0.6], [1.0])]), {}, tmp_path, "toy")
    assert [p.name for p in written] == ["toy_lotteryfl_upload_to_target.md"] and written[0].exists()
