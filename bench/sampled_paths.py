"""The two paths of the sparse kernels' active-weight gradient, ``(a @ b)`` at the active
positions (fedmpi/sparse_kernels/kernels.py, ``SparseStructure.sampled``), timed side by side on
the layer shapes of the FEMNIST CNN, and the path the cost model picks for each.

- ``sampled``: ``torch.sparse.sampled_addmm``, one dot product of length k per active position;
- ``blocks``: dense products of row blocks, gathered at the active positions.

Cases (a: rows × k, b: k × cols): fc1 (2048 × 3136) at batch 20, 32 and 64 (k = batch), conv2
(64 × 800 weights, 20 images of 14×14 positions: k = 3920) and conv1 (32 × 25, 20 × 28×28: k =
15680), each at several densities, random masks. Interleaved repeats in an order rotated every
repeat, the thread's CPU time, one torch thread (fedmpi/timing/measure.py's ``_timed``); median
ms over repeats. The cost model's constants in kernels.py come from this table.

    OMP_NUM_THREADS=1 python bench/sampled_paths.py [--repeats 7] [--min-time 0.05] [--json FILE] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fedmpi.sparse_kernels import SparseStructure  # noqa: E402
from fedmpi.timing.measure import _timed  # noqa: E402

CASES = {  # name: (rows, k, cols)
    "fc1 batch 20": (2048, 20, 3136), "fc1 batch 32": (2048, 32, 3136), "fc1 batch 64": (2048, 64, 3136),
    "conv2": (64, 20 * 14 * 14, 800), "conv1": (32, 20 * 28 * 28, 25)}
DENSITIES = (0.01, 0.03, 0.05, 0.07, 0.1, 0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_time <= 0:
        print("sampled_paths.py: --repeats must be >= 1 and --min-time > 0", file=sys.stderr)
        return 2
    if args.json and Path(args.json).exists() and not args.force:
        print(f"sampled_paths.py: --json {args.json} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    steps = {}
    for name, (rows, k, cols) in CASES.items():
        a, b = torch.randn(rows, k, generator=generator), torch.randn(k, cols, generator=generator)
        for density in DENSITIES:
            structure = SparseStructure(torch.rand(rows, cols, generator=generator) < density)
            steps[name, density, "sampled"] = (structure, lambda s=structure, a=a, b=b: s._sampled_addmm(a, b))
            steps[name, density, "blocks"] = (structure, lambda s=structure, a=a, b=b: s._product_gathered(a, b))
    inner = {}
    for key, (_, step) in steps.items():      # warm-up; steps per measurement
        step()
        inner[key] = max(1, int(args.min_time / max(_timed(step, 1), 1e-6)))
    keys = list(steps)
    times = {key: [] for key in keys}
    for r in range(args.repeats):
        shift = (r * 7) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(_timed(steps[key][1], inner[key]))
    print(f"ms per call, median of {args.repeats}; 'model' is the cost model's pick, '*' marks the faster measured path")
    print(f"{'case':>13} {'density':>7} {'sampled':>8} {'blocks':>8}  model")
    rows_out = []
    for name, (rows, k, cols) in CASES.items():
        for density in DENSITIES:
            ms = {p: statistics.median(times[name, density, p]) * 1e3 for p in ("sampled", "blocks")}
            faster = min(ms, key=ms.get)
            pick = "blocks" if steps[name, density, "blocks"][0].gathers(k) else "sampled"
            print(f"{name:>13} {density:7.2f} {ms['sampled']:7.2f}{'*' if faster == 'sampled' else ' '}"
                  f"{ms['blocks']:7.2f}{'*' if faster == 'blocks' else ' '}  {pick}")
            rows_out.append({"case": name, "rows": rows, "k": k, "cols": cols, "density": density, "pick": pick,
                             "seconds": {p: times[name, density, p] for p in ("sampled", "blocks")}})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
