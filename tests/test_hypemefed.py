"""HypeMeFed: hypernetwork shapes and sizes (LRF vs naive), generation and its cascade, aggregation
with generated tensors against a hand computation, and end to end (``python -m fedmpi``): exact
submodel bytes, identical metrics for P = 1, 2, 4, SIGKILL/SIGTERM + --resume bit-identical with
the hypernetworks restored; ScaleFL and full-depth FedAvg on the multi-exit family."""
from __future__ import annotations

import copy
import io
import os
import signal

import numpy as np
import pytest
import torch

from fedmpi import rng
from fedmpi.algorithms import ClientResult, ModelInfo
from fedmpi.algorithms.hypemefed import HypeMeFed
from fedmpi.algorithms.hypernetworks import (HyperNetworks, LRFHyperNetwork, conv_pairs, matrix_shape,
                                             parameter_count)
from fedmpi.algorithms.scalefl import ScaleFL, self_distillation
from fedmpi.config import load_config
from fedmpi.engine.checkpoint import read_checkpoint_file
from fedmpi.engine.state_file import read_state, write_state
from fedmpi.models import build_model
from fedmpi.update import ModelUpdate
from helpers import Streaming, fedmpi, needs_mpiexec, read_results, same_bits, variant_sizes


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hypemefed")


@pytest.fixture(scope="module")
def runs(tiered_runs):
    """``runs(algorithm, ranks)``: the session's tiered runs (conftest.py), shared with test_extensions."""
    return lambda algorithm, ranks: tiered_runs(algorithm, ranks)


def model_shapes(input_shape=(1, 28, 28), **variant) -> dict[str, tuple]:
    model = build_model("multiexit_vgg", input_shape, 10, **variant)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if t.is_floating_point()}


# ------------------------------------------------------------------------------ hypernetworks
# The spec's network: channels 32/64/128/256 for 28x28 and 32x32 inputs, 64/128/256/512 for 96x96.
# Parameter counts, LRF (hidden 512) and naive (hidden 64, the public code's NaiveHyperNetwork;
# and hidden 512 for reference), summed over the four conv pairs.
EXPECTED = {
    (1, 28, 28): {"lrf": 3_104_704, "naive": 89_579_776, "naive512": 708_896_768},
    (3, 32, 32): {"lrf": 3_104_704, "naive": 89_579_776, "naive512": 708_896_768},
    (3, 96, 96): {"lrf": 6_205_312, "naive": 358_318_336, "naive512": 2_835_580_928},
}


def test_conv_pairs_of_the_spec_network():
    shapes = model_shapes()
    assert conv_pairs(shapes) == [("blocks.1.conv1.weight", "blocks.2.conv1.weight", 2),
                                  ("blocks.1.conv2.weight", "blocks.2.conv2.weight", 2),
                                  ("blocks.2.conv1.weight", "blocks.3.conv1.weight", 3),
                                  ("blocks.2.conv2.weight", "blocks.3.conv2.weight", 3)]
    assert conv_pairs(model_shapes(level=2)) == conv_pairs(shapes)[:2]
    assert matrix_shape((64, 32, 3, 3)) == (192, 96) and matrix_shape((128, 64, 3)) == (384, 64)


@pytest.mark.parametrize("input_shape", sorted(EXPECTED))
def test_parameter_counts_lrf_vs_naive(input_shape):
    shapes = model_shapes(input_shape)
    pairs = [(shapes[s], shapes[t]) for s, t, _ in conv_pairs(shapes)]
    lrf = sum(parameter_count("lrf", s, t, 512) for s, t in pairs)
    naive = sum(parameter_count("naive", s, t, 64) for s, t in pairs)
    naive512 = sum(parameter_count("naive", s, t, 512) for s, t in pairs)
    assert {"lrf": lrf, "naive": naive, "naive512": naive512} == EXPECTED[input_shape]
    # the closed form is torch's count (the LRF nets at full size, the naive ones at a small hidden)
    assert HyperNetworks(shapes, "lrf", hidden=512).parameter_count() == lrf
    assert HyperNetworks(shapes, "naive", naive_hidden=3).parameter_count() == sum(
        parameter_count("naive", s, t, 3) for s, t in pairs)
    reduction = 1 - lrf / naive
    print(f"{input_shape}: LRF {lrf:,} vs naive {naive:,} parameters: -{100 * reduction:.2f} % "
          f"(naive at hidden 512: {naive512:,}, -{100 * (1 - lrf / naive512):.2f} %)")
    assert reduction > 0.96


