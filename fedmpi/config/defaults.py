"""fedmpi's own config keys: ``DEFAULTS`` (each key, its default and so its type). Each method's
section (``feddst``, ``prunefl``, ...) is declared by its class (``Algorithm.section`` and
``defaults``) and joins these in ``config.defaults()``."""
from __future__ import annotations

import copy
from typing import Any

from ..algorithms import config_sections

PARTITIONS = ("iid", "dirichlet", "shards", "natural")
LEFTOVER_RULES = ("lowest", "authors")   # tiers.leftover

DEFAULTS: dict[str, Any] = {
    "experiment": "",          # names the figure set this run belongs to (plots group by it)
    "seed": 0,
    "rounds": 20,
    "algorithm": "fedavg",
    "model": "mnistnet",
    "sparsity": 0.0,           # target fraction of zeros in maskable weights (sparse algorithms)
    "data": {
        "name": "fashion_mnist",
        "root": None,          # None: the dataset's default location (Fashion-MNIST: Debian package)
        "partition": "shards",
        "alpha": 0.5,          # Dirichlet concentration
        "shard_size": 20,
        "shards_per_client": 2,
        # dirichlet: redraw the split until every client holds at least this many training
        # samples (the HypeMeFed authors use 50); 0: no such redraw
        "min_client_samples": 0,
        # > 0: hold out this fraction of each client's own data as its local test split
        # (HypeMeFed's 80/20); 0: a client's local test set is the global test images of its labels
        "local_test_fraction": 0.0,
        # UniMiB-SHAR only: series (3x151 signals, 1-D layers) | image (HypeMeFed's 1x18x25 image)
        "unimib_layout": "series",
        "synthetic": {"alpha": 1.0, "beta": 1.0, "dim": 60, "classes": 10, "test_fraction": 0.2},
    },
    "clients": {"total": 100, "per_round": 10},
    "local": {
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.01,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "optimizer": "sgd",    # sgd | adam | adamw (momentum/nesterov: SGD; betas/eps: Adam, AdamW)
        "nesterov": False,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        # the clients' training loss: cross_entropy (softmax) | bce_onehot (the PruneFL authors'
        # FEMNIST/CIFAR-10 loss: BCE-with-logits on one-hot targets, mean over batch × classes)
        "loss": "cross_entropy",
        # clients of a rank trained at once (fedmpi/training/multi_client.py): the round's sorted
        # clients in consecutive blocks of this many, a block never split across ranks; results
        # are the same as one by one, bit for bit; 1: one by one
        "client_batch": 1,
        # auto: models fedmpi can train without autograd (the MLP; fedmpi/training/explicit.py)
        # do so, with the same bits; autograd: always through autograd
        "backward": "auto",
        # true: skip each epoch's last partial batch, and a client with fewer samples than
        # batch_size trains them as one batch (the HypeMeFed authors' DataLoader)
        "drop_last": False,
    },
    "eval": {
        "every": 1,
        "batch_size": 1000,    # evaluation chunk size; fixed so results do not depend on the rank count
    },
    # heterogeneous clients (the tiered methods): tier t holds mix[t] of the clients and trains
    # depth levels[t] (multi-exit blocks/exits) or width widths[t] (channel fraction)
    # leftover: who gets the per_round mod tiers slots left over from the even split: lowest (one
    # each to tiers 1, 2, ...) | authors (all to tier 2, as the HypeMeFed authors' main.py does)
    "tiers": {"mix": [1.0, 1.0, 1.0], "levels": [1, 2, 3], "widths": [0.25, 0.5, 1.0], "leftover": "lowest"},
    "device": {
        # the device profile behind sim_seconds (docs/timing.md): a built-in name (laptop,
        # raspberry-pi-4, jetson-nano, phone-lte) or a profile file (profiles/NAME.yaml: measured
        # by `fedmpi profile`, or coefficients such as prunefl-raspberry-pi.yaml)
        "profile": "laptop",
        # seconds charged to every client of every method in every round (sim_seconds) and part of
        # c0 in PruneFL's objective: the PruneFL authors' constant; 0: none beyond the profile's own
        "time_constant": 0.0,
        "tier_profiles": [],      # one profile per tier of tiers.mix for that tier's clients; []: profile
        "sparse_kernels": "off",  # off | auto (sparse kernel below the measured break-even) | always
        "kernel_profile": None,   # measured profile whose break-evens auto uses; None: device.profile
        "torch": "cpu",        # "cpu", or "cuda" to put each rank on GPU (local rank modulo GPU count)
    },
    # how and where the round's weighted sum over clients runs (docs/performance.md, "Worker-side
    # aggregation"); only algorithms whose merge is such a sum take fixed_point and workers
    "aggregation": {
        "sum": "float64",      # float64: in client-id order | fixed_point: int64 on a per-element grid,
                               # the same bits whatever the grouping
        "where": "server",     # server: rank 0 decodes every upload and merges | workers: each rank
                               # sums its clients, MPI combines the ranks (needs sum: fixed_point)
    },
    "checkpoint": {"every": 0},    # rounds between checkpoints; 0 = only on SIGTERM
    # wait: sleep (wait on MPI without spinning a core) or spin (MPI's own busy-poll);
    # share_data: one rank per node reads the dataset into MPI shared memory for all of them
    "mpi": {"wait": "sleep", "share_data": True},
    "output": {"progress": "auto"},  # auto: a bar on a terminal, lines in batch logs; true: a line per round
}

# Keys whose value may be one of several types.
UNION_TYPES = {"output.progress": (str, bool)}


def defaults(algorithm: str | None = None) -> dict:
    """Every key a config may hold, with its default: fedmpi's own, each built-in method's section
    (after ``device``, where they always stood) and, when ``algorithm`` is a plug-in, its section."""
    tree = {}
    for key, value in DEFAULTS.items():
        tree[key] = copy.deepcopy(value)
        if key == "device":
            for section, cls in config_sections(algorithm).items():
                tree[section] = copy.deepcopy(cls.defaults)
    return tree


def stored_defaults(algorithm: str | None = None) -> dict:
    """What a stored config of ``algorithm`` that lacks a key ran with: ``defaults(algorithm)``
    naming that algorithm (so its own section counts in the run's identity), except each method
    section's ``before_key_existed`` (keys added with a default unlike the behaviour before them)."""
    tree = defaults(algorithm)
    if algorithm is not None:
        tree["algorithm"] = algorithm
    for section, cls in config_sections(algorithm).items():
        tree[section].update(copy.deepcopy(cls.before_key_existed))
    return tree
