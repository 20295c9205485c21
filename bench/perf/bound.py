"""Where a client's local training goes, and what that bounds: the overhead workload's arithmetic floor.

``make bench-perf``'s overhead workload (bench/perf/workloads.py) trains a 199 k-parameter MLP
on 60 samples per client, batch 32: two SGD steps of 32 and 28 rows. The target there is fedmpi at
≤ 0.5× the bare per-client loop. Training several clients at once (``local.client_batch``)
can only remove what is not the clients' own arithmetic; this script measures how much that is.
On one torch thread, median over ``--repeats`` interleaved passes of ``--clients`` clients each:

    client     the bare loop's per-client training (a fresh torch.optim.SGD with momentum and
               weight decay, model forward, cross-entropy, backward, step), as bench/perf/bare.py
    products   the same client's matrix products alone, on preallocated tensors: per step and
               layer the forward ``addmm`` and the backward ``mm`` for the weight gradient and
               (except the first layer) the input gradient, and the bias gradient's column sum.
               These are the kernels the per-client loop runs and grouped training must also run
               per client to keep its results bit-identical (training/group_kernels.py)
    optimizer  the SGD step alone (weight decay, momentum, update) over all parameters, twice
    fedmpi-sgd   the client's training with fedmpi's SGD step (training/optim.py) instead of a
               fresh ``torch.optim.SGD``, as fedmpi's trainer runs it with ``local.backward:
               autograd``
    no-autograd  the same without autograd, as the trainer runs it by default: fedmpi's
               ``ExplicitMLP`` (training/explicit.py; the forward, the backward formulas autograd
               runs for it, fedmpi's SGD step). It is checked to give the bits of ``fedmpi-sgd``;
               the difference between the two is autograd's share of the client

and the clients' FLOPs (2 per multiply-add). Then the floor on C cores: products × clients / C,
against the bare loop's time × 0.5. If the floor is above the target, no exact grouping of
clients can reach it on this machine: the arithmetic alone takes longer.

Then one more pass of ``client`` under ``torch.profiler`` splits its wall time by ATen kernel
(self time, so nested calls count once): matrix products, element-wise kernels and copies (the
optimizer's weight decay, momentum and update over every parameter, the momentum buffers' first
copy, ReLU and its backward, the weights' reset), the loss, indexing the batch, other ATen ops
(views, allocation), and what runs outside any ATen kernel (Python, the autograd engine,
``torch.optim``'s own code): the only part an exact grouping of clients could remove, since it
must still run every client's kernels on that client's tensors.

    python bench/perf/bound.py [--clients 200] [--repeats 5] [--cores N] [--json results/perf/bound.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fedmpi.models import build_model  # noqa: E402
from fedmpi.training.explicit import ExplicitMLP  # noqa: E402
from fedmpi.training.optim import SGD, OptimizerSpec  # noqa: E402

SAMPLES, BATCH = 60, 32            # the overhead workload's client (bench/perf/workloads.py)
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 0.001
SGD_SPEC = OptimizerSpec("sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)   # fedmpi's, the same SGD


def step_rows() -> list[int]:
    return [min(BATCH, SAMPLES - start) for start in range(0, SAMPLES, BATCH)]


def linear_layers(model) -> list[torch.nn.Linear]:
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not layers or sum(p.numel() for p in model.parameters()) != sum(
            sum(p.numel() for p in m.parameters()) for m in layers):
        raise SystemExit("bound.py covers models whose parameters all sit in Linear layers (the workload's MLP)")
    return layers


def client_flops(layers) -> int:
    """Multiply-adds × 2 of one client: forward, weight gradient, input gradient (not the first layer's)."""
    total = 0
    for rows in step_rows():
        for i, layer in enumerate(layers):
            mac = rows * layer.in_features * layer.out_features
            total += 2 * mac * (3 if i > 0 else 2)
    return total


def autograd_steps(model, x, y, order, optimizer) -> None:
    """One client's minibatch steps through autograd with ``optimizer``, in place."""
    for start in range(0, SAMPLES, BATCH):
        batch = order[start:start + BATCH]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def bare_client(model, x, y, order) -> None:
    """One client of the bare loop's local training (bench/perf/bare.py), in place."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    autograd_steps(model, x, y, order, optimizer)


def time_products(layers, clients: int) -> float:
    """Seconds per client of its matrix products alone (the kernels, shapes and layouts of the loop)."""
    plans = []
    for rows in step_rows():
        for i, layer in enumerate(layers):
            W, b = layer.weight.detach(), layer.bias.detach()
            x = torch.randn(rows, layer.in_features)
            grad = torch.randn(rows, layer.out_features)
            plans.append((W, b, x, grad, torch.empty(rows, layer.out_features), torch.empty_like(W),
                          torch.empty(rows, layer.in_features) if i > 0 else None, torch.empty_like(b)))
    began = time.perf_counter()
    for _ in range(clients):
        for W, b, x, grad, out, grad_w, grad_x, grad_b in plans:
            torch.addmm(b, x, W.t(), out=out)
            torch.mm(grad.t(), x, out=grad_w)
            if grad_x is not None:
                torch.mm(grad, W, out=grad_x)
            torch.sum(grad, 0, out=grad_b)
    return (time.perf_counter() - began) / clients


def no_autograd_client(model, x, y, order) -> list[torch.Tensor]:
    """One client of the MLP without autograd, trained in place: fedmpi's own ``ExplicitMLP``
    (the trainer's ``local.backward: auto`` path) with fedmpi's SGD step; returns the trained
    parameters."""
    explicit = ExplicitMLP(model, SGD_SPEC)
    for start in range(0, SAMPLES, BATCH):
        batch = order[start:start + BATCH]
        _, saved = explicit.forward_loss(x[batch], y[batch])
        explicit.backward_step(saved)
    return [p.detach().clone() for p in model.parameters()]


def autograd_client(model, x, y, order) -> list[torch.Tensor]:
    """The same client through autograd and fedmpi's SGD step (reference for no_autograd_client)."""
    autograd_steps(model, x, y, order, SGD(model.parameters(), SGD_SPEC))
    return [p.detach().clone() for p in model.parameters()]


def reset(model, initial: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), initial):
            p.copy_(v)


def time_trained(train_client, model, x, y, clients: int) -> float:
    """Seconds per client of ``train_client`` (weights reset to their values before the pass for each client)."""
    initial = [p.detach().clone() for p in model.parameters()]
    began = time.perf_counter()
    for c in range(clients):
        reset(model, initial)
        train_client(model, x, y, torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(c)))
    elapsed = time.perf_counter() - began
    reset(model, initial)
    return elapsed / clients


