"""Datasets and their federated partitions.

``load_dataset`` reads a dataset from local files (never downloads) or generates LEAF Synthetic;
``partition_dataset`` splits it over clients. Both are deterministic in ``seed`` and never look
at the MPI rank, so every rank can build the same data on its own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmpi.errors import ConfigError, require
from fedmpi.plugins import Registry

from . import readers
from .partition import SCHEMES, hold_out_local_test, partition_dataset
from .readers_extra import UNIMIB_LAYOUTS, UNIMIB_TASKS, with_unimib_layout
from .synthetic import SYNTHETIC_DEFAULTS, make_synthetic
from .types import Dataset, DatasetSpec, Partition

__all__ = ["Dataset", "DatasetSpec", "Partition", "DATASETS", "SCHEMES", "SYNTHETIC_DEFAULTS", "UNIMIB_LAYOUTS",
           "UNIMIB_TASKS", "check_dataset_spec", "hold_out_local_test", "load_dataset", "partition_dataset"]


def _file_reader(name: str):
    """A data set in its standard files: the four arrays from ``readers``, images normalised."""
    def read(root, *, seed, num_clients, synthetic) -> Dataset:
        x_train, y_train, x_test, y_test = readers.READERS[name](root)
        if x_train.dtype == np.uint8:   # images; signals (UniMiB-SHAR) come back standardised
            x_train, x_test = readers.normalise(x_train, name), readers.normalise(x_test, name)
        return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                       num_classes=readers.NUM_CLASSES[name], input_shape=tuple(x_train.shape[1:]))
    return read


def _read_femnist(root, *, seed, num_clients, synthetic) -> Dataset:
    from .femnist import load_femnist    # LEAF JSON with its natural per-writer partition

    return load_femnist(root, num_clients)


def _read_synthetic(root, *, seed, num_clients, synthetic) -> Dataset:
    return make_synthetic(seed, num_clients, synthetic)


_SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
           "svhn": (3, 32, 32), "stl10": (3, 96, 96), "unimib_shar": (3, 151), "unimib_shar_adl": (3, 151),
           "unimib_shar_fall": (3, 151)}


def _builtin_datasets() -> dict[str, DatasetSpec]:
    from .femnist import EXPECTED as FEMNIST_FILES, NUM_CLASSES as FEMNIST_CLASSES, SIDE

    specs = [DatasetSpec(name, _file_reader(name), readers.EXPECTED_FILES[name], shape, readers.NUM_CLASSES[name],
                         "/usr/share/datasets/fashion-mnist" if name == "fashion_mnist" else None)
             for name, shape in _SHAPES.items()]
    specs.append(DatasetSpec("femnist", _read_femnist, FEMNIST_FILES, (1, SIDE, SIDE), FEMNIST_CLASSES))
    specs.append(DatasetSpec("synthetic", _read_synthetic, "", (SYNTHETIC_DEFAULTS["dim"],),
                             SYNTHETIC_DEFAULTS["classes"]))
    return {spec.name: spec for spec in specs}


def check_dataset_spec(name: str, spec) -> None:
    """Everything fedmpi reads from a data set's spec is there and well formed (ConfigError if not)."""
    def need(condition: bool, problem: str) -> None:
        require(condition, "data.name", problem)

    need(isinstance(spec, DatasetSpec), f"{spec!r} is not a fedmpi.data.DatasetSpec")
    need(spec.name == name, f"the spec declares name {spec.name!r}, registered as {name!r}")
    need(callable(spec.read), "read must be callable")
    need(isinstance(spec.files, str), "files must be a string (what data.root must hold; '' for none)")
    need(isinstance(spec.input_shape, tuple) and spec.input_shape and all(isinstance(d, int) and d > 0
                                                                           for d in spec.input_shape),
         "input_shape must be a tuple of positive ints")
    need(isinstance(spec.num_classes, int) and spec.num_classes >= 1, "num_classes must be a positive int")


DATASETS = Registry("fedmpi.datasets", "dataset", "data.name", _builtin_datasets, check_dataset_spec)


def load_dataset(name: str, root: str | None, *, seed: int, num_clients: int, synthetic: dict | None = None,
                 unimib_layout: str = "series") -> Dataset:
    """Load dataset ``name`` (a registered name or an import path) from ``root`` (or its default
    location), normalised. ``seed``, ``num_clients`` and ``synthetic`` (``data.synthetic``, see
    SYNTHETIC_DEFAULTS) matter for the generated ``synthetic`` data set, which has one LEAF user
    per client; ``unimib_layout`` (``data.unimib_layout``) for UniMiB-SHAR: ``image`` gives
    HypeMeFed's 1x18x25 images. Raises ConfigError for an unknown name or missing root, DataError
    for a bad file."""
    spec = DATASETS[DATASETS.resolve(name)]
    if spec.files:
        root = spec.default_root if root is None else root
        if root is None:
            raise ConfigError("data.root", f"dataset {name!r} has no default location; set data.root to the "
                                           f"directory holding {spec.files}")
    path = None if root is None else Path(root).expanduser()
    dataset = spec.read(path, seed=seed, num_clients=num_clients, synthetic=synthetic)
    return with_unimib_layout(dataset, unimib_layout)
