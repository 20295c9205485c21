"""LotteryFL: the client's prune-and-rewind step, the target density, the server's average over
holders, personalised evaluation, exact bytes, rank-count invariance (P = 1, 2, 4) and SIGKILL +
--resume."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml

from helpers import (LOTTERYFL, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results, same_bits,
                     sigkill_and_resume)

from fedmpi.algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from fedmpi.algorithms.lotteryfl import pack, unpack
from fedmpi.comm.codec import mask_bytes
from fedmpi.config import load_config
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.training import LocalTrainer
from fedmpi.update import ModelUpdate

LF = LOTTERYFL


def setup(**sets):
    cfg = load_config(None, extra=copy.deepcopy(LF), overrides=[f"{k}={v}" for k, v in sets.items()])
    model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    info = ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (60,)), num_clients=8,
                     model="mlp", input_shape=(60,), num_classes=10)
    return cfg, model, info


class Capture:
    """A trainer that records where training starts and returns those weights unchanged."""

    def __init__(self, model, cfg):
        self.real = LocalTrainer(model, cfg["local"])
        self.device = self.real.device
        self.started = None

    def load(self, weights, variant=None):
        return self.real.load(weights, variant)

    def train(self, weights, x, y, **kwargs):
        self.started = {n: np.array(v, copy=True) for n, v in weights.items()}
        self.masks = kwargs.get("masks")
        return {n: np.array(v, copy=True) for n, v in weights.items()}, 0.5, len(y)


def initial_weights(info, seed=0):
    """A θ₀ for the client-side tests: any weights do, the client rewinds to what its task carries."""
    g = np.random.default_rng(seed)
    return {n: g.normal(scale=0.1, size=s).astype(np.float32) for n, s in info.shapes.items()}


def moved(weights, seed=1):
    g = np.random.default_rng(seed)
    return {n: (w + g.normal(scale=0.1, size=w.shape)).astype(np.float32) for n, w in weights.items()}


def task(received, state=None, client=2, round_=3, initial=None):
    x, y = torch.randn(32, 60), torch.randint(0, 10, (32,))
    local_test = (torch.randn(8, 60), torch.randint(0, 10, (8,)))
    return ClientTask(round_, client, received, state or {}, x, y, 7, local_test=local_test, initial_weights=initial)


def test_client_prunes_20_percent_per_layer_and_rewinds_survivors_to_the_init():
    cfg, model, info = setup()
    algorithm = build_algorithm(cfg, info)
    algorithm._accuracy = lambda *args: 0.9
    theta0 = initial_weights(info)
    theta = moved(theta0)
    trainer = Capture(model, cfg)
    result = algorithm.local_update(task(ModelUpdate(theta), initial=theta0), trainer)
    assert result.metrics["pruned"] == 1 and result.state["density"] == pytest.approx(0.8)
    masks = result.update.masks
    for name in info.maskable:
        n = math.prod(info.shapes[name])
        keep = n - math.floor(0.2 * n + 0.5)
        assert masks[name].sum() == keep
        # the kept weights are the largest |θ| of the received global model
        threshold = np.sort(np.abs(theta[name]).reshape(-1))[::-1][keep - 1]
        assert np.all(np.abs(theta[name][masks[name]]) >= threshold)
        np.testing.assert_array_equal(trainer.started[name], np.where(masks[name], theta0[name], 0))
    for name in info.shapes:
        if name not in info.maskable:   # biases are not rewound (the paper)
            np.testing.assert_array_equal(trainer.started[name], theta[name])
    assert unpack(result.state["mask"]).keys() == masks.keys()
    assert result.metrics["client_density"] == pytest.approx(
        sum(m.sum() for m in masks.values()) / sum(m.size for m in masks.values()))


def test_rewind_biases_option_resets_biases_too():
    cfg, model, info = setup(**{"lotteryfl.rewind_biases": "true"})
    algorithm = build_algorithm(cfg, info)
    algorithm._accuracy = lambda *args: 0.9
    theta0 = initial_weights(info)
    trainer = Capture(model, cfg)
    algorithm.local_update(task(ModelUpdate(moved(theta0)), initial=theta0), trainer)
    for name in info.shapes:
        if name not in info.maskable:
            np.testing.assert_array_equal(trainer.started[name], theta0[name])


def test_no_pruning_below_the_threshold_trains_from_the_received_model_dense():
    cfg, model, info = setup()
    algorithm = build_algorithm(cfg, info)
    algorithm._accuracy = lambda *args: 0.05
    theta = moved(initial_weights(info))
    trainer = Capture(model, cfg)
    result = algorithm.local_update(task(ModelUpdate(theta)), trainer)
    assert result.metrics["pruned"] == 0 and result.update.masks == {} and trainer.masks is None
    assert result.state == {"mask": None, "density": 1.0}
    for name in info.shapes:
        np.testing.assert_array_equal(trainer.started[name], theta[name])


@pytest.mark.parametrize("overshoot, expected", [(False, 0.1), (True, 0.12 * 0.8)])
def test_the_last_step_stops_at_the_target_unless_overshoot(overshoot, expected):
    cfg, model, info = setup(**{"lotteryfl.overshoot": str(overshoot).lower()})
    algorithm = build_algorithm(cfg, info)
    algorithm._accuracy = lambda *args: 0.9
    theta = moved(initial_weights(info))
    g = np.random.default_rng(3)
    masks = {n: g.random(info.shapes[n]) < 0.12 for n in info.maskable}
    received = ModelUpdate({n: np.where(masks[n], v, 0) if n in masks else v for n, v in theta.items()}, masks)
    state = {"mask": pack(masks), "density": 0.12}
    result = algorithm.local_update(task(received, state, initial=initial_weights(info, seed=2)), Capture(model, cfg))
    assert result.state["density"] == pytest.approx(expected)
    step = 0.2 if overshoot else 1 - 0.1 / 0.12
    for name in info.maskable:
        active = int(masks[name].sum())
        assert int(result.update.masks[name].sum()) == active - math.floor(step * active + 0.5)
        assert not np.any(result.update.masks[name] & ~masks[name])   # only ever removes
    # at the target: no further pruning
    again = algorithm.local_update(task(ModelUpdate(theta, result.update.masks), result.state), Capture(model, cfg))
    assert again.metrics["pruned"] == 0


def test_a_mask_that_differs_from_the_clients_own_is_an_error():
    cfg, model, info = setup()
    algorithm = build_algorithm(cfg, info)
    theta = initial_weights(info)
    masks = {n: np.ones(info.shapes[n], bool) for n in info.maskable}
    other = {n: m.copy() for n, m in masks.items()}
    other[info.maskable[0]].reshape(-1)[0] = False
    with pytest.raises(RuntimeError, match="different mask"):
        algorithm.local_update(task(ModelUpdate(theta, other), {"mask": pack(masks), "density": 1.0}),
                               Capture(model, cfg))


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_server_averages_each_weight_over_its_holders_and_keeps_untouched_ones(aggregation):
    cfg, model, info = setup(**{"lotteryfl.aggregation": aggregation})
    algorithm = build_algorithm(cfg, info)
    theta = initial_weights(info)
    algorithm.init_server(theta, None)
    name = info.maskable[0]
    shape = info.shapes[name]
    m1, m2 = np.zeros(shape, bool), np.zeros(shape, bool)
    m1.reshape(-1)[[0, 1]] = True
    m2.reshape(-1)[[1, 2]] = True
    full = {n: np.ones(info.shapes[n], bool) for n in info.maskable if n != name}
    v1 = {n: np.full(info.shapes[n], 1.0, np.float32) for n in info.shapes}
    v2 = {n: np.full(info.shapes[n], 4.0, np.float32) for n in info.shapes}
    results = [ClientResult(0, 10, ModelUpdate(v1, {name: m1, **full}), 0.0, 10, metrics={"pruned": 1}),
               ClientResult(5, 30, ModelUpdate(v2, {name: m2, **full}), 0.0, 30, metrics={"pruned": 0})]
    algorithm.aggregate(1, results)
    w = algorithm.weights[name].reshape(-1)
    both = (1 * 10 + 4 * 30) / 40 if aggregation == "samples" else 2.5
    assert (w[0], w[1], w[2]) == (1.0, pytest.approx(both), 4.0)
    np.testing.assert_array_equal(w[3:], theta[name].reshape(-1)[3:])     # nobody held them
    bias = next(n for n in info.shapes if n not in info.maskable)
    assert np.allclose(algorithm.weights[bias], both)
    assert sorted(algorithm.client_masks) == [0, 5]
    # downloads: each masked client its own mask; a full-mask client the one shared dense payload
    assert np.array_equal(algorithm.download(2, 0).masks[name], m1)
    assert algorithm.download(2, 3) is algorithm.download(2, 4) and algorithm.download(2, 3).masks == {}
    assert algorithm.round_metrics(1)["pruned_clients"] == 1


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_the_engine_hands_lotteryfl_its_local_test_set_and_the_initial_model(fraction):
    from fedmpi.engine.context import build_context
    from fedmpi.engine.worker import make_client_task

    cfg, _, _ = setup(**{"data.local_test_fraction": fraction})
    ctx = build_context(cfg)
    received = ModelUpdate(ctx.initial_weights)
    for c in range(8):
        t = make_client_task(ctx, 3, c, received, {})
        x, y = t.local_test
        # the evaluator's local test samples of client c: the test split's rows of its natural
        # partition, or (local_test_fraction) rows held out of its training rows
        rows = ctx.partition.test_indices[c]
        assert len(y) == ctx.info.local_test_sizes[c] > 0
        source_x, source_y = ctx.train if fraction else ctx.test
        assert torch.equal(x, source_x[rows]) and torch.equal(y, source_y[rows])
        if fraction:
            assert not set(rows.tolist()) & set(ctx.partition.train_indices[c].tolist())
        # θ₀: the initial model every rank built, read-only
        assert t.initial_weights.keys() == ctx.initial_weights.keys()
        for name, value in t.initial_weights.items():
            assert np.shares_memory(value, ctx.initial_weights[name]) and not value.flags.writeable
    # a method that declares neither gets neither
    fedavg = build_context(load_config(None, extra={**copy.deepcopy(LF), "algorithm": "fedavg"}))
    t = make_client_task(fedavg, 3, 0, received, {})
    assert t.local_test is None and t.initial_weights is None


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("lotteryfl")
    (path / "lf.yaml").write_text(yaml.safe_dump(LF))
    return path


@pytest.fixture(scope="module")
def runs(work):
    cache = {}

    def get(ranks: int):
        if ranks not in cache:
            out = work / f"lf_p{ranks}.h5"
            proc, _ = fedmpi(["run", str(work / "lf.yaml"), "--out", str(out), "--quiet"], ranks, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[ranks] = read_results(out)
        return cache[ranks]

    return get


@pytest.mark.slow
def test_personalised_accuracy_beside_the_global_one(runs):
    rounds = runs(1)["rounds"]
    for column in ("personal_accuracy", "personal_accuracy_best", "test_accuracy", "client_accuracy"):
        assert np.all(np.isfinite(rounds[column])), column
    pruned = np.cumsum(rounds["pruned_clients"]) > 0
    assert pruned.any()
    # before any client pruned, the personalised models are the global one
    assert np.array_equal(rounds["personal_accuracy"][~pruned], rounds["client_accuracy"][~pruned])
    assert not np.array_equal(rounds["personal_accuracy"][pruned], rounds["client_accuracy"][pruned])
    assert np.all(np.diff(rounds["personal_accuracy_best"]) >= 0)
    assert np.all(np.diff(rounds["density"]) <= 0) and rounds["density"][-1] < 1


@pytest.mark.slow
def test_best_so_far_is_at_least_each_clients_best_post_training_accuracy(runs):
    """Each client's best so far is at least every post-training accuracy it reported: the mean
    over the 8 clients is at least the mean of those maxima (0 for a client not trained yet)."""
    result = runs(1)
    rounds, clients = result["rounds"], result["clients"]
    assert np.all(np.isfinite(clients["post_accuracy"]))
    for i, r in enumerate(rounds["round"]):
        best_post = np.zeros(8)
        so_far = clients["round"] <= r
        for c, post in zip(clients["client_id"][so_far], clients["post_accuracy"][so_far]):
            best_post[c] = max(best_post[c], post)
        assert rounds["personal_accuracy_best"][i] >= best_post.mean() - 1e-12, r


@pytest.mark.slow
def test_bytes_follow_each_clients_own_mask(runs):
    clients = runs(1)["clients"]
    _, model, info = setup()
    sizes = {n: math.prod(info.shapes[n]) for n in info.maskable}
    dense = sum(math.prod(s) for n, s in info.shapes.items() if n not in info.maskable)
    active = {}   # client → per-layer active counts of its mask
    for row in range(len(clients["round"])):
        c = int(clients["client_id"][row])
        before = active.get(c, dict(sizes))
        assert int(clients["download_bytes"][row]) == 4 * (sum(before.values()) + dense)   # never the mask
        after = dict(before)
        if clients["pruned"][row]:
            after = {n: k - math.floor(0.2 * k + 0.5) for n, k in before.items()}
        expected = 4 * (sum(after.values()) + dense)
        if clients["pruned"][row]:
            expected += sum(mask_bytes(sizes[n], k) for n, k in after.items())
        assert int(clients["upload_bytes"][row]) == expected, row
        assert clients["client_density"][row] == pytest.approx(sum(after.values()) / sum(sizes.values()))
        active[c] = after


@needs_mpiexec
@pytest.mark.slow
def test_identical_metrics_for_1_2_4_ranks(runs):
    base = runs(1)
    for ranks in (2, 4):
        assert_all_columns_identical(base, runs(ranks), f"lotteryfl P=1 vs P={ranks}")


RESUME = ["--set", "checkpoint.every=1", "--set", "lotteryfl.local_steps=60", "--set", "eval.every=2"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(work):
    path = work / "lf.yaml"
    a, b = sigkill_and_resume(path, work, RESUME, r"^round 4/8")
    assert_all_columns_identical(a, b, "lotteryfl resumed after SIGKILL")
    assert same_bits(a["rounds"]["personal_accuracy_best"], b["rounds"]["personal_accuracy_best"])
