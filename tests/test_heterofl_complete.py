"""HeteroFL as its authors run it (docs/methods/hypemefed.md, "HeteroFL"): a client uploads exactly
the tensors it trains (no exits 1-2, no BN statistics, of the classifier the rows of its own
classes), trains with static BN, a scaler and the masked cross-entropy, and the server averages
with count weights and queries the BN statistics the evaluation uses. Every number here is counted
or computed by hand (numpy, or torch's plain conv2d), not by the code under test."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import TIERED, fedmpi, read_results, write_idx

from fedmpi.algorithms import ALGORITHMS, ClientResult, ClientTask
from fedmpi.config import load_config
from fedmpi.engine.context import build_context
from fedmpi.initial import build_initial
from fedmpi.models import build_model
from fedmpi.update import ModelUpdate

torch.set_num_threads(1)

MODEL, SHAPE, CLASSES = "multiexit_vgg_small", (1, 28, 28), 10
CHANNELS = (8, 16, 32, 64)          # multiexit_vgg_small on 28x28: the spec's 32/64/128/256 / 4
WIDTHS = (0.25, 0.5, 1.0)           # tiers.widths' default, tier 1, 2, 3
# a small MNIST-format run whose clients miss some classes (Dirichlet α = 0.3 over 180 samples)
SMALL = {**copy.deepcopy(TIERED), "model": MODEL, "rounds": 1, "algorithm": "heterofl",
         "data": {**TIERED["data"], "alpha": 0.3}}


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    work = tmp_path_factory.mktemp("heterofl")
    cfg = copy.deepcopy(SMALL)
    cfg["data"]["root"] = str(write_idx(work / "mnist"))
    return cfg


def width_values(width: float, classes: int) -> dict[str, int]:
    """Values of each tensor a rate-``width`` client trains, by hand: per block conv1, conv2 (3x3,
    with bias), two BNs of weight and bias; the deepest exit head reads block 3's c x 1 x 1 output
    (28 -> 14 -> 7 -> 3 -> 1) and has ``classes`` rows."""
    kept = [math.ceil(width * c) for c in CHANNELS]
    values, c_in = {}, SHAPE[0]
    for b, c in enumerate(kept):
        values[f"block{b}"] = (c * c_in * 9 + c) + (c * c * 9 + c) + 2 * (2 * c)
        c_in = c
    values["head"] = classes * kept[3] + classes
    return values


def mask_wire_bytes(size: int, kept: int) -> int:
    """The wire format's mask (comm/codec.py docstring): a bitmap of ceil(n/8) bytes, or the kept
    positions in the narrowest unsigned type indexing n elements when strictly smaller."""
    bitmap = (size + 7) // 8
    index = (1 if size <= 2 ** 8 else 2 if size <= 2 ** 16 else 4) * kept
    return index if index < bitmap else bitmap


@pytest.mark.slow
def test_upload_is_exactly_the_trained_tensors_and_the_download_has_no_exits_1_2(small_cfg, tmp_path):
    """Per client, 4 bytes a value of its width's blocks and classifier only: no exits 1-2 and no BN
    running statistics either way; the upload's classifier has the rows of its own classes (plus
    the mask saying which), the download all rows."""
    config = tmp_path / "heterofl.yaml"
    config.write_text(yaml.safe_dump(small_cfg))
    out = tmp_path / "heterofl.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet"], 1, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    clients = read_results(out)["clients"]
    # each client's classes, from the partition and labels every rank builds
    cfg = load_config(None, extra=small_cfg)
    initial = build_initial(cfg)
    labels = [np.unique(initial.dataset.y_train[rows]) for rows in initial.partition.train_indices]
    assert any(len(k) < CLASSES for k in labels), "the case needs clients that miss classes"
    checked = 0
    for row, client in enumerate(clients["client_id"]):
        tier = int(clients["tier"][row])
        width, k = WIDTHS[tier - 1], len(labels[client])
        body = sum(v for name, v in width_values(width, CLASSES).items() if name != "head")
        head_in = math.ceil(width * CHANNELS[3])
        assert clients["download_bytes"][row] == 4 * (body + CLASSES * head_in + CLASSES), (client, tier)
        if k == CLASSES:
            expected = 4 * (body + CLASSES * head_in + CLASSES)
        else:
            expected = 4 * (body + k * head_in + k) + mask_wire_bytes(CLASSES * head_in, k * head_in) \
                + mask_wire_bytes(CLASSES, k)
            checked += 1
        assert clients["upload_bytes"][row] == expected, (client, tier, k)
    assert checked > 0


def client_task(ctx, client: int) -> ClientTask:
    rows = torch.from_numpy(ctx.partition.train_indices[client])
    return ClientTask(1, client, ctx.algorithm.download(1, client), {}, ctx.train[0][rows], ctx.train[1][rows],
                      seed=7)


def test_a_client_trains_and_uploads_neither_exits_1_2_nor_bn_statistics(small_cfg):
    cfg = load_config(None, extra=small_cfg)
    ctx = build_context(cfg)
    algo = ctx.algorithm
    algo.init_server({n: w.copy() for n, w in ctx.initial_weights.items()}, np.random.default_rng(0))
    for tier in range(3):
        client = int(np.flatnonzero(algo.tier == tier)[0])
        sent = algo.download(1, client).values
        result = algo.local_update(client_task(ctx, client), ctx.trainer)
        for names in (set(sent), set(result.update.values)):
            assert not {n for n in names if n.startswith(("exits.0.", "exits.1."))}, tier
            assert not {n for n in names if "running_" in n or "num_batches" in n}, tier
            assert {"exits.2.linear.weight", "exits.2.linear.bias"} <= names
        # the module the client trained: BN without running statistics (batch statistics always)
        model = ctx.trainer.model_for(algo.variants[tier])
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(norms) == 8 and all(m.running_mean is None and not m.track_running_stats for m in norms)


def test_static_bn_normalises_with_the_batch_statistics_in_training_and_evaluation(small_cfg):
    cfg = load_config(None, extra=small_cfg)
    algo = ALGORITHMS["heterofl"](cfg, build_context(cfg).info)
    torch.manual_seed(0)
    model = build_model(MODEL, SHAPE, CLASSES, **algo.variants[1])
    bn = model.blocks[0].bn1
    x = torch.randn(6, bn.num_features, 5, 5) * 3 + 2
    mean = x.double().mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    var = x.double().var(dim=(0, 2, 3), unbiased=False).view(1, -1, 1, 1)
    by_hand = ((x.double() - mean) / torch.sqrt(var + bn.eps)).float()
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        for mode in (True, False):
            model.train(mode)
            assert torch.allclose(bn(x), by_hand, atol=1e-5), mode
    assert "blocks.0.bn1.running_mean" not in model.state_dict()


def test_the_scaler_divides_by_the_width_in_training_and_not_in_evaluation(small_cfg):
    """What the BN after a convolution receives, against the convolution's output, in the model a
    rate-p client trains: output / p in training, the output itself at evaluation."""
    cfg = load_config(None, extra=small_cfg)
    algo = ALGORITHMS["heterofl"](cfg, build_context(cfg).info)
    for tier, width in enumerate(WIDTHS):
        torch.manual_seed(1)
        model = build_model(MODEL, SHAPE, CLASSES, **algo.variants[tier])
        block = model.blocks[1]
        seen = {}
        block.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.detach().clone()))
        block.bn2.register_forward_pre_hook(lambda m, i: seen.__setitem__("bn", i[0].detach().clone()))
        x = torch.randn(4, *SHAPE)
        for training, factor in ((True, 1 / width), (False, 1.0)):
            model.train(training)
            with torch.no_grad():
                model(x)
            assert torch.allclose(seen["bn"], seen["conv"] * factor, rtol=1e-6, atol=1e-7), (width, training)


def test_masked_cross_entropy_against_a_hand_computation(small_cfg):
    """A client whose training labels are classes 0 and 2: the logits of the 8 other classes become
    0 (they stay in the softmax as exp(0) = 1), then the mean cross-entropy:
        sample 1, z0 = 1.0, z2 = 0.5, y = 0: −1.0 + log(e^1.0 + e^0.5 + 8) = 1.5150319
        sample 2, z0 = 0.3, z2 = 1.5, y = 2: −1.5 + log(e^0.3 + e^1.5 + 8) = 1.1269521
        mean 1.3209920."""
    torch.manual_seed(3)
    logits = (torch.randn(2, CLASSES) * 2).requires_grad_()
    with torch.no_grad():
        logits[0, [0, 2]] = torch.tensor([1.0, 0.5])
        logits[1, [0, 2]] = torch.tensor([0.3, 1.5])
    y = torch.tensor([0, 2])
    masked = np.zeros((2, CLASSES))
    masked[0, [0, 2]] = 1.0, 0.5
    masked[1, [0, 2]] = 0.3, 1.5
    by_numpy = np.mean([-masked[i, y[i]] + np.log(np.exp(masked[i]).sum()) for i in range(2)])
    assert by_numpy == pytest.approx(1.3209920, abs=1e-7)

    cfg = load_config(None, extra=small_cfg)
    info = build_context(cfg).info
    algo = ALGORITHMS["heterofl"](cfg, info)
    used = {}

    class CapturingTrainer:
        def train(self, values, x, y, **kwargs):
            used.update(kwargs)
            return dict(values), 0.0, len(y)

    client = int(np.flatnonzero(algo.tier == 2)[0])
    algo.weights = {n: np.zeros(s, np.float32) for n, s in info.shapes.items()}
    labels = torch.tensor([0, 2, 2, 0, 2])      # the client's training labels: classes 0 and 2
    algo.local_update(ClientTask(1, client, algo.download(1, client), {}, torch.zeros(5, *SHAPE), labels, seed=0),
                      CapturingTrainer())
    loss = used["objective"]([logits], y)
    assert loss.item() == pytest.approx(by_numpy, abs=1e-6)
    loss.backward()
    absent = [c for c in range(CLASSES) if c not in (0, 2)]
    assert torch.all(logits.grad[:, absent] == 0)     # absent classes get no gradient


def test_the_server_averages_each_classifier_row_over_its_senders_with_count_weights(small_cfg):
    """Two width-1 clients: A (10 samples) sent rows 0, 1, B (30 samples) rows 1, 2; row 1 is the
    plain mean of both, rows 0 and 2 their sender's value, row 3 keeps the server's."""
    cfg = load_config(None, extra=small_cfg)
    info = build_context(cfg).info
    algo = ALGORITHMS["heterofl"](cfg, info)
    algo.weights = {n: np.full(s, 5.0, np.float32) for n, s in info.shapes.items()}
    name = "exits.2.linear.bias"

    def result(client, samples, rows, value):
        mask = np.zeros(CLASSES, bool)
        mask[rows] = True
        bias = np.where(mask, value, 0.0).astype(np.float32)
        return ClientResult(client, samples, ModelUpdate({name: bias}, masks={name: mask}), 0.0, samples)

    algo.aggregate(1, [result(0, 10, [0, 1], 1.0), result(1, 30, [1, 2], 3.0)])
    assert algo.weights[name][:4].tolist() == [1.0, 2.0, 3.0, 5.0]


def test_the_evaluation_uses_bn_statistics_queried_over_the_clients_training_data(small_cfg):
    """blocks.0.bn1 sees conv1(x): its statistics are computed here from every client's training
    samples with torch's conv2d in float64. One batch per client (``clients`` query, batch size
    above every client's size): the cumulative average over the batches is the mean over clients
    of each client's mean and unbiased variance. One batch for all (``pooled``): the plain ones."""
    for query in ("pooled", "clients"):     # pooled: the default
        extra = {**small_cfg, "local": {**small_cfg["local"], "batch_size": 1000}}
        cfg = load_config(None, extra=extra if query == "pooled" else {**extra, "heterofl": {"sbn_query": query}})
        ctx = build_context(cfg)
        algo = ctx.algorithm
        algo.init_server({n: w.copy() for n, w in ctx.initial_weights.items()}, np.random.default_rng(0))
        models = {m.key: m for m in algo.evaluation_models(1)}
        x_train = ctx.train[0].double()
        groups = ctx.partition.train_indices if query == "clients" else [np.concatenate(ctx.partition.train_indices)]
        for key, width in (("global", 1.0), ("width0.25", 0.25), ("width0.5", 0.5)):
            weights = models[key].weights
            c = math.ceil(width * CHANNELS[0])
            conv_w = torch.from_numpy(algo.weights["blocks.0.conv1.weight"][:c]).double()
            conv_b = torch.from_numpy(algo.weights["blocks.0.conv1.bias"][:c]).double()
            means, variances = [], []
            for rows in groups:
                out = F.conv2d(x_train[torch.from_numpy(rows)], conv_w, conv_b, padding=1)
                means.append(out.mean(dim=(0, 2, 3)).numpy())
                variances.append(out.var(dim=(0, 2, 3), unbiased=True).numpy())
            np.testing.assert_allclose(weights["blocks.0.bn1.running_mean"], np.mean(means, axis=0), rtol=1e-4,
                                       atol=1e-6)
            np.testing.assert_allclose(weights["blocks.0.bn1.running_var"], np.mean(variances, axis=0), rtol=1e-4)
        # the server's own model is unchanged: the statistics are the evaluation's
        name = "blocks.0.bn1.running_mean"
        assert np.array_equal(algo.weights[name], ctx.initial_weights[name])
