"""What a run starts from, built from the config alone: the dataset, its federated partition, and
the model with its seeded initial weights θ₀. Every rank builds the same (``engine.context``
builds the rest of the run's setup on top of it), and the bench's bare loop and start-up
measurement (bench/perf/bare.py, startup.py) build fedmpi's exact start from it.

A module of its own, outside the engine: it imports neither MPI nor the engine's round loop, so
the bench can use it without them. The only MPI is optional and passed in: ``load_once``
(``Communicator.load_once_per_node``) reads the dataset on one rank per node into shared memory.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from . import rng
from .data import Dataset, Partition, hold_out_local_test, load_dataset, partition_dataset
from .errors import ConfigError
from .models import build_model


@dataclass
class Initial:
    dataset: Dataset
    partition: Partition               # with the held-out local test sets of data.local_test_fraction
    builder: Callable[..., nn.Module]  # build_model for the config's model, the data's shape and classes
    model: nn.Module                   # built by ``builder`` and initialised: its state is θ₀
    weights: dict[str, np.ndarray]     # θ₀: copies of the model's floating-point state_dict entries


def build_initial(cfg: dict, load_once: Callable | None = None,
                  mark: Callable[[str], None] | None = None) -> Initial:
    """Dataset, partition and initial model of ``cfg``, the same on every rank and every call.

    ``load_once(load)``, when given, runs ``load`` (the dataset) once per node and shares it.
    ``mark(stage)``, when given, is called as each stage ends: ``"data"``, then ``"partition"``
    (the start-up measurement times them)."""
    data = cfg["data"]

    def load():
        return load_dataset(data["name"], data["root"], seed=cfg["seed"],
                            num_clients=cfg["clients"]["total"], synthetic=data["synthetic"],
                            unimib_layout=data["unimib_layout"])

    dataset = load_once(load) if load_once is not None else load()
    if mark is not None:
        mark("data")
    partition = partition_dataset(
        dataset, data["partition"], cfg["clients"]["total"], seed=cfg["seed"],
        alpha=data["alpha"], shard_size=data["shard_size"], shards_per_client=data["shards_per_client"],
        min_client_samples=data["min_client_samples"])
    if data["local_test_fraction"] > 0:
        partition = hold_out_local_test(partition, data["local_test_fraction"], cfg["seed"])
    empty = [c for c, idx in enumerate(partition.train_indices) if len(idx) == 0]
    if empty:
        raise ConfigError("data.partition", f"clients {empty[:5]} have no training data; "
                          "use fewer clients.total or a larger data.alpha")
    if mark is not None:
        mark("partition")
    builder = partial(build_model, cfg["model"], dataset.input_shape, dataset.num_classes)
    model = builder()
    torch.manual_seed(rng.torch_seed(cfg["seed"], rng.INIT))
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items() if t.is_floating_point()}
    return Initial(dataset, partition, builder, model, weights)
