"""STL-10 (binary) and UniMiB-SHAR (.mat) readers on small files written in the real formats."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from fedmpi.data import DATASETS, load_dataset
from fedmpi.data.readers import EXPECTED_FILES, NORMALISATION, NUM_CLASSES, READERS
from fedmpi.errors import ConfigError, DataError
from fedmpi.models import build_model

SIDE = 96


# ------------------------------------------------------------------------------ STL-10
def write_stl10(directory, images: np.ndarray, labels: np.ndarray, split: str):
    """images uint8 (N, 3, 96, 96) as (channel, row, column); the file stores every channel
    column-major (MATLAB order), labels 1..10 one byte each."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
    (directory / f"{split}_y.bin").write_bytes(np.asarray(labels, np.uint8).tobytes())


def stl10_images(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n, 3, SIDE, SIDE), dtype=np.uint8)
    images[:, 0, 5, :] = 255     # a bright row in the red channel: a transposed read shows a column
    images[:, 0, :, 5] = 0
    return images


def unnormalise(x, name):
    mean, std = (np.asarray(v, np.float64).reshape(1, -1, 1, 1) for v in NORMALISATION[name])
    return np.rint((x.astype(np.float64) * std + mean) * 255).astype(np.int64)


@pytest.fixture
def stl10_root(tmp_path):
    train, test = stl10_images(4, 0), stl10_images(3, 1)
    write_stl10(tmp_path / "stl10_binary", train, [1, 10, 3, 7], "train")
    write_stl10(tmp_path / "stl10_binary", test, [2, 2, 9], "test")
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"")   # present in the real archive, unread
    return tmp_path, train, test


@pytest.mark.parametrize("inner", [False, True])
def test_stl10_round_trip(stl10_root, inner):
    root, train, test = stl10_root
    ds = load_dataset("stl10", root / "stl10_binary" if inner else root, seed=0, num_clients=1)
    assert ds.input_shape == (3, SIDE, SIDE) and ds.num_classes == 10 and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(unnormalise(ds.x_train, "stl10"), train)
    np.testing.assert_array_equal(unnormalise(ds.x_test, "stl10"), test)
    np.testing.assert_array_equal(ds.y_train, [0, 9, 2, 6])
    np.testing.assert_array_equal(ds.y_test, [1, 1, 8])
    assert np.all(unnormalise(ds.x_train, "stl10")[:, 0, 5, 6:] == 255)   # rows stay rows


