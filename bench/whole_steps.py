"""The whole training steps bench/kernel_steps.py times, and the PruneFL masks it times them with
(bench/kernel_steps.py's docstring says what each step holds and how the masks are made)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from fedmpi.algorithms.prunefl import PruneFL
from fedmpi.algorithms.prunefl_reconfiguration import RoundTimeModel, apply_new_masks, reconfigure
from fedmpi.config.defaults import DEFAULTS
from fedmpi.sparse_kernels import SparseStructure, sparse_forward
from fedmpi.sparsity import Remasker
from fedmpi.timing.measure import _step_fn
from fedmpi.training import LocalTrainer
from fedmpi.training.hooks import SquaredGradientAccumulator, SummedGradientSquared
from fedmpi.training.optim import OptimizerSpec

KERNELS = ("dense", "sparse", "sparse_active")
UNBOUNDED_C0 = 1e30   # Γ's denominator: every candidate of positive importance raises Γ

def read_settings(path) -> tuple[dict, dict, dict]:
    """(whole config, local section with fedmpi's defaults, prunefl section with PruneFL's defaults)
    of a run config or of a campaign file's ``config``."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    cfg = doc.get("config", doc) if isinstance(doc, dict) else {}
    if not isinstance(cfg, dict):
        raise ValueError("holds no config mapping")
    return cfg, {**DEFAULTS["local"], **cfg.get("local", {})}, {**PruneFL.defaults, **cfg.get("prunefl", {})}


# ------------------------------------------------------------------------------------ masks
def prunefl_masks(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, densities, *,
                  local: dict, settings: dict, settle: int = 4, seed: int = 0, progress=None) -> dict[float, np.ndarray]:
    """{density: mask of layer ``name``} by PruneFL's reconfigurations with the density cap at
    each density (the module doc), ``settle`` more once the cap is reached; ``x``, ``y``: the
    training data, of which a fixed subset of ``settings["ip_data_batches"]`` batches is used (0:
    all). ``model`` is trained in place."""
    trainer = LocalTrainer(model, local)
    take = settings["ip_data_batches"] * local["batch_size"] or len(y)
    chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(y))[:take]))
    x, y = x[chosen], y[chosen]
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}
    names = [n for n, _ in model.named_parameters()]
    mask = np.ones(weights[name].shape, bool)
    time_model = RoundTimeModel(UNBOUNDED_C0, {name: 1.0})
    out, chunk = {}, 0
    for density in sorted(densities, reverse=True):
        cap = int(round(density * mask.size))
        settled = 0
        while int(mask.sum()) != cap or settled < settle:
            settled += int(mask.sum()) == cap
            hook = SquaredGradientAccumulator(names, dtype=torch.float32)
            weights, _, _ = trainer.train(weights, x, y, seed=seed * 1000 + chunk, round_=1, client_id=0,
                                          masks={name: mask}, steps=settings["ip_interval"], hooks=[hook])
            chunk += 1
            importance = {k: t.numpy() for k, t in hook.totals.items()}
            others = sum(float(v.sum()) for k, v in importance.items() if k != name)
            new = reconfigure(weights, {name: mask}, {name: importance[name]}, settings["max_drop"], time_model,
                              dense_importance=others, max_active=cap).masks
            weights = apply_new_masks(weights, {name: mask}, new)
            count = int(new[name].sum())
            if count < cap:
                raise RuntimeError(f"{name}: only {count} weights have importance > 0, "
                                   f"fewer than density {density} needs ({cap})")
            if count > cap and count >= int(mask.sum()):
                raise RuntimeError(f"{name}: a reconfiguration kept {count} of {int(mask.sum())} weights "
                                   f"(prunefl.max_drop {settings['max_drop']}); density {density} is not reached")
            mask = new[name]
            if progress:
                progress(f"prunefl mask: reconfiguration {chunk}, density {mask.mean():.4f}")
        out[density] = mask.copy()
    return out


# ------------------------------------------------------------------------------------ steps
class KernelStep:
    """One kernel's training step on ``module`` with ``mask``, as the trainer runs it (module doc):
    ``forward_backward()``, ``step()`` (+ optimizer step and re-masking where the trainer
    re-masks; ``importance=True``: + PruneFL's importance hook); ``load()`` puts the start
    weights back (the masked ``start`` and the bias at construction) and starts a fresh optimizer
    (its first step creates any momentum buffer, as a round's does); ``weight()`` is the dense
    weight now (the compact values scattered into zeros for ``sparse_active``)."""

    def __init__(self, kernel: str, module: nn.Module, name: str, x: torch.Tensor, gy: torch.Tensor,
                 mask: torch.Tensor, structure: SparseStructure, start: torch.Tensor, spec: OptimizerSpec):
        self.module, self.structure, self.start = module, structure, start
        self.start_bias = None if module.bias is None else module.bias.detach().clone()
        self.values = nn.Parameter(structure.values(start)) if kernel == "sparse_active" else None
        forward = module.forward if kernel == "dense" else sparse_forward(
            module, structure, "dense" if kernel == "sparse" else "active", self.values)
        self.forward_backward = _step_fn(module, x, gy, forward, self.values)
        trained = [module.weight if self.values is None else self.values]
        self.trained, self.spec = trained + ([] if module.bias is None else [module.bias]), spec
        self.optimizer = spec.build(self.trained)
        self.params = {name: module.weight, **({} if module.bias is None else {"bias": module.bias})}
        # the trainer re-masks the layers whose dense weight the optimizer steps
        self.masks = {name: mask} if self.values is None else {}
        self.remask = Remasker(self.params, self.masks)
        self.importance = SummedGradientSquared(list(self.params)) if self.values is None else None
        self.batch = len(x)

    def step(self, importance: bool = False) -> None:
        self.forward_backward()
        if importance:
            self.importance.after_backward(self.params, self.batch)
        self.optimizer.step()
        self.remask()

    @torch.no_grad()
    def load(self) -> None:
        self.module.weight.copy_(self.start)
        if self.start_bias is not None:
            self.module.bias.copy_(self.start_bias)
        if self.values is not None:
            self.values.copy_(self.structure.values(self.start))
        self.optimizer = self.spec.build(self.trained)   # fresh state (momentum), as every round's

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        if self.values is None:
            return self.module.weight.detach().clone()
        flat = torch.zeros(self.start.numel(), dtype=self.values.dtype)
        flat.index_copy_(0, self.structure.flat, self.values.detach())
        return flat.reshape(self.start.shape)

    def part(self, part: str):
        return {"step": self.step, "fwd_bwd": self.forward_backward,
                "step_importance": lambda: self.step(importance=True)}[part]


def kernel_steps(module: nn.Module, name: str, x: torch.Tensor, gy: torch.Tensor, mask: torch.Tensor,
                 spec: OptimizerSpec, kernels=KERNELS) -> dict[str, KernelStep]:
    """{kernel: its step} on one layer, mask and optimizer, from the module's weight under ``mask``."""
    mask = mask.to(torch.bool)
    structure = SparseStructure(mask)
    start = module.weight.detach() * mask
    return {k: KernelStep(k, module, name, x, gy, mask, structure, start, spec) for k in kernels}
