"""PruneFL's importance as it travels: one float32 vector over the model's trainable parameters
(model order, each tensor flattened), and the two upload protocols of ``prunefl.importance_upload``:

- ``pruned`` (default; the authors' protocol, jiangyuang/PruneFL ``bases/fl/modules.py``): on the
  ΔR-th FL round a client uploads the importance of the *pruned* positions of the maskable
  weights only (``Client.accumulate_sgrad``: ``masked_select(mask == 0)``), 4 bytes per pruned
  weight; the server derives every other parameter's importance from the clients' weight updates
  of each round, ((θ_k − θ) / lr)² · samples processed (``Server.merge_accumulate_client_update``),
  which for plain SGD at a fixed lr equals the client's (Σ_steps g)² · samples processed. The
  derivation follows the update whatever the optimizer: with momentum, weight decay or Adam it
  is the authors' formula applied, not (Σ g)².
- ``dense`` (fedmpi's former protocol, and the authors' simulation ``bases/fl/simulation/adaptive.py``,
  which counts no bytes): the client uploads all n values, 4·n bytes.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch


def parameter_names(info) -> list[str]:
    """The model's trainable parameters in model order (what importance covers); all float
    tensors when the model cannot be built from ``info``."""
    if not info.model:
        return list(info.shapes)
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):   # building draws from torch's global RNG
        model = build_model(info.model, info.input_shape, info.num_classes)
    return [n for n, _ in model.named_parameters() if n in info.shapes]


def flatten_importance(parts: Mapping[str, np.ndarray], names: list[str], shapes: Mapping[str, tuple]) -> np.ndarray:
    """One float32 vector over ``names`` (zeros where a tensor has no importance)."""
    sizes = [math.prod(shapes[n]) for n in names]
    out = np.zeros(sum(sizes), np.float32)
    offset = 0
    for name, size in zip(names, sizes):
        if name in parts:
            out[offset:offset + size] = np.asarray(parts[name]).reshape(-1)
        offset += size
    return out


def split_importance(vector: np.ndarray, names: list[str], shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for n in names:
        size = math.prod(shapes[n])
        out[n] = vector[offset:offset + size].reshape(shapes[n])
        offset += size
    if offset != vector.size:
        raise ValueError(f"importance vector has {vector.size} values, the parameters {offset}")
    return out


def pruned_positions(masks: Mapping[str, np.ndarray], names: list[str], shapes: Mapping[str, tuple]) -> np.ndarray:
    """Flat positions, in the importance vector, of the weights ``masks`` prune (ascending); a
    tensor without a mask has none."""
    parts, offset = [], 0
    for name in names:
        if name in masks:
            parts.append(offset + np.flatnonzero(~np.asarray(masks[name], bool).reshape(-1)))
        offset += math.prod(shapes[name])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def summed_importance(uploads: list[np.ndarray], derived: np.ndarray | None, masks: Mapping[str, np.ndarray],
                      names: list[str], shapes: Mapping[str, tuple], protocol: str) -> np.ndarray | None:
    """An upload round's importance over ``names`` (float64; None: nothing to reconfigure with):
    ``dense``: the uploads summed; ``pruned``: ``derived`` (``add_update_importance`` since the last
    reconfiguration) with the uploads added at the pruned positions of ``masks``, the masks the
    clients trained with. ``uploads`` in client-id order: the sum is the same for any rank count."""
    if protocol == "dense":
        if not uploads:
            return None
        total, where = np.zeros(sum(math.prod(shapes[n]) for n in names), np.float64), slice(None)
    else:
        if derived is None:
            return None
        total, where = derived, pruned_positions(masks, names, shapes)
    for vector in uploads:
        total[where] += np.asarray(vector, dtype=np.float64)
    return total


def add_update_importance(total: np.ndarray | None, results, weights: Mapping[str, np.ndarray],
                          masks: Mapping[str, np.ndarray], names: list[str], shapes: Mapping[str, tuple],
                          lr: float) -> np.ndarray:
    """``total`` (float64 over ``names``; None: zeros) + Σ_k ((θ_k − θ) / lr)² · samples processed
    over each client's uploaded positions: the active weights of masked tensors and every value of
    the others. ``weights``: θ, what the clients were sent; ``results``: the round's, in client-id
    order (so the sum is the same for any rank count)."""
    if total is None:
        total = np.zeros(sum(math.prod(shapes[n]) for n in names), np.float64)
    offset = 0
    for name in names:
        size = math.prod(shapes[name])
        sent = np.asarray(weights[name], np.float64).reshape(-1)
        for result in results:
            update = result.update
            if name in masks:
                positions, kept = update.packed.get(name) or _active(update.values[name], masks[name])
                delta = np.asarray(kept, np.float64).reshape(-1) - sent[positions]
                total[offset + np.asarray(positions)] += (delta / lr) ** 2 * result.samples_processed
            else:
                delta = np.asarray(update.values[name], np.float64).reshape(-1) - sent
                total[offset:offset + size] += (delta / lr) ** 2 * result.samples_processed
        offset += size
    return total


def _active(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions = np.flatnonzero(np.asarray(mask, bool).reshape(-1))
    return positions, np.asarray(values).reshape(-1)[positions]
