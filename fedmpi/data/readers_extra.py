"""Readers for HypeMeFed's other datasets, from their distribution formats (nothing is downloaded).

- **STL-10** (Coates, Ng, Lee 2011), binary version ``stl10_binary/``: ``train_X.bin`` /
  ``test_X.bin`` hold uint8 images of 3×96×96, each channel stored column-major (MATLAB order),
  ``train_y.bin`` / ``test_y.bin`` one uint8 label 1..10 per image. ``data.root`` is the directory
  holding ``stl10_binary/`` or that directory itself. The unlabelled split is not read.
- **UniMiB-SHAR** (Micucci, Mobilio, Napoletano 2017), its ``data/`` MATLAB files: ``<task>_data.mat``
  holds the variable ``<task>_data`` (N × 453: 151 samples of the x, then y, then z acceleration
  in m/s²) and ``<task>_labels.mat`` the variable ``<task>_labels`` (N × 3: class 1..K, subject,
  trial). Tasks: ``acc`` (all 17 classes: dataset ``unimib_shar``), ``adl`` (9 activities of daily
  living: ``unimib_shar_adl``), ``fall`` (8 kinds of fall: ``unimib_shar_fall``, the task HypeMeFed's
  public code loads). Samples are 1-D signals of shape (3, 151). The dataset has no test split:
  fedmpi holds out every fifth sample of each class (in file order) as the global test set, and
  standardises each axis with the mean and standard deviation of the training part (float32).
  ``data.unimib_layout: image`` turns each standardised signal into HypeMeFed's single-channel
  18×25 image (``unimib_image``; eis-lab/HypeMeFed, models/unimib/vgg.py, ``forward``): the last
  sample of each axis is dropped and the 3×150 values are laid out row by row, so rows 0–5 hold x,
  6–11 y, 12–17 z, each row 25 consecutive samples. The authors' code feeds raw m/s² values
  (utilities/unimib_dataset.py); fedmpi keeps its per-axis standardisation for both layouts.

Each ``read_*`` returns ``(x_train, y_train, x_test, y_test)``; STL-10 images are uint8 (N, 3, 96,
96) normalised later like every image dataset, UniMiB-SHAR signals come back already standardised.
Every problem with a file raises ``DataError`` naming it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedmpi.errors import ConfigError, DataError

STL10_DIR = "stl10_binary"
STL10_SIDE = 96
STL10_IMAGE_BYTES = 3 * STL10_SIDE * STL10_SIDE
STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
# Per-channel (mean, std) of the STL-10 training images, as commonly published.
STL10_NORMALISATION = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))

UNIMIB_TASKS = {"unimib_shar": ("acc", 17), "unimib_shar_adl": ("adl", 9), "unimib_shar_fall": ("fall", 8)}
UNIMIB_AXES, UNIMIB_LENGTH = 3, 151
UNIMIB_TEST_EVERY = 5          # every fifth sample of each class is a global test sample
# data.unimib_layout: series, the (3, 151) signals; image, HypeMeFed's (1, 18, 25) image of them
UNIMIB_LAYOUTS = ("series", "image")
UNIMIB_IMAGE_SHAPE = (1, 18, 25)


# ---------------------------------------------------------------- STL-10 binary

def _stl10_dir(root) -> Path:
    from .readers import _check_root

    root = _check_root(root)
    if (root / STL10_DIR).is_dir():
        return root / STL10_DIR
    if (root / STL10_FILES["train"][0]).exists():
        return root
    raise DataError(root / STL10_DIR, f"missing: {root} holds neither {STL10_DIR}/ nor its files "
                                      f"(train_X.bin, train_y.bin, test_X.bin, test_y.bin)")


def _read_raw(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(path, "missing")
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc}")


def read_stl10_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split -> (uint8 (N, 3, 96, 96), int64 labels 0..9)."""
    from .readers import _check_counts, _check_labels

    raw = _read_raw(images_path)
    if raw.size == 0 or raw.size % STL10_IMAGE_BYTES:
        raise DataError(images_path, f"holds {raw.size} bytes, not a whole number of 3x96x96 images "
                                     f"({STL10_IMAGE_BYTES} bytes each); the file is truncated or not STL-10")
    # each image: 3 channels, each 96x96 column-major -> (N, C, W, H), then swap to (N, C, H, W)
    images = np.ascontiguousarray(raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2))
    labels = _read_raw(labels_path).astype(np.int64)
    _check_counts(images_path, len(images), labels_path, len(labels))
    _check_labels(labels, 10, labels_path, first=1)
    return images, labels - 1


def read_stl10(root):
    directory = _stl10_dir(root)
    out = []
    for split in ("train", "test"):
        images, labels = STL10_FILES[split]
        out += list(read_stl10_split(directory / images, directory / labels))
    return tuple(out)


# ---------------------------------------------------------------- UniMiB-SHAR .mat

