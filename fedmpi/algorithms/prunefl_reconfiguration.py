"""PruneFL's reconfiguration, as pure functions (spec step 4; the algorithm around it: prunefl.py).

- ``RoundTimeModel``: the round time T(m) = c₀ + Σ_l t_l · nnz_l(m) the reconfiguration trades
  importance against; ``round_time_model`` builds it from fedmpi.timing.
- ``reconfigure``: keep the largest active weights by |w|, then add candidates by decreasing
  importance per second while that raises Γ = Σ G / T (``greedy_count``, the exact maximiser over
  the candidate sets); ``gamma`` evaluates Γ of a mask.
- ``apply_new_masks``: the weights under the new mask.
- ``reconfigured_model``: the server's step, both together on the global model. PruneFL runs it
  after an upload round was evaluated (``PruneFL.prepare_next_round``): the evaluation sees the
  model the clients trained, and the next round downloads the new mask, as the authors' server
  does (``bases/fl/simulation/adaptive.py``: aggregate, evaluate, then ``control.adjust``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..sparsity import magnitude_masks


# --------------------------------------------------------------------------- time model

@dataclass(frozen=True)
class RoundTimeModel:
    """T(m) = c0 + Σ_l t[l] · nnz_l(m): seconds of one FL round of one client with mask m.

    ``t[l]`` is layer l's cost per active weight (its share of the round's local computation
    plus communicating one value); ``c0`` the fixed part. This is the interface PruneFL's
    reconfiguration needs; ``round_time_model`` builds it from fedmpi.timing."""

    c0: float
    t: Mapping[str, float]

    def __post_init__(self):
        bad = {n: v for n, v in self.t.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"per-parameter times must be positive and finite, got {bad}")
        if not (self.c0 >= 0 and math.isfinite(self.c0)):
            raise ValueError(f"c0 must be >= 0, got {self.c0}")

    def seconds(self, counts: Mapping[str, int]) -> float:
        return float(self.c0 + sum(self.t[n] * float(k) for n, k in counts.items()))


def round_time_model(cfg: dict, info, local_steps: int | None, client_id: int | None = None) -> RoundTimeModel:
    """c₀ and t_l of fedmpi.timing's linear model (``TimeModel.c0`` / ``.t``) for the profile of
    ``client_id`` (None: ``device.profile``) and a round of ``local_steps`` minibatch steps of
    ``local.batch_size`` samples (``local_steps`` None, i.e. epochs: one batch, as the round's
    size is not known here), with ``device.time_constant`` in c₀, as ``sim_seconds`` charges it.
    With adaptive pruning the FL round's clients gather importance, computing every weight's
    gradient: the model charges that (``dense_weight_gradients``: in c₀, as it does not depend on
    the mask). ``prunefl.time_constant`` ≥ 0 replaces c₀ of the objective only (not charged)."""
    from ..timing import RunTiming

    pf = cfg.get("prunefl", {})
    model = RunTiming.from_config(cfg, info).time_model(
        client_id, steps_per_round=local_steps or 1, batch_size=cfg["local"]["batch_size"],
        dense_weight_gradients=bool(pf.get("adaptive", True)))
    c0, t = model.c0, model.t
    override = pf.get("time_constant", -1.0)
    if override is not None and override >= 0:
        c0 = float(override)
    return RoundTimeModel(float(c0), {n: float(v) for n, v in t.items()})


# --------------------------------------------------------------------------- reconfiguration

def greedy_count(numerator: float, denominator: float, values: np.ndarray, costs: np.ndarray,
                 limit: int | None = None) -> int:
    """How many of the candidates (already sorted by values/costs, decreasing) the greedy adds:
    the longest prefix whose every item i satisfies values_i / costs_i > (num + Σ_{j<i} values_j)
    / (den + Σ_{j<i} costs_j). Once an item fails, every later one fails too (its ratio is no
    larger and the running ratio no smaller), so the prefix maximises (num + Σ values) /
    (den + Σ costs) over all subsets. ``limit`` caps the count (density cap)."""
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if values.size == 0:
        return 0
    before_v = numerator + np.concatenate(([0.0], np.cumsum(values[:-1])))
    before_c = denominator + np.concatenate(([0.0], np.cumsum(costs[:-1])))
    ok = values * before_c > costs * before_v
    count = int(values.size) if ok.all() else int(np.argmin(ok))
    return count if limit is None else max(0, min(count, int(limit)))


@dataclass
class Reconfiguration:
    masks: dict[str, np.ndarray]
    kept: dict[str, int]           # per layer: active weights kept by magnitude
    added: dict[str, int]          # per layer: candidates the greedy added
    objective: float               # Γ = Σ G / T of the new mask


def reconfigure(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                importance: Mapping[str, np.ndarray], drop_fraction: float, time_model: RoundTimeModel,
                *, dense_importance: float = 0.0, max_active: int | None = None) -> Reconfiguration:
    """PruneFL's RECONFIGURE over the layers in ``masks`` (spec step 4).

    Per layer with a active weights, the a − ⌊d·a⌋ largest |w| among them are kept; all other
    positions are candidates. num = ``dense_importance`` + Σ G over the kept weights, den = c₀ +
    Σ_l t_l · kept_l; candidates (all layers together) are added by decreasing G_j / t_l(j)
    while that exceeds num / den (``greedy_count``), at most ``max_active`` active weights in
    all. Ties: equal ratios keep layer order, then decreasing G, then the lower flat index."""
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop fraction {drop_fraction} outside [0, 1]")
    names = list(masks)
    counts = {}
    for name in names:
        active = int(np.count_nonzero(masks[name]))
        counts[name] = active - int(drop_fraction * active)
    kept_masks = magnitude_masks({n: weights[n] for n in names}, counts,
                                 within={n: masks[n] for n in names})
    numerator = float(dense_importance)
    denominator = float(time_model.c0)
    layer_of, positions, values, ratio_parts = [], [], [], []
    t_of = np.array([time_model.t[name] for name in names], dtype=np.float64)
    for i, name in enumerate(names):
        kept = kept_masks[name].reshape(-1)
        g = np.asarray(importance[name], dtype=np.float64).reshape(-1)
        numerator += float(g[kept].sum())
        denominator += time_model.t[name] * counts[name]
        candidates = np.flatnonzero(~kept)          # in (layer, flat index) order
        positions.append(candidates)
        values.append(g[candidates])
        ratio_parts.append(values[-1] / t_of[i])
        layer_of.append(np.full(candidates.size, i, dtype=np.int32))
    positions_all = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    values_all = np.concatenate(values) if values else np.zeros(0)
    ratios = np.concatenate(ratio_parts) if ratio_parts else np.zeros(0)
    layers_all = np.concatenate(layer_of) if layer_of else np.zeros(0, np.int32)
    limit = None if max_active is None else max_active - sum(counts.values())
    # the greedy only walks a prefix of the candidates sorted by ratio: sort the top k (ties at
    # the boundary included, so the prefix is exactly the full sort's), widen k while all are taken
    k = max(4096, 2 * sum(int(np.count_nonzero(masks[n])) - counts[n] for n in names))
    while True:
        order = top_order(ratios, k)
        n_add = greedy_count(numerator, denominator, values_all[order], t_of[layers_all[order]], limit)
        if n_add < order.size or order.size == ratios.size:
            break
        k *= 4
    chosen = order[:n_add]
    new_masks, added = {}, {}
    for i, name in enumerate(names):
        flat = kept_masks[name].reshape(-1).copy()
        mine = chosen[layers_all[chosen] == i]
        flat[positions_all[mine]] = True
        new_masks[name] = flat.reshape(np.shape(masks[name]))
        added[name] = int(mine.size)
    numerator += float(values_all[chosen].sum())
    denominator += float(t_of[layers_all[chosen]].sum())
    return Reconfiguration(new_masks, counts, added, numerator / denominator if denominator > 0 else math.inf)


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of every score ≥ the k-th largest, by decreasing score, ties in index order: a
    prefix of ``np.argsort(-scores, kind="stable")`` holding at least min(k, n) items."""
    n = scores.size
    if k >= n:
        return np.argsort(-scores, kind="stable")
    kth = -np.partition(-scores, k - 1)[k - 1]
    selected = np.flatnonzero(scores >= kth)
    return selected[np.argsort(-scores[selected], kind="stable")]


