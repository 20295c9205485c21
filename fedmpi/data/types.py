"""The two data containers shared by readers, partitioners and the training code."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Partition:
    """Which samples each client holds.

    ``train_indices[k]`` indexes the dataset's train arrays; ``test_indices[k]`` (client k's
    local test set) indexes its TEST arrays, or its TRAIN arrays when ``local_test_in_train``
    (a held-out part of the client's own data, ``data.local_test_fraction``); int64, sorted.
    """

    train_indices: list[np.ndarray]
    test_indices: list[np.ndarray]
    local_test_in_train: bool = False

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    def num_samples(self) -> np.ndarray:
        """Training-set size per client (the FedAvg aggregation weights)."""
        return np.array([len(ix) for ix in self.train_indices], dtype=np.int64)


@dataclass
class Dataset:
    """A whole dataset in memory, already normalised.

    Images are float32 (N, C, H, W); synthetic features float32 (N, D); labels int64 (N,).
    ``natural_partition`` is set only where the data comes with its own per-user split
    (LEAF Synthetic).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    natural_partition: Partition | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"classes={self.num_classes}, input_shape={self.input_shape})")


@dataclass(frozen=True)
class DatasetSpec:
    """A data set as fedmpi knows it: ``data.name`` → how to read it and what it needs.

    ``read(root, *, seed, num_clients, synthetic)`` returns the normalised ``Dataset``; ``root`` is
    ``data.root`` (or ``default_root``) as a Path, None for a data set that needs no files;
    ``synthetic`` is ``data.synthetic`` (only the generated LEAF Synthetic reads it). Problems with a file raise ``DataError`` naming
    it. ``files`` says what ``data.root`` must hold ("" for a generated data set)."""

    name: str
    read: object
    files: str
    input_shape: tuple
    num_classes: int
    default_root: str | None = None
