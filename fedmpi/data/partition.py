"""Splitting a dataset across clients: iid, dirichlet (Hsu et al. 2019), shards, natural.

All randomness comes from ``generator(seed, PARTITION)``, so every rank computes the same
partition independently.
"""
from __future__ import annotations

import numpy as np

from fedmpi import rng
from fedmpi.errors import ConfigError

from .types import Dataset, Partition

SCHEMES = ("iid", "dirichlet", "shards", "natural")

# Dirichlet: how many fresh draws to try before topping up starved clients by hand.
DIRICHLET_MAX_TRIES = 100
# Dirichlet with data.min_client_samples: how many fresh draws to try before giving up (exit 2).
MIN_CLIENT_SAMPLES_MAX_DRAWS = 1000


def partition_dataset(dataset: Dataset, scheme: str, num_clients: int, *, seed: int,
                      alpha: float, shard_size: int, shards_per_client: int,
                      min_client_samples: int = 0) -> Partition:
    """Split ``dataset`` over ``num_clients`` clients by ``scheme``.

    ``min_client_samples`` > 0 (``dirichlet`` only): redraw the whole split until every client
    holds at least that many training samples. Every client's train and local-test indices are
    int64 and sorted ascending.
    """
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError("clients.total", f"must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if scheme == "natural":
        return _natural(dataset, num_clients)
    if scheme not in SCHEMES:
        raise ConfigError("data.partition", f"unknown scheme {scheme!r}; choose one of "
                                            f"{', '.join(SCHEMES)}")
    n_train = len(dataset.y_train)
    if num_clients > n_train:
        raise ConfigError("clients.total", f"{num_clients} clients but the training set has "
                                           f"only {n_train} samples")
    g = rng.generator(seed, rng.PARTITION)
    if scheme == "iid":
        return _iid(dataset, num_clients, g)
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ConfigError("data.alpha", f"must be > 0, got {alpha!r}")
        return _dirichlet(dataset, num_clients, float(alpha), g, int(min_client_samples))
    return _shards(dataset, num_clients, shard_size, shards_per_client, g)


def hold_out_local_test(partition: Partition, fraction: float, seed: int) -> Partition:
    """Split each client's training data into local train / local test (e.g. 80/20 for
    ``fraction`` 0.2): ⌊fraction·n⌋ samples (at least 1 when n ≥ 2, never all of them) drawn from
    ``generator(seed, LOCAL_SPLIT, 0, client)`` become the client's local test set."""
    train, test = [], []
    for client, indices in enumerate(partition.train_indices):
        n = len(indices)
        held = min(max(int(fraction * n), 1 if n >= 2 else 0), n - 1)
        order = rng.generator(seed, rng.LOCAL_SPLIT, 0, client).permutation(n)
        test.append(np.sort(indices[order[:held]]))
        train.append(np.sort(indices[order[held:]]))
    return Partition(train, test, local_test_in_train=True)


# ``generator(seed, LOCAL_SPLIT, draw, client)``: draw 0 is the local test hold-out above, this one
# a client's validation split, so neither split shifts the other
VALIDATION_DRAW = 1


def validation_split(n: int, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..n−1 of client ``client``'s training data (in partition order) split into
    (train, validation), both ascending: ⌊fraction·n⌋ positions (at least 1 when n ≥ 2, never all;
    none when ``fraction`` is 0) drawn from ``generator(seed, LOCAL_SPLIT, VALIDATION_DRAW, client)``,
    so the split depends on (seed, client) alone, never on the rank or the round."""
    held = min(max(int(fraction * n), 1), n - 1) if fraction > 0 and n >= 2 else 0
    order = rng.generator(seed, rng.LOCAL_SPLIT, VALIDATION_DRAW, client).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def _sorted_parts(parts) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _natural(dataset: Dataset, num_clients: int) -> Partition:
    natural = dataset.natural_partition
    if natural is None:
        raise ConfigError("data.partition", f"'natural' needs a dataset with its own per-user "
                                            f"split (synthetic); {dataset.name} has none, use "
                                            f"iid, dirichlet or shards")
    if natural.num_clients != num_clients:
        raise ConfigError("clients.total", f"the natural partition of {dataset.name} has "
                                           f"{natural.num_clients} users, not {num_clients}")
    return Partition(_sorted_parts(natural.train_indices), _sorted_parts(natural.test_indices))


def _iid(dataset: Dataset, num_clients: int, g: np.random.Generator) -> Partition:
    train = np.array_split(g.permutation(len(dataset.y_train)), num_clients)
    test = np.array_split(g.permutation(len(dataset.y_test)), num_clients)
    return Partition(_sorted_parts(train), _sorted_parts(test))


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def _dirichlet_counts(class_sizes: np.ndarray, num_clients: int, alpha: float,
                      g: np.random.Generator) -> np.ndarray:
    """(clients, classes) sample counts: each class split by proportions ~ Dir(alpha)."""
    props = g.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))  # (classes, clients)
    # Cut points floor(cumsum(p) * n) as in Hsu et al.'s reference split.
    cuts = np.floor(np.cumsum(props, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes  # rounding must not lose the last samples
    counts = np.diff(cuts, axis=1, prepend=0)
    return counts.T


def _top_up(counts: np.ndarray, minimum: int) -> np.ndarray:
    """Move samples from the richest clients to those below ``minimum``, deterministically.

    Only used when repeated draws all starve some client (many clients, few classes, small
    alpha); each moved sample goes from the richest client's most plentiful class.
    """
    counts = counts.copy()
    for k in np.flatnonzero(counts.sum(axis=1) < minimum):
        while counts[k].sum() < minimum:
            donor = int(np.argmax(counts.sum(axis=1)))
            cls = int(np.argmax(counts[donor]))
            counts[donor, cls] -= 1
            counts[k, cls] += 1
    return counts


def _redraw_until_minimum(class_sizes: np.ndarray, num_clients: int, alpha: float,
                          g: np.random.Generator, minimum: int) -> np.ndarray:
    """The HypeMeFed authors' rule (eis-lab/HypeMeFed, framework/DataManager.py,
    ``non_iid_partition``: ``while min_size < min_data_size`` redraws every class's Dir(alpha)
    proportions and keeps the draw once its smallest client holds ``min_data_size`` samples; their
    STL-10 and SVHN runs pass 50 from ``get_datasets``). Their loop is unbounded; this one stops
    after MIN_CLIENT_SAMPLES_MAX_DRAWS draws. Every draw comes from ``g`` (the seed), never the rank."""
    n_train = int(class_sizes.sum())
    if minimum * num_clients > n_train:
        raise ConfigError("data.min_client_samples",
                          f"{num_clients} clients x {minimum} samples need {minimum * num_clients}, "
                          f"but the training set has {n_train}; lower data.min_client_samples "
                          f"(at most {n_train // num_clients}) or clients.total")
    for _ in range(MIN_CLIENT_SAMPLES_MAX_DRAWS):
        counts = _dirichlet_counts(class_sizes, num_clients, alpha, g)
        if counts.sum(axis=1).min() >= minimum:
            return counts
    raise ConfigError("data.min_client_samples",
                      f"no Dir({alpha:g}) split in {MIN_CLIENT_SAMPLES_MAX_DRAWS} draws gave all "
                      f"{num_clients} clients at least {minimum} training samples; lower "
                      f"data.min_client_samples, or raise data.alpha")


def _dirichlet(dataset: Dataset, num_clients: int, alpha: float,
               g: np.random.Generator, min_client_samples: int = 0) -> Partition:
    y_train, y_test = dataset.y_train, dataset.y_test
    classes = np.unique(y_train)
    class_sizes = np.array([(y_train == c).sum() for c in classes], dtype=np.int64)
    if min_client_samples > 0:
        counts = _redraw_until_minimum(class_sizes, num_clients, alpha, g, min_client_samples)
    else:
        # A client with almost no data makes FedAvg weights and local epochs meaningless.
        minimum = max(1, min(10, len(y_train) // num_clients // 2))
        for _ in range(DIRICHLET_MAX_TRIES):
            counts = _dirichlet_counts(class_sizes, num_clients, alpha, g)
            if counts.sum(axis=1).min() >= minimum:
                break
        else:
            counts = _top_up(counts, minimum)

    train_parts = [[] for _ in range(num_clients)]
    test_parts = [[] for _ in range(num_clients)]
    for j, c in enumerate(classes):
        members = g.permutation(np.flatnonzero(y_train == c))
        for k, part in enumerate(_split_by_counts(members, counts[:, j])):
            train_parts[k].append(part)
        # Test images of this class go to clients in the same proportions as the training ones.
        test_members = g.permutation(np.flatnonzero(y_test == c))
        test_cuts = np.floor(np.cumsum(counts[:, j]) / class_sizes[j]
                             * len(test_members)).astype(np.int64)
        test_cuts[-1] = len(test_members)
        for k, part in enumerate(_split_by_counts(test_members, np.diff(test_cuts, prepend=0))):
            test_parts[k].append(part)
    return Partition(_sorted_parts(np.concatenate(p) for p in train_parts),
                     _sorted_parts(np.concatenate(p) for p in test_parts))


def _shards(dataset: Dataset, num_clients: int, shard_size: int, shards_per_client: int,
            g: np.random.Generator) -> Partition:
    """McMahan et al.'s pathological split, with the FedDST/LotteryFL local test sets."""
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ConfigError("data.shard_size", f"must be a positive integer, got {shard_size!r}")
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
        raise ConfigError("data.shards_per_client",
                          f"must be a positive integer, got {shards_per_client!r}")
    y_train, y_test = dataset.y_train, dataset.y_test
    num_shards = len(y_train) // shard_size
    needed = num_clients * shards_per_client
    if needed > num_shards:
        raise ConfigError("data.shards_per_client",
                          f"{num_clients} clients x {shards_per_client} shards need {needed} "
                          f"shards of {shard_size} images, but the {len(y_train)}-image "
                          f"training set holds only {num_shards}; lower data.shards_per_client, "
                          f"data.shard_size or clients.total")
    by_label = np.argsort(y_train, kind="stable")  # ties keep index order
    shards = by_label[: num_shards * shard_size].reshape(num_shards, shard_size)
    chosen = g.permutation(num_shards)[:needed].reshape(num_clients, shards_per_client)
    train, test = [], []
    for client_shards in chosen:
        idx = np.sort(shards[client_shards].reshape(-1))
        train.append(idx)
        test.append(np.flatnonzero(np.isin(y_test, np.unique(y_train[idx]))).astype(np.int64))
    return Partition(train, test)
