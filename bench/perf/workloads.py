"""The workloads of ``make bench-perf`` (bench/perf/run.py): fedmpi configs, shared with the bare loop.

compute   MNISTNet, Fashion-MNIST iid over 100 clients (600 images each), 10 per round: the
          per-client loop is dominated by convolution arithmetic.
overhead  a 199 k-parameter MLP (784-200-200-10), Fashion-MNIST iid over 1,000 clients (60 images
          each), 100 per round (and ``overhead1000``: all 1,000 per round): two local steps per
          client, so per-step and per-client overhead, not arithmetic, dominates.

Every workload: one local epoch, batch 32, SGD lr 0.01 with momentum 0.9 and weight decay 1e-3;
algorithms FedAvg (dense) and FedDST at S = 0.8 with one mask readjustment in the middle of the
timed rounds. Evaluation only after the last round (``eval.every: 0``).

Rounds: fedmpi and the bare loop both run ``rounds + 2``: round 1 is a warm-up (first-use costs:
allocator, lazy imports; reported separately), the next ``rounds`` are timed, and the last round
(which in fedmpi also evaluates) is not timed.
"""
from __future__ import annotations

import copy

LOCAL = {"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.001}

WORKLOADS = {
    "compute": {
        "title": "compute-bound: MNISTNet, 100 clients x 600 images, 10 per round",
        "rounds": 20, "quick_rounds": 3, "client_batches": [1],
        "config": {"model": "mnistnet", "clients": {"total": 100, "per_round": 10}},
    },
    "overhead": {
        "title": "overhead-bound: MLP (199 k parameters), 1,000 clients x 60 images, 100 per round",
        "rounds": 10, "quick_rounds": 3, "client_batches": [1, 25],
        "config": {"model": "mlp", "clients": {"total": 1000, "per_round": 100}},
    },
    "overhead1000": {
        "title": "overhead-bound at scale: MLP, 1,000 clients x 60 images, all 1,000 per round",
        "rounds": 4, "quick_rounds": 2, "client_batches": [1, 25],
        "config": {"model": "mlp", "clients": {"total": 1000, "per_round": 1000}},
    },
}

ALGORITHMS = {
    "fedavg": {"algorithm": "fedavg", "sparsity": 0.0},
    "feddst": {"algorithm": "feddst", "sparsity": 0.8},
}


def fedmpi_config(workload: str, algorithm: str, timed_rounds: int, *, client_batch: int = 1,
                  workers: bool = False) -> dict:
    """The fedmpi config (a mapping for ``load_config(extra=...)`` or a YAML file). ``workers``:
    each rank sums its own clients (docs/performance.md, "Worker-side aggregation")."""
    spec = WORKLOADS[workload]
    total_rounds = timed_rounds + 2
    cfg = {
        "experiment": f"perf-{workload}",
        "seed": 0,
        "rounds": total_rounds,
        "data": {"name": "fashion_mnist", "partition": "iid"},
        "local": {**LOCAL, "client_batch": client_batch},
        "eval": {"every": 0},
        "output": {"progress": False},
        **copy.deepcopy(spec["config"]),
        **ALGORITHMS[algorithm],
    }
    if workers:
        cfg["aggregation"] = {"sum": "fixed_point", "where": "workers"}
    if algorithm == "feddst":
        # one readjustment, in the middle of the timed rounds (round 1 is the warm-up)
        middle = 1 + max(1, (timed_rounds + 1) // 2)
        cfg["feddst"] = {"readjust_every": middle, "r_end": middle + 1}
    return cfg
