"""Readers (tiny files in the real formats), partitions and LEAF Synthetic."""
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers import toy_dataset

from fedmpi.data import (DATASETS, Partition, load_dataset,
                         partition_dataset)
from fedmpi.data.readers import NORMALISATION
from fedmpi.errors import ConfigError, DataError

# ------------------------------------------------------------------ helpers writing real formats


def write_idx_images(path, images, gz):
    n, r, c = images.shape
    data = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, r, c))
    data += images.astype(np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(data) if gz else data)


def write_idx_labels(path, labels, gz):
    data = (0x801).to_bytes(4, "big") + len(labels).to_bytes(4, "big")
    data += np.asarray(labels, dtype=np.uint8).tobytes()
    Path(path).write_bytes(gzip.compress(data) if gz else data)


def make_idx_dir(root, gz, n_train=30, n_test=12, seed=0):
    rs = np.random.default_rng(seed)
    arrays = {
        "train_x": rs.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rs.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rs.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rs.integers(0, 10, n_test).astype(np.uint8),
    }
    ext = ".gz" if gz else ""
    write_idx_images(root / f"train-images-idx3-ubyte{ext}", arrays["train_x"], gz)
    write_idx_labels(root / f"train-labels-idx1-ubyte{ext}", arrays["train_y"], gz)
    write_idx_images(root / f"t10k-images-idx3-ubyte{ext}", arrays["test_x"], gz)
    write_idx_labels(root / f"t10k-labels-idx1-ubyte{ext}", arrays["test_y"], gz)
    return arrays


def unnormalise(x, name):
    mean, std = (np.asarray(v, dtype=np.float64).reshape(1, -1, 1, 1)
                 for v in NORMALISATION[name])
    return np.rint((x.astype(np.float64) * std + mean) * 255).astype(np.int64)


def write_cifar_batch(path, data, labels, label_key=b"labels"):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", label_key: list(map(int, labels)), b"data": data}, f)


def make_cifar10_dir(root, per_batch=4, n_test=5):
    rs = np.random.default_rng(1)
    d = root / "cifar-10-batches-py"
    d.mkdir()
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rs.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rs.integers(0, 10, per_batch)
        write_cifar_batch(d / f"data_batch_{i}", x, y)
        train_x.append(x), train_y.append(y)
    test_x = rs.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = rs.integers(0, 10, n_test)
    write_cifar_batch(d / "test_batch", test_x, test_y)
    return np.concatenate(train_x), np.concatenate(train_y), test_x, test_y


def part(ds, scheme, k, seed=0, alpha=0.5, shard_size=10, shards_per_client=2):
    return partition_dataset(ds, scheme, k, seed=seed, alpha=alpha, shard_size=shard_size,
                             shards_per_client=shards_per_client)


def same_partition(a: Partition, b: Partition):
    return (len(a.train_indices) == len(b.train_indices)
            and all(np.array_equal(x, y) for x, y in zip(a.train_indices, b.train_indices))
            and all(np.array_equal(x, y) for x, y in zip(a.test_indices, b.test_indices)))


def assert_well_formed(p: Partition, n_clients):
    assert len(p.train_indices) == len(p.test_indices) == n_clients
    for ix in (*p.train_indices, *p.test_indices):
        assert ix.dtype == np.int64
        assert np.all(np.diff(ix) > 0), "indices must be sorted ascending, no repeats"


def assert_disjoint(parts, n_total):
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx), "clients share samples"
    assert allidx.min() >= 0 and allidx.max() < n_total


