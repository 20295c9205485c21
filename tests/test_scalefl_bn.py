"""ScaleFL's batch norm as its authors' CIFAR runs use it (git-disl/scale-fl: every BN built with
``track_running_stats=False``, their ``-trs`` flag unset): ``scalefl.track_running_stats: false``,
the default, builds the clients' submodels and the server's evaluation models without running
statistics, so none are sent or averaged and evaluation normalises with the batch's own
statistics; ``true`` keeps them. Every expected number is counted or computed by hand here."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from fake_results import make_config, make_rounds, write_fake_run
from helpers import TIERED, fedmpi, read_results, write_idx

from fedmpi.algorithms import ClientTask
from fedmpi.config import load_config
from fedmpi.engine.context import build_context
from fedmpi.results.groups import group_runs
from fedmpi.results.reader import read_run
from fedmpi.results.writer import config_identity, identity_differences

torch.set_num_threads(1)

MODEL = "multiexit_vgg_small"
CHANNELS = (8, 16, 32, 64)       # multiexit_vgg_small on 28x28: the spec's 32/64/128/256 / 4
# ScaleFL's default tiers: (level, width); a level-l submodel holds blocks 0..l
TIERS = ((1, 0.7), (2, 0.75), (3, 1.0))
SMALL = {**copy.deepcopy(TIERED), "model": MODEL, "rounds": 1, "algorithm": "scalefl"}


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    work = tmp_path_factory.mktemp("scalefl_bn")
    cfg = copy.deepcopy(SMALL)
    cfg["data"]["root"] = str(write_idx(work / "mnist"))
    return cfg


def is_running_stat(name: str) -> bool:
    return name.endswith((".running_mean", ".running_var", ".num_batches_tracked"))


def test_without_running_stats_nothing_of_bn_statistics_is_sent_or_averaged(small_cfg):
    cfg = load_config(None, extra=small_cfg)
    assert cfg["scalefl"]["track_running_stats"] is False      # the authors' CIFAR runs: the default
    ctx = build_context(cfg)
    algo = ctx.algorithm
    start = {n: w.copy() for n, w in ctx.initial_weights.items()}
    algo.init_server({n: w.copy() for n, w in start.items()}, np.random.default_rng(0))
    results = []
    for tier in range(3):
        # the module a client trains: no BN of it keeps running statistics
        model = ctx.trainer.model_for(algo.variants[tier])
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(norms) == 2 * (TIERS[tier][0] + 1)
        assert all(m.running_mean is None and m.running_var is None for m in norms), tier
        client = int(np.flatnonzero(algo.tier == tier)[0])
        received = algo.download(1, client)
        rows = torch.from_numpy(ctx.partition.train_indices[client][:20])
        result = algo.local_update(ClientTask(1, client, received, {}, ctx.train[0][rows], ctx.train[1][rows],
                                              seed=3), ctx.trainer)
        for names in (received.values, result.update.values):
            assert names and not [n for n in names if is_running_stat(n)], tier
        results.append(result)
    algo.aggregate(1, results)
    for name, value in algo.weights.items():
        if is_running_stat(name):     # nobody sent them: the initial values, untouched
            assert np.array_equal(value, start[name]), name
    assert not np.array_equal(algo.weights["blocks.0.conv1.weight"], start["blocks.0.conv1.weight"])
    # and the server evaluates models built the same way, sent without BN statistics
    for model in algo.evaluation_models(1):
        assert model.variant["track_running_stats"] is False, model.key
        assert not [n for n in model.weights if is_running_stat(n)], model.key


def test_evaluation_normalises_with_the_batch_statistics(small_cfg):
    ctx = build_context(load_config(None, extra=small_cfg))
    algo = ctx.algorithm
    weights = {n: w.copy() for n, w in ctx.initial_weights.items()}
    weights["blocks.0.bn1.weight"][:] = 2.0
    weights["blocks.0.bn1.bias"][:] = 0.5
    algo.init_server(weights, np.random.default_rng(0))
    full = next(m for m in algo.evaluation_models(1) if m.key == "global")
    network = ctx.trainer.load(full.weights, full.variant)
    network.eval()                    # as the evaluator runs it
    bn = network.blocks[0].bn1
    # a tiny batch: 2 samples x 1x2 positions, every channel the values 1, 2 / 4, 9:
    # mean 4, biased variance ((1-4)² + (2-4)² + 0 + (9-4)²)/4 = 38/4 = 9.5
    x = torch.tensor([[1.0, 2.0], [4.0, 9.0]]).view(2, 1, 1, 2).repeat(1, CHANNELS[0], 1, 1)
    expected = 2.0 * (x - 4.0) / np.sqrt(9.5 + bn.eps) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(bn(x), expected, rtol=1e-6, atol=1e-6)
        # the whole network: a sample's logits depend on the batch it is evaluated in
        images = ctx.test[0][:8]
        alone, together = network(images[:4])[-1], network(images)[-1][:4]
    assert not torch.allclose(alone, together)


def test_runs_stored_before_the_option_existed_count_as_tracking_running_stats(tmp_path):
    """fedmpi's ScaleFL tracked running statistics before the option: a stored run without the key
    is one setting with ``true`` runs, not with the new default, and --resume says so."""
    before = {"widths": [0.7, 0.75, 1.0], "kd_gamma": 0.0, "kd_temperature": 3.0, "kd_after": 0.25}
    configs = [make_config("scalefl", seed=0, scalefl=before),
               make_config("scalefl", seed=1, scalefl={**before, "track_running_stats": True}),
               make_config("scalefl", seed=2, scalefl={**before, "track_running_stats": False})]
    rounds = make_rounds([0.5, 0.6], 100)
    runs = [read_run(write_fake_run(tmp_path / f"run{i}.h5", c, rounds)) for i, c in enumerate(configs)]
    assert sorted(sorted(r.seed for r in g.runs) for g in group_runs(runs)) == [[0, 1], [2]]

    settings = ["algorithm=scalefl", "model=multiexit_vgg_small"]
    current = load_config(None, settings)
    stored = json.loads(config_identity(current))
    del stored["scalefl.track_running_stats"]          # a checkpoint written before the key
    stored = json.dumps(stored, sort_keys=True)
    assert identity_differences(stored, config_identity(current)) == "scalefl.track_running_stats: true → false"
    tracked = load_config(None, [*settings, "scalefl.track_running_stats=true"])
    assert identity_differences(stored, config_identity(tracked)) == ""


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def bn_runs(small_cfg, tmp_path_factory):
    """The small ScaleFL run (1 round) without and with running statistics: results per setting."""
    work = tmp_path_factory.mktemp("scalefl_bn_runs")
    config = work / "scalefl.yaml"
    config.write_text(yaml.safe_dump(small_cfg))
    runs = {}
    for tracked in (False, True):
        out = work / f"trs_{tracked}.h5"
        proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet",
                          "--set", f"scalefl.track_running_stats={str(tracked).lower()}"], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[tracked] = read_results(out)
    return runs


def bn_floats(level: int, width: float) -> int:
    """Running-statistic floats of a (level, width) submodel, by hand: blocks 0..level, each with two
    BNs of ⌈width·C⌉ channels holding running_mean and running_var."""
    channels = [int(np.ceil(round(width * c, 9))) for c in CHANNELS[:level + 1]]
    return sum(2 * 2 * c for c in channels)


@pytest.mark.slow
def test_the_bytes_differ_by_exactly_the_running_statistics(bn_runs):
    # by hand: level 1 at 0.7 holds 6 + 12 channels, level 2 at 0.75 6 + 12 + 24, level 3 8 + 16 + 32 + 64
    assert [bn_floats(*t) for t in TIERS] == [4 * 18, 4 * 42, 4 * 120]
    static, tracked = bn_runs[False]["clients"], bn_runs[True]["clients"]
    order = lambda c: np.lexsort((c["client_id"], c["round"]))  # noqa: E731
    s, t = order(static), order(tracked)
    assert np.array_equal(static["client_id"][s], tracked["client_id"][t])
    tiers = static["tier"][s]
    assert set(tiers.tolist()) == {1, 2, 3}
    expected = np.array([4 * bn_floats(*TIERS[k - 1]) for k in tiers])
    assert np.array_equal(tracked["upload_bytes"][t] - static["upload_bytes"][s], expected)
    assert np.array_equal(tracked["download_bytes"][t] - static["download_bytes"][s], expected)
    for run in bn_runs.values():      # both finish and are evaluated
        for column in ("test_accuracy", "client_accuracy", "tier_accuracy[1]", "exit_accuracy[3]"):
            assert np.all(np.isfinite(run["rounds"][column])), column
