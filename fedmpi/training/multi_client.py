"""Several clients of one rank trained at once (``local.client_batch`` > 1).

``LocalTrainer.train`` trains one client at a time. For a small model and a few dozen samples per
client, most of that time is not arithmetic but per-step overhead: dozens of small kernel calls,
autograd bookkeeping, ``torch.optim`` machinery, each paid once per client and step.
``train_group`` trains G clients in lockstep instead: their weights are stacked ``[G, ...]``, the
model runs once per step for all of them under ``torch.func.vmap`` + ``functional_call``, and each
client keeps its own batch order (its own seeded generator, as in ``LocalTrainer._batches``), its
masks, its proximal anchor and its SGD momentum buffer.

Exactness: every client's weights, loss and sample count equal ``LocalTrainer.train``'s bit for bit.
Batching changes values only where a batched kernel would reduce in another order than the
per-client one: the linear layers, the convolutions and the cross-entropy, which therefore run as
custom autograd Functions calling, per client, the ATen kernels the one-by-one loop calls
(group_kernels.py). Everything else is elementwise or per row / per image (ReLU, pooling, flatten,
the SGD arithmetic, mask re-zeroing), where batching changes no value; the SGD step runs
``torch.optim.SGD``'s single-tensor arithmetic (weight decay, momentum, Nesterov) per client slice.
What is batched is what costs: one model call, one autograd graph and one optimizer pass per step
for G clients, the elementwise kernels, the data gather.

Clients whose sample counts differ have differently shaped batches; a group is split into
sub-groups of equal size (exact shapes, no padding), so a partition with unequal clients gains only
where sizes repeat (iid and shards partitions give equal sizes).

Only what is known to be exact is grouped (``group_unsupported`` says why not): SGD, the
cross-entropy objective (``local.loss: cross_entropy``; ``bce_onehot`` has no grouped kernel), no
step hooks, no ``steps`` limit, the full model, no sparse kernels, a model without buffers (no
batch norm) whose parameters all sit in ``nn.Linear`` / ``nn.Conv2d`` layers, and no random op in
the forward (``vmap`` refuses one). Otherwise ``train_group`` trains the clients one by one with
``LocalTrainer.train``: the same results, without the speed-up.
On CUDA the optimizer's per-client kernels are the same, but bit-equality with the one-by-one loop
(which uses ``torch.optim``'s foreach kernels there) is not claimed.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from torch.func import functional_call, vmap

from ..errors import DivergenceError
from ..rng import seed_torch_global
from ..update import tensor_view
from .group_kernels import GroupCrossEntropy, NotGroupable, PerClientKernels
from .objectives import cross_entropy
from .optim import sgd_step
from .trainer import batch_plan


@dataclass
class Member:
    """One client of a group: what ``LocalTrainer.train`` takes for it."""

    client_id: int
    weights: dict[str, np.ndarray]
    x: torch.Tensor
    y: torch.Tensor
    seed: int
    masks: dict[str, np.ndarray] | None = None


# ------------------------------------------------------------------ eligibility
_PARAMETER_FREE_OK = (torch.nn.ReLU, torch.nn.Flatten, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.Identity,
                      torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Sequential, torch.nn.ModuleList)


def model_unsupported(model: torch.nn.Module) -> str | None:
    """Why this model cannot be trained as a group (None: it can)."""
    if any(True for _ in model.buffers()):
        return "the model has buffers (batch norm?)"
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            continue
        if isinstance(module, torch.nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                return f"{name}: only zero, numeric conv padding is grouped"
            continue
        if own:
            return f"{name or 'model'} ({type(module).__name__}) holds parameters outside Linear/Conv2d"
        if name and not isinstance(module, _PARAMETER_FREE_OK) and list(module.children()) == []:
            return f"{name}: {type(module).__name__} is not known to act per sample"
    return None


def group_unsupported(trainer, *, optimizer=None, objective=None, hooks=(), steps=None,
                      variant=None, masks=None) -> str | None:
    """Why these training settings cannot be grouped exactly (None: they can); ``objective`` None:
    the trainer's (``local.loss``)."""
    spec = optimizer or trainer.optimizer
    if spec.name != "sgd":
        return f"optimizer {spec.name} (only SGD is grouped)"
    if objective is None:
        objective = getattr(trainer, "objective", cross_entropy)
    if objective is not cross_entropy:   # GroupCrossEntropy is the only grouped loss kernel
        return "an objective other than cross-entropy (local.loss or the method's own)"
    if tuple(hooks):
        return "step hooks"
    if steps is not None:
        return "a fixed number of steps"
    if variant:
        return "a model variant"
    if masks and getattr(trainer, "sparse_kernels", None) is not None:
        return "sparse kernels"
    return model_unsupported(trainer.model)