def gamma(masks: Mapping[str, np.ndarray], importance: Mapping[str, np.ndarray], time_model: RoundTimeModel,
          dense_importance: float = 0.0) -> float:
    """Γ(m) = (dense_importance + Σ G over m) / T(m); for tests and diagnostics."""
    num = dense_importance + sum(float(np.asarray(importance[n], np.float64)[np.asarray(m, bool)].sum())
                                 for n, m in masks.items())
    return num / time_model.seconds({n: int(np.count_nonzero(m)) for n, m in masks.items()})


def apply_new_masks(weights: dict[str, np.ndarray], old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                    last: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Weights under the new masks: kept where active before and after, 0 where dropped, and for
    newly active positions 0 (or their value in ``last``, the public code's behaviour)."""
    out = dict(weights)
    for name, mask in new.items():
        w = np.asarray(weights[name])
        fresh = np.zeros_like(w) if last is None else np.asarray(last[name], dtype=w.dtype)
        out[name] = np.where(mask, np.where(old[name], w, fresh), np.zeros_like(w)).astype(w.dtype)
    return out


def reconfigured_model(weights: dict[str, np.ndarray], masks: Mapping[str, np.ndarray],
                       importance: Mapping[str, np.ndarray], maskable: list[str], drop_fraction: float,
                       time_model: RoundTimeModel, *, max_active: int | None = None,
                       last: Mapping[str, np.ndarray] | None = None):
    """(weights, masks, Γ) after ``reconfigure`` of the global model: ``masks`` empty means all
    ones (a dense model); the dense tensors' importance counts in Γ's numerator; the weights
    follow ``apply_new_masks`` (``last``: the values re-activated positions resume)."""
    old = dict(masks) or {n: np.ones(np.shape(weights[n]), bool) for n in maskable}
    dense = sum(float(importance[n].sum()) for n in importance if n not in maskable)
    result = reconfigure(weights, old, importance, drop_fraction, time_model, dense_importance=dense,
                         max_active=max_active)
    return apply_new_masks(weights, old, result.masks, last), result.masks, result.objective
