"""Local training on one rank, assembled from parts an algorithm chooses: the optimizer
(``OptimizerSpec``), the objective (``objectives``), step hooks (``hooks``), the model variant
(depth/width submodels) and optional masks and proximal term.

One ``LocalTrainer`` per rank owns the torch modules: the base model and each variant it has been
asked for, built once and reused for every client and round (clients load their weights into it).
All randomness (batch order, dropout) is seeded from the task's seed, which derives from
(seed, round, client), so a client's result does not depend on the rank that trains it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import DivergenceError
from ..rng import seed_torch_global
from ..sparsity import Remasker, apply_masks_torch
from ..update import tensor_view
from .explicit import ExplicitMLP
from .hooks import StepHook
from .objectives import Objective, loss_objective
from .optim import OptimizerSpec


def batch_plan(n: int, local: dict) -> tuple[int, int]:
    """(batch size, end of the last batch) for one pass over ``n`` samples. ``local.drop_last``
    follows the HypeMeFed authors' client (framework/FedClients/FedClient.py, ``FedClient.__init__``):
    batch size min(batch_size, n), and ``DataLoader(drop_last=True)`` skips the last partial batch."""
    size = local["batch_size"]
    if not local.get("drop_last", False):
        return size, n
    size = max(min(size, n), 1)
    return size, n - n % size


def variant_key(variant: dict | None) -> tuple:
    return tuple(sorted((variant or {}).items()))


class LocalTrainer:
    def __init__(self, model: torch.nn.Module, local_cfg: dict, device: str = "cpu", *,
                 build_variant: Callable[..., torch.nn.Module] | None = None, sparse_kernels=None):
        """``model`` is the full model; ``build_variant(**variant)`` builds a submodel (a model
        family's ``level``/``width`` keywords) the first time a client needs it.
        ``sparse_kernels``: a ``fedmpi.sparse_kernels.SparseKernelPolicy`` choosing which masked
        layers run a real sparse kernel (None: dense kernels only)."""
        self.sparse_kernels = sparse_kernels
        self._kernels: dict[tuple, object] = {}
        self.device = torch.device(device)
        self.local = local_cfg
        self.optimizer = OptimizerSpec.from_config(local_cfg)
        # local.loss: the objective of every client an algorithm does not give its own
        self.objective = loss_objective(local_cfg.get("loss", "cross_entropy"))
        # "auto": models fedmpi can train without autograd (explicit.py) do so, same bits
        self.backward = local_cfg.get("backward", "auto")
        self._build_variant = build_variant
        self._models: dict[tuple, torch.nn.Module] = {}
        self._tensors: dict[tuple, dict[str, torch.Tensor]] = {}
        self._adopt((), model)

    def _adopt(self, key: tuple, model: torch.nn.Module) -> None:
        self._models[key] = model.to(self.device)
        # live views of every parameter and buffer, so loading weights is a copy_ per tensor
        self._tensors[key] = dict(model.state_dict(keep_vars=True))

    def model_for(self, variant: dict | None = None) -> torch.nn.Module:
        key = variant_key(variant)
        if key not in self._models:
            if self._build_variant is None:
                raise ValueError(f"model variant {dict(key)} requested but this model has no variants")
            self._adopt(key, self._build_variant(**dict(key)))
        return self._models[key]

    @property
    def model(self) -> torch.nn.Module:
        return self._models[()]

    # -- weights in and out -------------------------------------------------------------------
    @torch.no_grad()
    def load(self, weights: dict[str, np.ndarray], variant: dict | None = None) -> torch.nn.Module:
        model = self.model_for(variant)
        tensors = self._tensors[variant_key(variant)]
        for name, value in weights.items():
            if name not in tensors:
                raise KeyError(f"tensor {name!r} is not part of model variant {variant or 'full'}")
            tensors[name].copy_(tensor_view(np.asarray(value)))
        return model

    @torch.no_grad()
    def export(self, names: Iterable[str], variant: dict | None = None) -> dict[str, np.ndarray]:
        tensors = self._tensors[variant_key(variant)]
        return {n: tensors[n].detach().to("cpu", copy=True).numpy() for n in names}

    def _torch_masks(self, masks: dict[str, np.ndarray] | None) -> dict[str, torch.Tensor]:
        # converted once per client, not once per step
        return {n: torch.from_numpy(m).to(self.device, torch.bool) for n, m in (masks or {}).items()}

    def _batches(self, n: int, generator: torch.Generator):
        order = torch.randperm(n, generator=generator)
        size, end = batch_plan(n, self.local)
        for start in range(0, end, size):
            yield order[start:start + size]

    # -- training -----------------------------------------------------------------------------
    def train(self, weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, *, seed: int,
              round_: int, client_id: int, masks: dict[str, np.ndarray] | None = None,
              prox_mu: float = 0.0, epochs: int | None = None, steps: int | None = None,
              optimizer: OptimizerSpec | None = None, objective: Objective | None = None,
              hooks: Iterable[StepHook] = (), variant: dict | None = None,
              sparse_layers: Iterable[str] | None = None,
              ) -> tuple[dict[str, np.ndarray], float, int]:
        """Local training from ``weights``; returns (new weights, mean objective value, samples processed).

        Runs ``epochs`` passes over the data (default ``local.epochs``), or exactly ``steps``
        minibatch steps when given (PruneFL's "5 local iterations"), reshuffling each pass.
        With ``masks``, masked weights are zero before the first step and re-zeroed after every
        step (forward uses the sparse weights; gradients stay dense). ``prox_mu`` adds FedProx's
        μ/2·‖θ − θ_start‖² on the live parameters (not part of the reported loss).
        ``objective``: None is the trainer's (``local.loss``).
        ``sparse_layers`` names masked layers to run with a real sparse kernel (CPU; None: the
        trainer's ``sparse_kernels`` policy picks them from their densities); results equal the
        masked dense layers' up to float rounding. Their weight gradient is dense when ``hooks``
        are given (a hook may read inactive gradients); without hooks they train their active
        values as compact vectors (``fedmpi.sparse_kernels``, mode "active"), written back into
        the dense weights at the end.
        """
        # build/load first: building a variant the first time draws from torch's global RNG, and
        # dropout must not depend on whether this rank met the variant before
        model = self.load(weights, variant)
        seed_torch_global(seed, self.device)  # dropout and any other torch-global draw
        generator = torch.Generator().manual_seed(seed)
        params = dict(model.named_parameters())
        torch_masks = self._torch_masks(masks)
        apply_masks_torch(params, torch_masks)
        hooks = list(hooks)
        kernels = self._sparse_plan(model, variant, torch_masks, sparse_layers, "dense" if hooks else "active")
        # layers on "active" sparse kernels train their compact active values instead of the
        # dense weight: the optimizer steps those, and they need no re-masking
        compact = kernels.compact_parameters()
        trained = [compact.get(n, p) for n, p in params.items()]
        remask = Remasker(params, {n: m for n, m in torch_masks.items() if n not in compact})
        model.train()
        anchors = [p.detach().clone() for p in trained] if prox_mu > 0 else None
        spec = optimizer or self.optimizer
        objective = self.objective if objective is None else objective
        explicit = ExplicitMLP(model, spec) if self.backward == "auto" and ExplicitMLP.covers(
            model, device=self.device, objective=objective, optimizer=spec, hooks=hooks, prox_mu=prox_mu,
            compact=compact, variant=variant) else None
        opt = spec.build(trained) if explicit is None else None
        x, y = x.to(self.device), y.to(self.device)
        loss_sum, processed, step = 0.0, 0, 0
        passes = epochs if epochs is not None else self.local["epochs"]
        while (step < steps) if steps is not None else (passes > 0):
            passes -= 1
            for batch in self._batches(len(y), generator):
                if steps is not None and step == steps:
                    break
                xb, yb = x[batch], y[batch]
                if explicit is not None:
                    loss, saved = explicit.forward_loss(xb, yb)
                else:
                    with kernels:   # forward through the sparse kernels; their backward follows
                        loss = objective(model(xb), yb)
                task_loss = loss.item()
                if not math.isfinite(task_loss):
                    raise DivergenceError(round_, client_id, task_loss)
                if explicit is not None:
                    explicit.backward_step(saved)
                    remask()
                else:
                    if anchors is not None:
                        loss = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trained, anchors))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for hook in hooks:
                        hook.after_backward(params, len(yb))
                    opt.step()
                    remask()
                    for hook in hooks:
                        hook.after_step(params)
                loss_sum += task_loss * len(yb)
                processed += len(yb)
                step += 1
        kernels.write_back()
        return self.export(weights.keys(), variant), loss_sum / max(processed, 1), processed

    def _sparse_plan(self, model, variant, torch_masks, sparse_layers, weight_grad):
        from ..sparse_kernels import SparseKernels, masked_weight_modules

        key = variant_key(variant)
        kernels = self._kernels.setdefault(key, SparseKernels())
        if sparse_layers is None:
            if self.sparse_kernels is None or self.device.type != "cpu" or not torch_masks:
                return kernels.plan({}, {})
            modules = masked_weight_modules(model)
            densities = {n: int(m.count_nonzero()) / m.numel() for n, m in torch_masks.items() if n in modules}
            sparse_layers = self.sparse_kernels.choose(modules, densities, weight_grad)
        else:
            modules = masked_weight_modules(model)
        sparse_layers = list(sparse_layers)
        missing = [n for n in sparse_layers if n not in torch_masks or n not in modules]
        if missing:
            raise ValueError(f"sparse_layers {missing} need a mask and a Linear/Conv2d (groups 1) layer")
        return kernels.plan({n: modules[n] for n in sparse_layers}, torch_masks, weight_grad)

    def gradients(self, weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor, names, *,
                  seed: int, batches: int, masks: dict[str, np.ndarray] | None = None,
                  objective: Objective | None = None, variant: dict | None = None) -> dict[str, np.ndarray]:
        """Dense gradient of the plain task loss (no proximal term), summed over ``batches`` batches;
        ``objective`` None: the trainer's (``local.loss``)."""
        objective = self.objective if objective is None else objective
        generator = torch.Generator().manual_seed(seed)
        model = self.load(weights, variant)
        params = dict(model.named_parameters())
        apply_masks_torch(params, self._torch_masks(masks))
        model.train()
        model.zero_grad(set_to_none=True)
        x, y = x.to(self.device), y.to(self.device)
        for i, batch in enumerate(self._batches(len(y), generator)):
            if i == batches:
                break
            objective(model(x[batch]), y[batch]).backward()
        return {n: params[n].grad.detach().to("cpu", copy=True).numpy() for n in names}
