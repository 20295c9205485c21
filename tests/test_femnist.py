"""The LEAF FEMNIST reader: small files written here in LEAF's JSON format, the natural
per-writer partition (and the PruneFL code's grouping of writers into fewer clients), file
errors, and one end-to-end round with the FEMNIST CNN."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import yaml

from helpers import fedmpi, read_results

from fedmpi.data import load_dataset, partition_dataset
from fedmpi.data.femnist import group_writers
from fedmpi.errors import ConfigError, DataError

# writer → (train samples, test samples); w3 has no test samples
WRITERS = {"f0001_41": (5, 2), "f0002_07": (3, 1), "f0003_12": (4, 2), "f0004_33": (2, 0), "f0005_50": (6, 3)}
FILES = {"all_data_0_niid_0_keep_0_{}_9.json": ["f0001_41", "f0002_07", "f0003_12"],
         "all_data_1_niid_0_keep_0_{}_9.json": ["f0004_33", "f0005_50"]}


def samples(writer: str, split: str, n: int):
    """Deterministic images (values k/255) and labels per writer and split."""
    g = np.random.default_rng(zlib.crc32(f"{writer}/{split}".encode()))
    x = (g.integers(0, 256, (n, 784)) / 255.0).round(6)
    y = g.integers(0, 62, n)
    return x, y


def write_leaf(root, writers=WRITERS, files=FILES, mutate=None):
    for split, column in (("train", 0), ("test", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for pattern, users in files.items():
            doc = {"users": [], "num_samples": [], "user_data": {}}
            for user in users:
                n = writers[user][column]
                if split == "test" and n == 0:
                    continue
                x, y = samples(user, split, n)
                doc["users"].append(user)
                doc["num_samples"].append(n)
                doc["user_data"][user] = {"x": x.tolist(), "y": y.tolist()}
            if mutate:
                mutate(split, doc)
            (root / split / pattern.format(split)).write_text(json.dumps(doc))
    return root


def test_natural_partition_is_one_client_per_writer(tmp_path):
    data = load_dataset("femnist", str(write_leaf(tmp_path)), seed=0, num_clients=5)
    assert data.num_classes == 62 and data.input_shape == (1, 28, 28)
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (8, 1, 28, 28) and data.y_train.dtype == np.int64
    part = partition_dataset(data, "natural", 5, seed=0, alpha=1.0, shard_size=1, shards_per_client=1)
    order = ["f0001_41", "f0002_07", "f0003_12", "f0004_33", "f0005_50"]
    start_train = start_test = 0
    for k, writer in enumerate(order):
        n_train, n_test = WRITERS[writer]
        np.testing.assert_array_equal(part.train_indices[k], np.arange(start_train, start_train + n_train))
        np.testing.assert_array_equal(part.test_indices[k], np.arange(start_test, start_test + n_test))
        x, y = samples(writer, "train", n_train)
        np.testing.assert_array_equal(data.y_train[part.train_indices[k]], y)
        np.testing.assert_allclose(data.x_train[part.train_indices[k]].reshape(n_train, 784), x, rtol=1e-6)
        if n_test:
            xt, yt = samples(writer, "test", n_test)
            np.testing.assert_array_equal(data.y_test[part.test_indices[k]], yt)
        start_train += n_train
        start_test += n_test
    assert not part.local_test_in_train


def test_fewer_clients_group_consecutive_writers_as_the_prunefl_code():
    assert [list(r) for r in group_writers(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [list(r) for r in group_writers(193, 10)][-1] == list(range(171, 193))
    assert [len(r) for r in group_writers(193, 10)] == [19] * 9 + [22]
    with pytest.raises(ConfigError, match="clients.total"):
        group_writers(5, 6)


def test_grouped_partition(tmp_path):
    data = load_dataset("femnist", str(write_leaf(tmp_path)), seed=0, num_clients=2)
    part = partition_dataset(data, "natural", 2, seed=0, alpha=1.0, shard_size=1, shards_per_client=1)
    np.testing.assert_array_equal(part.train_indices[0], np.arange(0, 8))
    np.testing.assert_array_equal(part.train_indices[1], np.arange(8, 20))
    np.testing.assert_array_equal(part.test_indices[1], np.arange(3, 8))


def test_missing_root_and_bad_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("femnist", None, seed=0, num_clients=5)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("femnist", str(tmp_path / "nowhere"), seed=0, num_clients=5)
    only_train = tmp_path / "only_train"
    write_leaf(only_train)
    for f in (only_train / "test").iterdir():
        f.unlink()
    (only_train / "test").rmdir()
    with pytest.raises(DataError, match="test"):
        load_dataset("femnist", str(only_train), seed=0, num_clients=5)

    def bad_label(split, doc):
        if split == "train" and "f0004_33" in doc["user_data"]:
            doc["user_data"]["f0004_33"]["y"][0] = 62
    with pytest.raises(DataError, match="label 62"):
        load_dataset("femnist", str(write_leaf(tmp_path / "label", mutate=bad_label)), seed=0, num_clients=5)

    def bad_shape(split, doc):
        if split == "train" and "f0001_41" in doc["user_data"]:
            doc["user_data"]["f0001_41"]["x"][0] = [0.5] * 10
    with pytest.raises(DataError, match="f0001_41"):
        load_dataset("femnist", str(write_leaf(tmp_path / "shape", mutate=bad_shape)), seed=0, num_clients=5)

    def orphan(split, doc):
        if split == "test" and doc["users"] and doc["users"][0] == "f0001_41":
            doc["users"].append("f9999_00")
            doc["user_data"]["f9999_00"] = {"x": [[0.0] * 784], "y": [1]}
    with pytest.raises(DataError, match="f9999_00"):
        load_dataset("femnist", str(write_leaf(tmp_path / "orphan", mutate=orphan)), seed=0, num_clients=5)
    (tmp_path / "json" / "train").mkdir(parents=True)
    (tmp_path / "json" / "test").mkdir()
    (tmp_path / "json" / "train" / "a.json").write_text("{not json")
    (tmp_path / "json" / "test" / "a.json").write_text("{}")
    with pytest.raises(DataError, match="JSON"):
        load_dataset("femnist", str(tmp_path / "json"), seed=0, num_clients=5)


@pytest.mark.slow
def test_one_round_with_the_femnist_cnn(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    cfg = {"data": {"name": "femnist", "root": str(root), "partition": "natural"}, "model": "femnist_cnn",
           "clients": {"total": 5, "per_round": 2}, "rounds": 1,
           "local": {"epochs": 1, "batch_size": 4, "lr": 0.05}, "eval": {"every": 1}}
    path = tmp_path / "femnist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "femnist.h5"
    proc, _ = fedmpi(["run", str(path), "--out", str(out), "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert np.isfinite(res["rounds"]["test_accuracy"][0]) and np.isfinite(res["rounds"]["client_accuracy"][0])
    assert np.all(res["clients"]["upload_bytes"] == 4 * 6_603_710)     # the LEAF CNN with 62 classes
