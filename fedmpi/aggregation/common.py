"""What the float64 and the fixed-point averages share: the policies, the cast of an average to
its reference dtype, and the test for uploads packed at one shared mask."""
from __future__ import annotations

import numpy as np

from ..update import ModelUpdate

MISSING_POLICIES = ("keep", "zero")
SUM_MODES = ("float64", "fixed_point")


def _cast(averaged: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return averaged.astype(dtype)
    return np.rint(averaged).astype(dtype)


def _shared_packed_positions(updates: list[ModelUpdate], name: str) -> np.ndarray | None:
    """The positions array every upload holding ``name`` has it packed at (one and the same
    array, whole tensors), or None."""
    holders = [u for u in updates if name in u.values]
    if not holders or any(name in u.slices or name not in u.packed for u in holders):
        return None
    positions = holders[0].packed[name][0]
    return positions if all(u.packed[name][0] is positions for u in holders) else None
