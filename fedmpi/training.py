"""Local training on one rank: SGD over a client's data, with optional masks and proximal term.

One ``LocalTrainer`` per rank owns the torch module; every client trained on the rank loads its
weights into that module, so no per-client model objects are built. All randomness (batch order,
dropout) is seeded from the task's seed, which derives from (seed, round, client).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DivergenceError
from .sparsity import apply_masks_torch


class LocalTrainer:
    def __init__(self, model: torch.nn.Module, local_cfg: dict, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.local = local_cfg
        # live views of every parameter and buffer, so loading weights is a copy_ per tensor
        self.tensors = dict(self.model.state_dict(keep_vars=True))
        self.params = dict(self.model.named_parameters())

    # -- weights in and out -------------------------------------------------------------------
    @torch.no_grad()
    def load(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            self.tensors[name].copy_(torch.from_numpy(value))

    @torch.no_grad()
    def export(self, names) -> dict[str, np.ndarray]:
        return {n: self.tensors[n].detach().to("cpu", copy=True).numpy() for n in names}

    def _torch_masks(self, masks: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
        # converted once per client, not once per step
        return {n: torch.from_numpy(m).to(self.device, torch.bool) for n, m in (masks or {}).items()}

    def _batches(self, n: int, generator: torch.Generator):
        order = torch.randperm(n, generator=generator)
        size = self.local["batch_size"]
        for start in range(0, n, size):
            yield order[start:start + size]

    # -- training -----------------------------------------------------------------------------
    def train(self, weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, *, seed: int,
              round_: int, client_id: int, masks: dict[str, np.ndarray] | None = None,
              prox_mu: float = 0.0, epochs: int | None = None) -> tuple[dict[str, np.ndarray], float, int]:
        """``epochs`` of SGD from ``weights``; returns (new weights, mean train loss, samples processed).

        With ``masks``, masked weights are zero before the first step and re-zeroed after every
        step (forward uses the sparse weights; gradients stay dense). ``prox_mu`` adds FedProx's
        μ/2·‖θ − θ_start‖² on the live parameters.
        """
        torch.manual_seed(seed)  # dropout and any other torch-global draw
        generator = torch.Generator().manual_seed(seed)
        self.load(weights)
        torch_masks = self._torch_masks(masks)
        apply_masks_torch(self.params, torch_masks)
        self.model.train()
        params = list(self.params.values())
        anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None
        optimizer = torch.optim.SGD(params, lr=self.local["lr"], momentum=self.local["momentum"],
                                    weight_decay=self.local["weight_decay"])
        x, y = x.to(self.device), y.to(self.device)
        loss_sum, processed = 0.0, 0
        for _ in range(epochs if epochs is not None else self.local["epochs"]):
            for batch in self._batches(len(y), generator):
                xb, yb = x[batch], y[batch]
                loss = F.cross_entropy(self.model(xb), yb)
                task_loss = loss.item()
                if not math.isfinite(task_loss):
                    raise DivergenceError(round_, client_id, task_loss)
                if anchors is not None:
                    loss = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks_torch(self.params, torch_masks)
                loss_sum += task_loss * len(yb)
                processed += len(yb)
        return self.export(weights.keys()), loss_sum / max(processed, 1), processed

    def gradients(self, weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, names, *,
                  seed: int, batches: int, masks: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Dense gradient of the plain task loss (no proximal term), summed over ``batches`` batches."""
        generator = torch.Generator().manual_seed(seed)
        self.load(weights)
        apply_masks_torch(self.params, self._torch_masks(masks))
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        x, y = x.to(self.device), y.to(self.device)
        for i, batch in enumerate(self._batches(len(y), generator)):
            if i == batches:
                break
            F.cross_entropy(self.model(x[batch]), y[batch]).backward()
        return {n: self.params[n].grad.detach().to("cpu", copy=True).numpy() for n in names}
