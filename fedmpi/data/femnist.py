"""FEMNIST from LEAF's JSON files (Caldas et al., "LEAF: A Benchmark for Federated Settings"),
with its natural partition by writer. Nothing is downloaded: run LEAF's ``preprocess.sh`` for
femnist (e.g. ``-s niid --sf 0.05 -k 0 -t sample``) and point ``data.root`` at its output
directory ``data/femnist/data`` (the one holding ``train/`` and ``test/``).

Format (what LEAF writes): every ``*.json`` under ``train/`` and ``test/`` is an object with
``users`` (writer ids), ``num_samples`` (per writer) and ``user_data`` ({writer: {"x": [[784
floats in [0, 1]]], "y": [label 0..61]}}). Images are 28×28, stored row by row; labels are the 10
digits, 26 upper- then 26 lower-case letters (62 classes). Values are kept as LEAF stores them
(float32 in [0, 1], background 1), as LEAF's CNN and the PruneFL code train on them.

Writers are taken in the order of the train files (sorted by name), then of each file's
``users``; the pooled arrays are the writers' samples in that order. The natural partition gives
client k the training samples of its writers and, as its local test set, their test samples
(LEAF splits every writer's samples into train and test). With fewer clients than writers
(``clients.total`` < writers), consecutive writers are grouped: ⌊W / C⌋ writers for each of the
first C − 1 clients and the rest for the last, as the PruneFL code gives its 10 clients the 193
writers of its FEMNIST sample. More clients than writers is a config error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmpi.errors import ConfigError, DataError

from .types import Dataset, Partition

NUM_CLASSES = 62
SIDE = 28
EXPECTED = "train/*.json and test/*.json in LEAF's format (the femnist data/ directory)"


def _json_files(root: Path, split: str) -> list[Path]:
    directory = root / split
    if not directory.is_dir():
        raise DataError(directory, f"missing: data.root must hold {EXPECTED}")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DataError(directory, "holds no .json files")
    return files


def _read_split(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """writer → (x float32 (n, 1, 28, 28), y int64 (n,)), in file order."""
    writers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in _json_files(root, split):
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(path, f"not a readable JSON file ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("users"), list) \
                or not isinstance(doc.get("user_data"), dict):
            raise DataError(path, "not a LEAF file: needs 'users' (a list) and 'user_data' (a mapping)")
        for user in doc["users"]:
            data = doc["user_data"].get(user)
            if not isinstance(data, dict) or "x" not in data or "y" not in data:
                raise DataError(path, f"writer {user!r} has no 'x'/'y' in user_data")
            if user in writers:
                raise DataError(path, f"writer {user!r} appears twice in {split}/")
            try:
                x = np.asarray(data["x"], dtype=np.float32)
                y = np.asarray(data["y"], dtype=np.int64)
            except (TypeError, ValueError) as exc:
                raise DataError(path, f"writer {user!r}: 'x'/'y' are not numeric arrays ({exc})") from None
            if len(y) == 0:
                x = x.reshape(0, SIDE * SIDE)
            if x.ndim != 2 or x.shape[1] != SIDE * SIDE or y.ndim != 1 or len(x) != len(y):
                raise DataError(path, f"writer {user!r}: expected x of shape (n, 784) and n labels, got "
                                      f"x {x.shape} and {y.shape} labels")
            bad = (y < 0) | (y >= NUM_CLASSES)
            if bad.any():
                raise DataError(path, f"writer {user!r}: label {int(y[bad][0])} outside 0..{NUM_CLASSES - 1}")
            writers[user] = (x.reshape(-1, 1, SIDE, SIDE), y)
    return writers


def group_writers(num_writers: int, num_clients: int) -> list[range]:
    """Consecutive writers per client: one each, or ⌊W/C⌋ each and the rest to the last client."""
    if num_clients > num_writers:
        raise ConfigError("clients.total", f"femnist has {num_writers} writers in data.root; "
                                           f"at most that many clients (got {num_clients})")
    if num_clients == num_writers:
        return [range(k, k + 1) for k in range(num_writers)]
    size = num_writers // num_clients
    return [range(size * k, size * (k + 1) if k < num_clients - 1 else num_writers) for k in range(num_clients)]


def load_femnist(root: str | Path | None, num_clients: int) -> Dataset:
    if root is None:
        raise ConfigError("data.root", f"dataset 'femnist' has no default location; set data.root to "
                                       f"the directory holding {EXPECTED}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(root, "data directory does not exist (set data.root to LEAF's femnist data/)")
    train = _read_split(root, "train")
    test = _read_split(root, "test")
    orphans = [u for u in test if u not in train]
    if orphans:
        raise DataError(root / "test", f"writer {orphans[0]!r} has test samples but no training samples")
    writers = list(train)
    empty = np.zeros((0, 1, SIDE, SIDE), np.float32), np.zeros(0, np.int64)
    x_train = np.concatenate([train[u][0] for u in writers])
    y_train = np.concatenate([train[u][1] for u in writers])
    tests = [test.get(u, empty) for u in writers]
    x_test = np.concatenate([t[0] for t in tests])
    y_test = np.concatenate([t[1] for t in tests])
    train_bounds = np.cumsum([0] + [len(train[u][1]) for u in writers])
    test_bounds = np.cumsum([0] + [len(t[1]) for t in tests])
    groups = group_writers(len(writers), int(num_clients))
    partition = Partition(
        [np.concatenate([np.arange(train_bounds[w], train_bounds[w + 1]) for w in g]).astype(np.int64)
         for g in groups],
        [np.concatenate([np.arange(test_bounds[w], test_bounds[w + 1]) for w in g]).astype(np.int64)
         for g in groups])
    return Dataset(name="femnist", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=NUM_CLASSES, input_shape=(1, SIDE, SIDE), natural_partition=partition)
