"""Aggregation rules. Sums run in float64 in the order given (the round loop passes client-id
order), so the result does not depend on how clients were spread over ranks."""
from __future__ import annotations

import numpy as np


def weighted_average(tensors: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ_k w_k·θ_k / Σ_k w_k per tensor, returned as float32."""
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    out = {}
    for name in tensors[0]:
        acc = np.zeros(tensors[0][name].shape, dtype=np.float64)
        for tensor, w in zip(tensors, weights):
            acc += w * tensor[name].astype(np.float64)
        out[name] = (acc / total).astype(np.float32)
    return out


def sparse_weighted_average(tensors: list[dict[str, np.ndarray]], masks: list[dict[str, np.ndarray]],
                            weights: list[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FedDST's merge: per masked tensor θ = Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k, 0 where no client kept
    the weight; unmasked tensors get the plain weighted average.

    Returns (averaged tensors, per masked tensor the votes Σ_k w_k·m_k as float64). ``votes > 0``
    is the union of the client masks; the vote size says how much data backs each position.
    """
    out, votes = {}, {}
    dense_total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    for name in tensors[0]:
        shape = tensors[0][name].shape
        numerator = np.zeros(shape, dtype=np.float64)
        if name not in masks[0]:
            for tensor, w in zip(tensors, weights):
                numerator += w * tensor[name].astype(np.float64)
            out[name] = (numerator / dense_total).astype(np.float32)
            continue
        denominator = np.zeros(shape, dtype=np.float64)
        for tensor, mask, w in zip(tensors, masks, weights):
            m = mask[name]
            numerator[m] += w * tensor[name][m].astype(np.float64)
            denominator[m] += w
        kept = denominator > 0
        averaged = np.zeros(shape, dtype=np.float64)
        averaged[kept] = numerator[kept] / denominator[kept]
        out[name] = averaged.astype(np.float32)
        votes[name] = denominator
    return out, votes
