"""Aggregation rules. By default sums run in float64 in the order given (the round loop passes
client-id order), so the result does not depend on how clients were spread over ranks.
``aggregation.sum: fixed_point`` sums in int64 on a per-element grid instead (``FixedPointSum``):
the same bits whatever the order and grouping, which lets the worker ranks sum their own clients."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .comm.codec import ModelUpdate, tensor_view

MISSING_POLICIES = ("keep", "zero")
SUM_MODES = ("float64", "fixed_point")


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


# ------------------------------------------------------------------------ the fixed-point sum
# A float64 sum depends on the order of its terms, so summing each worker rank's clients and then
# the ranks' partial sums would change the last bits with the rank count. Integers add exactly, in
# any order. So every summand x_k = w_k·θ_k of an element goes on one grid shared by the whole
# round, steps of 2^(e−B) with e the element's largest binary exponent over all the round's
# summands (|x_k| < 2^e, np.frexp), and is summed as q_k = trunc(x_k·2^(B−e)), |q_k| < 2^B, in
# int64. Σ q_k is the same integer however the k are grouped, and so is float64(Σ q_k)·2^(e−B).
# Each truncation loses less than 2^(e−B): for K summands the sum is off by less than
# K·2^(e−B) ≤ K·2^(1−B)·max_k |x_k| (docs/performance.md, "Worker-side aggregation").
FIXED_POINT_BITS = 42                 # B
MAX_CONTRIBUTIONS = 2 ** 20           # summands per element: |Σ q| < 2^20·2^42 = 2^62, no int64 overflow
MAX_SUM_WEIGHT = 2 ** 29              # w·θ is exact in float64 for float32 θ (24 + 29 = 53 bits)
NO_SUMMAND = int(np.iinfo(np.int16).min)   # the exponent of an element without a nonzero summand


class FixedPointSum:
    """Per element of the tensors ``shapes``, the numerator Σ_k w_k·m_k·θ_k and the votes
    Σ_k w_k·m_k over uploads k (m_k: the upload's mask of the tensor, 1 where it sends none; w_k a
    non-negative integer), with the same bits however the uploads are split into groups.

    All at once: ``fixed_point_average``. In groups (each worker rank its own clients):

    1. ``scales(updates, weights)`` per group, combined by an element-wise maximum (MPI MAX);
    2. ``partial_sums(updates, weights, scales)`` per group with the combined scales, combined by
       int64 addition (MPI SUM);
    3. ``average(sums, scales, reference, missing)`` once.

    The scales (int16) hold per element the exponent e, then per tensor a flag, 1 when some upload
    masks it. The sums (int64) hold the quantised numerators per element, then the votes: per
    element for a masked tensor, one number for an unmasked one (all its elements share it).
    Sliced uploads (HeteroFL blocks) are not supported. With ``own_scales``, elements whose
    summands all lie on the grid are summed with one float64 add per upload (``_on_grid_sum``):
    the same integers.
    """

    def __init__(self, shapes: Mapping[str, tuple]):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self.names = list(self.shapes)
        self.segments: dict[str, slice] = {}
        start = 0
        for name, shape in self.shapes.items():
            self.segments[name] = slice(start, start + math.prod(shape))
            start += math.prod(shape)
        self.size = start

    # -- phase 1 ------------------------------------------------------------------------------
    def scales(self, updates: list[ModelUpdate], weights: list[int], labels: list | None = None) -> np.ndarray:
        """This group's per-element maximum exponents and per-tensor mask flags (int16).

        The largest exponent over the summands is the exponent of the largest |summand| (frexp's
        exponent grows with |x|), so only max_k |w_k·θ_k| per element is kept, and frexp runs once
        per tensor (``_largest``)."""
        weights = _checked_sum_weights(weights, len(updates))
        scales = np.full(self.size + len(self.names), NO_SUMMAND, dtype=np.int16)
        exponents, masked = scales[:self.size], scales[self.size:]
        masked[:] = 0
        for t, name in enumerate(self.names):
            # every holder sent the same mask (FedDST between readjustments): its positions only
            positions = _shared_packed_positions(updates, name)
            largest, any_masked = self._largest(updates, weights, labels, name, positions)
            masked[t] = int(any_masked or positions is not None)
            if not np.all(np.isfinite(largest)):
                self._raise_not_finite(updates, weights, labels, name)
            _, exponent = np.frexp(largest)                  # int32 in [-1073, 1025]; 0 for 0
            exponent[largest == 0] = NO_SUMMAND              # a zero must not widen the grid
            if positions is None:
                exponents[self.segments[name]] = exponent.astype(np.int16)
            else:
                exponents[self.segments[name]][positions] = exponent.astype(np.int16)   # elsewhere NO_SUMMAND
        return scales

    # -- phase 2 ------------------------------------------------------------------------------
    def partial_sums(self, updates: list[ModelUpdate], weights: list[int], scales: np.ndarray,
                     labels: list | None = None, *, own_scales: np.ndarray | None = None) -> np.ndarray:
        """This group's Σ q_k per element and its votes (int64), on the grid of the round's scales.

        ``own_scales``: what ``scales`` gave for these same updates. When the round's scales are
        at least those everywhere, no summand can leave the grid, which is checked once here
        instead of on every upload."""
        if len(updates) > MAX_CONTRIBUTIONS:
            raise ValueError(f"{len(updates)} uploads in one fixed-point sum; at most {MAX_CONTRIBUTIONS} "
                             f"(2^20) fit in int64")
        weights = _checked_sum_weights(weights, len(updates))
        exponents, masked, vote_segments = self._layout(scales)
        if own_scales is not None:
            own_exponents, own_masked, _ = self._layout(own_scales)
            if np.any(exponents < own_exponents) or np.any(own_masked & ~masked):
                raise ValueError("the round's scales are below this group's own: combine the groups' scales "
                                 "with an element-wise maximum")
        sums = np.zeros(vote_segments[self.names[-1]].stop if self.names else 0, dtype=np.int64)
        self._quantise_into(updates, weights, labels, exponents, masked, vote_segments, sums,
                            check_range=own_scales is None)
        return sums

    def _quantise_into(self, updates, weights, labels, exponents, masked, vote_segments, sums, *, check_range: bool):
        """Phase 2's work: add each upload's quantised summands and votes into ``sums``;
        ``check_range``: check that every upload stays on the grid (else the scales were checked once)."""
        numerators = sums[:self.size]
        for t, name in enumerate(self.names):
            segment = self.segments[name]
            # 2^(B−e) per element, an exact power of two in [2^-115, 2^190] for every exponent a
            # summand can have (w·θ: float32 θ, w ≤ 2^29); 1 where no summand is nonzero (every
            # x is 0 there)
            e = exponents[segment].astype(np.int32)
            positions = _shared_packed_positions(updates, name)
            if positions is not None:
                if not masked[t]:
                    raise ValueError(f"{name}: uploads have a mask the scales did not see; compute the "
                                     f"scales over every upload of the round")
                e = e[positions]
            factor = np.ldexp(1.0, np.where(e == NO_SUMMAND, 0, FIXED_POINT_BITS - e))
            # (k, w, flat values, flat mask or None) of the uploads holding the tensor
            held_by = []
            for k, w in enumerate(weights):
                taken = self._flat_values(updates[k], name, _label(labels, k), positions)
                if taken is None:
                    continue
                if taken[1] is not None and not masked[t]:
                    raise ValueError(f"{name}: upload {_label(labels, k)} has a mask the scales did not see; "
                                     f"compute the scales over every upload of the round")
                held_by.append((k, w, *taken))
            if not check_range and _on_grid_candidates(held_by):
                quantised_sum = _on_grid_sum(held_by, e, factor, labels, name)
            else:
                quantised_sum = _quantised_sum(held_by, factor, labels, name, check_range=check_range)
            votes = sums[vote_segments[name]]
            if positions is None:
                numerators[segment] += quantised_sum
                for _, w, _, held in held_by:
                    if held is None:
                        votes += w
                    else:
                        np.add(votes, w, out=votes, where=held)
            else:   # the same integers as element by element over the whole tensor, where every other element adds 0
                if votes.size != segment.stop - segment.start:
                    raise ValueError(f"{name}: masked uploads but one vote for the whole tensor")
                numerators[segment][positions] += quantised_sum
                votes[positions] += sum(w for _, w, _, _ in held_by)

    # -- the result ---------------------------------------------------------------------------
    def average(self, sums: np.ndarray, scales: np.ndarray, reference: Mapping[str, np.ndarray],
                missing: str = "keep") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """numerator / votes per element, cast like ``average_over_holders`` (same ``missing``
        policy and dtypes); returns (averaged tensors, float64 votes per tensor)."""
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing={missing!r}; expected one of {MISSING_POLICIES}")
        exponents, _, vote_segments = self._layout(scales)
        averaged, votes = {}, {}
        for name, ref in reference.items():
            ref = np.asarray(ref)
            if self.shapes.get(name) != ref.shape:
                raise ValueError(f"{name}: reference shape {ref.shape}, summed {self.shapes.get(name)}")
            segment = self.segments[name]
            numerator = np.ldexp(sums[segment].astype(np.float64), exponents[segment].astype(np.int32) - FIXED_POINT_BITS)
            denominator = sums[vote_segments[name]].astype(np.float64)    # exact below 2^53
            if denominator.size != numerator.size:
                denominator = np.full(numerator.size, denominator[0])
            held = denominator > 0
            result = ref.copy() if missing == "keep" else np.zeros_like(ref)
            flat = result.reshape(-1)
            flat[held] = _cast(numerator[held] / denominator[held], ref.dtype)
            averaged[name], votes[name] = result, denominator.reshape(ref.shape)
        return averaged, votes

    # -- helpers ------------------------------------------------------------------------------
    def _layout(self, scales: np.ndarray):
        """(exponents, mask flags, per tensor its slice of the votes) from the round's scales."""
        if scales.dtype != np.int16 or scales.size != self.size + len(self.names):
            raise ValueError(f"scales must be int16 of {self.size + len(self.names)} entries, got "
                             f"{scales.dtype} of {scales.size}")
        masked = scales[self.size:].astype(bool)
        vote_segments, start = {}, self.size
        for t, name in enumerate(self.names):
            count = self.segments[name].stop - self.segments[name].start if masked[t] else 1
            vote_segments[name] = slice(start, start + count)
            start += count
        return scales[:self.size], masked, vote_segments

    def _flat_values(self, update: ModelUpdate, name: str, label, positions: np.ndarray | None):
        """(θ flat, flat mask or None) of one upload's tensor, or None when it lacks the tensor.
        ``positions``: the shared mask's positions, whose packed values are taken instead."""
        if name not in update.values:
            return None
        if positions is not None:
            if np.shape(update.masks[name]) != self.shapes[name]:
                raise ValueError(f"{name}: upload {label} has shape {np.shape(update.masks[name])}, "
                                 f"expected {self.shapes[name]}")
            return np.asarray(update.packed[name][1]), None
        if name in update.slices:
            raise ValueError(f"{name}: upload {label} is a slice; the fixed-point sum takes whole tensors only")
        values = np.asarray(update.values[name])
        if values.shape != self.shapes[name]:
            raise ValueError(f"{name}: upload {label} has shape {values.shape}, expected {self.shapes[name]}")
        held = update.masks.get(name)
        if held is not None:
            held = np.asarray(held, dtype=bool).reshape(-1)
            if held.size != values.size:
                raise ValueError(f"{name}: upload {label} has a mask of {held.size} entries for {values.size} values")
        return values.reshape(-1), held

    def _largest(self, updates, weights, labels, name: str, positions: np.ndarray | None):
        """(max_k |w_k·θ_k| per element as float64, whether some upload masks the tensor).

        Per distinct weight w, the running maximum of |θ_k| is kept in float32 for float32 θ
        (|θ| and the maximum are exact there, at half the memory traffic of float64), then
        multiplied by w once (exact in float64): the same number as the maximum of the float64
        products. Other dtypes take w·|θ| in float64 per upload. NaN propagates: found by the
        caller."""
        size = positions.size if positions is not None else self.segments[name].stop - self.segments[name].start
        largest = np.zeros(size, dtype=np.float64)
        magnitude = np.empty(size, dtype=np.float32)
        running = np.empty(size, dtype=np.float32)
        x = None
        any_masked = False
        for w, group in _by_weight(weights):
            running.fill(0)
            for k in group:
                taken = self._flat_values(updates[k], name, _label(labels, k), positions)
                if taken is None:
                    continue
                values, held = taken
                any_masked |= held is not None
                if values.dtype == np.float32:
                    np.abs(values, out=magnitude)
                    if held is not None:
                        np.copyto(magnitude, 0, where=~held)    # ignored outside the mask, even if not finite
                    np.maximum(running, magnitude, out=running)
                else:
                    x = np.empty(size, dtype=np.float64) if x is None else x
                    np.multiply(values, np.float64(w), out=x, dtype=np.float64)
                    np.abs(x, out=x)
                    if held is not None:
                        np.copyto(x, 0.0, where=~held)
                    np.maximum(largest, x, out=largest)
            np.maximum(largest, np.multiply(running, np.float64(w), dtype=np.float64), out=largest)
        return largest, any_masked

    def _raise_not_finite(self, updates, weights, labels, name: str):
        positions = _shared_packed_positions(updates, name)
        for k, update in enumerate(updates):
            taken = self._flat_values(update, name, _label(labels, k), positions)
            if taken is None:
                continue
            values, held = taken
            summands = np.multiply(values, np.float64(weights[k]), dtype=np.float64)
            if not np.all(np.isfinite(summands if held is None else summands[held])):
                raise ValueError(f"tensor {name!r} of upload {_label(labels, k)} holds NaN or inf: the "
                                 f"fixed-point sum needs finite values")
        raise AssertionError("unreachable: a non-finite maximum without a non-finite summand")