def test_lrf_shapes_ranks_and_full_rank_factorisation():
    shapes = model_shapes()
    nets = HyperNetworks(shapes, "lrf", rank=100, hidden=16)
    assert [n.rank for n in nets.nets] == [96, 100, 100, 100]
    assert [n.rank for n in HyperNetworks(shapes, "lrf", rank=0, hidden=16).nets] == [96, 192, 192, 384]
    assert [n.rank for n in HyperNetworks(shapes, "lrf", rank=4, hidden=16).nets] == [4, 4, 4, 4]
    for net, (s, t, _) in zip(nets.nets, nets.pairs):
        rows, cols = matrix_shape(shapes[s])
        target_rows, target_cols = matrix_shape(shapes[t])
        assert (net.map_a[0].in_features, net.map_a[2].out_features) == (rows, target_cols)
        assert (net.map_b[0].in_features, net.map_b[2].out_features) == (cols, target_rows)
        source = torch.randn(shapes[s])
        a, b = net.prepare(source)
        assert a.shape == (net.rank, rows) and b.shape == (net.rank, cols)
        assert net.generate(a, b).shape == shapes[t]
    # at full rank AᵀB is the source matrix: no information is lost before the MLPs
    full = LRFHyperNetwork(shapes["blocks.1.conv2.weight"], shapes["blocks.2.conv2.weight"], 0, 8)
    source = torch.randn(shapes["blocks.1.conv2.weight"])
    a, b = full.prepare(source)
    torch.testing.assert_close((a.T @ b).reshape(source.shape), source, rtol=1e-4, atol=1e-5)


def test_training_is_seeded_persistent_and_reduces_the_error():
    shapes = model_shapes()
    g = np.random.default_rng(0)
    samples = [(g.normal(size=shapes["blocks.1.conv1.weight"]).astype(np.float32) * 0.05,
                g.normal(size=shapes["blocks.2.conv1.weight"]).astype(np.float32) * 0.05) for _ in range(3)]
    first, second = (HyperNetworks(shapes, "lrf", hidden=32, seed=5) for _ in range(2))
    before = np.mean([np.mean((first.generate(0, s) - t) ** 2) for s, t in samples])
    losses = [first.fit(0, samples, epochs=25, lr=5e-4, round_=3) for _ in range(2)]   # persists: 50 epochs
    for _ in range(2):
        second.fit(0, samples, epochs=25, lr=5e-4, round_=3)
    assert losses[1] < losses[0] < before
    assert first.trained == [True, False, False, False]
    for x, y in zip(first.nets[0].parameters(), second.nets[0].parameters()):
        assert torch.equal(x, y)
    other_seed = HyperNetworks(shapes, "lrf", hidden=32, seed=6)
    assert not torch.equal(next(other_seed.nets[0].parameters()), next(second.nets[0].parameters()))
    # a checkpoint round trip gives the same generations, bit for bit
    restored = HyperNetworks(shapes, "lrf", hidden=32, seed=99)
    saved = io.BytesIO()
    write_state(saved, first.state_dict(), {})
    saved.seek(0)
    restored.load_state_dict(read_state(saved)[1])
    assert restored.trained == first.trained
    assert np.array_equal(restored.generate(0, samples[0][0]), first.generate(0, samples[0][0]))


# ------------------------------------------------------------------------------ generation, aggregation
def make_hypemefed(**settings) -> HypeMeFed:
    cfg = load_config(None, ["algorithm=hypemefed", "model=multiexit_vgg", "clients.total=9", "clients.per_round=6",
                             "hypemefed.hidden=16", "hypemefed.naive_hidden=4",
                             *[f"hypemefed.{k}={v}" for k, v in settings.items()]])
    shapes = model_shapes()
    info = ModelInfo(shapes, [], {}, num_clients=9, model="multiexit_vgg", input_shape=(1, 28, 28), num_classes=10)
    algorithm = HypeMeFed(cfg, info)
    algorithm.init_server({n: np.zeros(s, np.float32) for n, s in shapes.items()}, rng.generator(0, rng.SERVER))
    return algorithm


