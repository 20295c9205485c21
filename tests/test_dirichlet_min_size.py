"""data.min_client_samples: the HypeMeFed authors' Dirichlet redraw until every client holds a
minimum number of samples (eis-lab/HypeMeFed, framework/DataManager.py, ``non_iid_partition``)."""
import hashlib

import numpy as np
import pytest

from fedmpi.config import load_config
from helpers import toy_dataset

from fedmpi.data import partition_dataset
from fedmpi.errors import ConfigError
from fedmpi.initial import build_initial


def dirichlet(ds, k, seed, alpha, **extra):
    return partition_dataset(ds, "dirichlet", k, seed=seed, alpha=alpha, shard_size=1,
                             shards_per_client=1, **extra)


def digest(p):
    h = hashlib.sha256()
    for a in p.train_indices + p.test_indices:
        h.update(np.int64(len(a)).tobytes())
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:16]


def sizes(p):
    return [len(a) for a in p.train_indices]


# Produced by the code before data.min_client_samples existed (/tmp/oldmain, the same calls
# without the keyword). The last case starves clients on every draw, so it covers the top-up.
OLD_PARTITIONS = [
    ((0, 10, 0.3), "9471c71f2f91db91", [55, 39, 63, 72, 27, 14, 35, 38, 23, 34]),
    ((3, 10, 0.5), "66040c6d1a9ab080", [53, 29, 29, 26, 52, 26, 13, 33, 60, 79]),
    ((1, 40, 0.05), "53e13e3cb873751b",
     [5, 8, 5, 5, 5, 20, 5, 5, 18, 14, 5, 12, 5, 11, 5, 18, 20, 7, 5, 6, 6, 10, 20, 20, 20, 5,
      21, 5, 16, 5, 5, 7, 6, 12, 5, 21, 8, 5, 5, 14]),
]


@pytest.mark.parametrize("case, expected_digest, expected_sizes", OLD_PARTITIONS)
def test_zero_keeps_the_old_partition_bit_for_bit(case, expected_digest, expected_sizes):
    seed, k, alpha = case
    p = dirichlet(toy_dataset(), k, seed, alpha, min_client_samples=0)
    assert sizes(p) == expected_sizes
    assert digest(p) == expected_digest


def test_minimum_redraws_until_every_client_has_enough():
    ds = toy_dataset()
    # (seed 0, 10 clients, alpha 0.3): the first draw already meets the built-in floor of 10, so the
    # default split is that first draw, and it leaves a client with 14 samples
    first = dirichlet(ds, 10, 0, 0.3)
    assert min(sizes(first)) < 30
    p = dirichlet(ds, 10, 0, 0.3, min_client_samples=30)
    assert min(sizes(p)) >= 30
    assert sizes(p) != sizes(first)
    # still a partition of the training set, and of the test set
    train = np.concatenate(p.train_indices)
    assert np.array_equal(np.sort(train), np.arange(len(ds.y_train)))
    assert np.array_equal(np.sort(np.concatenate(p.test_indices)), np.arange(len(ds.y_test)))
    # still non-iid: some client's labels are far from the uniform 10 % per class
    share = max(np.bincount(ds.y_train[idx], minlength=10).max() / len(idx) for idx in p.train_indices)
    assert share > 0.3
    # a whole fresh draw, not the first one topped up to the minimum: its smallest client (33)
    # is above 30, and every minimum up to 33 keeps the same draw (earlier draws fell below 30)
    assert min(sizes(p)) > 30
    for minimum in range(31, min(sizes(p)) + 1):
        assert digest(dirichlet(ds, 10, 0, 0.3, min_client_samples=minimum)) == digest(p)
    # a function of the seed alone
    assert digest(dirichlet(ds, 10, 0, 0.3, min_client_samples=30)) == digest(p)
    assert digest(dirichlet(ds, 10, 1, 0.3, min_client_samples=30)) != digest(p)


def test_minimum_reaches_a_run_through_the_config():
    overrides = ["data.name=synthetic", "data.partition=dirichlet", "data.alpha=0.3", "model=mlp",
                 "clients.total=8", "clients.per_round=4"]
    plain = build_initial(load_config(None, overrides)).partition
    assert min(sizes(plain)) < 60
    with_minimum = build_initial(load_config(None, overrides + ["data.min_client_samples=60"])).partition
    assert min(sizes(with_minimum)) >= 60


@pytest.mark.parametrize("minimum", [41, 40])
def test_unreachable_minimum_is_a_config_error(minimum):
    # 41 x 10 > 400 samples cannot be met; 40 needs a perfectly even Dir(0.1) split, which the
    # bounded redraws never find
    with pytest.raises(ConfigError) as e:
        dirichlet(toy_dataset(), 10, 0, 0.1, min_client_samples=minimum)
    assert e.value.key == "data.min_client_samples"
    assert "lower data.min_client_samples" in str(e.value)


@pytest.mark.parametrize("override, problem", [
    ("data.min_client_samples=-1", "must be 0"),
    ("data.min_client_samples=5", "only to data.partition: dirichlet"),   # the default is shards
])
def test_bad_setting_is_rejected_when_the_config_loads(override, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == "data.min_client_samples"
    assert problem in str(e.value)
    assert e.value.exit_code == 2
