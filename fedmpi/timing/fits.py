"""Fitting measured layer times (measure.py): least-squares lines of step time against nonzero
weights, the break-even density below which a sparse kernel beats the dense one, and the
measured profile built from them (``build_profile``)."""
from __future__ import annotations

import statistics

import numpy as np

from .measure import LayerTimes
from .profiles import LayerLine, MeasuredLayer, MeasuredProfile

# Sparse kernels are fitted on densities up to this (when two or more were measured there): the
# regime where one can beat the dense kernel; at high density their cost bends away from a line
# (the index traffic, the dense weight's memory), and above the break-even the dense kernel runs.
SPARSE_FIT_MAX_DENSITY = 0.5


def fit_line(nnz, seconds) -> LayerLine:
    """Least-squares line; slope and intercept kept non-negative (a negative slope — noise on a
    flat dense kernel — becomes a flat line at the median; a negative intercept a line through 0)."""
    x = np.asarray(nnz, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return LayerLine(float(np.median(y)), 0.0)
    slope, intercept = np.polyfit(x, y, 1)
    if slope < 0:
        return LayerLine(float(np.median(y)), 0.0)
    if intercept < 0:
        return LayerLine(0.0, float(np.dot(x, y) / np.dot(x, x)))
    return LayerLine(float(intercept), float(slope))


def fit_sparse(times: LayerTimes, kernel: str) -> LayerLine:
    """The line of a sparse kernel, fitted on densities <= SPARSE_FIT_MAX_DENSITY if two or more."""
    points = [(n, t) for d, n, t in zip(times.densities, times.nnz, times.medians(kernel))
              if d <= SPARSE_FIT_MAX_DENSITY]
    if len(points) < 2:
        return fit_line(times.nnz, times.medians(kernel))
    return fit_line([n for n, _ in points], [t for _, t in points])


def break_even(dense: LayerLine, sparse: LayerLine, numel: int) -> float:
    """Density below which the ``sparse`` line is below the ``dense`` line, in [0, 1]."""
    if sparse.slope <= dense.slope:
        return 1.0 if sparse(numel) < dense(numel) else (0.0 if sparse(0) >= dense(0) else 1.0)
    crossing = (dense.intercept - sparse.intercept) / (sparse.slope - dense.slope)
    return float(min(1.0, max(0.0, crossing / numel)))


def measured_crossover(times: LayerTimes, kernel: str = "sparse") -> float | None:
    """The largest measured density at which ``kernel``'s median beats dense's, with every lower
    density beating it too (None: not even the lowest)."""
    dense, sparse = times.medians("dense"), times.medians(kernel)
    best = None
    for d, a, b in zip(times.densities, dense, sparse):
        if b < a:
            best = d
        else:
            break
    return best


def build_profile(name: str, model_name: str, input_shape, num_classes: int, batch_size: int,
                  layer_times: dict[str, LayerTimes], model_step: list[float], *, uplink: float,
                  downlink: float, latency: float = 0.0, overhead: list[float] | None = None,
                  description: str = "", extra: dict | None = None) -> MeasuredProfile:
    """Fit the lines, the break-even densities and the rest of the step (the whole model's dense
    ``model_step`` minus its layers' dense medians) into a profile; ``overhead``: per-round
    measurements (their median)."""
    layers = {}
    dense_sum = 0.0
    for lname, lt in layer_times.items():
        dense = fit_line(lt.nnz, lt.medians("dense"))
        dense_sum += statistics.median(lt.medians("dense"))
        sparse = fit_sparse(lt, "sparse") if "sparse" in lt.times else None
        active = fit_sparse(lt, "sparse_active") if "sparse_active" in lt.times else None
        layers[lname] = MeasuredLayer(
            shape=lt.shape, dense=dense, sparse=sparse, sparse_active=active,
            break_even=break_even(dense, sparse, lt.numel) if sparse else 0.0,
            break_even_active=break_even(dense, active, lt.numel) if active else 0.0)
    other = max(0.0, statistics.median(model_step) - dense_sum)
    return MeasuredProfile(name=name, path="", model=model_name, input_shape=tuple(input_shape),
                           num_classes=num_classes, batch_size=batch_size, other_seconds=other,
                           layers=layers, uplink_bytes_per_second=uplink, downlink_bytes_per_second=downlink,
                           latency_seconds=latency, description=description, extra=extra or {},
                           overhead_seconds=statistics.median(overhead) if overhead else 0.0)