def test_stl10_errors(tmp_path):
    directory = tmp_path / "stl10_binary"
    write_stl10(directory, stl10_images(2, 0), [1, 2], "train")
    write_stl10(directory, stl10_images(2, 1), [1, 2], "test")
    (directory / "train_X.bin").write_bytes((directory / "train_X.bin").read_bytes()[:-7])
    with pytest.raises(DataError, match="train_X.bin.*whole number"):
        load_dataset("stl10", tmp_path, seed=0, num_clients=1)
    write_stl10(directory, stl10_images(2, 0), [1, 11], "train")
    with pytest.raises(DataError, match="train_y.bin.*label 11"):
        load_dataset("stl10", tmp_path, seed=0, num_clients=1)
    write_stl10(directory, stl10_images(2, 0), [1, 0], "train")
    with pytest.raises(DataError, match="label 0"):
        load_dataset("stl10", tmp_path, seed=0, num_clients=1)
    write_stl10(directory, stl10_images(2, 0), [1, 2, 3], "train")
    with pytest.raises(DataError, match="3 labels but"):
        load_dataset("stl10", tmp_path, seed=0, num_clients=1)
    write_stl10(directory, stl10_images(2, 0), [1, 2], "train")
    (directory / "test_y.bin").unlink()
    with pytest.raises(DataError, match="test_y.bin.*missing"):
        load_dataset("stl10", tmp_path, seed=0, num_clients=1)
    with pytest.raises(DataError, match="stl10_binary"):
        load_dataset("stl10", tmp_path / "stl10_binary" / "nothing_here", seed=0, num_clients=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds neither stl10_binary"):
        load_dataset("stl10", tmp_path / "empty", seed=0, num_clients=1)


# ------------------------------------------------------------------------------ UniMiB-SHAR
def write_unimib(directory, task: str, signals: np.ndarray, classes: np.ndarray):
    """signals (N, 3, 151) → <task>_data (N, 453: x, y, z), labels (N, 3: class, subject, trial),
    both double, as the real files (MATLAB v5, scipy.io.savemat)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    labels = np.stack([classes, np.arange(n) % 30 + 1, np.arange(n) % 2 + 1], axis=1).astype(np.float64)
    scipy.io.savemat(directory / f"{task}_data.mat", {f"{task}_data": signals.reshape(n, -1).astype(np.float64)})
    scipy.io.savemat(directory / f"{task}_labels.mat", {f"{task}_labels": labels})


def unimib_signals(classes: np.ndarray, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    signals = g.normal(0.0, 1.0, (len(classes), 3, 151))
    signals[:, 0] = signals[:, 0] * 2.0 + 9.81        # gravity on x: a per-axis offset and scale
    signals[:, 2] = signals[:, 2] * 0.5 - 3.0
    signals[:, 1, 0] = classes                        # y's first sample carries the class
    return signals


@pytest.mark.parametrize("name,task,classes", [("unimib_shar", "acc", 17), ("unimib_shar_adl", "adl", 9),
                                               ("unimib_shar_fall", "fall", 8)])
def test_unimib_round_trip(tmp_path, name, task, classes):
    labels = np.repeat(np.arange(1, classes + 1), 6)                 # 6 windows per class
    signals = unimib_signals(labels, 3)
    write_unimib(tmp_path / "UniMiB-SHAR" / "data", task, signals, labels)
    ds = load_dataset(name, tmp_path, seed=0, num_clients=1)
    assert ds.num_classes == classes == NUM_CLASSES[name] and ds.input_shape == (3, 151)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    test = np.zeros(len(labels), bool)
    test[4::6] = True                                                # every 5th of each class's 6
    assert len(ds.y_test) == classes and len(ds.y_train) == 5 * classes
    np.testing.assert_array_equal(ds.y_test, labels[test] - 1)
    np.testing.assert_array_equal(ds.y_train, labels[~test] - 1)
    # per-axis standardisation with the training part's statistics, axes in file order x, y, z
    train = signals[~test]
    mean, std = train.mean(axis=(0, 2)), train.std(axis=(0, 2))
    expected = (signals[test] - mean[None, :, None]) / std[None, :, None]
    np.testing.assert_allclose(ds.x_test, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=(0, 2)), 1, atol=1e-4)
    # the 1-D multi-exit network takes the signals
    model = build_model("multiexit_vgg", ds.input_shape, ds.num_classes)
    outputs = model(torch.from_numpy(ds.x_train[:2]))
    assert [tuple(o.shape) for o in outputs] == [(2, classes)] * 3


def test_unimib_data_directory_itself_and_errors(tmp_path):
    labels = np.repeat(np.arange(1, 9), 5)
    write_unimib(tmp_path, "fall", unimib_signals(labels, 0), labels)
    assert len(load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1).y_test) == 8
    with pytest.raises(DataError, match="acc_data.mat"):
        load_dataset("unimib_shar", tmp_path, seed=0, num_clients=1)
    bad = labels.copy()
    bad[3] = 9
    write_unimib(tmp_path, "fall", unimib_signals(labels, 0), bad)
    with pytest.raises(DataError, match="fall_labels.mat.*label 9"):
        load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)
    scipy.io.savemat(tmp_path / "fall_data.mat", {"data": np.zeros((40, 453))})
    with pytest.raises(DataError, match="variable 'fall_data'"):
        load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)
    scipy.io.savemat(tmp_path / "fall_data.mat", {"fall_data": np.zeros((40, 450))})
    with pytest.raises(DataError, match=r"\(N, 453\)"):
        load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)
    scipy.io.savemat(tmp_path / "fall_data.mat", {"fall_data": np.zeros((39, 453))})
    write_unimib(tmp_path / "x", "fall", unimib_signals(labels, 0), labels)   # labels for 40
    (tmp_path / "x" / "fall_labels.mat").replace(tmp_path / "fall_labels.mat")
    with pytest.raises(DataError, match="40 labels but"):
        load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)
    (tmp_path / "fall_data.mat").write_bytes(b"MATLAB 5.0 truncated")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)


def test_new_datasets_are_registered_without_default_roots():
    for name in ("stl10", "unimib_shar", "unimib_shar_adl", "unimib_shar_fall"):
        assert name in DATASETS and name in READERS and name in EXPECTED_FILES
        with pytest.raises(ConfigError, match="data.root"):
            load_dataset(name, None, seed=0, num_clients=1)
