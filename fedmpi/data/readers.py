"""Readers for the image datasets in their standard distribution formats. Nothing is downloaded.

Each ``read_*`` function takes the directory named by ``data.root`` and returns
``(x_train_uint8, y_train, x_test_uint8, y_test)`` with images as uint8 (N, C, H, W) and labels
int64; ``normalise`` turns images into float32 with the dataset's fixed published statistics.
Every problem with a file raises ``DataError`` naming that file.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from fedmpi.errors import DataError

# Per-channel (mean, std) of the training set, the constants used throughout the literature
# (torchvision examples, FedML, LEAF ports); fixed so that every rank normalises identically.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR100_DIR = "cifar-100-python"

SVHN_TRAIN = "train_32x32.mat"
SVHN_TEST = "test_32x32.mat"

# What data.root must hold, for error messages.
EXPECTED_FILES = {
    "mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
             "t10k-labels-idx1-ubyte (each optionally .gz)",
    "fashion_mnist": "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                     "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz)",
    "cifar10": f"{CIFAR10_DIR}/ (data_batch_1..5, test_batch)",
    "cifar100": f"{CIFAR100_DIR}/ (train, test)",
    "svhn": f"{SVHN_TRAIN} and {SVHN_TEST}",
}


def normalise(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 (x/255 - mean) / std per channel, without a float64 copy."""
    mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1)
                 for v in NORMALISATION[name])
    out = images.astype(np.float32)
    out *= np.float32(1.0) / (np.float32(255.0) * std)
    out -= mean / std
    return out


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data directory does not exist (set data.root to the directory "
                              "holding the dataset files)")
    return root


def _check_labels(labels: np.ndarray, num_classes: int, path: Path, first: int = 0) -> None:
    """Every label must lie in first..first+num_classes-1."""
    bad = np.flatnonzero((labels < first) | (labels >= first + num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(path, f"label {int(labels[i])} at index {i} is outside "
                              f"{first}..{first + num_classes - 1} ({bad.size} bad labels); "
                              f"the file is corrupt or belongs to another dataset")


def _check_counts(images_path: Path, n_images: int, labels_path: Path, n_labels: int) -> None:
    if n_images != n_labels:
        raise DataError(labels_path, f"holds {n_labels} labels but {images_path} holds "
                                     f"{n_images} images; the two files do not belong together")


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

def _find_idx(root: Path, stem: str) -> Path:
    """The raw file if present, else its .gz version."""
    for candidate in (root / stem, root / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(root / stem, f"missing: neither {stem} nor {stem}.gz is in {root}")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        return raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(path, f"truncated or corrupt gzip file ({exc}); download it again")
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc}")


def _idx_header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """Check the IDX magic number and return the dimensions."""
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(path, f"truncated: {len(data)} bytes, shorter than the "
                              f"{header_len}-byte IDX header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(path, f"bad magic number 0x{found:08x}, expected 0x{magic:08x} "
                              f"(IDX {kind} file); not an IDX file or the wrong file")
    return tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))


