"""The local optimizer as a value: ``OptimizerSpec`` comes from the ``local.*`` config keys (or
an algorithm's own settings) and builds a fresh torch optimizer for each client's training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OPTIMIZERS


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0         # SGD only
    nesterov: bool = False        # SGD only
    weight_decay: float = 0.0     # SGD/Adam: L2 added to the gradient; AdamW: decoupled decay
    betas: tuple[float, float] = (0.9, 0.999)   # Adam/AdamW
    eps: float = 1e-8                           # Adam/AdamW

    @classmethod
    def from_config(cls, local: dict) -> "OptimizerSpec":
        return cls(local["optimizer"], local["lr"], local["momentum"], local["nesterov"],
                   local["weight_decay"], tuple(float(b) for b in local["betas"]), local["eps"])

    def build(self, params) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay)
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
