"""LEAF Synthetic(alpha, beta) (Li et al., "Federated Optimization in Heterogeneous Networks").

Per user k: u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k ~ N(u_k, 1) (classes x dim),
b_k ~ N(u_k, 1); v_k ~ N(B_k, 1) per dimension; x ~ N(v_k, Sigma) with Sigma diagonal,
Sigma_jj = j^-1.2; y = argmax(W_k x + b_k) (softmax does not change the argmax).
alpha controls how much the users' models differ, beta how much their inputs differ.
As in the reference generator, alpha and beta are used as the *standard deviation* of the
normal draws. Samples per user: lognormal(4, 2) + 50, capped at ``max_samples``.

Every user's draws come from its own stream ``generator(seed, SYNTHETIC, 0, k)``, so user k's
data does not depend on how many users there are.
"""
from __future__ import annotations

import numpy as np

from fedmpi import rng
from fedmpi.errors import ConfigError

from .types import Dataset, Partition

SYNTHETIC_DEFAULTS = {
    "alpha": 1.0,
    "beta": 1.0,
    "dim": 60,
    "classes": 10,
    "test_fraction": 0.2,
    "min_samples": 50,
    "max_samples": 1000,
}


def synthetic_settings(settings: dict | None) -> dict:
    """Defaults merged with ``settings``, validated; bad values name ``data.synthetic.<key>``."""
    merged = dict(SYNTHETIC_DEFAULTS)
    for key, value in (settings or {}).items():
        if key not in SYNTHETIC_DEFAULTS:
            raise ConfigError(f"data.synthetic.{key}", f"unknown setting; known: "
                                                       f"{', '.join(SYNTHETIC_DEFAULTS)}")
        merged[key] = value

    def check(key, ok, what):
        if not ok:
            raise ConfigError(f"data.synthetic.{key}", f"must be {what}, got {merged[key]!r}")

    for key in ("alpha", "beta"):
        check(key, isinstance(merged[key], (int, float)) and merged[key] >= 0, "a number >= 0")
    for key, low in (("dim", 1), ("classes", 2), ("min_samples", 2)):
        check(key, isinstance(merged[key], int) and merged[key] >= low, f"an integer >= {low}")
    check("max_samples", isinstance(merged["max_samples"], int)
          and merged["max_samples"] >= merged["min_samples"], "an integer >= min_samples")
    tf = merged["test_fraction"]
    check("test_fraction", isinstance(tf, (int, float)) and 0 < tf < 1, "a number in (0, 1)")
    return merged


def _user_data(seed: int, user: int, s: dict, diag_std: np.ndarray):
    g = rng.generator(seed, rng.SYNTHETIC, 0, user)
    n = int(min(g.lognormal(4.0, 2.0) + s["min_samples"], s["max_samples"]))
    u = g.normal(0.0, s["alpha"])
    b_mean = g.normal(0.0, s["beta"])
    w = g.normal(u, 1.0, size=(s["classes"], s["dim"]))
    b = g.normal(u, 1.0, size=s["classes"])
    v = g.normal(b_mean, 1.0, size=s["dim"])
    x = v + g.standard_normal((n, s["dim"])) * diag_std
    y = np.argmax(x @ w.T + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def make_synthetic(seed: int, num_users: int, settings: dict | None = None) -> Dataset:
    """Pooled train/test arrays of ``num_users`` LEAF users plus their natural partition.

    Each user's samples are split into the first ``n - n_test`` (local train) and the last
    ``n_test = max(1, round(test_fraction * n))`` (local test); the pooled arrays are the users'
    parts concatenated in user order.
    """
    if not isinstance(num_users, int) or num_users < 1:
        raise ConfigError("clients.total", f"must be a positive integer, got {num_users!r}")
    s = synthetic_settings(settings)
    diag_std = np.arange(1, s["dim"] + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    xs_train, ys_train, xs_test, ys_test = [], [], [], []
    train_idx, test_idx = [], []
    n_train_total = n_test_total = 0
    for user in range(num_users):
        x, y = _user_data(seed, user, s, diag_std)
        n_test = max(1, int(round(s["test_fraction"] * len(y))))
        n_train = len(y) - n_test
        xs_train.append(x[:n_train]); ys_train.append(y[:n_train])
        xs_test.append(x[n_train:]); ys_test.append(y[n_train:])
        train_idx.append(np.arange(n_train_total, n_train_total + n_train, dtype=np.int64))
        test_idx.append(np.arange(n_test_total, n_test_total + n_test, dtype=np.int64))
        n_train_total += n_train
        n_test_total += n_test
    return Dataset(
        name="synthetic",
        x_train=np.concatenate(xs_train), y_train=np.concatenate(ys_train),
        x_test=np.concatenate(xs_test), y_test=np.concatenate(ys_test),
        num_classes=s["classes"], input_shape=(s["dim"],),
        natural_partition=Partition(train_idx, test_idx),
    )
