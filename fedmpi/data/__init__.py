"""Datasets and their federated partitions.

``load_dataset`` reads a dataset from local files (never downloads) or generates LEAF Synthetic;
``partition_dataset`` splits it over clients. Both are deterministic in ``seed`` and never look
at the MPI rank, so every rank can build the same data on its own.
"""
from __future__ import annotations

from pathlib import Path

from fedmpi.errors import ConfigError

from . import readers
from .partition import SCHEMES, hold_out_local_test, partition_dataset
from .synthetic import SYNTHETIC_DEFAULTS, make_synthetic
from .types import Dataset, Partition

__all__ = ["Dataset", "Partition", "DATASETS", "DEFAULT_ROOTS", "SCHEMES",
           "SYNTHETIC_DEFAULTS", "hold_out_local_test", "load_dataset", "partition_dataset"]

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "synthetic")

DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": None,
    "cifar10": None,
    "cifar100": None,
    "svhn": None,
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
    if root is None:
        root = DEFAULT_ROOTS[name]
    if root is None:
        raise ConfigError("data.root", f"dataset {name!r} has no default location; set "
                                       f"data.root to the directory holding "
                                       f"{readers.EXPECTED_FILES[name]}")
    root = Path(root).expanduser()
    x_train, y_train, x_test, y_test = readers.READERS[name](root)
    return Dataset(
        name=name,
        x_train=readers.normalise(x_train, name),
        y_train=y_train,
        x_test=readers.normalise(x_test, name),
        y_test=y_test,
        num_classes=readers.NUM_CLASSES[name],
        input_shape=tuple(x_train.shape[1:]),
    )
