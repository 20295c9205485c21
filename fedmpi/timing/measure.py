"""Measuring a machine: forward + backward time of each maskable layer at several densities with
the dense and the sparse kernels (``measure_model``), and of a whole training step through
``LocalTrainer`` (``trainer_seconds``). The line fits and break-even densities: fits.py; the
measured profile that ``fedmpi profile`` writes: profile_machine.py (``bench/kernels.py`` uses
the same measurements).

Protocol. Each layer gets the input it sees in the model (captured by a forward hook on one
random batch) and a fixed random output gradient. For each density d, a random mask with exactly
round(d·n) active weights (seeded) is applied to the weight; a *step* is ``zero grads → forward →
backward(output gradient)``, the input gradient computed unless the layer reads the model input.
Kernels: ``dense`` (the module's own forward on the masked weight), ``sparse`` (CSR kernel,
gradient of every weight) and ``sparse_active`` (CSR kernel on the compact active values, their
gradient only: what the trainer runs when no step hook needs inactive gradients).
After one warm-up step per (density, kernel), ``repeats`` rounds each time every (density,
kernel) pair once, the order rotated from round to round, so that slow phases of a shared
machine hit every kernel alike; one measurement is the mean of ``inner`` steps (``inner`` chosen
so a measurement lasts about ``min_time`` seconds). Reported: the median over rounds and the
spread (min, max, interquartile range). Lines are least-squares fits of the medians against nnz
(sparse kernels: on densities <= 0.5, see ``fits.SPARSE_FIT_MAX_DENSITY``).
Clock: ``cpu`` (default) is the measuring thread's CPU time (user + system), which time spent
descheduled on a shared machine does not inflate; with one torch thread it equals the wall time
of an idle machine. ``wall`` is ``time.perf_counter``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..sparse_kernels import SparseStructure, sparse_forward, supports

KERNELS = ("dense", "sparse", "sparse_active")
DEFAULT_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


@dataclass
class LayerTimes:
    name: str
    shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    densities: list[float]
    nnz: list[int]
    times: dict[str, list[list[float]]] = field(default_factory=dict)   # kernel → per density → repeats

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def medians(self, kernel: str) -> list[float]:
        return [statistics.median(ts) for ts in self.times[kernel]]

    def spread(self, kernel: str) -> list[dict]:
        out = []
        for ts in self.times[kernel]:
            q = np.quantile(ts, [0.25, 0.75]) if len(ts) > 1 else (ts[0], ts[0])
            out.append({"median": statistics.median(ts), "min": min(ts), "max": max(ts),
                        "iqr": float(q[1] - q[0]), "repeats": len(ts)})
        return out


def layer_inputs(model: nn.Module, input_shape, batch_size: int, seed: int = 0) -> dict[str, tuple]:
    """{weight name: (module, captured input, whether the layer reads the model input)}."""
    from ..models import maskable_weight_modules

    modules = maskable_weight_modules(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=g)
    captured: dict[str, tuple] = {}
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            if name not in captured:
                captured[name] = (module, inputs[0].detach().clone(), inputs[0] is x)
        return fn

    for name, module in modules.items():
        hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
            model.train()
    finally:
        for h in hooks:
            h.remove()
    order = [k for k in model.state_dict() if k in captured]
    return {k: captured[k] for k in order}


def exact_mask(shape, density: float, generator: torch.Generator) -> torch.Tensor:
    n = math.prod(shape)
    keep = int(round(density * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask.reshape(shape)


def _step_fn(module: nn.Module, x: torch.Tensor, gy: torch.Tensor, forward, values=None):
    def step():
        module.weight.grad = None
        if module.bias is not None:
            module.bias.grad = None
        if values is not None:
            values.grad = None
        x.grad = None
        forward(x).backward(gy)
    return step


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def _timed(step, inner: int, clock: str = "cpu") -> float:
    now = CLOCKS[clock]
    began = now()
    for _ in range(inner):
        step()
    return (now() - began) / inner


def time_layer(name: str, module: nn.Module, x: torch.Tensor, reads_model_input: bool, densities,
               *, repeats: int = 5, min_time: float = 0.02, kernels=KERNELS, seed: int = 0,
               max_inner: int = 50, clock: str = "cpu") -> LayerTimes:
    """Step times of one layer (see the module doc); the module's weight is restored after."""
    kernels = [k for k in kernels if k == "dense" or supports(module)]
    shape = tuple(module.weight.shape)
    original = module.weight.detach().clone()
    g = torch.Generator().manual_seed(seed)
    xin = x.clone().requires_grad_(not reads_model_input)
    with torch.no_grad():
        gy = torch.randn(module(xin).shape, generator=g)
    setups = []   # per density: (masked weight, structure)
    for d in densities:
        mask = exact_mask(shape, d, g)
        setups.append((original * mask, SparseStructure(mask)))
    steps = {}
    for i, (masked, structure) in enumerate(setups):
        for k in kernels:
            # sparse_active trains the compact active values, as the trainer does without hooks
            values = nn.Parameter(structure.values(masked)) if k == "sparse_active" else None
            forward = module.forward if k == "dense" else sparse_forward(
                module, structure, "dense" if k == "sparse" else "active", values)
            steps[i, k] = _step_fn(module, xin, gy, forward, values)

    def load(i):
        with torch.no_grad():
            module.weight.copy_(setups[i][0])

    # warm-up, and the number of steps per measurement (from the slowest kernel's warm-up step)
    slowest = 0.0
    for i in range(len(setups)):
        load(i)
        for k in kernels:
            steps[i, k]()
            slowest = max(slowest, _timed(steps[i, k], 1))
    inner = int(min(max_inner, max(1, math.ceil(min_time / max(slowest, 1e-6)))))
    result = LayerTimes(name, shape, tuple(x.shape), [float(d) for d in densities],
                        [int(s.nnz) for _, s in setups], {k: [[] for _ in setups] for k in kernels})
    pairs = [(i, k) for i in range(len(setups)) for k in kernels]
    for r in range(repeats):
        shift = (r * (len(kernels) + 1)) % len(pairs)
        for i, k in pairs[shift:] + pairs[:shift]:
            load(i)
            result.times[k][i].append(_timed(steps[i, k], inner, clock))
    with torch.no_grad():
        module.weight.copy_(original)
    module.weight.grad = None
    return result


