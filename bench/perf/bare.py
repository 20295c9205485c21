"""The bare PyTorch loop: exactly fedmpi's local training for a workload, without fedmpi.

Same data, partition, model and initial weights, same sampled clients per round, same per-client
batch orders (each client's generator seeded from (seed, round, client) as fedmpi's trainer does),
same optimizer (a fresh ``torch.optim.SGD`` per client), same aggregation arithmetic (float64
sums in client order), and for FedDST the same masks (``fedmpi.sparsity``), readjustment
(``fedmpi.algorithms.feddst_readjustment``) and server re-prune. What it leaves out is fedmpi itself: no engine, messages, codec, results file or
per-round bookkeeping.

One process (``python bench/perf/bare.py ...``) trains every client in turn; under ``mpiexec -n Q``
the round's clients are split over the Q processes as fedmpi splits them over its worker ranks
(largest first, by samples) and the weighted sums are combined with one ``Allreduce`` per round:
the floor for Q training processes. Prints one JSON line (rank 0): per-round seconds, the final
model's test accuracy and loss (to check it did fedmpi's work).

    python bench/perf/bare.py --workload overhead --algorithm fedavg --rounds 10 [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--algorithm", required=True, choices=["fedavg", "feddst"])
    parser.add_argument("--rounds", type=int, required=True, help="timed rounds (the loop runs rounds + 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--mpi", action="store_true", help="split the clients over the mpiexec processes")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from fedmpi import rng
    from fedmpi.config import load_config
    from fedmpi.engine.messages import assign_clients
    from fedmpi.initial import build_initial
    from fedmpi.models import maskable_parameter_names
    from fedmpi.algorithms.feddst_readjustment import (cosine_readjust_fraction, prune_and_grow,
                                                       readjustment_round, resolve_r_end, schedule_round)
    from fedmpi.sparsity import kept_counts, layer_densities, magnitude_masks
    from workloads import fedmpi_config

    if args.mpi:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    else:
        comm, rank, size = None, 0, 1

    torch.set_num_threads(args.threads)
    cfg = load_config(None, extra=fedmpi_config(args.workload, args.algorithm, args.rounds))
    seed, local = cfg["seed"], cfg["local"]
    initial = build_initial(cfg)   # fedmpi's own data, partition and initial model
    dataset, partition, model = initial.dataset, initial.partition, initial.model
    x_train, y_train = torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train)
    x_test, y_test = torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test)
    sizes = {c: len(idx) for c, idx in enumerate(partition.train_indices)}

    params = dict(model.named_parameters())
    names = list(params)
    weights = {n: initial.weights[n] for n in names}

    sparse = args.algorithm == "feddst" and cfg["sparsity"] > 0
    dst = cfg["feddst"]
    masks, counts = {}, {}
    if sparse:
        maskable = maskable_parameter_names(model)
        shapes = {n: weights[n].shape for n in maskable}
        counts = kept_counts(shapes, layer_densities(shapes, cfg["sparsity"], dst["distribution"]))
        masks = magnitude_masks({n: weights[n] for n in maskable}, counts)
        for n, m in masks.items():
            weights[n] = np.where(m, weights[n], np.float32(0))
        r_end = resolve_r_end(dst["r_end"], cfg["rounds"])

    def batches(n, generator):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, local["batch_size"]):
            yield order[start:start + local["batch_size"]]

    def zero_outside(torch_masks):
        with torch.no_grad():
            for n, m in torch_masks.items():
                params[n].masked_fill_(~m, 0)

    def load(values):
        with torch.no_grad():
            for n in names:
                params[n].copy_(torch.from_numpy(values[n]))

    def train(c, round_, client_masks):
        idx = torch.from_numpy(partition.train_indices[c])
        x, y = x_train[idx], y_train[idx]
        load(weights)
        s = rng.torch_seed(seed, rng.CLIENT, round_, c)
        torch.manual_seed(s)
        generator = torch.Generator().manual_seed(s)
        torch_masks = {n: torch.from_numpy(m) for n, m in client_masks.items()}
        zero_outside(torch_masks)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=local["lr"], momentum=local["momentum"],
                              weight_decay=local["weight_decay"])
        loss_sum = 0.0
        for _ in range(local["epochs"]):
            for batch in batches(len(y), generator):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss_sum += loss.item() * len(batch)   # fedmpi reports each client's mean loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                zero_outside(torch_masks)
        trained = {n: params[n].detach().numpy().copy() for n in names}
        new_masks = client_masks
        if sparse and readjustment_round(round_, dst["readjust_every"], r_end, dst["readjust_rule"]):
            # FedDST's readjustment: dense gradient over grad_batches batches, prune and regrow
            model.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(rng.torch_seed(seed, rng.REGROWTH, round_, c))
            for i, batch in enumerate(batches(len(y), g)):
                if i == dst["grad_batches"]:
                    break
                F.cross_entropy(model(x[batch]), y[batch]).backward()
            grads = {n: params[n].grad.detach().numpy().copy() for n in client_masks}
            fraction = cosine_readjust_fraction(dst["alpha"], schedule_round(round_, dst["readjust_rule"]), r_end)
            new_weights, new_masks = prune_and_grow({n: trained[n] for n in client_masks}, client_masks, grads,
                                                    fraction, counts=counts, regrow_pruned=dst["regrow_pruned"],
                                                    grow_over_all_positions=dst["grow_over_all"])
            trained.update(new_weights)
        return trained, new_masks, len(y)

    round_seconds = []
    for round_ in range(1, cfg["rounds"] + 1):
        began = time.perf_counter()
        clients = sorted(int(c) for c in rng.generator(seed, rng.SAMPLING, round_).choice(
            cfg["clients"]["total"], size=cfg["clients"]["per_round"], replace=False))
        mine = assign_clients(clients, sizes, list(range(size)))[rank]
        numerator = {n: np.zeros(weights[n].shape, np.float64) for n in names}
        denominator = {n: np.zeros(weights[n].shape, np.float64) for n in masks}
        dense_total = np.zeros(1)
        for c in mine:   # client order: the float64 sums run in fedmpi's order when size == 1
            trained, client_masks, n_samples = train(c, round_, masks)
            w = np.float64(n_samples)
            dense_total += w
            for n in names:
                contribution = w * trained[n].astype(np.float64)
                if n in client_masks:
                    np.add(numerator[n], contribution, out=numerator[n], where=client_masks[n])
                    np.add(denominator[n], w, out=denominator[n], where=client_masks[n])
                else:
                    numerator[n] += contribution
        if comm is not None and size > 1:
            for n in names:
                comm.Allreduce(MPI.IN_PLACE, numerator[n], op=MPI.SUM)
            for n in masks:
                comm.Allreduce(MPI.IN_PLACE, denominator[n], op=MPI.SUM)
            comm.Allreduce(MPI.IN_PLACE, dense_total, op=MPI.SUM)
        averaged = {}
        for n in names:
            den = denominator[n] if n in masks else np.full(weights[n].shape, dense_total[0])
            held = den > 0
            out = np.zeros(weights[n].shape, np.float32)
            out[held] = (numerator[n][held] / den[held]).astype(np.float32)
            averaged[n] = out
        if sparse:   # the server's re-prune back to the layer counts, among weights some client kept
            masks = magnitude_masks({n: averaged[n] for n in masks}, counts,
                                    within={n: d > 0 for n, d in denominator.items()}, tiebreak=denominator)
            for n, m in masks.items():
                averaged[n] = np.where(m, averaged[n], np.float32(0))
        weights = averaged
        round_seconds.append(time.perf_counter() - began)

    if rank == 0:
        load(weights)
        model.eval()
        with torch.no_grad():
            correct, loss = 0, 0.0
            for start in range(0, len(y_test), 1000):
                logits = model(x_test[start:start + 1000])
                correct += int((logits.argmax(1) == y_test[start:start + 1000]).sum())
                loss += float(F.cross_entropy(logits, y_test[start:start + 1000], reduction="sum"))
        print(json.dumps({"round_seconds": round_seconds, "processes": size, "threads": args.threads,
                          "test_accuracy": correct / len(y_test), "test_loss": loss / len(y_test),
                          "pid": os.getpid()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
