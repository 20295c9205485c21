"""The local optimizer as a value: ``OptimizerSpec`` comes from the ``local.*`` config keys (or
an algorithm's own settings) and builds a fresh optimizer for each client's training.

SGD, the default, is fedmpi's own ``SGD``: ``torch.optim.SGD``'s arithmetic, bit for bit, without
``torch.optim``. A ``torch.optim`` optimizer costs per client its construction and per step its
Python machinery, and its first step imports ``torch._dynamo`` (seconds of every rank's start-up).
Adam and AdamW are ``torch.optim``'s."""
from __future__ import annotations

from dataclasses import dataclass

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")


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

    def build(self, params) -> "SGD | torch.optim.Optimizer":
        if self.name == "sgd":
            return SGD(params, self)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay)
        if self.name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                     weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor | None],
             spec: OptimizerSpec) -> list[torch.Tensor | None]:
    """One SGD step on ``params`` (in place): ``torch.optim.SGD``'s single-tensor arithmetic (no
    dampening, no maximize), which is what it runs on CPU tensors: weight decay added to the
    gradient, the momentum buffer (a copy of the first step's gradient, then buf·m + g), Nesterov,
    then p − lr·d. ``torch._foreach_*`` on CPU runs that same single-tensor kernel on each tensor.
    ``buffers[j]`` is None until tensor j's first step; returns the buffers."""
    if spec.weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=spec.weight_decay)
    if spec.momentum != 0:
        running = [j for j, b in enumerate(buffers) if b is not None]
        if running:
            kept = [buffers[j] for j in running]
            torch._foreach_mul_(kept, spec.momentum)
            torch._foreach_add_(kept, [grads[j] for j in running], alpha=1)
        for j, b in enumerate(buffers):
            if b is None:
                buffers[j] = torch.clone(grads[j]).detach()
        grads = torch._foreach_add(grads, buffers, alpha=spec.momentum) if spec.nesterov else list(buffers)
    torch._foreach_add_(params, grads, alpha=-spec.lr)
    return buffers


class SGD:
    """The per-client optimizer for ``local.optimizer: sgd``: ``zero_grad`` and ``step`` as
    ``torch.optim.SGD`` does them, with the same results bit for bit (``sgd_step``). Parameters
    without a gradient in a step are skipped and keep their momentum, as there."""

    def __init__(self, params, spec: OptimizerSpec):
        self.params = list(params)
        self.spec = spec
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        stepped = [j for j, p in enumerate(self.params) if p.grad is not None]
        if not stepped:
            return
        buffers = sgd_step([self.params[j] for j in stepped], [self.params[j].grad for j in stepped],
                           [self.buffers[j] for j in stepped], self.spec)
        for j, b in zip(stepped, buffers):
            self.buffers[j] = b