# ------------------------------------------------------------------ training
def train_group(trainer, members: list[Member], *, round_: int, prox_mu: float = 0.0,
                epochs: int | None = None) -> list[tuple[dict[str, np.ndarray], float, int]]:
    """``LocalTrainer.train`` for each member (same results, bit for bit), several at once where
    ``group_unsupported`` allows; returns (weights, mean loss, samples processed) per member."""
    masked = any(m.masks for m in members)
    reason = group_unsupported(trainer, masks=masked)
    if reason is None and masked and len({tuple(sorted(m.masks or {})) for m in members}) > 1:
        reason = "members mask different tensors"
    if reason is None and len(members) > 1:
        try:
            return _train_grouped(trainer, members, round_, prox_mu, epochs)
        except NotGroupable:
            pass
    return [trainer.train(m.weights, m.x, m.y, seed=m.seed, round_=round_, client_id=m.client_id,
                          masks=m.masks, prox_mu=prox_mu, epochs=epochs) for m in members]


def _train_grouped(trainer, members, round_, prox_mu, epochs):
    results: dict[int, tuple] = {}
    losses: dict[int, list[tuple[float, int]]] = {}
    # sub-groups of equal size: positions in the group, in order, keyed by sample count
    order = sorted(range(len(members)), key=lambda i: (len(members[i].y), i))
    for _, positions in groupby(order, key=lambda i: len(members[i].y)):
        positions = list(positions)
        trained, step_losses = _train_equal(trainer, [members[i] for i in positions], prox_mu, epochs)
        for i, weights, per_step in zip(positions, trained, step_losses):
            results[i], losses[i] = weights, per_step
    out = []
    for i, m in enumerate(members):
        steps = losses[i]
        for loss, _ in steps:   # the one-by-one loop stops at the first client, in order, that diverges
            if not np.isfinite(loss):
                raise DivergenceError(round_, m.client_id, loss)
        loss_sum, processed = 0.0, 0
        for loss, size in steps:
            loss_sum += loss * size
            processed += size
        out.append((results[i], loss_sum / max(processed, 1), processed))
    seed_torch_global(members[-1].seed, trainer.device)   # the global RNG as the one-by-one loop leaves it
    return out


def _train_equal(trainer, members: list[Member], prox_mu: float, epochs: int | None):
    """Members with equal sample counts: same number of steps, same batch sizes."""
    device, model = trainer.device, trainer.model
    spec, local = trainer.optimizer, trainer.local
    G, n = len(members), len(members[0].y)
    names = [name for name, _ in model.named_parameters()]
    keys = list(members[0].weights)
    with torch.no_grad():
        params = {k: torch.stack([tensor_view(np.asarray(m.weights[k])) for m in members]).to(
            device, torch.float32) for k in names}
        masks = {}
        if members[0].masks:
            for k in members[0].masks:
                kept = torch.stack([torch.from_numpy(np.asarray(m.masks[k], dtype=bool)) for m in members])
                masks[k] = ~kept.to(device)
                params[k].masked_fill_(masks[k], 0)
        anchors = {k: p.clone() for k, p in params.items()} if prox_mu > 0 else None
    x = torch.stack([m.x for m in members]).to(device)
    y = torch.stack([m.y for m in members]).to(device)
    rows = torch.arange(G, device=device)[:, None]
    generators = [torch.Generator().manual_seed(m.seed) for m in members]
    with torch.no_grad():
        per_client = list(zip(*[params[k].detach().unbind(0) for k in names]))  # views, for the SGD step
    leaves = [params[k].requires_grad_() for k in names]
    buffers = None
    model.train()

    def forward(p, xb):
        with PerClientKernels():
            return functional_call(model, p, (xb,))

    batched_forward = vmap(forward)
    step_losses, sizes = [], []
    size, end = batch_plan(n, local)   # the one-by-one trainer's batches, local.drop_last included
    for _ in range(epochs if epochs is not None else local["epochs"]):
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        for start in range(0, end, size):
            batch = orders[:, start:start + size]
            logits = batched_forward(dict(zip(names, leaves)), x[rows, batch])
            loss = GroupCrossEntropy.apply(logits, y[rows, batch])
            total = loss
            if anchors is not None:
                prox = sum(((params[k] - anchors[k]) ** 2).flatten(1).sum(1) for k in names)
                total = loss + prox_mu / 2 * prox
            grads = torch.autograd.grad(total.sum(), leaves)
            with torch.no_grad():
                buffers = _sgd_step(per_client, list(zip(*[g.unbind(0) for g in grads])), buffers, spec)
                for k, outside in masks.items():
                    params[k].masked_fill_(outside, 0)
            step_losses.append(loss.detach())
            sizes.append(batch.shape[1])
    per_step = torch.stack(step_losses).t().tolist() if step_losses else [[] for _ in members]
    with torch.no_grad():
        stacked = {k: params[k].detach().to("cpu").numpy() for k in names}
    trained = [{k: stacked[k][g] for k in keys} for g in range(G)]
    return trained, [list(zip(row, sizes)) for row in per_step]


def _sgd_step(params, grads, buffers, spec):
    """``optim.sgd_step`` client by client (``params``/``grads``: per client, its slice of every
    parameter; a client's tensors stay in cache through the passes); returns the per-client
    momentum buffers."""
    if buffers is None:
        buffers = [[None] * len(p) for p in params]
    for c, (p, g) in enumerate(zip(params, grads)):
        buffers[c] = sgd_step(list(p), list(g), buffers[c], spec)
    return buffers
