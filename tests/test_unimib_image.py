"""data.unimib_layout: image, UniMiB-SHAR as HypeMeFed's single-channel 18x25 image, checked on small
.mat files written in the dataset's format against the authors' reshape (eis-lab/HypeMeFed,
utilities/unimib_dataset.py and models/unimib/vgg.py)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
import yaml

from helpers import fedmpi, read_results
from fedmpi.config import load_config
from fedmpi.data import load_dataset
from fedmpi.errors import ConfigError
from fedmpi.models import build_model

FALL_CLASSES = 8
PER_CLASS = 10                   # every fifth of each class's 10 is a global test sample: 2


def fall_files(directory, seed: int = 0):
    """UniMiB-SHAR's fall task as its data/ files: fall_data (N, 453: 151 samples of x, then y,
    then z, in m/s²) and fall_labels (N, 3: class 1..8, subject, trial), both double (MATLAB v5).
    Returns the raw (N, 453) rows, the classes and which rows are global test samples."""
    directory.mkdir(parents=True, exist_ok=True)
    classes = np.repeat(np.arange(1, FALL_CLASSES + 1), PER_CLASS)
    n = len(classes)
    g = np.random.default_rng(seed)
    rows = g.normal(0.0, 1.0, (n, 453))          # distinct values: a misplaced one is seen
    rows[:, :151] = rows[:, :151] * 2.0 + 9.81   # gravity on x: the axes differ in offset and scale
    rows[:, 302:] = rows[:, 302:] * 0.5 - 3.0
    rows[:, [150, 301, 452]] += 1000.0           # each axis's last sample, which the authors drop
    labels = np.stack([classes, np.arange(n) % 30 + 1, np.arange(n) % 2 + 1], axis=1).astype(np.float64)
    scipy.io.savemat(directory / "fall_data.mat", {"fall_data": rows})
    scipy.io.savemat(directory / "fall_labels.mat", {"fall_labels": labels})
    test = np.zeros(n, bool)
    test[PER_CLASS // 2 - 1::PER_CLASS // 2] = True
    return rows, classes, test


def authors_image(rows: np.ndarray) -> np.ndarray:
    """The authors' code, line for line: UniMib_DataManager reshapes each 453-value row to
    (1, 3, 151); MultiExitVGG.forward drops the last sample of each axis and reshapes to
    (1, 18, 25)."""
    x = np.reshape(np.asarray(rows, np.float64), (-1, 1, 3, 151))
    return x[:, :, :, :-1].reshape(x.shape[0], 1, 18, 25)


def test_image_pixels_are_the_authors_reshape_of_the_signal(tmp_path):
    rows, classes, test = fall_files(tmp_path)
    ds = load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1, unimib_layout="image")
    # fedmpi standardises each axis with the training part's mean and std (both layouts): undo it
    train_axes = rows[~test].reshape(-1, 3, 151)
    mean = train_axes.mean(axis=(0, 2))
    std = train_axes.std(axis=(0, 2))
    axis_of_row = np.repeat(np.arange(3), 6)                    # image rows 0-5 x, 6-11 y, 12-17 z
    for x, part in ((ds.x_train, ~test), (ds.x_test, test)):
        raw = x.astype(np.float64) * std[axis_of_row][None, None, :, None] + mean[axis_of_row][None, None, :, None]
        np.testing.assert_allclose(raw, authors_image(rows[part]), rtol=0, atol=1e-5)
    # by hand, for the first training sample: row r, column c is sample 25·(r mod 6) + c of axis r // 6
    first = rows[~test][0]
    raw0 = ds.x_train[0, 0].astype(np.float64) * std[axis_of_row][:, None] + mean[axis_of_row][:, None]
    for r, c, column in ((0, 0, 0), (0, 24, 24), (1, 0, 25), (5, 24, 149), (6, 0, 151), (11, 24, 300),
                         (12, 0, 302), (17, 24, 451)):
        assert raw0[r, c] == pytest.approx(first[column], abs=1e-5), (r, c)
    # the last sample of each axis (columns 150, 301, 452, all above 900) is in no pixel
    assert np.all(first[[150, 301, 452]] > 900) and np.abs(raw0).max() < 100


def test_image_shape_labels_and_the_2d_multiexit_models(tmp_path):
    rows, classes, test = fall_files(tmp_path)
    series = load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1)
    image = load_dataset("unimib_shar_fall", tmp_path, seed=0, num_clients=1, unimib_layout="image")
    assert series.input_shape == (3, 151)
    assert image.input_shape == (1, 18, 25) and image.x_train.shape == (len(classes) - test.sum(), 1, 18, 25)
    assert image.x_test.shape == (test.sum(), 1, 18, 25) and image.x_train.dtype == np.float32
    assert image.num_classes == FALL_CLASSES
    np.testing.assert_array_equal(image.y_train, series.y_train)
    np.testing.assert_array_equal(image.y_test, series.y_test)
    for name in ("multiexit_vgg", "multiexit_vgg_small"):
        model = build_model(name, image.input_shape, image.num_classes).eval()
        assert isinstance(model.blocks[0].conv1, torch.nn.Conv2d)          # 2-D layers, not 1-D
        outputs = model(torch.from_numpy(image.x_train[:2]))
        assert [tuple(o.shape) for o in outputs] == [(2, FALL_CLASSES)] * 3


def test_layout_key_is_checked(tmp_path):
    cfg = load_config(None, ["data.name=unimib_shar_fall", "data.unimib_layout=image"])
    assert cfg["data"]["unimib_layout"] == "image"
    assert load_config(None, ["data.name=unimib_shar"])["data"]["unimib_layout"] == "series"
    with pytest.raises(ConfigError, match="data.unimib_layout.*series.*image"):
        load_config(None, ["data.name=unimib_shar_fall", "data.unimib_layout=picture"])
    with pytest.raises(ConfigError, match="data.unimib_layout.*only to data.name unimib_shar"):
        load_config(None, ["data.unimib_layout=image"])                    # Fashion-MNIST
    with pytest.raises(ConfigError, match="data.unimib_layout.*only to data.name"):
        load_dataset("synthetic", None, seed=0, num_clients=2, unimib_layout="image")


def tiny_fall_config(tmp_path, layout: str) -> dict:
    return {"seed": 1, "rounds": 2, "algorithm": "hypemefed", "model": "multiexit_vgg_small",
            "data": {"name": "unimib_shar_fall", "root": str(tmp_path / "data"), "partition": "iid",
                     "unimib_layout": layout},
            "clients": {"total": 6, "per_round": 3},
            "local": {"epochs": 1, "batch_size": 8, "lr": 0.005, "optimizer": "adam"},
            "eval": {"every": 1, "batch_size": 40}, "hypemefed": {"epochs": 1}}


@pytest.mark.slow
def test_a_tiered_run_on_the_image_finishes_with_the_2d_submodels(tmp_path):
    fall_files(tmp_path / "data")
    path = tmp_path / "image.yaml"
    path.write_text(yaml.safe_dump(tiny_fall_config(tmp_path, "image")))
    out = tmp_path / "image.h5"
    proc, _ = fedmpi(["run", str(path), "--out", str(out), "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert len(res["rounds"]["round"]) == 2 and np.all(np.isfinite(res["rounds"]["test_accuracy"]))
    clients = res["clients"]
    for level in (1, 2, 3):
        # every tier up- and downloads exactly its 2-D submodel for 1x18x25 inputs
        model = build_model("multiexit_vgg_small", (1, 18, 25), FALL_CLASSES, level=level)
        floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
        this = clients["tier"] == level
        assert this.any() and np.all(clients["upload_bytes"][this] == 4 * floats), level


def test_a_bad_layout_stops_the_run_with_status_2_before_round_1(tmp_path):
    fall_files(tmp_path / "data")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_fall_config(tmp_path, "picture")))
    out = tmp_path / "bad.h5"
    proc, _ = fedmpi(["run", str(path), "--out", str(out), "--quiet"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.unimib_layout" in proc.stderr and "series" in proc.stderr and "image" in proc.stderr
    assert not out.exists()
