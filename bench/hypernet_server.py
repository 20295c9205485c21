"""HypeMeFed's server cost: one round of hypernetwork training, low-rank (LRF) against naive.

The work is what ``hypemefed`` does on rank 0 each round for the spec's network (``multiexit_vgg``,
widths 32/64/128/256 for 28×28 inputs; ``--wide``: 64/128/256/512 for 96×96 inputs): for each of
the four conv pairs (conv k of block i → block i+1, i = 1, 2), ``HyperNetworks.fit`` on the
(source, target) weights of the round's clients that trained the deeper block — with 10 clients
at levels 1/2/3 = 4/3/3, six pairs for block 1 → 2 (levels 2 and 3) and three for block 2 → 3
(level 3) — 25 epochs, Adam lr 5e-4, one torch thread (as the server runs it). The weights are the
model's initial weights plus noise: the time does not depend on their values.

LRF and naive alternate, repeated; reported per kind: median, min and max seconds per round, the
parameter count and bytes, and the ratio naive / LRF from the medians.

    python bench/hypernet_server.py [--repeats 3] [--wide] [--rank 100] [--json results/perf/hypernet.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from fedmpi.algorithms.hypernetworks import HyperNetworks, single_thread
from fedmpi.models import build_model
from fedmpi.timing.profile_machine import machine_description

LEVEL_COUNTS = {1: 4, 2: 3, 3: 3}   # 10 clients a round, drawn evenly over the tiers


def model_weights(wide: bool) -> dict[str, np.ndarray]:
    input_shape = (3, 96, 96) if wide else (1, 28, 28)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("multiexit_vgg", input_shape, 10)
    return {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}


def round_samples(weights: dict, pairs) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per conv pair, one (source, target) per client that trained the target's block."""
    generator = np.random.default_rng(0)

    def client_copy(name):
        w = weights[name]
        return (w + 0.01 * generator.standard_normal(w.shape)).astype(np.float32)

    samples = []
    for source, target, target_block in pairs:
        holders = sum(n for level, n in LEVEL_COUNTS.items() if level >= target_block)
        samples.append([(client_copy(source), client_copy(target)) for _ in range(holders)])
    return samples


def one_round(kind: str, weights: dict, samples, *, rank: int, epochs: int) -> tuple[float, HyperNetworks]:
    shapes = {n: w.shape for n, w in weights.items()}
    nets = HyperNetworks(shapes, kind, rank=rank)
    began = time.perf_counter()
    with single_thread():
        for index, pair_samples in enumerate(samples):
            nets.fit(index, pair_samples, epochs=epochs, lr=5e-4, round_=1)
    return time.perf_counter() - began, nets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wide", action="store_true", help="the 96×96 network (64/128/256/512)")
    parser.add_argument("--rank", type=int, default=100, help="hypemefed.rank (clipped to full rank)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    weights = model_weights(args.wide)
    shapes = {n: w.shape for n, w in weights.items()}
    pairs = HyperNetworks(shapes, "lrf", rank=1).pairs
    samples = round_samples(weights, pairs)
    kinds = ("lrf", "naive")
    times = {k: [] for k in kinds}
    sizes = {}
    print(f"multiexit_vgg {'96x96' if args.wide else '28x28'}: pairs "
          + ", ".join(f"{s.split('.')[1]}.{s.split('.')[2]}→{t.split('.')[1]} ({len(x)} clients)"
                      for (s, t, _), x in zip(pairs, samples)), flush=True)
    for repeat in range(args.repeats):
        order = kinds if repeat % 2 == 0 else kinds[::-1]
        for kind in order:
            seconds, nets = one_round(kind, weights, samples, rank=args.rank, epochs=args.epochs)
            times[kind].append(seconds)
            sizes[kind] = (nets.parameter_count(), nets.parameter_bytes())
            print(f"  repeat {repeat + 1}/{args.repeats} {kind:5s} {seconds:8.2f} s", flush=True)
            del nets
    report = {"machine": machine_description(), "network": "96x96" if args.wide else "28x28",
              "rank": args.rank, "epochs": args.epochs, "clients_per_level": LEVEL_COUNTS,
              "kinds": {k: {"seconds": times[k], "median": statistics.median(times[k]),
                            "min": min(times[k]), "max": max(times[k]),
                            "params": sizes[k][0], "bytes": sizes[k][1]} for k in kinds}}
    lrf, naive = report["kinds"]["lrf"], report["kinds"]["naive"]
    report["naive_over_lrf_time"] = naive["median"] / lrf["median"]
    report["memory_reduction"] = 1 - lrf["bytes"] / naive["bytes"]
    print("\n| hypernetworks | parameters | bytes | server s/round median (min–max) |\n|---|---|---|---|")
    for kind in kinds:
        r = report["kinds"][kind]
        print(f"| {kind} | {r['params']:,} | {r['bytes']:,} | {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f}) |")
    print(f"\nLRF: {report['memory_reduction'] * 100:.2f} % less memory, "
          f"{report['naive_over_lrf_time']:.2f}x faster (median over {args.repeats} repeats)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