def _unimib_dir(root, task: str) -> Path:
    from .readers import _check_root

    root = _check_root(root)
    for candidate in (root, root / "data", root / "UniMiB-SHAR" / "data"):
        if (candidate / f"{task}_data.mat").is_file():
            return candidate
    raise DataError(root / f"{task}_data.mat", f"missing: neither {root} nor its data/ holds "
                                               f"{task}_data.mat and {task}_labels.mat")


def _load_variable(path: Path, name: str) -> np.ndarray:
    import scipy.io  # local import, as for SVHN

    if not path.is_file():
        raise DataError(path, "missing")
    try:
        mat = scipy.io.loadmat(path, variable_names=(name,))
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError, ...
        raise DataError(path, f"not a readable MATLAB file ({type(exc).__name__}: {exc}); "
                              f"the file is truncated or corrupt")
    if name not in mat:
        raise DataError(path, f"malformed UniMiB-SHAR file: expected the variable '{name}'")
    return np.asarray(mat[name])


def read_unimib_task(root, task: str, num_classes: int):
    """-> standardised float32 (N, 3, 151) train/test signals and int64 labels 0..K-1."""
    from .readers import _check_counts, _check_labels

    directory = _unimib_dir(root, task)
    data_path, labels_path = directory / f"{task}_data.mat", directory / f"{task}_labels.mat"
    data = _load_variable(data_path, f"{task}_data")
    labels = _load_variable(labels_path, f"{task}_labels")
    if data.ndim != 2 or data.shape[1] != UNIMIB_AXES * UNIMIB_LENGTH or not np.issubdtype(data.dtype, np.number):
        raise DataError(data_path, f"malformed: {task}_data should be numeric (N, "
                                   f"{UNIMIB_AXES * UNIMIB_LENGTH}), got {data.dtype} {data.shape}")
    if labels.ndim != 2 or labels.shape[1] < 1:
        raise DataError(labels_path, f"malformed: {task}_labels should be (N, 3), got {labels.shape}")
    _check_counts(data_path, len(data), labels_path, len(labels))
    classes = labels[:, 0].astype(np.int64)
    _check_labels(classes, num_classes, labels_path, first=1)
    signals = data.astype(np.float64).reshape(-1, UNIMIB_AXES, UNIMIB_LENGTH)
    if not np.all(np.isfinite(signals)):
        raise DataError(data_path, "holds NaN or infinite values")
    test = np.zeros(len(classes), dtype=bool)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        test[members[UNIMIB_TEST_EVERY - 1::UNIMIB_TEST_EVERY]] = True
    train = signals[~test]
    mean = train.mean(axis=(0, 2), keepdims=True)
    std = np.maximum(train.std(axis=(0, 2), keepdims=True), 1e-8)

    def standardise(x):
        return ((x - mean) / std).astype(np.float32)

    return standardise(train), classes[~test] - 1, standardise(signals[test]), classes[test] - 1


def unimib_image(signals: np.ndarray) -> np.ndarray:
    """(N, 3, 151) signals -> (N, 1, 18, 25) images, as HypeMeFed's UniMiB-SHAR model builds them
    (``x[:, :, :, :-1].reshape(N, 1, 18, 25)`` on (N, 1, 3, 151)): each axis's last sample dropped,
    the 3×150 values (x, then y, then z) read row by row into 18 rows of 25."""
    kept = signals[:, :, :UNIMIB_LENGTH - 1]
    return np.ascontiguousarray(kept.reshape(len(signals), *UNIMIB_IMAGE_SHAPE))


def with_unimib_layout(dataset, layout: str):
    """``dataset`` (a loaded ``Dataset``) in ``data.unimib_layout`` ``layout``; ``series`` leaves
    every data set as it is, ``image`` needs a UniMiB-SHAR one (ConfigError otherwise)."""
    if layout == "series":
        return dataset
    if layout not in UNIMIB_LAYOUTS:
        raise ConfigError("data.unimib_layout", f"unknown layout {layout!r}; choose series (3x151 signals) "
                                                f"or image (HypeMeFed's 1x18x25 image)")
    if dataset.name not in UNIMIB_TASKS:
        raise ConfigError("data.unimib_layout", f"image applies only to data.name {', '.join(UNIMIB_TASKS)}; "
                                                f"data.name is {dataset.name!r}: set data.unimib_layout to series")
    return dataclasses.replace(dataset, x_train=unimib_image(dataset.x_train), x_test=unimib_image(dataset.x_test),
                               input_shape=UNIMIB_IMAGE_SHAPE)


def _unimib_reader(name: str):
    task, classes = UNIMIB_TASKS[name]
    return lambda root: read_unimib_task(root, task, classes)


READERS = {"stl10": read_stl10, **{name: _unimib_reader(name) for name in UNIMIB_TASKS}}
NUM_CLASSES = {"stl10": 10, **{name: classes for name, (_, classes) in UNIMIB_TASKS.items()}}
NORMALISATION = {"stl10": STL10_NORMALISATION}
EXPECTED_FILES = {
    "stl10": f"{STL10_DIR}/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin)",
    **{name: f"{task}_data.mat and {task}_labels.mat (UniMiB-SHAR's data/ directory)"
       for name, (task, _) in UNIMIB_TASKS.items()},
}
