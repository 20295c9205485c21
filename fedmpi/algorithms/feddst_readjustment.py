"""FedDST's mask readjustment (feddst.py): which rounds readjust and by how much (the schedule and
the cosine fraction), the client's prune-and-grow, and the public code's server re-prune.

Weights, gradients and masks are as in fedmpi/sparsity.py (``dict[str, np.ndarray]`` by
state_dict name, bool masks); rankings are stable, so ties go to the lower flat index.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..errors import ConfigError
from ..sparsity import top_flat


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


# --------------------------------------------------------------------------- client and server

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
        survivors = top_flat(np.abs(flat_w), active - k, was_active)
        new_flat = np.zeros(was_active.size, dtype=bool)
        new_flat[survivors] = True
        n_grow = max(0, target - (active - k))

        abs_g = np.abs(g.reshape(-1))
        if grow_over_all_positions:
            grown = top_flat(abs_g, n_grow)
        elif regrow_pruned:
            grown = top_flat(abs_g, n_grow, ~new_flat)
        else:
            grown = top_flat(abs_g, n_grow, ~was_active)
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