def client_of_level(algorithm, level) -> int:
    return next(c for c in range(9) if algorithm.level_of(c) == level)


def constant_update(algorithm, level, value) -> ModelUpdate:
    shapes = model_shapes(level=level)
    return ModelUpdate({n: np.full(s, value, np.float32) for n, s in shapes.items()})


@pytest.mark.parametrize("kind", ["lrf", "naive"])
def test_generation_targets_and_cascade(kind):
    algorithm = make_hypemefed(hypernetwork=kind)
    nets = algorithm.hypernetworks
    shapes = model_shapes()
    g = np.random.default_rng(1)
    values = {n: g.normal(size=s).astype(np.float32) for n, s in model_shapes(level=1).items()}
    assert algorithm.generate(values, 1) == {}               # nothing trained yet: nothing generated
    nets.trained = [True] * 4
    level1 = algorithm.generate(values, 1)
    assert sorted(level1) == ["blocks.2.conv1.weight", "blocks.2.conv2.weight", "blocks.3.conv1.weight",
                              "blocks.3.conv2.weight"]
    for name, tensor in level1.items():
        assert tensor.shape == shapes[name] and tensor.dtype == np.float32
    # the cascade: block 3 comes from the generated block 2
    for k, (index_12, index_23) in ((1, (0, 2)), (2, (1, 3))):
        assert np.array_equal(level1[f"blocks.2.conv{k}.weight"], nets.generate(index_12, values[f"blocks.1.conv{k}.weight"]))
        assert np.array_equal(level1[f"blocks.3.conv{k}.weight"], nets.generate(index_23, level1[f"blocks.2.conv{k}.weight"]))
    values2 = {n: g.normal(size=s).astype(np.float32) for n, s in model_shapes(level=2).items()}
    level2 = algorithm.generate(values2, 2)
    assert sorted(level2) == ["blocks.3.conv1.weight", "blocks.3.conv2.weight"]
    assert np.array_equal(level2["blocks.3.conv2.weight"], nets.generate(3, values2["blocks.2.conv2.weight"]))
    assert algorithm.generate({n: g.normal(size=s).astype(np.float32) for n, s in shapes.items()}, 3) == {}
    nets.trained = [True, True, False, False]                  # H[2→3] never trained: the cascade stops
    assert sorted(algorithm.generate(values, 1)) == ["blocks.2.conv1.weight", "blocks.2.conv2.weight"]


class FakeHyperNetworks:
    """Generation = a constant: the source's mean + 10 (so a cascade 1 → 2 → 3 adds 20)."""

    def __init__(self, real):
        self.pairs, self.real, self.trained, self.fitted = real.pairs, real, [False] * 4, []
        self.shapes = model_shapes()

    def fit(self, index, samples, **_):
        self.fitted.append((index, len(samples)))
        self.trained[index] = True
        return 0.5

    def generate(self, index, source):
        return np.full(self.shapes[self.pairs[index][1]], float(np.mean(source)) + 10, np.float32)

    def parameter_count(self):
        return 7

    def parameter_bytes(self):
        return 28


