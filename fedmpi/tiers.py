"""Which tier each client is in (the tiered methods' ``tiers.mix``): read by the tiered methods and
by the time model, which gives each tier its own device profile (``device.tier_profiles``)."""
from __future__ import annotations

import numpy as np

from . import rng


def tier_of_clients(num_clients: int, mix: list[float], seed: int) -> np.ndarray:
    """Tier (0-based) of every client: a seeded permutation cut in proportion to ``mix``."""
    shares = np.asarray(mix, dtype=np.float64) / float(np.sum(mix))
    bounds = np.floor(np.cumsum(shares) * num_clients + 1e-9).astype(int)
    tiers = np.searchsorted(bounds, np.arange(num_clients), side="right")
    order = rng.generator(seed, rng.TIERS).permutation(num_clients)
    out = np.empty(num_clients, dtype=np.int64)
    out[order] = tiers
    return out
