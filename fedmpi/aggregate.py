"""Aggregation rules. Sums run in float64 in the order given (the round loop passes client-id
order), so the result does not depend on how clients were spread over ranks."""
from __future__ import annotations

import numpy as np

from .comm.codec import ModelUpdate

MISSING_POLICIES = ("keep", "zero")


def average_over_holders(updates: list[ModelUpdate], weights: list[float], reference: dict[str, np.ndarray],
                         missing: str = "keep") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per element of each ``reference`` tensor: Σ_k w_k·θ_k / Σ_k w_k over the clients k that sent
    it (sent the tensor, whole or as the block ``update.slices[name]``, and, if they sent a mask for
    it, kept the element). Elements nobody sent keep the reference value (``missing="keep"``) or
    become 0 (``missing="zero"``). Results have the reference dtype; integer and bool tensors are
    rounded to the nearest value rather than truncated.

    Returns (averaged tensors, per tensor the float64 votes Σ_k w_k over the holders of each
    element). FedDST reads ``votes > 0`` as the union of the client masks and the votes as the
    amount of data backing each position.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}; expected one of {MISSING_POLICIES}")
    weights = np.asarray(weights, dtype=np.float64)
    averaged, votes = {}, {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        senders = [k for k, update in enumerate(updates) if name in update.values]
        numerator = np.zeros(ref.shape, dtype=np.float64)
        if senders and all(name not in updates[k].masks and name not in updates[k].slices for k in senders):
            # every sender holds every element: one denominator, summed with np.sum as the plain
            # weighted average always was (its results stay bit-identical)
            for k in senders:
                numerator += weights[k] * _values(updates[k], name, ref.shape)
            denominator = np.full(ref.shape, float(np.sum(weights[senders])))
        else:
            denominator = np.zeros(ref.shape, dtype=np.float64)
            for k in senders:
                _accumulate(numerator, denominator, updates[k], name, weights[k])
        held = denominator > 0
        result = ref.copy() if missing == "keep" else np.zeros_like(ref)
        result[held] = _cast(numerator[held] / denominator[held], ref.dtype)
        averaged[name], votes[name] = result, denominator
    return averaged, votes


def _values(update: ModelUpdate, name: str, shape: tuple) -> np.ndarray:
    values = np.asarray(update.values[name])
    if values.shape != shape:
        raise ValueError(f"{name}: sent shape {values.shape}, expected {shape}")
    return values.astype(np.float64)


def _accumulate(numerator: np.ndarray, denominator: np.ndarray, update: ModelUpdate, name: str,
                weight: np.float64) -> None:
    """Add one client's w·θ and w to the elements it holds (its block, inside its mask)."""
    block = update.slices.get(name, ())
    if block and (len(block) != numerator.ndim
                  or any(not 0 <= s <= e <= n for (s, e), n in zip(block, numerator.shape))):
        raise ValueError(f"{name}: slice {block} lies outside the tensor of shape {numerator.shape}")
    # trailing Ellipsis: a view even for 0-d tensors, so the in-place adds reach the full tensors
    region = tuple(slice(s, e) for s, e in block) + (Ellipsis,)
    num, den = numerator[region], denominator[region]
    contribution = weight * _values(update, name, num.shape)
    mask = update.masks.get(name)
    if mask is None:
        num += contribution
        den += weight
    else:
        # where=: values outside the mask are ignored, even if they are not finite
        mask = np.asarray(mask, dtype=bool)
        np.add(num, contribution, out=num, where=mask)
        np.add(den, weight, out=den, where=mask)


def _cast(averaged: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return averaged.astype(dtype)
    return np.rint(averaged).astype(dtype)


def weighted_average(tensors: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ_k w_k·θ_k / Σ_k w_k per tensor, returned as float32."""
    reference = {name: np.zeros(np.shape(t), np.float32) for name, t in tensors[0].items()}
    averaged, _ = average_over_holders([ModelUpdate(t) for t in tensors], weights, reference, missing="zero")
    return averaged


def sparse_weighted_average(tensors: list[dict[str, np.ndarray]], masks: list[dict[str, np.ndarray]],
                            weights: list[float]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FedDST's merge: per masked tensor θ = Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k, 0 where no client kept
    the weight; unmasked tensors get the plain weighted average.

    Returns (averaged tensors as float32, per masked tensor the votes Σ_k w_k·m_k as float64).
    """
    reference = {name: np.zeros(np.shape(t), np.float32) for name, t in tensors[0].items()}
    updates = [ModelUpdate(t, m) for t, m in zip(tensors, masks)]
    averaged, votes = average_over_holders(updates, weights, reference, missing="zero")
    return averaged, {name: votes[name] for name in masks[0]}