@pytest.mark.parametrize("aggregation", ["samples", "uniform"])
def test_aggregation_with_generated_tensors_by_hand(aggregation):
    """Three clients, levels 1, 2, 3 with 10, 20, 30 samples, every tensor filled with 1, 2, 3."""
    algorithm = make_hypemefed(aggregation=aggregation)
    algorithm.hypernetworks = fake = FakeHyperNetworks(algorithm.hypernetworks)
    clients = [client_of_level(algorithm, level) for level in (1, 2, 3)]
    results = sorted([ClientResult(c, 10 * level, constant_update(algorithm, level, level), 0.0, 0)
                      for level, c in zip((1, 2, 3), clients)], key=lambda r: r.client_id)
    before = copy.deepcopy(algorithm.weights)
    algorithm.aggregate(1, results)
    w = algorithm.weights
    # pairs (1→2, k) train on the level-2 and level-3 clients, (2→3, k) on the level-3 one
    assert fake.fitted == [(0, 2), (1, 2), (2, 1), (3, 1)]

    def mean(pairs):   # (value, samples) → the configured average
        weights = [n if aggregation == "samples" else 1 for _, n in pairs]
        return sum(v * n for (v, _), n in zip(pairs, weights)) / sum(weights)

    # block 2 conv weights: trained by levels 2, 3; generated for level 1 (1 + 10)
    assert np.allclose(w["blocks.2.conv1.weight"], mean([(11, 10), (2, 20), (3, 30)]))
    # block 3 conv weights: level 3; level 2 generated (2 + 10); level 1 by the cascade (1 + 10 + 10)
    assert np.allclose(w["blocks.3.conv2.weight"], mean([(21, 10), (12, 20), (3, 30)]))
    if aggregation == "samples":
        assert np.allclose(w["blocks.2.conv1.weight"], 4.0) and np.allclose(w["blocks.3.conv2.weight"], 9.0)
    else:
        assert np.allclose(w["blocks.3.conv2.weight"], 12.0)
    # everything else only from the clients that trained it: biases, BN, heads
    assert np.allclose(w["blocks.3.conv1.bias"], 3) and np.allclose(w["blocks.3.bn2.running_var"], 3)
    assert np.allclose(w["blocks.2.bn1.running_mean"], mean([(2, 20), (3, 30)]))
    assert np.allclose(w["exits.1.linear.weight"], mean([(2, 20), (3, 30)]))
    assert np.allclose(w["exits.0.linear.weight"], mean([(1, 10), (2, 20), (3, 30)]))
    assert np.allclose(w["blocks.0.conv1.weight"], mean([(1, 10), (2, 20), (3, 30)]))
    assert set(w) == set(before) and all(w[n].dtype == before[n].dtype for n in w)
    metrics = algorithm.round_metrics(1)
    assert metrics["hypernet_loss"] == 0.5 and metrics["hypernet_params"] == 7 and metrics["hypernet_bytes"] == 28
    assert metrics["server_seconds"] >= 0


def test_public_generation_counts_the_global_values_instead():
    """The public code's generated weights never reach its models: a shallow client's deeper
    tensors (all of them, BN and heads included) are the global values it was sent."""
    algorithm = make_hypemefed(aggregation="uniform", public_generation="true")
    algorithm.hypernetworks = fake = FakeHyperNetworks(algorithm.hypernetworks)
    algorithm.weights = {n: np.full(v.shape, 7.0, v.dtype) for n, v in algorithm.weights.items()}
    clients = [client_of_level(algorithm, level) for level in (1, 2, 3)]
    results = sorted([ClientResult(c, 10 * level, constant_update(algorithm, level, level), 0.0, 0)
                      for level, c in zip((1, 2, 3), clients)], key=lambda r: r.client_id)
    algorithm.aggregate(1, results)
    w = algorithm.weights
    assert len(fake.fitted) == 4                        # trained all the same (the time is spent)
    assert np.allclose(w["blocks.3.conv2.weight"], (7 + 7 + 3) / 3)
    assert np.allclose(w["blocks.3.bn1.running_mean"], (7 + 7 + 3) / 3)
    assert np.allclose(w["blocks.2.conv1.weight"], (7 + 2 + 3) / 3)
    assert np.allclose(w["exits.1.linear.bias"], (7 + 2 + 3) / 3)
    assert np.allclose(w["blocks.1.conv1.weight"], (1 + 2 + 3) / 3)