def time_no_autograd(model, x, y, clients: int) -> float:
    """Seconds per client of ``no_autograd_client``, after checking its bits on one client."""
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(0))
    initial = [p.detach().clone() for p in model.parameters()]
    explicit = no_autograd_client(model, x, y, order)
    reset(model, initial)
    reference = autograd_client(model, x, y, order)
    reset(model, initial)
    if not all(torch.equal(a, b) for a, b in zip(explicit, reference)):
        raise SystemExit("no-autograd client differs from the autograd one: the comparison would be unfair")
    return time_trained(no_autograd_client, model, x, y, clients)


def time_optimizer(model, clients: int) -> float:
    """Seconds per client of its SGD steps alone (torch.optim.SGD, gradients already there)."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    began = time.perf_counter()
    for _ in range(clients):
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for _ in step_rows():
            optimizer.step()
    return (time.perf_counter() - began) / clients


KERNEL_GROUPS = {
    "matrix products": {"aten::mm", "aten::addmm"},
    "element-wise and copies": {"aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::copy_",
                                "aten::clone", "aten::relu", "aten::clamp_min", "aten::threshold_backward",
                                "aten::zero_", "aten::fill_", "aten::sum", "aten::div", "aten::neg"},
    "loss": {"aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
             "aten::nll_loss_backward"},
    "indexing the batch": {"aten::index"},
}


def profile_client(model, x, y, clients: int) -> dict[str, float]:
    """Seconds per client of the bare loop's training by kernel group (torch.profiler self times);
    "outside ATen kernels" is the pass's wall time minus every ATen op's self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time_trained(bare_client, model, x, y, clients) * clients
    groups = dict.fromkeys([*KERNEL_GROUPS, "other ATen ops"], 0.0)
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        group = next((g for g, names in KERNEL_GROUPS.items() if event.key in names), "other ATen ops")
        groups[group] += event.self_cpu_time_total / 1e6
    groups["outside ATen kernels"] = wall - sum(groups.values())
    return {"wall": wall / clients, **{g: t / clients for g, t in groups.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="clients per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores of the floor (default: all)")
    parser.add_argument("--loop-seconds", type=float, default=None,
                        help="the bare loop's round-loop time of the overhead workload (results/perf/"
                             "overhead.json's 'loop' median), to print the bound as a fraction of it")
    parser.add_argument("--workload-clients", type=int, default=1000,
                        help="client trainings in the overhead workload's timed rounds (10 rounds x 100)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("mlp", (1, 28, 28), 10)
    layers = linear_layers(model)
    x, y = torch.randn(SAMPLES, 1, 28, 28), torch.randint(0, 10, (SAMPLES,))
    flops = client_flops(layers)
    kinds = {"client": lambda: time_trained(bare_client, model, x, y, args.clients),
             "products": lambda: time_products(layers, args.clients),
             "optimizer": lambda: time_optimizer(model, args.clients),
             "fedmpi-sgd": lambda: time_trained(autograd_client, model, x, y, args.clients),
             "no-autograd": lambda: time_no_autograd(model, x, y, args.clients)}
    for run in kinds.values():   # warm-up
        run()
    samples = {k: [] for k in kinds}
    for repeat in range(args.repeats):
        for kind in (list(kinds) if repeat % 2 == 0 else list(kinds)[::-1]):
            samples[kind].append(kinds[kind]())
    median = {k: statistics.median(v) for k, v in samples.items()}
    floor = median["products"] * args.workload_clients / args.cores
    report = {"host": platform.node(), "torch": torch.__version__, "cores": args.cores,
              "params": sum(p.numel() for p in model.parameters()), "steps": step_rows(),
              "client_flops": flops, "clients_per_pass": args.clients, "repeats": args.repeats,
              "seconds_per_client": samples, "median_seconds_per_client": median,
              "gflops": {k: flops / median[k] / 1e9 for k in ("client", "products")},
              "products_share": median["products"] / median["client"],
              "optimizer_share": median["optimizer"] / median["client"],
              "workload_clients": args.workload_clients, "products_floor_seconds": floor}
    print(f"overhead workload's client: {report['params']:,} parameters, steps of {step_rows()} rows, "
          f"{flops / 1e6:.1f} MFLOP; one thread, median of {args.repeats} x {args.clients} clients")
    print("| part | ms per client | share of the client | GFLOP/s |\n|---|---|---|---|")
    for kind in kinds:
        rate = f"{report['gflops'][kind]:.1f}" if kind in report["gflops"] else ""
        print(f"| {kind} | {median[kind] * 1e3:.3f} | {median[kind] / median['client']:.2f} | {rate} |")
    print(f"matrix products alone for {args.workload_clients} clients on {args.cores} core(s): {floor:.2f} s "
          f"(bare loop on one thread, same clients: {median['client'] * args.workload_clients:.2f} s)")
    if args.loop_seconds:
        report["loop_seconds"] = args.loop_seconds
        report["floor_vs_loop"] = floor / args.loop_seconds
        print(f"against the bare loop's measured {args.loop_seconds:.2f} s: the products alone are "
              f"{report['floor_vs_loop']:.2f}x it (target 0.5x)")
    split = profile_client(model, x, y, args.clients)
    report["profiled_client"] = split
    print(f"\none more pass of client under torch.profiler ({split['wall'] * 1e3:.3f} ms per client):")
    print("| part | ms per client | share |\n|---|---|---|")
    for part, seconds in split.items():
        if part != "wall":
            print(f"| {part} | {seconds * 1e3:.3f} | {seconds / split['wall']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
