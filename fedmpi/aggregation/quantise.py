"""The fixed-point grid and the integer sums on it, for ``FixedPointSum`` (``fixed_point.py``):
the truncating sum (``_quantised_sum``), the one pass over a group's uploads that gives the
scales' maxima and the sums where nothing is truncated (``grid_pass``, in C where
``grid_pass.c`` is built), and those sums' integers (``_on_grid_sum``)."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from .. import native
from ..update import tensor_view

# grid_pass.c, loaded at the first sum (native.Library says why not at import)
GRID_PASS = native.Library("fedmpi.aggregation._grid_pass", {
    "fedmpi_grid_pass": ([ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 5, ctypes.c_int),
    "fedmpi_off_grid_sum": ([ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4, None),
})

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
# Elements per chunk where every upload is added chunk by chunk: the chunk's running values
# (float64 sum, float32 minimum and scratch: 1 MiB) stay in a core's L2 while the uploads stream
# through, instead of going to memory once per upload; fewer, larger chunks cost fewer calls
# (2^16 ran the overhead workload's rounds 3 % faster than 2^14: bench/perf/ab.py). The same
# operations per element in the same order: the same bits.
CHUNK = 1 << 16


def chunks(size: int) -> list[slice]:
    """The element ranges (of at most ``CHUNK``) the sums take every upload through, in order."""
    return [slice(start, min(start + CHUNK, size)) for start in range(0, size, CHUNK)]


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


@dataclass
class GridPass:
    """One pass over a group's float32 uploads of a tensor (``grid_pass``), per element:
    ``largest`` max_k w_k·|θ_k| (float64, every upload), ``total`` Σ w_k·θ_k and ``smallest``
    min |θ_k| (float64, float32; uploads with w_k > 0), ``finite``: every w_k·|θ_k| is finite."""

    largest: np.ndarray
    total: np.ndarray
    smallest: np.ndarray
    finite: bool


def grid_pass(thetas: list[np.ndarray], weights: list[int]) -> GridPass:
    """``GridPass`` of flat float32 arrays of one size, every upload per chunk (the running
    values stay in cache): grid_pass.c where it is built, else numpy and torch, the same numbers.
    The maxima and minima are exact; the totals are exact where ``_on_grid_finish`` uses them."""
    size = thetas[0].size if thetas else 0
    largest, total = np.zeros(size), np.zeros(size)
    smallest = np.full(size, np.inf, dtype=np.float32)
    lib = GRID_PASS.get()
    if lib is not None and thetas:
        # the uploads in the order the numpy path takes them (by weight): the same totals' bits
        # even where they are not exact (those elements are redone, but a test compares them)
        order = [k for _, group in _by_weight(weights) for k in group]
        flat = [np.ascontiguousarray(thetas[k]) for k in order]
        w = np.asarray([weights[k] for k in order], dtype=np.float64)
        bad = lib.fedmpi_grid_pass(size, len(flat), native.pointers(flat), w.ctypes.data, largest.ctypes.data,
                                   total.ctypes.data, smallest.ctypes.data)
        return GridPass(largest, total, smallest, not bad)
    total_t, smallest_t = torch.from_numpy(total), torch.from_numpy(smallest)
    spans = chunks(size)
    width = spans[0].stop if spans else 0
    magnitude, running = torch.empty(width, dtype=torch.float32), torch.empty(width, dtype=torch.float32)
    groups = [(float(w), [tensor_view(thetas[k]) for k in group]) for w, group in _by_weight(weights)]
    for span in spans:
        n = span.stop - span.start
        largest_c, total_c, smallest_c = largest[span], total_t[span], smallest_t[span]
        magnitude_c, running_c = magnitude[:n], running[:n]
        for w, group in groups:
            running_c.fill_(0)
            for theta in group:
                theta_c = theta[span]
                torch.abs(theta_c, out=magnitude_c)
                torch.maximum(running_c, magnitude_c, out=running_c)     # NaN propagates
                if w:
                    total_c.add_(theta_c, alpha=w)    # w·θ is exact in float64
                    torch.minimum(smallest_c, magnitude_c, out=smallest_c)
            # max_k |θ_k| of the weight's group, times w once: exact in float64 (0·inf: NaN, found)
            with np.errstate(invalid="ignore"):
                np.maximum(largest_c, np.multiply(running_c.numpy(), w, dtype=np.float64), out=largest_c)
    return GridPass(largest, total, smallest, bool(np.all(np.isfinite(largest))))


def _on_grid_sum(held_by, e: np.ndarray, factor: np.ndarray, labels, name: str,
                 done: GridPass | None = None) -> np.ndarray:
    """``_quantised_sum``'s integers with one add per upload where no truncation happens.

    Where every summand's |θ_k| ≥ 2^(e−19), each w_k·θ_k (integer w_k) is a multiple of the grid
    step 2^(e−B), so trunc does nothing and the float64 running sum Σ w_k·θ_k stays exact (at most
    2^11 summands below 2^e each: below 2^53 steps): scaled by 2^(B−e), it is the int64 sum. The
    few elements with a smaller summand (a value near zero next to larger ones) are redone by
    ``_quantised_sum``. The sums and the running minimum of |θ| come from ``grid_pass``
    (``done``: the pass the scales already made over these uploads)."""
    if done is None:
        done = grid_pass([values for _, _, values, _ in held_by], [w for _, w, _, _ in held_by])
    quantised_sum = (done.total * factor).astype(np.int64)      # exact: integers below 2^53
    # 2^(e−19) in float64 (0 where no summand is nonzero: every value there is 0 and on the grid)
    threshold = np.ldexp(1.0, np.where(e == NO_SUMMAND, -1100, e - ON_GRID_MARGIN))
    off_grid = np.flatnonzero(done.smallest < threshold)
    if off_grid.size:
        quantised_sum[off_grid] = _off_grid_sum(held_by, off_grid, factor[off_grid], labels, name)
    return quantised_sum


def _off_grid_sum(held_by, off_grid: np.ndarray, factor: np.ndarray, labels, name: str) -> np.ndarray:
    """``_quantised_sum`` of the elements ``off_grid`` (unmasked uploads, trusted scales): in C
    where grid_pass.c is built, the same integers."""
    lib = GRID_PASS.get()
    if lib is None:
        return _quantised_sum([(k, w, values[off_grid], None) for k, w, values, _ in held_by], factor, labels,
                              name, check_range=False)
    flat = [np.ascontiguousarray(values) for _, _, values, _ in held_by]
    w = np.asarray([w for _, w, _, _ in held_by], dtype=np.float64)
    factor, index = np.ascontiguousarray(factor), np.ascontiguousarray(off_grid, dtype=np.int64)
    out = np.empty(off_grid.size, dtype=np.int64)
    lib.fedmpi_off_grid_sum(off_grid.size, index.ctypes.data, len(flat), native.pointers(flat), w.ctypes.data,
                            factor.ctypes.data, out.ctypes.data)
    return out


def _by_weight(weights: list[int]) -> list[tuple[int, list[int]]]:
    """The uploads' indices grouped by weight (first appearance order): integer sums do not
    depend on the order, and per distinct weight some work is done once."""
    groups: dict[int, list[int]] = {}
    for k, w in enumerate(weights):
        groups.setdefault(w, []).append(k)
    return list(groups.items())


def _label(labels, k: int):
    return k if labels is None else labels[k]