def trainer_seconds(model_name: str, input_shape, num_classes: int, batch_size: int, local: dict, *,
                    repeats: int = 5, steps: int = 4, seed: int = 0,
                    clock: str = "cpu") -> tuple[list[float], list[float]]:
    """Whole-model cost through fedmpi's own ``LocalTrainer`` (plain SGD, random masks of density
    0.5 on every maskable weight — re-masking costs the same whatever the kernels, and its writes
    grow as density falls: 0.5 is the middle —, dense kernels): per repeat, the seconds of one
    training step — (T(steps) − T(0)) / steps — and the per-round overhead T(0) (load weights and
    masks, export). ``local``: the config's ``local`` section, whose optimizer settings are replaced
    by plain SGD at a negligible rate."""
    from ..models import build_model, maskable_parameter_names
    from ..training import LocalTrainer

    torch.manual_seed(seed)
    model = build_model(model_name, input_shape, num_classes)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}
    rng = np.random.default_rng(seed)
    masks = {n: rng.random(weights[n].shape) < 0.5 for n in maskable_parameter_names(model)}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size * steps, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (batch_size * steps,), generator=g)
    local = dict(local)
    local.update(batch_size=batch_size, lr=1e-6, momentum=0.0, weight_decay=0.0, optimizer="sgd")
    trainer = LocalTrainer(model, local)

    def run(k):
        return lambda: trainer.train(weights, x, y, seed=seed, round_=1, client_id=0, masks=masks, steps=k)

    run(steps)(), run(0)()   # warm-up
    per_step, overhead = [], []
    for _ in range(repeats):
        t0 = _timed(run(0), 1, clock)
        tk = _timed(run(steps), 1, clock)
        per_step.append(max(0.0, (tk - t0) / steps))
        overhead.append(t0)
    return per_step, overhead


def measure_model(model: nn.Module, input_shape, batch_size: int, densities=DEFAULT_DENSITIES, *,
                  repeats: int = 5, min_time: float = 0.02, kernels=KERNELS, seed: int = 0,
                  layers=None, progress=None, clock: str = "cpu") -> dict[str, LayerTimes]:
    inputs = layer_inputs(model, input_shape, batch_size, seed)
    out = {}
    for name, (module, x, reads_input) in inputs.items():
        if layers is not None and name not in layers:
            continue
        if progress:
            progress(f"{name} {tuple(module.weight.shape)} input {tuple(x.shape)}")
        out[name] = time_layer(name, module, x, reads_input, densities, repeats=repeats,
                               min_time=min_time, kernels=kernels, seed=seed, clock=clock)
    return out
