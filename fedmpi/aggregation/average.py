"""The float64 average over holders: sums run in float64 in the order given (the round loop
passes client-id order), so the result does not depend on how clients were spread over ranks."""
from __future__ import annotations

import numpy as np

from ..update import ModelUpdate
from .common import MISSING_POLICIES, SUM_MODES, _cast, _shared_packed_positions
from .fixed_point import fixed_point_average


def average_over_holders(updates: list[ModelUpdate], weights: list[float], reference: dict[str, np.ndarray],
                         missing: str = "keep", sum_mode: str = "float64",
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per element of each ``reference`` tensor: Σ_k w_k·θ_k / Σ_k w_k over the clients k that sent
    it (sent the tensor, whole or as the block ``update.slices[name]``, and, if they sent a mask for
    it, kept the element). Elements nobody sent keep the reference value (``missing="keep"``) or
    become 0 (``missing="zero"``). Results have the reference dtype; integer and bool tensors are
    rounded to the nearest value rather than truncated.

    Returns (averaged tensors, per tensor the float64 votes Σ_k w_k over the holders of each
    element). FedDST reads ``votes > 0`` as the union of the client masks and the votes as the
    amount of data backing each position.

    ``sum_mode="fixed_point"``: the sums of ``FixedPointSum`` (integer weights, no sliced tensors).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}; expected one of {MISSING_POLICIES}")
    if sum_mode == "fixed_point":
        return fixed_point_average(updates, weights, reference, missing)
    if sum_mode != "float64":
        raise ValueError(f"sum_mode={sum_mode!r}; expected one of {SUM_MODES}")
    weights = np.asarray(weights, dtype=np.float64)
    averaged, votes = {}, {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        senders = [k for k, update in enumerate(updates) if name in update.values]
        numerator = np.zeros(ref.shape, dtype=np.float64)
        if senders and all(name not in updates[k].masks and name not in updates[k].slices for k in senders):
            # every sender holds every element: one denominator, summed with np.sum as the plain
            # weighted average always was (its results stay bit-identical). w·θ goes through one
            # reused float64 scratch array: the same products as weights[k] * θ.astype(float64),
            # without two fresh arrays (and their page faults) per upload
            scratch = np.empty(ref.shape, dtype=np.float64)
            for k in senders:
                np.multiply(_sent(updates[k], name, ref.shape), weights[k], out=scratch, dtype=np.float64)
                numerator += scratch
            denominator = np.full(ref.shape, float(np.sum(weights[senders])))
        elif (positions := _shared_packed_positions(updates, name)) is not None:
            # every sender sent the same mask, decoded once (codec.MaskPositions: FedDST between
            # readjustments): sum the packed values position by position, then place the sums;
            # per element the same float64 additions in the same order as below
            if np.shape(updates[senders[0]].masks[name]) != ref.shape:
                raise ValueError(f"{name}: sent shape {np.shape(updates[senders[0]].masks[name])}, expected {ref.shape}")
            packed_numerator = np.zeros(positions.size, dtype=np.float64)
            packed_denominator = np.zeros(positions.size, dtype=np.float64)
            scratch = np.empty(positions.size, dtype=np.float64)
            for k in senders:
                np.multiply(updates[k].packed[name][1], weights[k], out=scratch, dtype=np.float64)
                packed_numerator += scratch
                packed_denominator += weights[k]
            denominator = np.zeros(ref.shape, dtype=np.float64)
            numerator.reshape(-1)[positions] = packed_numerator
            denominator.reshape(-1)[positions] = packed_denominator
        else:
            denominator = np.zeros(ref.shape, dtype=np.float64)
            for k in senders:
                _accumulate(numerator, denominator, updates[k], name, weights[k])
        held = denominator > 0
        result = ref.copy() if missing == "keep" else np.zeros_like(ref)
        result[held] = _cast(numerator[held] / denominator[held], ref.dtype)
        averaged[name], votes[name] = result, denominator
    return averaged, votes


def _sent(update: ModelUpdate, name: str, shape: tuple) -> np.ndarray:
    values = np.asarray(update.values[name])
    if values.shape != shape:
        raise ValueError(f"{name}: sent shape {values.shape}, expected {shape}")
    return values


def _values(update: ModelUpdate, name: str, shape: tuple) -> np.ndarray:
    return _sent(update, name, shape).astype(np.float64)


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
    mask = update.masks.get(name)
    if mask is None:
        num += weight * _values(update, name, num.shape)
        den += weight
        return
    packed = update.packed.get(name)
    if packed is not None and not block and num.flags.c_contiguous:
        # as decoded: the flat positions of the mask (C order, as np.nonzero below) and the values
        # there, so the same float64 operations per element without densifying the upload
        positions, kept = packed
        if np.shape(mask) != num.shape:
            raise ValueError(f"{name}: sent shape {np.shape(mask)}, expected {num.shape}")
        num.reshape(-1)[positions] += weight * np.asarray(kept).astype(np.float64)
        den.reshape(-1)[positions] += weight
        return
    values = np.asarray(update.values[name])
    if values.shape != num.shape:
        raise ValueError(f"{name}: sent shape {values.shape}, expected {num.shape}")
    # only the held positions are read (values outside the mask are ignored, even if they are
    # not finite), and each gets exactly the float64 operations of the dense case: num += w·θ
    held = np.nonzero(np.asarray(mask, dtype=bool))
    num[held] += weight * values[held].astype(np.float64)
    den[held] += weight
