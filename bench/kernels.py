"""Sparse vs dense kernels: training-step time (forward + backward) against density, per maskable
layer of the FEMNIST CNN (1×28×28, 62 classes) and the CIFAR VGG-11 (3×32×32, 10 classes).

For every layer and density, three kernels run on the layer's real input (batch 20 by default):
``dense`` (the masked dense layer), ``sparse`` (CSR kernel, gradient of every weight: PruneFL's
case, whose importance needs inactive gradients) and ``sparse_active`` (CSR kernel on the compact
vector of active values, their gradient only: what the trainer runs without step hooks). Measurements are interleaved —
each repeat times every (density, kernel) pair once, in an order rotated between repeats — and
repeated; reported: median, min, max and interquartile range per point, the paired ratio
sparse/dense (both timed in the same repeat), the line fits, the break-even density of the fits
and the measured crossover (largest density up to which the sparse kernel's median wins), and
for the FEMNIST CNN's largest layer the step time at density 0.1 relative to dense (target ≤ 0.5×).
Protocol details: fedmpi/timing/measure.py. One torch thread. Clock: the thread's CPU time by
default (``--clock cpu``: time descheduled on a shared machine does not count; cache and memory
contention still do), or elapsed time (``--clock wall``).

    python bench/kernels.py [--models femnist_cnn vgg11] [--repeats 7] [--min-time 0.05]
                            [--densities 0.01,0.02,...] [--clock cpu|wall]
                            [--json results/perf/kernels.json] [--force]

A quick look while developing (noisy): --repeats 2 --min-time 0.005 --densities 0.05,0.1,0.3.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedmpi.models import build_model, maskable_weight_modules  # noqa: E402
from fedmpi.timing.fits import break_even, fit_line, fit_sparse, measured_crossover  # noqa: E402
from fedmpi.timing.measure import DEFAULT_DENSITIES, measure_model  # noqa: E402
from fedmpi.timing.profile_machine import machine_description  # noqa: E402

MODELS = {"femnist_cnn": ((1, 28, 28), 62), "vgg11": ((3, 32, 32), 10)}
SPARSE_KERNELS = ("sparse", "sparse_active")
TARGET_DENSITY = 0.1


def paired_ratios(lt, kernel: str, index: int) -> list[float]:
    return [s / d for s, d in zip(lt.times[kernel][index], lt.times["dense"][index])]


def layer_report(lt) -> dict:
    report = {"shape": list(lt.shape), "numel": lt.numel, "input_shape": list(lt.input_shape),
              "densities": lt.densities, "nnz": lt.nnz,
              "kernels": {k: lt.spread(k) for k in lt.times}, "fit": {}, "break_even": {},
              "crossover_measured": {}, "paired_ratio": {}}
    dense = fit_line(lt.nnz, lt.medians("dense"))
    report["fit"]["dense"] = dense.to_dict()
    for k in SPARSE_KERNELS:
        if k not in lt.times:
            continue
        line = fit_sparse(lt, k)
        report["fit"][k] = line.to_dict()
        report["break_even"][k] = break_even(dense, line, lt.numel)
        report["crossover_measured"][k] = measured_crossover(lt, k)
        report["paired_ratio"][k] = []
        for i in range(len(lt.densities)):
            r = paired_ratios(lt, k, i)
            report["paired_ratio"][k].append({"median": statistics.median(r), "min": min(r), "max": max(r)})
    return report


def print_table(model: str, reports: dict, largest: str) -> None:
    print(f"\n== {model}: step time (forward + backward) in ms, median over repeats [min-max]; "
          f"ratio = paired sparse/dense")
    for name, rep in reports.items():
        print(f"-- {name} {tuple(rep['shape'])} ({rep['numel']:,} weights), input {tuple(rep['input_shape'])}"
              f"{'  <- largest' if name == largest else ''}")
        has = [k for k in SPARSE_KERNELS if k in rep["kernels"]]
        header = f"{'density':>8} {'dense':>22}" + "".join(f" {k:>22} {'ratio':>6}" for k in has)
        print(header)
        for i, d in enumerate(rep["densities"]):
            def cell(k):
                s = rep["kernels"][k][i]
                return f"{s['median'] * 1e3:8.3f} [{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}]"
            row = f"{d:8.3f} {cell('dense'):>22}"
            for k in has:
                row += f" {cell(k):>22} {rep['paired_ratio'][k][i]['median']:6.2f}"
            print(row)
        for k in has:
            print(f"   {k}: break-even density (line fits) {rep['break_even'][k]:.3f}; measured crossover "
                  f"{rep['crossover_measured'][k]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--densities", default=",".join(str(d) for d in DEFAULT_DENSITIES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--layers", nargs="*", help="only these weight names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the thread's CPU time (robust on a shared machine); wall: elapsed time")
    parser.add_argument("--json", default=str(ROOT / "results" / "perf" / "kernels.json"))
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args(argv)
    if Path(args.json).exists() and not args.force:
        print(f"kernels.py: --json {args.json} exists; pass --force to overwrite it, or another --json path",
              file=sys.stderr)
        return 2
    if args.repeats < 5:
        print(f"kernels.py: --repeats {args.repeats} < 5: a development run, not a measurement", file=sys.stderr)
    densities = sorted({float(d) for d in args.densities.split(",") if d.strip()} | {TARGET_DENSITY})
    torch.set_num_threads(1)
    began = time.time()
    out = {"settings": {"densities": densities, "repeats": args.repeats, "min_time": args.min_time,
                        "batch_size": args.batch_size, "seed": args.seed, "torch_threads": 1, "clock": args.clock,
                        "command": " ".join([Path(sys.executable).name, *sys.argv])},
           "machine": machine_description(), "load_average_start": list(os.getloadavg()), "models": {}}
    for model_name in args.models:
        shape, classes = MODELS[model_name]
        torch.manual_seed(args.seed)
        model = build_model(model_name, shape, classes)
        times = measure_model(model, shape, args.batch_size, densities, repeats=args.repeats,
                              min_time=args.min_time, seed=args.seed, layers=args.layers, clock=args.clock,
                              progress=lambda s: print(f"[{model_name}] {s}", file=sys.stderr, flush=True))
        reports = {name: layer_report(lt) for name, lt in times.items()}
        sizes = {n: m.weight.numel() for n, m in maskable_weight_modules(model).items()}
        largest = max(sizes, key=lambda n: (sizes[n], -list(sizes).index(n)))   # the first of the largest
        at = {}
        if largest in reports:
            i = densities.index(TARGET_DENSITY)
            ratios = reports[largest]["paired_ratio"]
            at = {k: ratios[k][i] for k in SPARSE_KERNELS if k in ratios}
        out["models"][model_name] = {"input_shape": list(shape), "num_classes": classes, "layers": reports,
                                     "largest_layer": largest, "largest_layer_ratio_at_0.1": at}
        print_table(model_name, reports, largest)
        for k, r in at.items():
            print(f"{model_name} largest layer {largest} at density {TARGET_DENSITY}: {k} / dense = "
                  f"{r['median']:.2f}x (paired, min {r['min']:.2f}, max {r['max']:.2f})")
    if out["models"].get("femnist_cnn", {}).get("largest_layer_ratio_at_0.1"):
        femnist = out["models"]["femnist_cnn"]
        best = min(femnist["largest_layer_ratio_at_0.1"].values(), key=lambda r: r["median"])["median"]
        out["target"] = {"what": "FEMNIST CNN largest layer, step time at density 0.1 / dense", "target": 0.5,
                         "ratio": femnist["largest_layer_ratio_at_0.1"], "best": best, "met": best <= 0.5}
        print(f"\ntarget: FEMNIST CNN largest layer at density 0.1 <= 0.5x dense: best {best:.2f}x "
              f"({'met' if best <= 0.5 else 'not met'})")
    out["seconds"] = time.time() - began
    out["load_average_end"] = list(os.getloadavg())
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
    print(f"kernels.py: {path} ({out['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