# ------------------------------------------------------------------ IDX readers


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_round_trip(tmp_path, gz, name):
    arrays = make_idx_dir(tmp_path, gz)
    ds = load_dataset(name, str(tmp_path), seed=0, num_clients=2)
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (30, 1, 28, 28)
    assert ds.y_train.dtype == np.int64 and ds.input_shape == (1, 28, 28)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(unnormalise(ds.x_train, name)[:, 0], arrays["train_x"])
    np.testing.assert_array_equal(unnormalise(ds.x_test, name)[:, 0], arrays["test_x"])
    np.testing.assert_array_equal(ds.y_train, arrays["train_y"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_y"])


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_images(tmp_path, gz):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    if gz:
        path.unlink()
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    with pytest.raises(DataError, match="truncated: header says 30 images of 28x28") as e:
        load_dataset("mnist", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(path)


def test_idx_truncated_gzip_stream(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match="truncated or corrupt gzip") as e:
        load_dataset("mnist", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(path)


def test_idx_bad_magic(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[3] = 0x03  # an images magic in a labels file
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad magic number 0x00000803, expected 0x00000801") as e:
        load_dataset("mnist", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(path)


def test_idx_missing_file(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing") as e:
        load_dataset("fashion_mnist", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(tmp_path / "t10k-labels-idx1-ubyte")
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_idx_count_mismatch(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx_labels(tmp_path / "train-labels-idx1-ubyte", np.zeros(29), gz=False)
    with pytest.raises(DataError, match="holds 29 labels but .* holds 30 images") as e:
        load_dataset("mnist", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(tmp_path / "train-labels-idx1-ubyte")


def test_idx_label_out_of_range(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    labels = np.zeros(12)
    labels[5] = 12
    write_idx_labels(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    with pytest.raises(DataError, match="label 12 at index 5 is outside 0..9"):
        load_dataset("mnist", tmp_path, seed=0, num_clients=1)


def test_missing_root_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset("mnist", tmp_path / "nope", seed=0, num_clients=1)
    assert e.value.path == str(tmp_path / "nope")


def test_unknown_name_and_missing_root_are_config_errors():
    with pytest.raises(ConfigError) as e:
        load_dataset("imagenet", None, seed=0, num_clients=1)
    assert e.value.key == "data.name" and "fashion_mnist" in e.value.problem
    for name in ("mnist", "cifar10", "cifar100", "svhn"):
        assert DATASETS[name].default_root is None
        with pytest.raises(ConfigError) as e:
            load_dataset(name, None, seed=0, num_clients=1)
        assert e.value.key == "data.root" and "set data.root" in e.value.problem


FMNIST = DATASETS["fashion_mnist"].default_root


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f"{FMNIST} (real Fashion-MNIST) absent")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist", None, seed=0, num_clients=1)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    # The published constants are the training-set statistics.
    assert abs(float(ds.x_train.mean())) < 0.01 and abs(float(ds.x_train.std()) - 1) < 0.01


# ------------------------------------------------------------------ CIFAR / SVHN readers


@pytest.mark.parametrize("point_at_inner_dir", [False, True])
def test_cifar10_round_trip(tmp_path, point_at_inner_dir):
    train_x, train_y, test_x, test_y = make_cifar10_dir(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if point_at_inner_dir else tmp_path
    ds = load_dataset("cifar10", root, seed=0, num_clients=1)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(unnormalise(ds.x_train, "cifar10"),
                                  train_x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(unnormalise(ds.x_test, "cifar10"),
                                  test_x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.y_train, train_y)
    np.testing.assert_array_equal(ds.y_test, test_y)
    # Channel layout: the first 1024 bytes of a row are the red plane.
    assert unnormalise(ds.x_train, "cifar10")[0, 0, 0, 1] == train_x[0, 1]
    assert unnormalise(ds.x_train, "cifar10")[0, 1, 0, 0] == train_x[0, 1024]


def test_cifar10_missing_and_malformed(tmp_path):
    make_cifar10_dir(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing") as e:
        load_dataset("cifar10", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(d / "data_batch_3")

    (d / "data_batch_3").write_bytes((d / "data_batch_2").read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_dataset("cifar10", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(d / "data_batch_3")

    write_cifar_batch(d / "data_batch_3", np.zeros((4, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match="holds 4 images but 3 labels"):
        load_dataset("cifar10", tmp_path, seed=0, num_clients=1)


def test_cifar_batch_pickled_by_numpy1(tmp_path):
    # The distributed CIFAR files name numpy.core.multiarray (numpy 1.x), protocol 2.
    train_x, train_y, _, _ = make_cifar10_dir(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    blob = pickle.dumps({b"data": train_x[:4], b"labels": list(map(int, train_y[:4]))},
                        protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in blob
    path.write_bytes(blob)
    ds = load_dataset("cifar10", tmp_path, seed=0, num_clients=1)
    np.testing.assert_array_equal(unnormalise(ds.x_train[:4], "cifar10"),
                                  train_x[:4].reshape(-1, 3, 32, 32))


def test_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar10_dir(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", tmp_path, seed=0, num_clients=1)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rs = np.random.default_rng(2)
    x = rs.integers(0, 256, (6, 3072), dtype=np.uint8)
    y = np.array([0, 99, 5, 42, 7, 63])
    write_cifar_batch(d / "train", x, y, b"fine_labels")
    write_cifar_batch(d / "test", x[:2], y[:2], b"fine_labels")
    ds = load_dataset("cifar100", tmp_path, seed=0, num_clients=1)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(unnormalise(ds.x_train, "cifar100"), x.reshape(-1, 3, 32, 32))


def test_svhn_round_trip_and_errors(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rs = np.random.default_rng(3)
    x = rs.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x[..., :2], "y": y[:2]})
    ds = load_dataset("svhn", tmp_path, seed=0, num_clients=1)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 9, 0, 3])
    np.testing.assert_array_equal(unnormalise(ds.x_train, "svhn"), x.transpose(3, 2, 0, 1))

    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x[..., :2], "y": y[:3]})
    with pytest.raises(DataError, match="holds 2 images but 3 labels"):
        load_dataset("svhn", tmp_path, seed=0, num_clients=1)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_dataset("svhn", tmp_path, seed=0, num_clients=1)
    assert e.value.path == str(path)


# ------------------------------------------------------------------ partitions


def test_iid_covers_everything_near_equal():
    ds = toy_dataset()
    p = part(ds, "iid", 7)
    assert_well_formed(p, 7)
    np.testing.assert_array_equal(np.sort(np.concatenate(p.train_indices)), np.arange(400))
    np.testing.assert_array_equal(np.sort(np.concatenate(p.test_indices)), np.arange(70))
    assert max(p.num_samples()) - min(p.num_samples()) <= 1
    assert same_partition(p, part(ds, "iid", 7))
    assert not same_partition(p, part(ds, "iid", 7, seed=1))


def test_dirichlet_disjoint_skewed_nonempty_deterministic():
    ds = toy_dataset(n_per_class=100)
    p = part(ds, "dirichlet", 20, alpha=0.05)
    assert_well_formed(p, 20)
    assert_disjoint(p.train_indices, 1000)
    assert_disjoint(p.test_indices, 70)
    # Every sample is assigned (the standard split loses none).
    assert sum(p.num_samples()) == 1000
    # Minimum size min(10, N / clients / 2) = 10.
    assert min(p.num_samples()) >= 10
    # Small alpha: each client is dominated by one class.
    dominant = [np.bincount(ds.y_train[ix], minlength=10).max() / len(ix)
                for ix in p.train_indices]
    assert np.mean(dominant) > 0.6
    iid_dominant = [np.bincount(ds.y_train[ix], minlength=10).max() / len(ix)
                    for ix in part(ds, "iid", 20).train_indices]
    assert np.mean(iid_dominant) < 0.45
    assert same_partition(p, part(ds, "dirichlet", 20, alpha=0.05))
    assert not same_partition(p, part(ds, "dirichlet", 20, alpha=0.05, seed=1))


def test_dirichlet_local_test_follows_class_proportions():
    ds = toy_dataset(n_per_class=200, n_test_per_class=100)
    p = part(ds, "dirichlet", 5, alpha=0.3)
    for tr, te in zip(p.train_indices, p.test_indices):
        train_share = np.bincount(ds.y_train[tr], minlength=10) / 200
        test_share = np.bincount(ds.y_test[te], minlength=10) / 100
        np.testing.assert_allclose(test_share, train_share, atol=0.011)


def test_dirichlet_many_clients_small_alpha_no_starved_client():
    # 10 classes, 300 clients, alpha 0.01: random draws nearly always starve some client.
    ds = toy_dataset(n_per_class=600, n_test_per_class=1)
    p = part(ds, "dirichlet", 300, alpha=0.01)
    assert min(p.num_samples()) >= 10
    assert_disjoint(p.train_indices, 6000)
    assert sum(p.num_samples()) == 6000


def test_shards_pathological_split():
    ds = toy_dataset(n_per_class=40, n_test_per_class=7)  # 400 images, 40 shards of 10
    p = part(ds, "shards", 15, shard_size=10, shards_per_client=2)
    assert_well_formed(p, 15)
    assert_disjoint(p.train_indices, 400)
    for tr, te in zip(p.train_indices, p.test_indices):
        assert len(tr) == 20
        labels = np.unique(ds.y_train[tr])
        assert len(labels) <= 2
        # Each shard is a run of one label (class sizes are multiples of the shard size).
        assert all(np.isin(np.bincount(ds.y_train[tr], minlength=10), [0, 10, 20]))
        np.testing.assert_array_equal(te, np.flatnonzero(np.isin(ds.y_test, labels)))
    assert same_partition(p, part(ds, "shards", 15, shard_size=10, shards_per_client=2))
    assert not same_partition(p, part(ds, "shards", 15, seed=1, shard_size=10,
                                      shards_per_client=2))


def test_shards_are_cut_from_stable_label_sort():
    ds = toy_dataset(n_per_class=40)
    p = part(ds, "shards", 40, shard_size=10, shards_per_client=1)  # uses every shard
    order = np.argsort(ds.y_train, kind="stable")
    expected = sorted(tuple(np.sort(order[i:i + 10])) for i in range(0, 400, 10))
    assert sorted(tuple(ix) for ix in p.train_indices) == expected


def test_too_many_shards_is_config_error():
    ds = toy_dataset(n_per_class=40)  # 40 shards of 10
    with pytest.raises(ConfigError) as e:
        part(ds, "shards", 21, shard_size=10, shards_per_client=2)
    assert e.value.key == "data.shards_per_client"
    assert "42" in e.value.problem and "40" in e.value.problem


def test_bad_scheme_and_natural_without_natural_split():
    ds = toy_dataset()
    with pytest.raises(ConfigError) as e:
        part(ds, "pathological", 4)
    assert e.value.key == "data.partition"
    with pytest.raises(ConfigError) as e:
        part(ds, "natural", 4)
    assert e.value.key == "data.partition" and "synthetic" in e.value.problem
    with pytest.raises(ConfigError) as e:
        part(ds, "dirichlet", 4, alpha=0.0)
    assert e.value.key == "data.alpha"


# ------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_shapes_and_natural_partition():
    settings = {"alpha": 0.5, "beta": 0.5}
    a = load_dataset("synthetic", None, seed=3, num_clients=12, synthetic=settings)
    b = load_dataset("synthetic", None, seed=3, num_clients=12, synthetic=settings)
    c = load_dataset("synthetic", None, seed=4, num_clients=12, synthetic=settings)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.shape != c.x_train.shape or not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.x_train.shape[1] == 60 and a.input_shape == (60,) and a.num_classes == 10
    assert a.y_train.min() >= 0 and a.y_train.max() < 10

    p = partition_dataset(a, "natural", 12, seed=0, alpha=1, shard_size=1, shards_per_client=1)
    assert_well_formed(p, 12)
    np.testing.assert_array_equal(np.concatenate(p.train_indices), np.arange(len(a.y_train)))
    np.testing.assert_array_equal(np.concatenate(p.test_indices), np.arange(len(a.y_test)))
    for tr, te in zip(p.train_indices, p.test_indices):
        n = len(tr) + len(te)
        assert 50 <= n <= 1000
        assert len(te) == round(0.2 * n)
    # User k's data does not depend on the number of users.
    small = load_dataset("synthetic", None, seed=3, num_clients=5, synthetic=settings)
    k = small.natural_partition.train_indices[4]
    np.testing.assert_array_equal(small.x_train[k], a.x_train[a.natural_partition.train_indices[4]])


def test_synthetic_users_differ_and_pooled_partitions_work():
    ds = load_dataset("synthetic", None, seed=0, num_clients=8,
                      synthetic={"alpha": 1.0, "beta": 1.0, "dim": 20, "classes": 5})
    assert ds.x_train.shape[1] == 20 and ds.num_classes == 5
    # beta = 1: per-user input means differ clearly.
    means = [ds.x_train[ix].mean() for ix in ds.natural_partition.train_indices]
    assert np.std(means) > 0.2
    p = partition_dataset(ds, "iid", 8, seed=0, alpha=1, shard_size=1, shards_per_client=1)
    np.testing.assert_array_equal(np.sort(np.concatenate(p.train_indices)),
                                  np.arange(len(ds.y_train)))
    with pytest.raises(ConfigError) as e:
        load_dataset("synthetic", None, seed=0, num_clients=8, synthetic={"gamma": 1})
    assert e.value.key == "data.synthetic.gamma"