def read_idx_images(path: Path, rows: int = 28, cols: int = 28) -> np.ndarray:
    """IDX3 unsigned-byte images -> uint8 (N, 1, rows, cols)."""
    data = _read_bytes(path)
    n, r, c = _idx_header(path, data, IDX_IMAGES_MAGIC, 3)
    if (r, c) != (rows, cols):
        raise DataError(path, f"images are {r}x{c}, expected {rows}x{cols}")
    expected = 16 + n * r * c
    if len(data) < expected:
        raise DataError(path, f"truncated: header says {n} images of {r}x{c} "
                              f"({expected} bytes), file holds {len(data)} bytes")
    if len(data) > expected:
        raise DataError(path, f"malformed: header says {n} images of {r}x{c} ({expected} "
                              f"bytes), file holds {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, r, c)


def read_idx_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """IDX1 unsigned-byte labels -> int64 (N,)."""
    data = _read_bytes(path)
    (n,) = _idx_header(path, data, IDX_LABELS_MAGIC, 1)
    expected = 8 + n
    if len(data) < expected:
        raise DataError(path, f"truncated: header says {n} labels ({expected} bytes), "
                              f"file holds {len(data)} bytes")
    if len(data) > expected:
        raise DataError(path, f"malformed: header says {n} labels ({expected} bytes), "
                              f"file holds {len(data)} bytes")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    _check_labels(labels, num_classes, path)
    return labels


def read_idx_dataset(root) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST: the four IDX files (raw or gzipped) in ``root``."""
    root = _check_root(root)
    paths = {key: _find_idx(root, stem) for key, stem in IDX_FILES.items()}
    out = []
    for split in ("train", "test"):
        images = read_idx_images(paths[f"{split}_images"])
        labels = read_idx_labels(paths[f"{split}_labels"])
        _check_counts(paths[f"{split}_images"], len(images), paths[f"{split}_labels"],
                      len(labels))
        out += [images, labels]
    return tuple(out)


# ---------------------------------------------------------------- CIFAR pickles

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # Pickles written by numpy 1.x name numpy.core, which numpy 2 only keeps as a shim.
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _cifar_dir(root: Path, dirname: str, marker: str) -> Path:
    """Accept root = the directory containing ``dirname`` or ``dirname`` itself."""
    root = _check_root(root)
    if (root / dirname).is_dir():
        return root / dirname
    if (root / marker).exists():
        return root
    raise DataError(root / dirname, f"missing: {root} holds neither {dirname}/ nor its "
                                    f"files ({marker}, ...)")


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int):
    """One CIFAR python batch -> (uint8 (N, 3, 32, 32), int64 labels)."""
    if not path.is_file():
        raise DataError(path, "missing")
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc}")
    except Exception as exc:  # pickle raises many types on malformed input
        raise DataError(path, f"not a readable CIFAR python batch ({type(exc).__name__}: "
                              f"{exc}); the file is truncated or corrupt")
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(path, f"malformed CIFAR batch: expected a dict with keys b'data' and "
                              f"{label_key!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(path, f"malformed CIFAR batch: b'data' should be uint8 (N, 3072), "
                              f"got {getattr(data, 'dtype', '')} {shape}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"malformed CIFAR batch: {label_key!r} is not a list of ints "
                              f"({exc})")
    if len(labels) != len(data):
        raise DataError(path, f"holds {len(data)} images but {len(labels)} labels")
    _check_labels(labels, num_classes, path)
    # Rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root):
    directory = _cifar_dir(root, CIFAR10_DIR, CIFAR10_TRAIN[0])
    train = [read_cifar_batch(directory / name, b"labels", 10) for name in CIFAR10_TRAIN]
    x_test, y_test = read_cifar_batch(directory / CIFAR10_TEST, b"labels", 10)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def read_cifar100(root):
    directory = _cifar_dir(root, CIFAR100_DIR, "train")
    x_train, y_train = read_cifar_batch(directory / "train", b"fine_labels", 100)
    x_test, y_test = read_cifar_batch(directory / "test", b"fine_labels", 100)
    return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------- SVHN .mat

def read_svhn_mat(path: Path):
    """SVHN cropped-digits .mat -> (uint8 (N, 3, 32, 32), int64 labels 0..9)."""
    import scipy.io  # only SVHN needs scipy; keep the import local

    if not path.is_file():
        raise DataError(path, "missing")
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError, ...
        raise DataError(path, f"not a readable MATLAB (v5) file ({type(exc).__name__}: {exc}); "
                              f"the file is truncated or corrupt")
    if "X" not in mat or "y" not in mat:
        raise DataError(path, "malformed SVHN file: expected variables 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(path, f"malformed SVHN file: X should be (32, 32, 3, N), got {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(path, f"malformed SVHN file: X should be uint8, got {x.dtype}")
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    if len(labels) != x.shape[3]:
        raise DataError(path, f"holds {x.shape[3]} images but {len(labels)} labels")
    # Digit 0 is stored as label 10; a few re-distributions already use 0.
    _check_labels(labels, 11, path)
    labels[labels == 10] = 0
    # (H, W, C, N) -> (N, C, H, W), contiguous for fast batching.
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def read_svhn(root):
    root = _check_root(root)
    x_train, y_train = read_svhn_mat(root / SVHN_TRAIN)
    x_test, y_test = read_svhn_mat(root / SVHN_TEST)
    return x_train, y_train, x_test, y_test


READERS = {
    "mnist": read_idx_dataset,
    "fashion_mnist": read_idx_dataset,
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}

# HypeMeFed's other datasets (STL-10 binary, UniMiB-SHAR .mat): readers_extra.py
from . import readers_extra as _extra  # noqa: E402  (after the helpers it imports at call time)

READERS.update(_extra.READERS)
NUM_CLASSES.update(_extra.NUM_CLASSES)
NORMALISATION.update(_extra.NORMALISATION)
EXPECTED_FILES.update(_extra.EXPECTED_FILES)
