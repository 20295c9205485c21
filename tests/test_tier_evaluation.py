"""The evaluation protocol of the tiered methods: a client is scored on the submodel it runs (its
tier's depth and width), never on the full model. In this process, for the width methods: the
labels of every client's local test samples are set to what its tier's submodel predicts, that
submodel built here directly from the global weights with the model builder's ``level``/``width``
options, so a client scored on its own submodel gets exactly 1 and one scored on the full model
less (checked first: the full model predicts otherwise on some of the smallest tier's samples)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers import TIERED, submodel_predictions, write_idx

from fedmpi.config import load_config
from fedmpi.engine.context import build_context
from fedmpi.engine.evaluation import Evaluator

@pytest.mark.parametrize("algorithm", ["heterofl", "scalefl"])
def test_each_client_is_scored_on_its_tiers_submodel(algorithm, tmp_path):
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator

    cfg = copy.deepcopy(TIERED)
    cfg["data"]["root"] = str(write_idx(tmp_path / "mnist"))
    if algorithm == "heterofl":   # the stored BN statistics, as submodel_predictions() (the query: test_heterofl_complete)
        cfg["heterofl"] = {"static_bn": False}
    if algorithm == "scalefl":    # stored BN statistics too: batch statistics would depend on the evaluator's chunks
        cfg["scalefl"] = {"track_running_stats": True}
    cfg = load_config(None, extra={**cfg, "algorithm": algorithm})
    ctx = build_context(cfg)
    algo = ctx.algorithm
    # the exit heads scaled up: the initial model's logits are close together, and a top-2 margin
    # under float32 noise would let the evaluator's batching flip a prediction
    algo.init_server({n: w * 1000 if n.startswith("exits.") else w.copy() for n, w in ctx.initial_weights.items()},
                     np.random.default_rng(0))
    weights = algo.weights
    tier_variants = [dict(v) for v in algo.variants]   # e.g. HeteroFL {"width": 0.25}, ScaleFL + level
    assert any(v.get("width", 1.0) < 1 for v in tier_variants)

    (x_train, y_train), (x_test, y_test) = ctx.train, ctx.test
    assert ctx.partition.local_test_in_train          # TIERED holds local test sets out of training
    full, _ = submodel_predictions(weights, x_train)
    y_local = y_train.clone()
    differs = 0
    for tier, variant in enumerate(tier_variants):
        predicted, margin = submodel_predictions(weights, x_train, **variant)
        for c in np.flatnonzero(algo.tier == tier):
            rows = ctx.partition.test_indices[c]
            assert len(rows) and margin[rows].min() > 1e-3   # no near-tie a chunking could flip
            y_local[torch.from_numpy(rows)] = torch.from_numpy(predicted[rows])
            if tier == 0:
                differs += int(np.count_nonzero(predicted[rows] != full[rows]))
    assert differs > 0, "the case does not tell the smallest tier's submodel from the full model"

    # global test labels: the smallest tier's submodel's predictions, so the exit it ends at is
    # measured on that submodel exactly when exit_accuracy scores it with 1
    smallest = tier_variants[0]
    y_global, margin = submodel_predictions(weights, x_test, **smallest)
    assert margin.min() > 1e-3
    full_test, _ = submodel_predictions(weights, x_test)
    full_accuracy = float(np.mean(full_test == y_global))
    assert full_accuracy < 1

    comm = Communicator(MPI.COMM_WORLD)
    evaluator = Evaluator(comm, ctx.trainer, {"test": (x_test, torch.from_numpy(y_global)),
                                              "train": (x_train, y_local)}, ctx.partition, 40)
    metrics = algo.evaluation_metrics(1, evaluator.run(algo.evaluation_models(1)))

    for tier in range(len(tier_variants)):
        assert metrics[f"tier_accuracy[{tier + 1}]"] == 1.0, (tier, metrics)
    assert metrics["client_accuracy"] == 1.0
    assert metrics[f"exit_accuracy[{smallest.get('level', 3)}]"] == 1.0
    # the full model at its deepest exit on the global test set, reported as test_accuracy
    assert metrics["test_accuracy"] == pytest.approx(full_accuracy, abs=1e-12)
