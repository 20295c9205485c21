"""A model and a data set reader as fedmpi plug-ins: ``logreg`` (multinomial logistic regression
on the flattened input) and ``csv_table`` (``train.csv`` and ``test.csv`` in ``data.root``: one
sample per line, the integer label first, then the features)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import nn

from fedmpi.data import Dataset, DatasetSpec
from fedmpi.errors import ConfigError, DataError
from fedmpi.models import ModelSpec


def build_logreg(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


LOGREG = ModelSpec("logreg", build_logreg, accepts=lambda shape: True, needs="any")


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except OSError:
        raise DataError(path, "missing: data.root must hold train.csv and test.csv") from None
    except ValueError as exc:
        raise DataError(path, f"not a table of numbers: {exc}") from None
    labels = table[:, 0]
    if table.shape[1] < 2 or np.any(labels != np.round(labels)) or np.any(labels < 0):
        raise DataError(path, "each line must be a label (an integer >= 0) and at least one feature")
    return table[:, 1:].astype(np.float32), labels.astype(np.int64)


def read_csv_table(root, *, seed, num_clients, synthetic) -> Dataset:
    if root is None:
        raise ConfigError("data.root", "csv_table needs data.root: a directory holding train.csv and test.csv")
    x_train, y_train = _read_csv(Path(root) / "train.csv")
    x_test, y_test = _read_csv(Path(root) / "test.csv")
    if x_train.shape[1] != x_test.shape[1]:
        raise DataError(Path(root) / "test.csv", f"has {x_test.shape[1]} features, train.csv {x_train.shape[1]}")
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8   # standardised by the training set
    classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset("csv_table", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test,
                   num_classes=classes, input_shape=(x_train.shape[1],))


# input_shape and num_classes are nominal (the files decide): they only serve fedmpi's hints
CSV_TABLE = DatasetSpec("csv_table", read_csv_table, files="train.csv and test.csv", input_shape=(1,),
                        num_classes=2)
