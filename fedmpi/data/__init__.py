"""Datasets and their federated partitions.

``load_dataset`` reads a dataset from local files (never downloads) or generates LEAF Synthetic;
``partition_dataset`` splits it over clients. Both are deterministic in ``seed`` and never look
at the MPI rank, so every rank can build the same data on its own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmpi.errors import ConfigError

from . import readers
from .partition import SCHEMES, hold_out_local_test, partition_dataset
from .synthetic import SYNTHETIC_DEFAULTS, make_synthetic
from .types import Dataset, Partition

__all__ = ["Dataset", "Partition", "DATASETS", "DEFAULT_ROOTS", "SCHEMES",
           "SYNTHETIC_DEFAULTS", "hold_out_local_test", "load_dataset", "partition_dataset"]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10", "unimib_shar", "unimib_shar_adl",
            "unimib_shar_fall", "femnist", "synthetic")

DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": None,
    "cifar10": None,
    "cifar100": None,
    "svhn": None,
    "stl10": None,
    "unimib_shar": None,
    "unimib_shar_adl": None,
    "unimib_shar_fall": None,
    "femnist": None,    # LEAF's femnist data/ (train/*.json, test/*.json): fedmpi/data/femnist.py
    "synthetic": None,  # generated, needs no files
}


def load_dataset(name: str, root: str | None, *, seed: int, num_clients: int,
                 synthetic: dict | None = None) -> Dataset:
    """Load dataset ``name`` from ``root`` (or its default location), normalised.

    ``seed``, ``num_clients`` and ``synthetic`` (settings, see SYNTHETIC_DEFAULTS) matter only
    for the generated ``synthetic`` dataset, which has one LEAF user per client.
    Raises ConfigError for an unknown name or missing root, DataError for a bad file.
    """
    if name not in DATASETS:
        raise ConfigError("data.name", f"unknown dataset {name!r}; choose one of "
                                       f"{', '.join(DATASETS)}")
    if name == "synthetic":
        return make_synthetic(seed, num_clients, synthetic)
    if name == "femnist":   # LEAF JSON with its natural per-writer partition
        from .femnist import load_femnist

        return load_femnist(root, num_clients)
    if root is None:
        root = DEFAULT_ROOTS[name]
    if root is None:
        raise ConfigError("data.root", f"dataset {name!r} has no default location; set "
                                       f"data.root to the directory holding "
                                       f"{readers.EXPECTED_FILES[name]}")
    root = Path(root).expanduser()
    x_train, y_train, x_test, y_test = readers.READERS[name](root)
    if x_train.dtype == np.uint8:   # images; signals (UniMiB-SHAR) come back standardised
        x_train, x_test = readers.normalise(x_train, name), readers.normalise(x_test, name)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=readers.NUM_CLASSES[name],
        input_shape=tuple(x_train.shape[1:]),
    )
