"""The sparse upload path against the dense one: encode on the worker ranks → gatherv → decode and
merge on rank 0, for a model of ``--params`` float32 parameters (default 1,000,000 in 4 tensors),
through fedmpi's own codec, communicator and merge (what a round's upload does with
``aggregation.where: server``).

Per repeat, interleaved (the order alternates), each worker rank encodes ``--clients-per-rank``
uploads, and rank 0 gathers, decodes (without densifying, as the server does) and merges all of
them (the float64 weighted sum over holders), for three payloads:

    dense     every value (FedAvg)
    bitmap    sparsity S (default 0.8): the mask as a bitmap, then the kept values (a changed mask:
              FedDST's readjustment rounds)
    values    the kept values only (the receiver holds the mask: FedDST's other rounds)

Timed on rank 0: the path, from a barrier to the merged model, and the transport, the gatherv
alone (from a barrier after encoding to the last byte on rank 0); reported: median, min and max
over the repeats, and each sparse kind's medians relative to dense (the target: ≤ 0.35× at S = 0.8
on 8 ranks). Run it on an otherwise idle machine:

    mpiexec -n 8 python bench/perf/gather.py [--repeats 7] [--params 1000000] [--sparsity 0.8]
                                             [--clients-per-rank 1] [--json results/perf/gather.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from fedmpi.aggregation import average_over_holders
from fedmpi.comm.codec import Encoded, MaskPositions, decode, encode
from fedmpi.comm.transport import Communicator
from fedmpi.update import ModelUpdate

KINDS = ("dense", "bitmap", "values")


def model_tensors(params: int, generator: np.random.Generator) -> dict[str, np.ndarray]:
    """Four tensors sharing ``params`` values, the shapes of a small MLP's weights and biases."""
    sizes = {"layer1.weight": params * 7 // 10, "layer2.weight": params * 29 // 100, "layer1.bias": params // 200}
    sizes["layer2.bias"] = params - sum(sizes.values())
    return {name: generator.standard_normal(n).astype(np.float32) for name, n in sizes.items()}


def masks_for(tensors: dict, sparsity: float, generator: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: generator.random(t.size) >= sparsity for name, t in tensors.items() if name.endswith("weight")}


def one_gather(comm: Communicator, kind: str, updates: list[ModelUpdate], masks: dict,
               reference_weights: dict) -> tuple[float, float]:
    """One round's upload path; returns (path seconds, transport seconds) as rank 0 saw them."""
    reference = masks if kind == "values" else None
    comm.comm.Barrier()
    began = time.perf_counter()
    encoded = [encode(u, reference) for u in updates] if not comm.is_server or comm.size == 1 else []
    data = np.concatenate([e.data for e in encoded]) if encoded else np.zeros(0, np.uint8)
    layouts = comm.gather_objects([(e.layout, e.nbytes) for e in encoded])   # as the clients' reports do
    comm.comm.Barrier()
    sent = time.perf_counter()
    buffers = comm.gather_buffers(data)
    arrived = time.perf_counter()
    if comm.is_server:
        # what the server does with a round's uploads (engine/server.py): decode each without
        # densifying, then the float64 merge in client order (aggregation.average_over_holders)
        positions, decoded = MaskPositions(), []
        for rank_layouts, buffer in zip(layouts, buffers):
            offset = 0
            for layout, nbytes in rank_layouts:
                decoded.append(decode(Encoded(layout, buffer[offset:offset + nbytes]), reference,
                                      densify=False, positions_cache=positions))
                offset += nbytes
        average_over_holders(decoded, [1.0] * len(decoded), reference_weights, missing="zero")
    elapsed = time.perf_counter() - began
    return comm.comm.bcast((elapsed, arrived - sent), root=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--clients-per-rank", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    comm = Communicator()
    generator = np.random.default_rng(1000 + comm.rank)   # each rank its own clients' values
    shared = np.random.default_rng(0)                      # the same masks on every rank
    tensors = [model_tensors(args.params, generator) for _ in range(args.clients_per_rank)]
    masks = masks_for(tensors[0], args.sparsity, shared)
    updates = {
        "dense": [ModelUpdate(t) for t in tensors],
        "bitmap": [ModelUpdate({n: np.where(masks[n], v, 0) if n in masks else v for n, v in t.items()}, masks)
                   for t in tensors],
    }
    updates["values"] = updates["bitmap"]
    times = {k: [] for k in KINDS}
    transport = {k: [] for k in KINDS}
    payload = {}
    reference_weights = {name: np.zeros_like(t) for name, t in tensors[0].items()}
    for kind in KINDS:   # warm-up
        one_gather(comm, kind, updates[kind], masks, reference_weights)
    for repeat in range(args.repeats):
        order = KINDS if repeat % 2 == 0 else KINDS[::-1]
        for kind in order:
            path, moved = one_gather(comm, kind, updates[kind], masks, reference_weights)
            times[kind].append(path)
            transport[kind].append(moved)
    for kind in KINDS:
        reference = masks if kind == "values" else None
        payload[kind] = encode(updates[kind][0], reference).nbytes
    if comm.is_server:
        dense = statistics.median(times["dense"])
        dense_transport = statistics.median(transport["dense"])
        report = {"ranks": comm.size, "params": args.params, "sparsity": args.sparsity,
                  "clients_per_rank": args.clients_per_rank, "repeats": args.repeats,
                  "kinds": {k: {"seconds": times[k], "median": statistics.median(times[k]), "min": min(times[k]),
                                "max": max(times[k]), "payload_bytes_per_client": payload[k],
                                "vs_dense": statistics.median(times[k]) / dense,
                                "transport_seconds": transport[k],
                                "transport_median": statistics.median(transport[k]),
                                "transport_vs_dense": statistics.median(transport[k]) / dense_transport}
                            for k in KINDS}}
        print(f"{comm.size} ranks, {args.params:,} parameters, S = {args.sparsity}, "
              f"{args.clients_per_rank} client(s) per worker rank, {args.repeats} repeats; path = encode, "
              f"gather, decode and merge; transport = the gather alone")
        print("| upload | bytes per client | path: median ms (min–max) | path × dense | transport: median ms "
              "| transport × dense |\n|---|---|---|---|---|---|")
        for kind, r in report["kinds"].items():
            print(f"| {kind} | {r['payload_bytes_per_client']:,} | {r['median'] * 1e3:.2f} "
                  f"({r['min'] * 1e3:.2f}–{r['max'] * 1e3:.2f}) | {r['vs_dense']:.2f} | "
                  f"{r['transport_median'] * 1e3:.2f} | {r['transport_vs_dense']:.2f} |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
