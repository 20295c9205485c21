"""PruneFL's initial-pruning round (round 1 with ``prunefl.initial_pruning: true``): client k₀
alone trains from the dense init and reconfigures its mask every ``ip_interval`` iterations until
the density settles (the protocol and the public code's options: the module doc of prunefl.py).

Its data (``ip_data_batches``, default 10, the authors' ``IP_DATA_BATCH``): a subset of
ip_data_batches × local.batch_size of k₀'s samples, drawn once from (seed, round 1, k₀) and the
same for every iteration of the round; 0 (or a client with fewer samples) trains on all of them.
The authors' code takes the first 10 batches of one shuffled pass over its initial-pruning data
and cycles them in that order; fedmpi draws new batches from the subset, a fresh order for each
pass and at the start of each stretch of ``ip_interval`` iterations.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import rng
from ..training.hooks import SquaredGradientAccumulator
from ..training.objectives import cross_entropy
from ..update import ModelUpdate
from .base import ClientResult, ClientTask
from .prunefl_reconfiguration import apply_new_masks, reconfigure, round_time_model


# round 1's and k₀'s columns besides ip_iterations/ip_reconfigurations: the distinct samples
# initial pruning trained on and the samples it processed
IP_COLUMNS = {"ip_samples": np.int64, "ip_samples_processed": np.int64}


class _AccuracyObjective:
    """The trainer's loss (``local.loss``) that also counts the minibatches' correct predictions
    (before each step)."""

    def __init__(self, loss):
        self.loss = loss
        self.correct = 0
        self.total = 0

    def __call__(self, outputs, y):
        with torch.no_grad():
            self.correct += int((outputs.argmax(dim=1) == y).sum())
            self.total += int(len(y))
        return self.loss(outputs, y)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def run_initial_pruning(task: ClientTask, trainer, *, cfg: dict, settings: dict, info, param_names: list[str],
                        local_steps: int | None) -> ClientResult:
    """Client k₀ alone: train from the dense init, reconfigure every ``ip_interval``
    iterations with d = ``max_drop``, until the density settles. ``settings``: the prunefl
    section; ``param_names``: the parameters importance covers; ``local_steps``: an FL round's
    (for k₀'s time model)."""
    s = settings
    maskable = info.maskable
    time_model = round_time_model(cfg, info, local_steps, task.client_id)   # k₀'s device
    weights = {n: np.asarray(v).copy() for n, v in task.received.values.items()}
    masks = {n: np.ones(info.shapes[n], bool) for n in maskable}
    last = {n: weights[n].copy() for n in maskable} if s["regrow_value"] == "last" else None
    x, y = task.x, task.y
    if s["ip_data_batches"] > 0:   # a fixed subset for the whole round (the module doc)
        take = min(len(y), s["ip_data_batches"] * cfg["local"]["batch_size"])
        chosen = np.sort(rng.generator(cfg["seed"], rng.CLIENT, task.round, task.client_id)
                         .permutation(len(y))[:take])
        index = torch.from_numpy(chosen)
        x, y = x[index], y[index]
    total = sum(math.prod(info.shapes[n]) for n in maskable)
    density_time = {n: 0.0 for n in maskable}   # Σ samples · layer density, for the time model
    iterations = processed_total = reconfigurations = chunk = 0
    loss_sum = 0.0
    started = s["ip_accuracy_factor"] <= 0
    previous_density, stable = None, []
    while iterations < s["ip_max_iterations"]:
        steps = min(s["ip_interval"], s["ip_max_iterations"] - iterations)
        hook = SquaredGradientAccumulator(param_names, dtype=torch.float32)
        objective = _AccuracyObjective(getattr(trainer, "objective", cross_entropy))
        weights, loss, processed = trainer.train(
            weights, x, y, seed=rng.torch_seed(cfg["seed"], rng.CLIENT, task.round, task.client_id, chunk),
            round_=task.round, client_id=task.client_id, masks=masks, steps=steps, hooks=[hook],
            objective=objective)
        chunk += 1
        iterations += steps
        loss_sum += loss * processed
        processed_total += processed
        for n in maskable:
            density_time[n] += processed * float(masks[n].mean())
        if not started:
            started = objective.accuracy >= s["ip_accuracy_factor"] / info.num_classes
            if not started:
                continue
        importance = {n: t.to("cpu").numpy() for n, t in hook.totals.items()}
        dense = sum(float(importance[n].sum()) for n in importance if n not in maskable)
        if last is not None:
            last = {n: np.where(masks[n], weights[n], last[n]) for n in maskable}
        result = reconfigure(weights, masks, {n: importance.get(n, np.zeros(info.shapes[n]))
                                              for n in maskable},
                             s["max_drop"], time_model, dense_importance=dense)
        weights = apply_new_masks(weights, masks, result.masks, last)
        masks = result.masks
        reconfigurations += 1
        density = sum(int(np.count_nonzero(m)) for m in masks.values()) / total
        if previous_density is not None:
            stable.append(abs(density / previous_density - 1.0) <= s["ip_threshold"])
        previous_density = density
        if len(stable) >= s["ip_patience"] and all(stable[-s["ip_patience"]:]):
            break
    densities = {n: density_time[n] / max(processed_total, 1) for n in maskable}
    return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks),
                        loss_sum / max(processed_total, 1), processed_total, densities=densities,
                        metrics={"ip_iterations": iterations, "ip_reconfigurations": reconfigurations,
                                 "ip_samples": int(len(y)), "ip_samples_processed": processed_total})
