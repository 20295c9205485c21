"""Local objectives: the loss a client minimises, given the model's output(s) and the labels.

A model returns one logits tensor or, for a multi-exit network, a list of them (shallowest exit
first). ``cross_entropy`` handles both: on a list it is the joint loss Σ_e CE(exit_e), equal
weights (HypeMeFed, ScaleFL); ``weighted_exits`` takes other weights.

``local.loss`` picks the trainer's default objective (``LOSSES``): ``cross_entropy`` (softmax
cross-entropy), or ``bce_onehot``, the PruneFL authors' loss for FEMNIST and CIFAR-10 (their
models' ``binary_cross_entropy_with_logits`` on one-hot float targets, mean over batch × classes).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Objective = Callable[[object, torch.Tensor], torch.Tensor]


def exit_outputs(outputs) -> list[torch.Tensor]:
    """A model's outputs as a list of logits tensors, shallowest exit first."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def cross_entropy(outputs, y: torch.Tensor) -> torch.Tensor:
    exits = exit_outputs(outputs)
    loss = F.cross_entropy(exits[0], y)
    for logits in exits[1:]:
        loss = loss + F.cross_entropy(logits, y)
    return loss


def bce_onehot(outputs, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every logit against the one-hot label, each class an independent
    sigmoid: mean over batch × classes of −[t·log σ(z) + (1 − t)·log(1 − σ(z))], t = onehot(y).
    On a list of exits, the sum over the exits (as ``cross_entropy``)."""
    exits = exit_outputs(outputs)
    loss = None
    for logits in exits:
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        term = F.binary_cross_entropy_with_logits(logits, target)
        loss = term if loss is None else loss + term
    return loss


LOSSES: dict[str, Objective] = {"cross_entropy": cross_entropy, "bce_onehot": bce_onehot}


def loss_objective(name: str) -> Objective:
    """The objective ``local.loss: name`` stands for (``LOSSES``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def weighted_exits(weights: Sequence[float]) -> Objective:
    """Σ_e weights[e]·CE(exit_e); the model must have exactly len(weights) exits."""
    weights = [float(w) for w in weights]

    def objective(outputs, y):
        exits = exit_outputs(outputs)
        if len(exits) != len(weights):
            raise ValueError(f"objective has {len(weights)} exit weights, the model has {len(exits)} exits")
        return sum(w * F.cross_entropy(logits, y) for w, logits in zip(weights, exits))

    return objective
