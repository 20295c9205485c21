"""Sparse-training toolkit shared by FedDST, PruneFL and LotteryFL: layer densities, masks and
magnitude pruning. FedDST's own readjustment (its schedule, gradient regrowth, the public code's
server re-prune) is fedmpi/algorithms/feddst_readjustment.py.

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

def top_flat(scores: np.ndarray, k: int, candidates: np.ndarray | None = None,
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
        keep = top_flat(np.abs(w), count, candidates, None if tiebreak is None else tiebreak[name])
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


class Remasker:
    """After every optimizer step, zero each masked parameter's entries outside its mask, as
    ``apply_masks_torch`` does, in one fused pass: p ← 0 + p·m (``torch.addcmul``), with each mask
    made once as a tensor of its parameter's dtype. For finite values the bits are those of
    ``masked_fill_`` (kept entries unchanged, the others +0: 0 + (−0) is +0), except that a kept
    entry equal to −0.0 becomes +0.0, which no later sum or product can tell apart. About a fifth of its
    time on a 6.4 M-weight layer (a bool mask costs a slow masked fill, or a type promotion per
    step). An entry outside the mask that has overflowed to ±inf or is NaN becomes NaN, not 0:
    that client's training has diverged, and its next forward pass reports it."""

    def __init__(self, params: Mapping[str, object], masks: Mapping[str, object]):
        import torch

        self.pairs = []
        for name, mask in masks.items():
            if name not in params:
                raise KeyError(f"mask {name!r} has no matching parameter")
            tensor = params[name]
            m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
            if tuple(m.shape) != tuple(tensor.shape):
                raise ValueError(f"layer {name!r}: mask shape {tuple(m.shape)} != weight shape "
                                 f"{tuple(tensor.shape)}")
            factor = m.to(device=tensor.device, dtype=tensor.dtype)
            self.pairs.append((tensor, factor, torch.zeros((), dtype=tensor.dtype, device=tensor.device)))

    def __call__(self) -> None:
        import torch

        with torch.no_grad():
            for tensor, factor, zero in self.pairs:
                torch.addcmul(zero, tensor, factor, out=tensor)
