"""Sparse vs dense kernels for whole training steps of one layer (default: fc1 of the FEMNIST CNN,
3136 → 2048, batch 20), with masks PruneFL produces and with uniform random masks.

One timed step per kernel, as ``LocalTrainer.train`` (fedmpi/training/trainer.py) runs it:

- ``dense`` (the masked dense layer): zero the gradients; forward with the module's own kernel on
  the masked weight; backward from a fixed output gradient (dense weight gradient, input
  gradient); the optimizer step on the whole weight and the bias; re-masking (``fedmpi.sparsity.Remasker``, as the trainer).
- ``sparse`` (CSR kernel, gradient of every weight: what the trainer runs when a step hook reads
  inactive gradients, as PruneFL's importance does): the same through the sparse kernel; the
  optimizer still steps the dense weight, so the re-masking stays.
- ``sparse_active`` (CSR kernel on the compact active values: what the trainer runs without
  hooks): forward and backward on the compact values; the optimizer steps them and the bias; no
  re-masking (inactive weights do not exist).

Beside it: the same steps without optimizer and re-masking (``fwd_bwd``, what bench/kernels.py
times) and, for ``dense`` and ``sparse``, the step of a round that gathers PruneFL's importance
(``step_importance``: ``SummedGradientSquared.after_backward`` after the backward; the
campaign's clients run it in every FL round whose importance an upload round sends). Not timed:
what happens once per round (loading weights, a mask's index structure, the compact values'
gather and write-back) and the rest of the model (the same for every kernel). The optimizer is
``--config``'s ``local.*`` (default the PruneFL Fashion-MNIST campaign's: plain SGD, lr 1.0).

Masks (only the mask differs between rows: weights, input, output gradient are the same).
``uniform``: exactly round(d·n) positions at random (bench/kernels.py's). ``prunefl``: PruneFL's
reconfigurations of this layer with the library's ``SquaredGradientAccumulator``, ``reconfigure``
and ``apply_new_masks``: the model trains from its init with ``LocalTrainer`` on a fixed subset of
``prunefl.ip_data_batches`` batches of the config's training data; every ``prunefl.ip_interval``
steps the layer is reconfigured with drop fraction ``prunefl.max_drop`` (keep the largest |w| of
the active weights, add others by decreasing importance) under PruneFL's density cap
(``max_active``) at the benchmark's density, largest density first, until the cap is reached
exactly, then ``--settle`` more times at that density (default 4: the campaign's PruneFL runs
reconfigure 4 times after initial pruning, fc1 staying at density 0.20-0.23), so that the mask
holds weights chosen by importance, not only by magnitude. Within one layer the candidates'
order is importance alone whatever the time model; its c₀ here is large enough that Γ rises with
every candidate of positive importance, so the cap, not Γ, sets the count. FEMNIST is not on the
development machine: the data is the config's (Fashion-MNIST, as the campaign's; fc1 has
FEMNIST's shape). ``row/col cv``: how unevenly the active weights spread over rows / columns.

Timing: fedmpi/timing/measure.py's protocol (a warm-up, interleaved repeats in an order rotated
between repeats, ``inner`` steps per measurement for about ``--min-time`` seconds, the start
weights and a fresh optimizer loaded before each measurement, untimed). Reported: median, min and
max over repeats and the paired ratio kernel/dense (same repeat, same part). One torch thread;
clock ``cpu`` (the thread's CPU time, default) or ``wall``.

    python bench/kernel_steps.py [--config bench/prunefl_fmnist_campaign.yaml] [--layer fc1.weight]
        [--densities 0.05,0.1,0.2] [--masks prunefl uniform] [--repeats 11] [--min-time 0.1]
        [--settle 4] [--clock cpu|wall] [--data-root DIR] [--json results/perf/kernel_steps.json] [--force]

A quick check while developing (noisy, not a measurement): --repeats 1 --min-time 0.001.
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
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]   # fedmpi; whole_steps.py
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from fedmpi.config.defaults import DEFAULTS  # noqa: E402
from fedmpi.timing.measure import CLOCKS, _timed, exact_mask, layer_inputs  # noqa: E402
from fedmpi.training.optim import OptimizerSpec  # noqa: E402
from whole_steps import KERNELS, KernelStep, kernel_steps, prunefl_masks, read_settings  # noqa: E402

PARTS = ("step", "fwd_bwd", "step_importance")     # step_importance: not for sparse_active
MASK_KINDS = ("prunefl", "uniform")
TARGET_DENSITY, TARGET_RATIO = 0.1, 0.5


# ------------------------------------------------------------------------------------ timing
def time_rows(rows: list[dict[str, KernelStep]], *, repeats: int, min_time: float, clock: str,
              max_inner: int = 50) -> dict[tuple, list[float]]:
    """{(row, kernel, part): seconds per step, one per repeat}, measured as the module doc says."""
    pairs = [(i, k, p) for i, row in enumerate(rows) for k in row for p in PARTS
             if not (p == "step_importance" and k == "sparse_active")]
    slowest = 0.0
    for i, k, p in pairs:   # warm-up; the steps per measurement from the slowest
        rows[i][k].load()
        rows[i][k].part(p)()
        slowest = max(slowest, _timed(rows[i][k].part(p), 1))
    inner = int(min(max_inner, max(1, np.ceil(min_time / max(slowest, 1e-6)))))
    times = {pair: [] for pair in pairs}
    stride = sum(1 for pair in pairs if pair[0] == 0) + 1
    for r in range(repeats):
        shift = (r * stride) % len(pairs)
        for i, k, p in pairs[shift:] + pairs[:shift]:
            rows[i][k].load()
            times[i, k, p].append(_timed(rows[i][k].part(p), inner, clock))
    return times


def mask_structure(mask: torch.Tensor) -> dict:
    """How the active weights spread over output rows and input columns (coefficient of variation
    of the per-row / per-column counts: about sqrt((1 - d) / (d · cols)) for a uniform mask)."""
    m = mask.reshape(mask.shape[0], -1).to(torch.float64)
    rows, cols = m.sum(1), m.sum(0)
    return {"row_cv": float(rows.std() / rows.mean()), "col_cv": float(cols.std() / cols.mean()),
            "rows_empty": int((rows == 0).sum()), "cols_empty": int((cols == 0).sum())}


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report_row(times: dict, i: int, kernels) -> dict:
    out = {}
    for k in kernels:
        for p in PARTS:
            if (i, k, p) not in times:
                continue
            entry = {"seconds": spread(times[i, k, p])}
            if k != "dense":
                entry["paired_ratio"] = spread([s / d for s, d in zip(times[i, k, p], times[i, "dense", p])])
            out.setdefault(k, {})[p] = entry
    return out


def print_table(layer: str, shape, input_shape, rows: list[dict]) -> None:
    print(f"\n== {layer} {tuple(shape)}, input {tuple(input_shape)}: ms per step, median [min-max] over repeats; "
          f"ratio = paired kernel/dense, median [min-max]; fb = the forward+backward-only ratio; "
          f"row/col cv: spread of the active weights over rows / columns (0: even)")
    head = f"{'mask':>8} {'density':>7} {'row/col cv':>10} {'dense step':>20}"
    for k in KERNELS[1:]:
        head += f" {k + ' step':>20} {'ratio':>17} {'fb':>5}"
    print(head)

    def ms(s):
        return f"{s['median'] * 1e3:7.2f} [{s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f}]"

    for row in rows:
        k = row["kernels"]
        cv = f"{row['structure']['row_cv']:.2f}/{row['structure']['col_cv']:.2f}"
        line = f"{row['mask']:>8} {row['density']:7.3f} {cv:>10} {ms(k['dense']['step']['seconds']):>20}"
        for name in KERNELS[1:]:
            r = k[name]["step"]["paired_ratio"]
            line += (f" {ms(k[name]['step']['seconds']):>20} {r['median']:5.2f} [{r['min']:.2f}-{r['max']:.2f}]"
                     f" {k[name]['fwd_bwd']['paired_ratio']['median']:5.2f}")
        print(line)
    print("-- rounds that gather PruneFL's importance (step + SummedGradientSquared): sparse / dense")
    for row in rows:
        k = row["kernels"]
        r = k["sparse"]["step_importance"]["paired_ratio"]
        print(f"{row['mask']:>8} {row['density']:7.3f} dense {ms(k['dense']['step_importance']['seconds'])}  "
              f"sparse {ms(k['sparse']['step_importance']['seconds'])}  ratio {r['median']:.2f} "
              f"[{r['min']:.2f}-{r['max']:.2f}]")


# ------------------------------------------------------------------------------------ main
def fail(message: str) -> int:
    print(f"kernel_steps.py: {message}", file=sys.stderr)
    return 2


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "bench" / "prunefl_fmnist_campaign.yaml"))
    parser.add_argument("--layer", default="fc1.weight")
    parser.add_argument("--densities", default="0.05,0.1,0.2", help=f"{TARGET_DENSITY} is always added")
    parser.add_argument("--masks", nargs="+", default=list(MASK_KINDS), choices=MASK_KINDS)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per measurement")
    parser.add_argument("--batch-size", type=int, help="default: the config's local.batch_size")
    parser.add_argument("--settle", type=int, default=4, help="PruneFL reconfigurations at each density")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=list(CLOCKS), default="cpu")
    parser.add_argument("--data-root", help="default: the config's data.root, else the data set's own location")
    parser.add_argument("--json", default=str(ROOT / "results" / "perf" / "kernel_steps.json"))
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return parser.parse_args(argv)


def check(args) -> tuple[str | None, tuple]:
    """(what is wrong with the command line or None, (densities, config, local, prunefl))."""
    try:
        densities = sorted({float(d) for d in args.densities.split(",") if d.strip()} | {TARGET_DENSITY})
    except ValueError:
        return f"--densities {args.densities!r}: give numbers separated by commas, e.g. 0.05,0.1,0.2", ()
    if not all(0 < d <= 1 for d in densities):
        return f"--densities {args.densities!r}: each density must be in (0, 1]", ()
    if args.repeats < 1 or args.min_time <= 0 or args.settle < 0:
        return "--repeats must be >= 1, --min-time > 0 and --settle >= 0", ()
    if Path(args.json).exists() and not args.force:
        return f"--json {args.json} exists; pass --force to overwrite it, or another --json path", ()
    try:
        cfg, local, settings = read_settings(args.config)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return f"--config {args.config}: {exc}", ()
    if "prunefl" in args.masks and not (0 < settings["max_drop"] <= 1 and settings["ip_interval"] >= 1):
        return (f"--config {args.config}: the PruneFL masks need prunefl.max_drop in (0, 1] and prunefl.ip_interval "
                f">= 1 (got {settings['max_drop']}, {settings['ip_interval']})"), ()
    local["batch_size"] = args.batch_size or local["batch_size"]
    return None, (densities, cfg, local, settings)


def target(report: list[dict], layer: str) -> dict:
    """Per mask kind: the whole-step ratios at TARGET_DENSITY, the best kernel, whether ≤ TARGET_RATIO."""
    out = {}
    for row in (r for r in report if r["density"] == TARGET_DENSITY):
        ratios = {k: row["kernels"][k]["step"]["paired_ratio"]["median"] for k in KERNELS[1:]}
        best = min(ratios, key=ratios.get)
        out[row["mask"]] = {"ratio": ratios, "best": best, "target": TARGET_RATIO, "met": ratios[best] <= TARGET_RATIO}
        print(f"target: {layer} at density {TARGET_DENSITY}, {row['mask']} mask, whole step <= {TARGET_RATIO}x dense: "
              + ", ".join(f"{k} {r:.2f}x" for k, r in ratios.items())
              + f" ({'met' if ratios[best] <= TARGET_RATIO else 'not met'})")
    return out


def main(argv=None) -> int:
    args = arguments(argv)
    error, checked = check(args)
    if error:
        return fail(error)
    densities, cfg, local, settings = checked
    if args.repeats < 5:
        print(f"kernel_steps.py: --repeats {args.repeats} < 5: a development run, not a measurement", file=sys.stderr)
    from fedmpi.data import DATASETS, load_dataset
    from fedmpi.errors import ConfigError, DataError
    from fedmpi.models import build_model
    from fedmpi.timing.profile_machine import machine_description

    data_name, model_name = cfg.get("data", {}).get("name", DEFAULTS["data"]["name"]), cfg.get("model", "femnist_cnn")
    spec = DATASETS[DATASETS.resolve(data_name)]
    torch.set_num_threads(1)
    began, load_start = time.time(), list(os.getloadavg())
    torch.manual_seed(args.seed)
    model = build_model(model_name, spec.input_shape, spec.num_classes)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    module = dict(model.named_modules()).get(args.layer.rsplit(".", 1)[0])
    if not args.layer.endswith(".weight") or not isinstance(module, (nn.Linear, nn.Conv2d)):
        return fail(f"--layer {args.layer!r}: name a Linear or Conv2d weight of {model_name}, e.g. fc1.weight")
    masks = {}
    if "prunefl" in args.masks:
        try:
            data = load_dataset(data_name, args.data_root or cfg.get("data", {}).get("root"), seed=args.seed,
                                num_clients=1)
        except (ConfigError, DataError, OSError) as exc:
            return fail(f"reading {data_name} for the PruneFL masks: {exc} (--data-root DIR, or --masks uniform)")
        found = prunefl_masks(model, args.layer, torch.from_numpy(data.x_train), torch.from_numpy(data.y_train),
                              densities, local=local, settings=settings, settle=args.settle, seed=args.seed,
                              progress=lambda s: print(f"[kernel_steps] {s}", file=sys.stderr, flush=True))
        masks.update({("prunefl", d): torch.from_numpy(m) for d, m in found.items()})
        model.load_state_dict(init)   # every row times the same weights, input and output gradient
    generator = torch.Generator().manual_seed(args.seed)
    for d in densities if "uniform" in args.masks else ():
        masks["uniform", d] = exact_mask(tuple(module.weight.shape), d, generator)
    _, x, reads_input = layer_inputs(model, spec.input_shape, local["batch_size"], args.seed)[args.layer]
    x.requires_grad_(not reads_input)
    with torch.no_grad():
        gy = torch.randn(module(x).shape, generator=generator)
    optimizer = OptimizerSpec.from_config(local)
    keys = sorted(masks, key=lambda key: (MASK_KINDS.index(key[0]), key[1]))
    rows = [kernel_steps(module, args.layer, x, gy, masks[key], optimizer) for key in keys]
    times = time_rows(rows, repeats=args.repeats, min_time=args.min_time, clock=args.clock)
    report = [{"mask": kind, "density": d, "nnz": int(masks[kind, d].sum()), "structure": mask_structure(masks[kind, d]),
               "kernels": report_row(times, i, KERNELS)} for i, (kind, d) in enumerate(keys)]
    print_table(args.layer, module.weight.shape, x.shape, report)
    settings_out = {"config": args.config, "model": model_name, "data": data_name, "layer": args.layer,
                    "densities": densities, "masks": args.masks, "repeats": args.repeats, "min_time": args.min_time,
                    "batch_size": local["batch_size"], "seed": args.seed, "settle": args.settle,
                    "optimizer": optimizer.__dict__, "torch_threads": 1, "clock": args.clock,
                    "prunefl": {k: settings[k] for k in ("ip_interval", "ip_data_batches", "max_drop")},
                    "command": " ".join([Path(sys.executable).name, *sys.argv])}
    out = {"settings": settings_out, "machine": machine_description(), "load_average_start": load_start,
           "rows": report, "target": target(report, args.layer), "seconds": time.time() - began,
           "load_average_end": list(os.getloadavg())}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"kernel_steps.py: {path} ({out['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
