"""The reproducible fixed-point sum (``aggregation.sum: fixed_point``): per element the same bits
whatever the order and grouping of the uploads, so the worker ranks can sum their own clients.
The grid and the sums on it: ``quantise.py``."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..update import ModelUpdate
from .common import MISSING_POLICIES, _cast, _shared_packed_positions
from .quantise import (FIXED_POINT_BITS, MAX_CONTRIBUTIONS, MAX_SUM_WEIGHT, NO_SUMMAND, GridPass, _by_weight,
                       _label, _on_grid_candidates, _on_grid_sum, _quantised_sum, chunks, grid_pass)


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
        """This group's per-element maximum exponents and per-tensor mask flags (int16)."""
        return self.first_pass(updates, weights, labels).scales

    def first_pass(self, updates: list[ModelUpdate], weights: list[int], labels: list | None = None) -> "FirstPass":
        """This group's scales (``scales``), and for tensors whose uploads are all unmasked float32
        the on-grid running sums of the same pass (``grid_pass``), for ``partial_sums(own=...)``.

        The largest exponent over the summands is the exponent of the largest |summand| (frexp's
        exponent grows with |x|), so only max_k |w_k·θ_k| per element is kept, and frexp runs once
        per tensor."""
        weights = _checked_sum_weights(weights, len(updates))
        scales = np.full(self.size + len(self.names), NO_SUMMAND, dtype=np.int16)
        exponents, masked = scales[:self.size], scales[self.size:]
        masked[:] = 0
        grid = {}
        for t, name in enumerate(self.names):
            # every holder sent the same mask (FedDST between readjustments): its positions only
            positions = _shared_packed_positions(updates, name)
            held_by = self._held_by(updates, weights, labels, name, positions)
            if _on_grid_candidates(held_by):    # one pass for the maxima and the running sums
                done = grid[name] = grid_pass([v for _, _, v, _ in held_by], [w for _, w, _, _ in held_by])
                largest, finite, any_masked = done.largest, done.finite, False
            else:
                largest, any_masked = self._largest(held_by, positions, name)
                finite = bool(np.all(np.isfinite(largest)))
            masked[t] = int(any_masked or positions is not None)
            if not finite:
                self._raise_not_finite(updates, weights, labels, name)
            _, exponent = np.frexp(largest)                  # int32 in [-1073, 1025]; 0 for 0
            exponent[largest == 0] = NO_SUMMAND              # a zero must not widen the grid
            if positions is None:
                exponents[self.segments[name]] = exponent.astype(np.int16)
            else:
                exponents[self.segments[name]][positions] = exponent.astype(np.int16)   # elsewhere NO_SUMMAND
        return FirstPass(scales, tuple(weights), len(updates), grid)

    # -- phase 2 ------------------------------------------------------------------------------
    def partial_sums(self, updates: list[ModelUpdate], weights: list[int], scales: np.ndarray,
                     labels: list | None = None, *, own_scales: np.ndarray | None = None,
                     own: "FirstPass | None" = None) -> np.ndarray:
        """This group's Σ q_k per element and its votes (int64), on the grid of the round's scales.

        ``own_scales``: what ``scales`` gave for these same updates; ``own``: what ``first_pass``
        gave for them (its scales, and its running sums, which spare a second pass). When the
        round's scales are at least this group's own everywhere, no summand can leave the grid,
        which is checked once here instead of on every upload."""
        if len(updates) > MAX_CONTRIBUTIONS:
            raise ValueError(f"{len(updates)} uploads in one fixed-point sum; at most {MAX_CONTRIBUTIONS} "
                             f"(2^20) fit in int64")
        weights = _checked_sum_weights(weights, len(updates))
        if own is not None:
            if own.weights != tuple(weights) or own.uploads != len(updates):
                raise ValueError("own: the first pass of other uploads or weights")
            own_scales = own.scales
        exponents, masked, vote_segments = self._layout(scales)
        if own_scales is not None:
            own_exponents, own_masked, _ = self._layout(own_scales)
            if np.any(exponents < own_exponents) or np.any(own_masked & ~masked):
                raise ValueError("the round's scales are below this group's own: combine the groups' scales "
                                 "with an element-wise maximum")
        sums = np.zeros(vote_segments[self.names[-1]].stop if self.names else 0, dtype=np.int64)
        self._quantise_into(updates, weights, labels, exponents, masked, vote_segments, sums,
                            check_range=own_scales is None, grid=own.grid if own is not None else {})
        return sums

    def _quantise_into(self, updates, weights, labels, exponents, masked, vote_segments, sums, *, check_range: bool,
                       grid: dict):
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
            held_by = self._held_by(updates, weights, labels, name, positions)
            for k, _, _, held in held_by:
                if held is not None and not masked[t]:
                    raise ValueError(f"{name}: upload {_label(labels, k)} has a mask the scales did not see; "
                                     f"compute the scales over every upload of the round")
            if not check_range and _on_grid_candidates(held_by):
                quantised_sum = _on_grid_sum(held_by, e, factor, labels, name, grid.get(name))
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

    def _held_by(self, updates, weights, labels, name: str, positions) -> list[tuple]:
        """(k, w, flat values, flat mask or None) of the uploads holding the tensor."""
        return [(k, w, *taken) for k, w in enumerate(weights)
                if (taken := self._flat_values(updates[k], name, _label(labels, k), positions)) is not None]

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

    def _largest(self, held_by: list[tuple], positions: np.ndarray | None, name: str):
        """(max_k |w_k·θ_k| per element as float64, whether some upload masks the tensor), over
        ``held_by`` (``_held_by``'s uploads of tensor ``name``).

        Per distinct weight w, the running maximum of |θ_k| is kept in float32 for float32 θ
        (|θ| and the maximum are exact there, at half the memory traffic of float64), then
        multiplied by w once (exact in float64): the same number as the maximum of the float64
        products. Other dtypes take w·|θ| in float64 per upload. NaN propagates: found by the
        caller."""
        size = positions.size if positions is not None else self.segments[name].stop - self.segments[name].start
        groups, any_masked = [], False          # (w, [(flat θ, flat mask or None), ...]) per distinct weight
        for w, group in _by_weight([w for _, w, _, _ in held_by]):
            taken = [held_by[i][2:] for i in group]
            any_masked |= any(held is not None for _, held in taken)
            groups.append((np.float64(w), taken))
        largest = np.zeros(size, dtype=np.float64)
        spans = chunks(size)
        width = spans[0].stop if spans else 0
        magnitude, running = np.empty(width, dtype=np.float32), np.empty(width, dtype=np.float32)
        x = np.empty(width, dtype=np.float64)
        for span in spans:                       # every upload per chunk, as _on_grid_sum
            n = span.stop - span.start
            largest_c, magnitude_c, running_c, x_c = largest[span], magnitude[:n], running[:n], x[:n]
            for w, taken in groups:
                running_c.fill(0)
                for values, held in taken:
                    values_c, held_c = values[span], None if held is None else held[span]
                    if values.dtype == np.float32:
                        np.abs(values_c, out=magnitude_c)
                        if held_c is not None:
                            np.copyto(magnitude_c, 0, where=~held_c)   # ignored outside the mask, even if not finite
                        np.maximum(running_c, magnitude_c, out=running_c)
                    else:
                        np.multiply(values_c, w, out=x_c, dtype=np.float64)
                        np.abs(x_c, out=x_c)
                        if held_c is not None:
                            np.copyto(x_c, 0.0, where=~held_c)
                        np.maximum(largest_c, x_c, out=largest_c)
                np.maximum(largest_c, np.multiply(running_c, w, dtype=np.float64), out=largest_c)
        return largest, any_masked

    def _raise_not_finite(self, updates, weights, labels, name: str):
        positions = _shared_packed_positions(updates, name)
        for k, update in enumerate(updates):
            taken = self._flat_values(update, name, _label(labels, k), positions)
            if taken is None:
                continue
            values, held = taken
            with np.errstate(invalid="ignore"):     # 0·inf: NaN, which is what is looked for
                summands = np.multiply(values, np.float64(weights[k]), dtype=np.float64)
            if not np.all(np.isfinite(summands if held is None else summands[held])):
                raise ValueError(f"tensor {name!r} of upload {_label(labels, k)} holds NaN or inf: the "
                                 f"fixed-point sum needs finite values")
        raise AssertionError("unreachable: a non-finite maximum without a non-finite summand")


@dataclass
class FirstPass:
    """``FixedPointSum.first_pass``'s result: the group's ``scales``, the ``weights`` and number of
    ``uploads`` it saw, and per tensor its ``grid_pass`` (the on-grid running sums)."""

    scales: np.ndarray
    weights: tuple
    uploads: int
    grid: dict[str, GridPass]


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
    first = summer.first_pass(updates, weights)
    return summer.average(summer.partial_sums(updates, weights, first.scales, own=first), first.scales, reference,
                          missing)


def _checked_sum_weights(weights, count: int) -> list[int]:
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} uploads")
    for k, w in enumerate(weights):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)) or not 0 <= w <= MAX_SUM_WEIGHT:
            raise ValueError(f"weight {w!r} of upload {k}: the fixed-point sum needs integer weights in "
                             f"[0, 2^29]")
    return [int(w) for w in weights]