@dataclass
class RoundSums:
    """The round's fixed-point sums as the ranks reduced them (``aggregation.where: workers``):
    ``Algorithm.merge_over_holders`` averages these instead of decoded uploads."""

    summer: FixedPointSum
    sums: np.ndarray
    scales: np.ndarray

    def average(self, reference: Mapping[str, np.ndarray], missing: str = "keep"):
        return self.summer.average(self.sums, self.scales, reference, missing)


def fixed_point_average(updates: list[ModelUpdate], weights: list[int], reference: Mapping[str, np.ndarray],
                        missing: str = "keep") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``average_over_holders`` with ``FixedPointSum``, all at once: the reference the worker
    ranks' two phases reproduce bit for bit."""
    summer = FixedPointSum({name: np.shape(ref) for name, ref in reference.items()})
    scales = summer.scales(updates, weights)
    return summer.average(summer.partial_sums(updates, weights, scales, own_scales=scales), scales, reference, missing)


def _quantised_sum(held_by, factor: np.ndarray, labels, name: str, *, check_range: bool) -> np.ndarray:
    """Σ_k trunc(w_k·θ_k·2^(B−e)) per element (int64) over ``held_by`` (k, w, values, mask or None)."""
    limit = 2.0 ** FIXED_POINT_BITS
    quantised_sum = np.zeros(factor.size, dtype=np.int64)
    x = np.empty(factor.size, dtype=np.float64)
    x_t, quantised_t = torch.from_numpy(x), torch.empty(factor.size, dtype=torch.int64)
    quantised_sum_t = torch.from_numpy(quantised_sum)
    for w, group in _by_weight([w for _, w, _, _ in held_by]):
        # w·2^(B−e) is exact, and so is θ·(w·2^(B−e)) (w·θ fits float64's 53 bits; a power
        # of two only moves the exponent): the bits of ldexp(w·θ, B − e), in one pass
        scaled_t = torch.from_numpy(factor * np.float64(w))
        for i in group:
            k, _, values, held = held_by[i]
            # torch's kernels for the three passes: the same IEEE products and C casts as
            # numpy's, about twice as fast on float32·float64 and float → int64
            torch.mul(tensor_view(values), scaled_t, out=x_t)
            if held is not None:
                np.copyto(x, 0.0, where=~held)    # values outside the mask are ignored, even if not finite
            if check_range and x.size and not (x.max() < limit and x.min() > -limit):
                raise ValueError(f"{name}: upload {_label(labels, k)} exceeds its elements' scales; "
                                 f"compute the scales over every upload of the round")
            # the float → int64 cast truncates toward zero: trunc(x·2^(B−e)), |q| < 2^B
            quantised_t.copy_(x_t)
            quantised_sum_t += quantised_t
    return quantised_sum


