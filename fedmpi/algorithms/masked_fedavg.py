"""Masked FedAvg: clients train the masked model they are sent and upload it with its mask; the
server averages each weight over the clients that hold it. The base of PruneFL (prunefl.py) and
of its baselines SNIP and iterative magnitude pruning (pruning_baselines.py), one global mask
whose unheld weights keep the server's value, and of FedDST and RandomMask (feddst.py), whose
clients' masks part after a readjustment and whose unheld weights become 0."""
from __future__ import annotations

import math

import numpy as np

from ..update import ModelUpdate
from .base import Algorithm, ClientResult, ClientTask


class MaskedFedAvg(Algorithm):
    """Clients train the masked model for ``<section>.local_steps`` iterations (0 or no such key:
    ``local.epochs``) with proximal term ``prox_mu``; the server merges through
    ``merge_over_holders``: per element the average over the clients holding it, client k
    weighing ``partial_sum_weight`` (here its sample count), an element nobody holds kept
    (``missing = "keep"``) or 0 (``"zero"``). Columns: ``active_params`` (active maskable
    weights plus every dense tensor: the model size) and ``layer_density[<layer>]``."""

    section = ""
    missing = "keep"
    prox_mu = 0.0

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

    def samples_per_round(self, num_samples: int) -> int:
        """The samples a client with ``num_samples`` processes in a round, as ``LocalTrainer.train``
        counts them: ``local_steps`` minibatches of ``local.batch_size``, the passes over its
        data wrapping around (each pass ending in a short batch), or ``local.epochs`` passes."""
        steps = self.local_steps()
        if steps is None or num_samples == 0:
            return self.cfg["local"]["epochs"] * num_samples
        batch_size = self.cfg["local"]["batch_size"]
        passes, rest = divmod(steps, math.ceil(num_samples / batch_size))
        return passes * num_samples + rest * batch_size

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

    def partial_sum_weight(self, client_id: int, num_samples: int) -> int:
        return num_samples

    def aggregate(self, round_, results, sums=None):
        self.weights, _ = self.merge_over_holders(results, sums)

    # ---- client ----------------------------------------------------------------------------
    def train(self, task: ClientTask, trainer, hooks=()):
        masks = dict(task.received.masks) or None
        return trainer.train(task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
                             client_id=task.client_id, masks=masks, steps=self.local_steps(), hooks=hooks,
                             prox_mu=self.prox_mu)

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        return self.after_training(task, trainer, *self.train(task, trainer))

    def after_training(self, task: ClientTask, trainer, weights, loss, processed) -> ClientResult:
        """The client's result from ``train``'s (weights, loss, samples processed): the trained
        weights under the mask it was sent."""
        masks = dict(task.received.masks)
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks), loss, processed,
                            densities=densities)