def test_scalefl_variants_and_objective():
    cfg = load_config(None, ["algorithm=scalefl", "model=multiexit_vgg", "clients.total=9", "clients.per_round=6"])
    info = ModelInfo(model_shapes(), [], {}, num_clients=9, model="multiexit_vgg", input_shape=(1, 28, 28),
                     num_classes=10)
    algorithm = ScaleFL(cfg, info)
    # every BN without running statistics: the authors' CIFAR runs (tests/test_scalefl_bn.py)
    assert algorithm.variants == [{"level": 1, "width": 0.7, "track_running_stats": False},
                                  {"level": 2, "width": 0.75, "track_running_stats": False},
                                  {"level": 3, "width": 1.0, "track_running_stats": False}]
    assert algorithm.objective_for(5, 0) is algorithm._objectives[False]      # first quarter: no distillation
    assert algorithm.objective_for(6, 0) is algorithm._objectives[True]
    torch.manual_seed(0)
    exits, y = [torch.randn(8, 10, requires_grad=True) for _ in range(3)], torch.randint(0, 10, (8,))
    ce = [torch.nn.functional.cross_entropy(e, y) for e in exits]
    plain = self_distillation(0.0, 3.0)(exits, y)
    torch.testing.assert_close(plain, (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6)
    kd = self_distillation(0.5, 3.0)(exits, y)
    assert kd > plain
    kd.backward()
    assert exits[2].grad is not None      # the teacher learns from its own CE term only ...
    exits[2].grad = None
    (self_distillation(0.5, 3.0)(exits, y) - plain.detach()).backward()
    torch.testing.assert_close(exits[2].grad, torch.autograd.grad(3 * ce[2] / 6, exits[2], retain_graph=True)[0])


# ------------------------------------------------------------------------------ end to end
TIMING = {"wall_seconds", "cum_wall_seconds", "compute_seconds", "mpi_payload_bytes", "mpi_control_bytes", "rank",
          "server_seconds", "server_peak_rss_bytes"}


def assert_identical(a: dict, b: dict, what: str):
    for group in ("rounds", "clients"):
        assert set(a[group]) == set(b[group]), what
        for name in set(a[group]) - TIMING:
            assert same_bits(a[group][name], b[group][name]), f"{what}: {group}/{name}"


@needs_mpiexec
@pytest.mark.slow
def test_hypemefed_identical_for_1_2_4_ranks(runs):
    _, base = runs("hypemefed", 1)
    rounds = base["rounds"]
    assert np.all(rounds["server_seconds"] > 0) and np.all(np.isfinite(rounds["hypernet_loss"]))
    assert np.all(rounds["hypernet_params"] == EXPECTED[(1, 28, 28)]["lrf"])
    assert np.all(rounds["hypernet_bytes"] == 4 * EXPECTED[(1, 28, 28)]["lrf"])
    for column in ("exit_accuracy[1]", "exit_accuracy[3]", "tier_accuracy[1]", "tier_accuracy[3]"):
        assert np.all(np.isfinite(rounds[column])), column
    for ranks in (2, 4):
        _, other = runs("hypemefed", ranks)
        assert_identical(base, other, f"hypemefed P=1 vs P={ranks}")


@pytest.mark.slow
def test_hypemefed_submodel_bytes_are_exact(runs):
    """A level-l client downloads and uploads exactly its blocks and exits; nothing generated travels."""
    _, res = runs("hypemefed", 1)
    clients = res["clients"]
    for level in (1, 2, 3):
        sizes = variant_sizes(level=level)
        this = clients["tier"] == level
        assert this.any()
        assert np.all(clients["upload_bytes"][this] == 4 * sum(sizes.values())), level
        assert np.all(clients["download_bytes"][this] == 4 * sum(sizes.values())), level
        assert np.all(clients["header_bytes"][this] == 9 * len(sizes))


@pytest.mark.slow
def test_generation_changes_only_the_generated_blocks(runs):
    """Round 1 trains the same clients from the same model as depth-wise averaging; HypeMeFed then
    changes only blocks 2 and 3 (generated conv weights), so exit 1 agrees bit for bit and the deep
    exits do not."""
    _, hyp = runs("hypemefed", 1)
    _, depth = runs("depthwise_avg", 1)
    first = hyp["clients"]["round"] == 1
    assert same_bits(hyp["clients"]["train_loss"][first], depth["clients"]["train_loss"][first])
    assert same_bits(hyp["rounds"]["exit_accuracy[1]"][:1], depth["rounds"]["exit_accuracy[1]"][:1])
    assert hyp["rounds"]["test_loss"][0] != depth["rounds"]["test_loss"][0]


@pytest.mark.slow
def test_scalefl_width_and_depth_bytes_are_exact(runs):
    _, res = runs("scalefl", 1)
    clients, full = res["clients"], variant_sizes()
    for tier, (level, width) in enumerate(((1, 0.7), (2, 0.75), (3, 1.0)), start=1):
        sizes = variant_sizes(level=level, width=width, track_running_stats=False)   # no BN statistics travel
        shapes = model_shapes(level=level, width=width, track_running_stats=False)
        this = clients["tier"] == tier
        assert this.any()
        assert np.all(clients["upload_bytes"][this] == 4 * sum(sizes.values()))
        assert np.all(clients["download_bytes"][this] == 4 * sum(sizes.values()))
        header = sum(9 + (0 if sizes[n] == full[n] else len(n) + 3 + 12 * len(shapes[n])) for n in sizes)
        assert np.all(clients["header_bytes"][this] == header), tier
    assert np.all(np.isfinite(res["rounds"]["client_accuracy"]))


@pytest.mark.slow
def test_full_depth_fedavg_runs_on_the_multiexit_model(runs):
    _, res = runs("fedavg", 1)
    assert np.all(np.isfinite(res["rounds"]["test_accuracy"])) and np.all(np.isfinite(res["rounds"]["client_accuracy"]))
    assert np.all(res["clients"]["upload_bytes"] == 4 * sum(variant_sizes().values()))


# ------------------------------------------------------------------------------ kill / SIGTERM + resume
RESUME = ["--set", "algorithm=hypemefed", "--set", "rounds=5", "--set", "local.epochs=2", "--set", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def uninterrupted_hypemefed(work, tiered_cfg):
    out = work / "hypemefed_reference.h5"
    proc, _ = fedmpi(["run", str(tiered_cfg), "--out", str(out), "--quiet", *RESUME], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)


def interrupted(work, tiered_cfg, name: str, how: int, extra=()):
    out = work / f"hypemefed_{name}.h5"
    run = Streaming(["run", str(tiered_cfg), "--out", str(out), "--progress", *RESUME, *extra])
    run.wait_for_line(r"^round 2/5", timeout=240)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before it could be interrupted; make rounds slower")
    os.kill(run.proc.pid, how)
    rc, stderr = run.finish(timeout=120)
    return out, rc, stderr


def resume(tiered_cfg, out, extra=()):
    proc, _ = fedmpi(["run", str(tiered_cfg), "--out", str(out), "--quiet", "--resume", *RESUME, *extra], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(out)
    assert "finished" in resumed["attrs"] and not out.with_suffix(".ckpt").exists()
    return resumed


@pytest.mark.slow
@pytest.mark.xdist_group("hypemefed_resume")     # one worker: the module's uninterrupted run, made once
def test_sigkill_then_resume_is_bit_identical_with_the_hypernetworks(work, tiered_cfg, uninterrupted_hypemefed):
    out, rc, _ = interrupted(work, tiered_cfg, "killed", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    checkpoint = read_checkpoint_file(out.with_suffix(".ckpt"))
    assert 1 <= checkpoint["round"] < 5      # the line for round 2 may precede its checkpoint
    saved = checkpoint["algorithm"]["hypernetworks"]
    assert saved["kind"] == "lrf" and saved["trained"] == [True] * 4 and len(saved["nets"]) == 4
    assert {n: v.shape for n, v in saved["nets"][0].items()}["map_a.0.weight"] == (512, 192)
    resumed = resume(tiered_cfg, out)
    # hypernet_loss and the deep exits after the restart depend on the restored hypernetworks
    assert_identical(resumed, uninterrupted_hypemefed, "resumed after SIGKILL")


@pytest.mark.slow
@pytest.mark.xdist_group("hypemefed_resume")     # one worker: the module's uninterrupted run, made once
def test_sigterm_checkpoints_and_resume_is_bit_identical(work, tiered_cfg, uninterrupted_hypemefed):
    no_checkpoints = ["--set", "checkpoint.every=0"]
    out, rc, stderr = interrupted(work, tiered_cfg, "terminated", signal.SIGTERM, no_checkpoints)
    assert rc == 75, stderr
    assert "resume with --resume" in stderr
    resumed = resume(tiered_cfg, out, no_checkpoints)
    assert_identical(resumed, uninterrupted_hypemefed, "resumed after SIGTERM")
