"""Step hooks: code an algorithm runs inside every local step.

``after_backward`` sees the fresh gradients (before the optimizer uses them); ``after_step``
sees the updated parameters. The trainer always re-applies the client's masks after each step
(that is the first hook it runs); an algorithm adds its own through ``train(hooks=...)``.
"""
from __future__ import annotations

import numpy as np
import torch


class StepHook:
    def after_backward(self, params: dict[str, torch.nn.Parameter], batch_size: int) -> None:
        pass

    def after_step(self, params: dict[str, torch.nn.Parameter]) -> None:
        pass


class SquaredGradientAccumulator(StepHook):
    """PruneFL's importance in its initial pruning (the public code's ``ip_control``): for every
    named parameter, active or not, Σ_steps g² · batch size, where g is the step's (dense)
    minibatch gradient. The masked forward keeps gradients dense, so inactive weights collect
    importance too and can be regrown. (Its FL rounds square the *summed* gradient instead:
    ``SummedGradientSquared``.)"""

    def __init__(self, names, dtype: torch.dtype = torch.float64):
        """``dtype``: what the totals are kept in (float32 saves PruneFL's initial pruning a
        float64 copy of every gradient per step)."""
        self.names = list(names)
        self.dtype = dtype
        self.totals: dict[str, torch.Tensor] = {}

    def after_backward(self, params, batch_size):
        with torch.no_grad():
            for name, grad in _gradients(params, self.names):
                _add(self.totals, name, grad.to(self.dtype).pow(2).mul_(batch_size))

    def result(self) -> dict[str, np.ndarray]:
        """float32 arrays (what a client uploads)."""
        return {n: t.to("cpu").float().numpy() for n, t in self.totals.items()}


class SummedGradientSquared(StepHook):
    """PruneFL's per-round importance in its FL rounds (the TNNLS paper, spec step 2, and the
    public code's ``AdaptiveClient.main``): for every named parameter, active or not,
    (Σ_steps g)² · samples processed, where g is each step's dense minibatch gradient. Unlike
    ``SquaredGradientAccumulator`` (Σ_steps g² · batch, what PruneFL's initial pruning
    accumulates), the gradients are summed over the local steps *before* squaring, so directions
    that agree across the steps count more than noise that cancels. The sums are kept in the
    gradients' dtype (float32: a handful of local steps), the result is float32."""

    def __init__(self, names):
        self.names = list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.samples = 0

    def after_backward(self, params, batch_size):
        with torch.no_grad():
            for name, grad in _gradients(params, self.names):
                _add(self.sums, name, grad)
        self.samples += int(batch_size)

    def result(self) -> dict[str, np.ndarray]:
        """float32 arrays (Σ g)² · samples; names that never saw a gradient are left out."""
        with torch.no_grad():
            return {n: (s * s).mul_(self.samples).to("cpu").numpy() for n, s in self.sums.items()}


def _add(totals: dict, name: str, value: torch.Tensor) -> None:
    """totals[name] += value, starting from a copy (never an alias of a live gradient)."""
    if name in totals:
        totals[name] += value
    else:
        totals[name] = value.clone()


def _gradients(params: dict, names):
    """(name, detached gradient) of the named parameters that have one this step."""
    for name in names:
        grad = params[name].grad
        if grad is not None:
            yield name, grad.detach()
