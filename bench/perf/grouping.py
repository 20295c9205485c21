"""Does training several clients at once pay on this machine, even without exactness?

The overhead workload's local training (bench/perf/workloads.py: MLP 784-200-200-10, 60 samples
per client, batches of 32, SGD lr 0.01, momentum 0.9, weight decay 1e-3, one epoch), for 100
clients, one torch thread, run two ways side by side:

    per-client   one client after another: autograd through ``F.linear``, the SGD step
                 (what fedmpi's trainer and the bare loop run)
    batched-G    G clients at once with the fastest plain form: stacked weights [G, out, in],
                 ``torch.baddbmm`` per layer, one autograd graph and one SGD step for the group.
                 Its sums run in another order than the per-client kernels, so results differ
                 in the last bits (reported); fedmpi's ``local.client_batch`` keeps them exact
                 by calling the per-client kernels (training/group_kernels.py) and is slower still.

Random inputs (the speed does not depend on the values). Prints per-client milliseconds and the
ratio batched / per-client (median over the repeats, interleaved); ``--json`` writes them.

    python bench/perf/grouping.py [--clients 100] [--groups 5 10 25 50] [--repeats 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fedmpi.training.optim import OptimizerSpec, sgd_step  # noqa: E402

DIMS = [784, 200, 200, 10]
SAMPLES, BATCH = 60, 32
SGD = OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=1e-3)   # the workloads' local optimizer


def sgd(params, grads, buffers):
    """fedmpi's SGD step (``torch.optim.SGD``'s arithmetic), on per-client or stacked tensors alike."""
    with torch.no_grad():
        buffers[:] = sgd_step(params, list(grads), buffers, SGD)


def per_client(weights, biases, x, y, orders):
    final = []
    for k in range(x.shape[0]):
        params = [w.clone().requires_grad_() for w in weights] + [b.clone().requires_grad_() for b in biases]
        buffers = [None] * len(params)
        for start in range(0, SAMPLES, BATCH):
            batch = orders[k, start:start + BATCH]
            h = x[k, batch]
            for layer in range(3):
                h = F.linear(h, params[layer], params[3 + layer])
                h = F.relu(h) if layer < 2 else h
            sgd(params, torch.autograd.grad(F.cross_entropy(h, y[k, batch]), params), buffers)
        final.append(params[0].detach())
    return torch.stack(final)


def batched(weights, biases, x, y, orders, group):
    final = []
    for first in range(0, x.shape[0], group):
        xs, ys, os = x[first:first + group], y[first:first + group], orders[first:first + group]
        g = xs.shape[0]
        params = [w.expand(g, -1, -1).clone().requires_grad_() for w in weights] + \
                 [b.expand(g, -1).clone().requires_grad_() for b in biases]
        buffers = [None] * len(params)
        for start in range(0, SAMPLES, BATCH):
            batch = os[:, start:start + BATCH]
            h = torch.gather(xs, 1, batch.unsqueeze(-1).expand(-1, -1, DIMS[0]))
            labels = torch.gather(ys, 1, batch)
            for layer in range(3):
                h = torch.baddbmm(params[3 + layer].unsqueeze(1), h, params[layer].transpose(1, 2))
                h = F.relu(h) if layer < 2 else h
            # each client's mean loss; their sum has each client's gradient as its own
            loss = F.cross_entropy(h.reshape(-1, DIMS[-1]), labels.reshape(-1), reduction="sum") / batch.shape[1]
            sgd(params, torch.autograd.grad(loss, params), buffers)
        final.append(params[0].detach())
    return torch.cat(final)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--groups", type=int, nargs="+", default=[5, 10, 25, 50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=generator) * i ** -0.5 for i, o in zip(DIMS[:-1], DIMS[1:])]
    biases = [torch.zeros(o) for o in DIMS[1:]]
    x = torch.randn(args.clients, SAMPLES, DIMS[0], generator=generator)
    y = torch.randint(0, DIMS[-1], (args.clients, SAMPLES), generator=generator)
    orders = torch.stack([torch.randperm(SAMPLES, generator=generator) for _ in range(args.clients)])

    systems = ["per-client"] + [f"batched-{g}" for g in args.groups]
    seconds = {s: [] for s in systems}
    reference = per_client(weights, biases, x, y, orders)            # warm-up, and the reference weights
    difference = {}
    for rep in range(args.repeats):
        for system in (systems if rep % 2 == 0 else systems[::-1]):
            began = time.perf_counter()
            if system == "per-client":
                result = per_client(weights, biases, x, y, orders)
            else:
                result = batched(weights, biases, x, y, orders, int(system.split("-")[1]))
            seconds[system].append(time.perf_counter() - began)
            difference[system] = float((result - reference).abs().max())
    base = statistics.median(seconds["per-client"])
    rows = {s: {"ms_per_client": 1e3 * statistics.median(v) / args.clients,
                "vs_per_client": statistics.median(v) / base,
                "max_abs_difference_first_layer": difference[s]} for s, v in seconds.items()}
    print(f"{'system':12s} {'ms/client':>10s} {'vs per-client':>14s} {'max |Δw1|':>10s}")
    for s, r in rows.items():
        print(f"{s:12s} {r['ms_per_client']:10.3f} {r['vs_per_client']:14.2f} {r['max_abs_difference_first_layer']:10.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "bench-grouping", "clients": args.clients, "repeats": args.repeats,
                       "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "systems": rows,
                       "samples": seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