# a float64 running sum of on-grid summands is exact while |Σ| < 2^53 units: 2^(53−B) summands
ON_GRID_MAX_SUMMANDS = 2 ** (53 - FIXED_POINT_BITS)
# a float32 θ with |θ| ≥ 2^(e−19) has its lowest bit at ≥ 2^(e−19−23) = 2^(e−B): on the grid
ON_GRID_MARGIN = FIXED_POINT_BITS - 23


def _on_grid_candidates(held_by) -> bool:
    """Whether ``_on_grid_sum`` applies: unmasked float32 values, few enough summands."""
    summands = sum(1 for _, w, _, _ in held_by if w)
    return 0 < summands <= ON_GRID_MAX_SUMMANDS and all(
        held is None and values.dtype == np.float32 for _, _, values, held in held_by)


def _on_grid_sum(held_by, e: np.ndarray, factor: np.ndarray, labels, name: str) -> np.ndarray:
    """``_quantised_sum``'s integers in one pass per upload where no truncation happens.

    Where every summand's |θ_k| ≥ 2^(e−19), each w_k·θ_k (integer w_k) is a multiple of the grid
    step 2^(e−B), so trunc does nothing and the float64 running sum Σ w_k·θ_k stays exact (at most
    2^11 summands below 2^e each: below 2^53 steps): scaled by 2^(B−e), it is the int64 sum. The
    few elements with a smaller summand (a value near zero next to larger ones) are redone by
    ``_quantised_sum``. One add per upload instead of a multiply, a cast and an add, with the
    running minimum of |θ| as the test."""
    total = torch.zeros(factor.size, dtype=torch.float64)
    smallest = torch.full((factor.size,), np.inf, dtype=torch.float32)
    for _, w, values, _ in held_by:
        if w:
            theta = tensor_view(values)
            total.add_(theta, alpha=float(w))     # w·θ is exact in float64, and so is the running sum here
            torch.minimum(smallest, theta.abs(), out=smallest)
    quantised_sum = (total.numpy() * factor).astype(np.int64)      # exact: integers below 2^53
    # 2^(e−19) in float64 (0 where no summand is nonzero: every value there is 0 and on the grid)
    threshold = np.ldexp(1.0, np.where(e == NO_SUMMAND, -1100, e - ON_GRID_MARGIN))
    off_grid = np.flatnonzero(smallest.numpy() < threshold)
    if off_grid.size:
        quantised_sum[off_grid] = _quantised_sum([(k, w, values[off_grid], None) for k, w, values, _ in held_by],
                                                 factor[off_grid], labels, name, check_range=False)
    return quantised_sum


def _shared_packed_positions(updates: list[ModelUpdate], name: str) -> np.ndarray | None:
    """The positions array every upload holding ``name`` has it packed at (one and the same
    array, whole tensors), or None."""
    holders = [u for u in updates if name in u.values]
    if not holders or any(name in u.slices or name not in u.packed for u in holders):
        return None
    positions = holders[0].packed[name][0]
    return positions if all(u.packed[name][0] is positions for u in holders) else None


def _checked_sum_weights(weights, count: int) -> list[int]:
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} uploads")
    for k, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or not 0 <= w <= MAX_SUM_WEIGHT:
            raise ValueError(f"weight {w!r} of upload {k}: the fixed-point sum needs integer weights in "
                             f"[0, 2^29]")
    return [int(w) for w in weights]


def _by_weight(weights: list[int]) -> list[tuple[int, list[int]]]:
    """The uploads' indices grouped by weight (first appearance order): integer sums do not
    depend on the order, and per distinct weight some work is done once."""
    groups: dict[int, list[int]] = {}
    for k, w in enumerate(weights):
        groups.setdefault(w, []).append(k)
    return list(groups.items())


def _label(labels, k: int):
    return k if labels is None else labels[k]
