"""fedmpi's MLP trained without autograd: the same ATen kernels on the same tensors, so the same
bits, with less per-step overhead (``local.backward: auto``).

A small model's step on a few dozen samples is short enough that autograd's own work (recording
the graph, running its engine, accumulating gradients into ``.grad``) is a sizeable share of it
(bench/perf/bound.py measures about a quarter for the overhead workload's MLP). For
``models.nets.MLP`` (flatten, then Linear-ReLU-...-Linear) the backward pass is short enough to
write out: per step the forward ``addmm``/``relu``, the cross-entropy as ``_log_softmax`` and
``nll_loss_forward``, then the formulas autograd runs for them (``nll_loss_backward``,
``_log_softmax_backward_data``, ``mm`` for the weight and input gradients in autograd's operand
order, ``sum(0)`` for the bias, ``threshold_backward`` for ReLU), and fedmpi's SGD step
(``optim.sgd_step``). ``tests/test_training.py`` checks the bits against the autograd path for
every setting this path accepts; anything else (``local.loss: bce_onehot`` too) trains through
autograd (``ExplicitMLP.covers``).
"""
from __future__ import annotations

import torch

from ..models.nets import MLP
from .objectives import cross_entropy
from .optim import OptimizerSpec, sgd_step

_aten = torch.ops.aten


class ExplicitMLP:
    """One client's training steps of an ``MLP``'s live parameters (updated in place)."""

    @staticmethod
    def covers(model, *, device: torch.device, objective, optimizer: OptimizerSpec, hooks, prox_mu: float,
               compact: dict, variant) -> bool:
        return (type(model) is MLP and device.type == "cpu" and objective is cross_entropy
                and optimizer.name == "sgd" and not hooks and prox_mu == 0 and not compact and not variant
                and all(p.dtype == torch.float32 for p in model.parameters()))

    def __init__(self, model: MLP, optimizer: OptimizerSpec):
        self.layers = [model.fc1, model.fc2, model.fc3]
        # the parameters' storage, outside autograd: steps update the model in place
        self.params = [t.detach() for layer in self.layers for t in (layer.weight, layer.bias)]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.optimizer = optimizer
        self._one = torch.ones(())

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor):
        """The batch's mean cross-entropy (a 0-d tensor) and what the backward needs."""
        activations = [torch.flatten(x, 1)]
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            out = torch.addmm(self.params[2 * i + 1], activations[-1], self.params[2 * i].t())
            activations.append(torch.relu(out) if i < last else out)
        log_probs = _aten._log_softmax(activations[-1], 1, False)
        loss, total_weight = _aten.nll_loss_forward(log_probs, y, None, 1, -100)
        return loss, (activations, log_probs, y, total_weight)

    def backward_step(self, saved) -> None:
        """Gradients of the loss as autograd computes them, then one SGD step."""
        activations, log_probs, y, total_weight = saved
        grad = _aten.nll_loss_backward(self._one, log_probs, y, None, 1, -100, total_weight)
        grad = _aten._log_softmax_backward_data(grad, log_probs, 1, torch.float32)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for i in reversed(range(len(self.layers))):
            # autograd's addmm backward with mat2 = W.t() (column-major): W's gradient is grad.t() @ x
            grads[2 * i], grads[2 * i + 1] = torch.mm(grad.t(), activations[i]), torch.sum(grad, 0)
            if i > 0:
                grad = _aten.threshold_backward(torch.mm(grad, self.params[2 * i]), activations[i], 0)
        self.buffers = sgd_step(self.params, grads, self.buffers, self.optimizer)
