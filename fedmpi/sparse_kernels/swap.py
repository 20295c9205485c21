"""Which masked layers run a sparse kernel (``SparseKernelPolicy``, from their density and a
profile's measured break-even densities), and running chosen modules with their sparse kernels
(``SparseKernels``: swaps their ``forward`` for the duration of a ``with`` block, the trainer's
``sparse_layers`` option). The kernels themselves: ``kernels.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .kernels import WEIGHT_GRAD_MODES, SparseStructure, sparse_forward, supports


class SparseKernels:
    """Runs chosen modules with their sparse kernels inside ``with kernels:`` blocks.

    ``plan(modules, masks, weight_grad)`` picks the modules ({weight name: module}) and builds
    (or reuses) the index structure of each one's mask; each ``with`` block then swaps those
    modules' ``forward`` for the sparse one and restores the dense forward on exit. With
    ``weight_grad="active"`` the plan also takes each module's active values into a compact
    ``nn.Parameter`` (``compact_parameters``; the weights must already be masked), which the
    forward uses and the optimizer steps; ``write_back`` puts them into the dense weights. A forward pass
    run inside the block records the sparse autograd functions, so its backward pass (run after the
    block) is sparse too. Structures are cached across plans and rebuilt only when a mask changes
    (``torch.equal``), so a trainer keeps one instance per model variant.
    """

    def __init__(self):
        self._structures: dict[str, SparseStructure] = {}
        self._forwards: dict[str, tuple[nn.Module, object]] = {}
        self._installed: list[nn.Module] = []
        self._compact: dict[str, tuple[nn.Module, nn.Parameter]] = {}

    def structure(self, name: str, mask: torch.Tensor) -> SparseStructure:
        cached = self._structures.get(name)
        if cached is None or cached.shape != tuple(mask.shape) or cached.mask.device != mask.device \
                or not torch.equal(cached.mask, mask.to(torch.bool)):
            cached = self._structures[name] = SparseStructure(mask)
        return cached

    def plan(self, modules: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor],
             weight_grad: str = "dense") -> "SparseKernels":
        if weight_grad not in WEIGHT_GRAD_MODES:
            raise ValueError(f"weight_grad must be one of {WEIGHT_GRAD_MODES}, got {weight_grad!r}")
        self._forwards, self._compact = {}, {}
        for name, module in modules.items():
            structure = self.structure(name, masks[name])
            values = None
            if weight_grad == "active":
                values = nn.Parameter(structure.values(module.weight))
                self._compact[name] = (module, values)
            self._forwards[name] = (module, sparse_forward(module, structure, weight_grad, values))
        return self

    def compact_parameters(self) -> dict[str, nn.Parameter]:
        """{weight name: its compact active values} of the current "active" plan (else empty)."""
        return {name: values for name, (_, values) in self._compact.items()}

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the compact values into the dense weights (zero elsewhere)."""
        for name, (module, values) in self._compact.items():
            flat = module.weight.view(-1)
            flat.zero_()
            flat.index_copy_(0, self._structures[name].flat, values.detach())

    @property
    def layers(self) -> list[str]:
        return list(self._forwards)

    def __enter__(self):
        for module, forward in self._forwards.values():
            module.forward = forward
            self._installed.append(module)
        return self

    def __exit__(self, *exc):
        for module in self._installed:
            if "forward" in module.__dict__:
                del module.forward
        self._installed = []
        return False


@dataclass(frozen=True)
class SparseKernelPolicy:
    """Which masked layers run a sparse kernel: ``mode`` "off" (none), "always" (every supported
    layer with a mask below density 1) or "auto" (those whose density is below
    ``break_even[name]``, the density under which a profile measured the sparse kernel faster;
    layers missing from ``break_even`` stay dense)."""

    mode: str = "off"
    break_even: Mapping[str, float] | None = None
    break_even_active: Mapping[str, float] | None = None   # the same for weight_grad "active"

    def choose(self, modules: Mapping[str, nn.Module], densities: Mapping[str, float],
               weight_grad: str = "dense") -> list[str]:
        if self.mode == "off":
            return []
        table = (self.break_even_active if weight_grad == "active" and self.break_even_active
                 else self.break_even) or {}
        chosen = []
        for name, density in densities.items():
            module = modules.get(name)
            if module is None or not supports(module) or not density < 1.0:
                continue
            if self.mode == "always" or density < table.get(name, 0.0):
                chosen.append(name)
        return chosen


def masked_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<prefix>.weight": module}`` for every module that has a sparse kernel."""
    return {(f"{p}.weight" if p else "weight"): m for p, m in model.named_modules() if supports(m)}
