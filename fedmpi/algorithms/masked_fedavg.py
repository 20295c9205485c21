"""Masked FedAvg: one global mask, clients training the masked model, the server averaging each
active weight over the clients that hold it. The base of PruneFL (prunefl.py) and of its
baselines SNIP and iterative magnitude pruning (pruning_baselines.py)."""
from __future__ import annotations

import math

import numpy as np

from ..aggregate import average_over_holders
from ..comm.codec import ModelUpdate
from .base import Algorithm, ClientResult, ClientTask


class MaskedFedAvg(Algorithm):
    """One global mask; clients train the masked model for ``<section>.local_steps`` iterations
    (0: ``local.epochs``); the server averages each active weight over the clients. Shared by
    PruneFL, SNIP and iterative magnitude pruning. Columns: ``active_params`` (active maskable
    weights plus every dense tensor: the model size) and ``layer_density[<layer>]``."""

    section = ""

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.settings = cfg[self.section] if self.section else {}
        self.dense_names = [n for n in info.shapes if n not in info.maskable]
        self.dense_size = sum(math.prod(info.shapes[n]) for n in self.dense_names)
        self.maskable_size = sum(math.prod(info.shapes[n]) for n in info.maskable)

    # ---- helpers ---------------------------------------------------------------------------
    def local_steps(self) -> int | None:
        steps = int(self.settings.get("local_steps", 0))
        return steps if steps > 0 else None

    def active_params(self) -> int:
        if not self.masks:
            return self.maskable_size + self.dense_size
        return sum(int(np.count_nonzero(m)) for m in self.masks.values()) + self.dense_size

    def layer_counts(self) -> dict[str, int]:
        if not self.masks:
            return {n: math.prod(self.info.shapes[n]) for n in self.info.maskable}
        return {n: int(np.count_nonzero(m)) for n, m in self.masks.items()}

    def aggregation_weight(self, result: ClientResult) -> float:
        return result.num_samples

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Adopt ``masks`` (weights outside become 0)."""
        self.masks = {n: np.asarray(m, dtype=bool) for n, m in masks.items()}
        for name, mask in self.masks.items():
            self.weights[name] = np.where(mask, self.weights[name], np.zeros_like(self.weights[name]))

    # ---- results columns -------------------------------------------------------------------
    def round_columns(self):
        return {"active_params": np.int64, **{f"layer_density[{n}]": np.float64 for n in self.info.maskable}}

    def round_metrics(self, round_):
        counts = self.layer_counts()
        return {"active_params": self.active_params(),
                **{f"layer_density[{n}]": counts[n] / math.prod(self.info.shapes[n]) for n in counts}}

    # ---- server ----------------------------------------------------------------------------
    def init_server(self, weights, rng_) -> None:
        self.weights = dict(weights)

    def aggregate(self, round_, results):
        updates = [ModelUpdate({n: r.update.values[n] for n in self.info.shapes if n in r.update.values},
                               r.update.masks) for r in results]
        self.weights, _ = average_over_holders(updates, [self.aggregation_weight(r) for r in results],
                                               self.weights, missing="keep")

    # ---- client ----------------------------------------------------------------------------
    def train(self, task: ClientTask, trainer, hooks=()):
        masks = dict(task.received.masks) or None
        return trainer.train(task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
                             client_id=task.client_id, masks=masks, steps=self.local_steps(), hooks=hooks)

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        weights, loss, processed = self.train(task, trainer)
        masks = dict(task.received.masks)
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks), loss, processed,
                            densities=densities)
