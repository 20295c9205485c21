"""Sparse-training toolkit shared by FedDST, PruneFL and LotteryFL: layer densities, masks,
magnitude pruning, gradient regrowth, the public FedDST code's server re-prune, and the
readjustment schedule (which rounds readjust, and the cosine fraction).

Weights, gradients and masks are ``dict[str, np.ndarray]`` keyed by state_dict name, in model
order (float weights, bool masks). Only the tensors present in the masks are "maskable"; other
entries (biases, norms) pass through untouched. Everything is deterministic: rankings use stable
sorts on flat indices, so ties always go to the lower flat index (it ranks first: kept before
pruned, grown before not grown). No random state is ever consulted.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fedmpi.errors import ConfigError

DISTRIBUTIONS = ("erk", "uniform", "erk_public")


# --------------------------------------------------------------------------- layer densities

def _check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ConfigError("sparsity", f"must be in [0, 1), got {sparsity!r}")
    return s


def _erk_score(shape: tuple) -> float:
    """RigL's Erdős–Rényi-Kernel score: (sum of the dims) / (product of the dims)."""
    return float(sum(shape)) / float(math.prod(shape))


def layer_densities(shapes: Mapping[str, tuple], sparsity: float,
                    distribution: str = "erk") -> dict[str, float]:
    """Per-layer kept fraction for a global target ``sparsity`` (fraction of zeros).

    ``erk`` (default, the paper's): RigL's ERK, density_l = ε·score_l with
    score_l = sum(shape)/prod(shape); one ε for all layers so that Σ density_l·n_l = (1−S)·Σ n_l.
    A layer whose density would exceed 1 is made dense and ε is re-solved over the others,
    repeated until no layer exceeds 1 (capping only raises ε, so capping every exceeding layer
    at once gives the same result as RigL's one-at-a-time loop).

    ``uniform``: every layer 1−S.

    ``erk_public``: the public FedDST code (bibikar/feddst, models.py ``_weights_by_layer``) —
    per-layer *sparsity* ∝ (1 − score_l), scaled so Σ s_l·n_l = S·Σ n_l. Since score_l ≪ 1 for
    all but tiny layers this is nearly uniform, and nothing is capped or redistributed; we clip
    densities to [0, 1] so the result stays valid (the global density then misses 1−S only if
    clipping bites). Differences from that code: n_l counts the weight tensor only (the code
    adds the layer's bias) and counts are rounded by ``kept_counts`` (the code floors). It is
    an option for reproducing the code, not the paper's distribution.
    """
    s = _check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError("feddst.distribution",
                          f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        if len(shape) == 0 or math.prod(shape) <= 0:
            raise ValueError(f"layer {name!r}: cannot mask a tensor of shape {shape}")
    if s == 0.0 or not shapes:
        return {name: 1.0 for name in shapes}
    if distribution == "uniform":
        return {name: 1.0 - s for name in shapes}

    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    scores = {name: _erk_score(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())

    if distribution == "erk_public":
        layer_sparsity = {name: 1.0 - scores[name] for name in shapes}
        weighted = sum(layer_sparsity[name] * sizes[name] for name in shapes)
        scale = s * total / weighted
        return {name: min(1.0, max(0.0, 1.0 - scale * layer_sparsity[name])) for name in shapes}

    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        budget = (1.0 - s) * total - sum(sizes[name] for name in dense)
        epsilon = budget / sum(scores[name] * sizes[name] for name in free)
        exceeding = [name for name in free if epsilon * scores[name] > 1.0]
        if not exceeding:
            break
        # Cannot empty `free` for S > 0: the last free layer would need more than all weights.
        dense.update(exceeding)
    return {name: 1.0 if name in dense else min(1.0, epsilon * scores[name]) for name in shapes}


def kept_counts(shapes: Mapping[str, tuple], densities: Mapping[str, float]) -> dict[str, int]:
    """Weights to keep per layer: density·n rounded half up, at least 1 if density > 0, at most n."""
    counts = {}
    for name, shape in shapes.items():
        n = math.prod(int(d) for d in shape)
        density = float(densities[name])
        if not (0.0 <= density <= 1.0):
            raise ValueError(f"layer {name!r}: density {density} outside [0, 1]")
        count = int(math.floor(density * n + 0.5))
        if density > 0.0:
            count = max(count, 1)
        counts[name] = min(count, n)
    return counts


# --------------------------------------------------------------------------- ranking and masks

def _top_flat(scores: np.ndarray, k: int, candidates: np.ndarray | None = None,
              tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Flat indices of the k largest ``scores`` among ``candidates`` (all if None).

    Equal scores are ordered by the larger ``tiebreak`` (if given), then the lower flat index:
    candidates are listed in ascending order and the sorts are stable.
    """
    flat = np.asarray(scores).reshape(-1)
    index = np.arange(flat.size) if candidates is None else np.flatnonzero(candidates)
    if k <= 0 or index.size == 0:
        return np.empty(0, dtype=np.int64)
    if tiebreak is None:
        order = np.argsort(-flat[index], kind="stable")
    else:
        # lexsort: last key is primary
        order = np.lexsort((-np.asarray(tiebreak).reshape(-1)[index], -flat[index]))
    return index[order[:k]]


def magnitude_masks(weights: Mapping[str, np.ndarray], counts: Mapping[str, int],
                    within: Mapping[str, np.ndarray] | None = None,
                    tiebreak: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per layer in ``counts``, keep the ``counts[l]`` largest-|w| positions (bool masks).

    ``within`` (optional masks) restricts the choice to those positions, e.g. to prune only
    among currently active weights when some active weights are exactly 0 (LotteryFL,
    server re-pruning); if fewer candidates than the count exist, all of them are kept.
    ``tiebreak`` (optional scores per layer) orders positions of equal |w|, larger first: the
    FedDST server ranks freshly grown (still zero) weights by how many clients grew them.
    """
    masks = {}
    for name, count in counts.items():
        w = np.asarray(weights[name])
        count = int(count)
        if not (0 <= count <= w.size):
            raise ValueError(f"layer {name!r}: keep count {count} outside [0, {w.size}]")
        candidates = None if within is None else np.asarray(within[name], dtype=bool).reshape(-1)
        keep = _top_flat(np.abs(w), count, candidates, None if tiebreak is None else tiebreak[name])
        mask = np.zeros(w.size, dtype=bool)
        mask[keep] = True
        masks[name] = mask.reshape(w.shape)
    return masks


def _zero_outside_torch(name: str, tensor, mask) -> None:
    import torch

    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
    m = m.to(device=tensor.device, dtype=torch.bool)
    if m.shape != tensor.shape:
        raise ValueError(f"layer {name!r}: mask shape {tuple(m.shape)} != weight shape "
                         f"{tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.masked_fill_(~m, 0)


def apply_masks_torch(module_or_named_params, masks: Mapping[str, object]) -> None:
    """Zero, in place and under no_grad, every parameter entry outside its mask.

    Takes an ``nn.Module`` (its ``named_parameters()``), a ``{name: tensor}`` mapping or an
    iterable of ``(name, tensor)``. Call it after every optimizer step: momentum and weight
    decay move pruned weights off 0 (the momentum buffer keeps the dense gradient), and this
    puts them back to exactly 0. Masks may be numpy or torch bool arrays.
    """
    if hasattr(module_or_named_params, "named_parameters"):
        params = dict(module_or_named_params.named_parameters())
    else:
        params = dict(module_or_named_params)  # a mapping or (name, tensor) pairs
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask {name!r} has no matching parameter")
        _zero_outside_torch(name, params[name], mask)


# --------------------------------------------------------------------------- dynamic sparsity

def prune_and_grow(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                   gradients: Mapping[str, np.ndarray], fraction: float, *,
                   counts: Mapping[str, int] | None = None, regrow_pruned: bool = True,
                   grow_over_all_positions: bool = False
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedDST/RigL mask readjustment; returns (new_weights, new_masks), inputs untouched.

    Per masked layer with a active weights and target count c (``counts[l]``; a when ``counts``
    is None): k = floor(fraction·a) (RigL truncates too, so a layer never moves more than the
    fraction). Prune the k active weights of smallest |w| (mask False, weight 0), then grow
    c − (a − k) positions of largest |g| among the positions inactive *after* pruning, so a
    just-pruned weight may come straight back (the spec's "currently inactive", and RigL's
    rule). Grown weights start at exactly 0 — including a just-pruned one that is regrown (RigL
    would keep its old value there; the spec says prune, then grow at 0). When a = c, as it
    always is under the paper's server, k positions are grown and the active count is
    unchanged; a mask below its target (possible only with the public code's server re-prune,
    ``reprune_public``) is grown back to c, as the public code's ``layer_grow`` does.

    A layer with no inactive position (one that ERK made dense) is left alone, weights
    included: it has nothing to grow into, and pruning k weights to regrow exactly those at 0
    would only erase trained weights (RigL skips such layers too).

    ``regrow_pruned=False``: candidates are only positions inactive *before* the readjustment;
    k is then capped at n − c so there are enough of them to reach c again.

    ``grow_over_all_positions=True``: the public FedDST code's growth (models.py
    ``layer_grow``) — top-|g| over all positions, active ones included; each chosen position is
    set active with weight 0, so an active weight can be reset to 0 and the active count can
    drop below the target.

    Weights without a mask are copied unchanged; masked weights come back zero outside
    their new mask.
    """
    fraction = float(fraction)
    if not (0.0 <= fraction <= 1.0):
        raise ValueError(f"readjustment fraction must be in [0, 1], got {fraction}")
    readjusted = {}
    new_masks = {}
    for name, mask in masks.items():
        w = np.asarray(weights[name])
        m = np.asarray(mask, dtype=bool)
        g = np.asarray(gradients[name])
        if m.shape != w.shape or g.shape != w.shape:
            raise ValueError(f"layer {name!r}: shapes differ (weight {w.shape}, mask {m.shape}, "
                             f"gradient {g.shape})")
        flat_w = w.reshape(-1).copy()  # a fresh copy whatever the input's memory layout
        was_active = m.reshape(-1)
        if was_active.all():           # dense layer: nothing to grow into
            readjusted[name] = flat_w.reshape(w.shape)
            new_masks[name] = m.copy()
            continue
        active = int(np.count_nonzero(was_active))
        target = active if counts is None else int(counts[name])
        if not (0 <= target <= was_active.size):
            raise ValueError(f"layer {name!r}: target count {target} outside [0, {was_active.size}]")
        k = int(math.floor(fraction * active))
        if not regrow_pruned and not grow_over_all_positions:
            k = min(k, was_active.size - target)

        # Prune = keep the (active - k) largest |w| among the active ones.
        survivors = _top_flat(np.abs(flat_w), active - k, was_active)
        new_flat = np.zeros(was_active.size, dtype=bool)
        new_flat[survivors] = True
        n_grow = max(0, target - (active - k))

        abs_g = np.abs(g.reshape(-1))
        if grow_over_all_positions:
            grown = _top_flat(abs_g, n_grow)
        elif regrow_pruned:
            grown = _top_flat(abs_g, n_grow, ~new_flat)
        else:
            grown = _top_flat(abs_g, n_grow, ~was_active)
        new_flat[grown] = True
        flat_w[grown] = 0
        flat_w[~new_flat] = 0
        readjusted[name] = flat_w.reshape(w.shape)
        new_masks[name] = new_flat.reshape(m.shape)
    # Keep the input's (model) order.
    new_weights = {name: readjusted[name] if name in readjusted else np.array(w, copy=True)
                   for name, w in weights.items()}
    return new_weights, new_masks


def reprune_public(weights: Mapping[str, np.ndarray], union: Mapping[str, np.ndarray],
                   counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The public FedDST code's server re-prune (bibikar/feddst: dst.py after aggregation,
    models.py ``layer_prune``), an option; the paper's is ``magnitude_masks`` within the union.

    ``union`` is the aggregated mask (positions some client kept), ``weights`` the sparse
    average (0 outside the union, and 0 at freshly grown positions). Only when the union holds
    more positions in all than the target (the code's ``global_model.sparsity() <
    round_sparsity``; our target is Σ counts, the rounded layer counts) is each layer cut: the
    n − c_l positions of smallest |w| *over the whole tensor* — the zeros outside the union
    included — are pruned, and the new mask is union minus those. Whenever the exact zeros
    (outside the union, plus grown weights nobody trained) outnumber n − c_l, some outside
    zeros are "pruned" again while in-union zeros go, and the layer ends below c_l until
    clients regrow it (``prune_and_grow`` with ``counts``). torch.topk leaves the order of equal
    magnitudes unspecified; here they go by lower flat index first, so the outcome is
    deterministic. A layer with c_l = 0 or c_l = n is left as the union (the code's
    ``n_prune >= n_total or n_prune < 0``, and n_prune = 0 prunes nothing).
    """
    union = {name: np.asarray(m, dtype=bool) for name, m in union.items()}
    if sum(int(np.count_nonzero(m)) for m in union.values()) <= sum(int(c) for c in counts.values()):
        return {name: m.copy() for name, m in union.items()}
    masks = {}
    for name, count in counts.items():
        mask = union[name].copy()
        n_prune = mask.size - int(count)
        if 0 < n_prune < mask.size:
            magnitude = np.abs(np.asarray(weights[name])).reshape(-1)
            smallest = np.argsort(magnitude, kind="stable")[:n_prune]
            mask.reshape(-1)[smallest] = False
        masks[name] = mask
    return masks


# --------------------------------------------------------------------------- readjustment schedule

READJUST_RULES = ("paper", "public")


def resolve_r_end(r_end: int, rounds: int) -> int:
    """``feddst.r_end``: -1 means rounds // 2 (the paper's R_end, and the public code's default)."""
    return int(r_end) if r_end >= 0 else int(rounds) // 2


def schedule_round(round_: int, rule: str = "paper") -> int:
    """The round counter the readjustment schedule sees. fedmpi counts rounds from 1; the public
    code counts its ``server_round`` from 0, so under ``rule="public"`` round r is s = r − 1."""
    if rule not in READJUST_RULES:
        raise ConfigError("feddst.readjust_rule", f"must be one of {READJUST_RULES}, got {rule!r}")
    return round_ - 1 if rule == "public" else round_


def readjustment_round(round_: int, every: int, r_end: int, rule: str = "paper") -> bool:
    """Whether round ``round_`` (from 1) readjusts masks.

    ``paper``: r % ΔR == 0 and r < R_end (the spec).
    ``public``: the public code's test on its 0-based counter s = r − 1: (s − 1) % ΔR == 0 and
    s < R_end (it readjusts while its cosine factor is > 0), with Python's modulo. That is rounds
    2, 2 + ΔR, 2 + 2ΔR, ... up to r = R_end, and with ΔR = 1 every round from 1 to R_end.
    """
    s = schedule_round(round_, rule)
    if rule == "public":
        return (s - 1) % every == 0 and s < r_end
    return s % every == 0 and s < r_end


def cosine_readjust_fraction(alpha: float, round_: int, r_end: int) -> float:
    """FedDST's readjustment fraction α_r = α/2·(1 + cos(π r / R_end)); 0 for r ≥ R_end."""
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ConfigError("feddst.alpha", f"must be in [0, 1], got {alpha!r}")
    if round_ < 0:
        raise ValueError(f"round must be >= 0, got {round_}")
    if round_ >= r_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * round_ / r_end))
