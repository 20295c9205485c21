"""The two paths of the sparse kernels' active-weight gradient, ``(a @ b)`` at the active
positions (fedmpi/sparse_kernels/kernels.py, ``SparseStructure.sampled``), timed side by side on
the layer shapes of the FEMNIST CNN, and the path the cost model picks for each.

- ``sampled``: ``torch.sparse.sampled_addmm``, one dot product of length k per active position;
- ``blocks``: dense products of row blocks, gathered at the active positions;
- ``simd`` (k ≤ 64, where fedmpi/sparse_kernels/simd.py is usable: the path Linear layers take
  there, whatever the cost model says): csr_simd.c's dot product per active position, a and b
  copied padded first (in a training step those copies serve the forward and the input gradient
  too; here they are charged to this product alone).

Cases (a: rows × k, b: k × cols): fc1 (2048 × 3136) at batch 20, 32 and 64 (k = batch), conv2
(64 × 800 weights, 20 images of 14×14 positions: k = 3920) and conv1 (32 × 25, 20 × 28×28: k =
15680), each at several densities, random masks. Interleaved repeats in an order rotated every
repeat, the thread's CPU time, one torch thread (fedmpi/timing/measure.py's ``_timed``); median
ms over repeats. The cost model's constants in kernels.py come from this table (its sampled and
blocks columns).

    OMP_NUM_THREADS=1 python bench/sampled_paths.py [--repeats 7] [--min-time 0.05] [--json FILE] [--force]
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]   # fedmpi; interleaved.py
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fedmpi.sparse_kernels import SparseStructure, simd  # noqa: E402
from interleaved import arguments, time_cases, write_json  # noqa: E402

CASES = {  # name: (rows, k, cols)
    "fc1 batch 20": (2048, 20, 3136), "fc1 batch 32": (2048, 32, 3136), "fc1 batch 64": (2048, 64, 3136),
    "conv2": (64, 20 * 14 * 14, 800), "conv1": (32, 20 * 28 * 28, 25)}
DENSITIES = (0.01, 0.03, 0.05, 0.07, 0.1, 0.2)


def main(argv=None) -> int:
    args = arguments(__doc__, "sampled_paths.py", argv)
    if args == 2:
        return 2
    generator = torch.Generator().manual_seed(0)
    steps = {}
    for name, (rows, k, cols) in CASES.items():
        a, b = torch.randn(rows, k, generator=generator), torch.randn(k, cols, generator=generator)
        for density in DENSITIES:
            structure = SparseStructure(torch.rand(rows, cols, generator=generator) < density)
            steps[name, density, "sampled"] = (structure, lambda s=structure, a=a, b=b: s._sampled_addmm(a, b))
            steps[name, density, "blocks"] = (structure, lambda s=structure, a=a, b=b: s._product_gathered(a, b))
            if simd.usable(structure, k, a.dtype, a.device):
                steps[name, density, "simd"] = (structure, lambda s=structure, a=a, b=b: simd.sddmm(
                    s, simd.padded(a.t()), simd.padded(b)))
    times = time_cases({key: step for key, (_, step) in steps.items()}, args.repeats, args.min_time)
    print(f"ms per call, median of {args.repeats}; 'model' is the cost model's pick, '*' marks the faster measured path")
    if not simd.available():
        print(f"sampled_paths.py: the simd column is empty ({simd.unavailable_because()})", file=sys.stderr)
    print(f"{'case':>13} {'density':>7} {'sampled':>8} {'blocks':>8} {'simd':>8}  model")
    rows_out = []
    for name, (rows, k, cols) in CASES.items():
        for density in DENSITIES:
            paths = [p for p in ("sampled", "blocks", "simd") if (name, density, p) in steps]
            ms = {p: statistics.median(times[name, density, p]) * 1e3 for p in paths}
            faster = min(ms, key=ms.get)
            pick = "blocks" if steps[name, density, "blocks"][0].gathers(k) else "sampled"
            cells = "".join(f"{ms[p]:7.2f}{'*' if faster == p else ' '}" if p in ms else f"{'-':>7} "
                            for p in ("sampled", "blocks", "simd"))
            print(f"{name:>13} {density:7.2f} {cells}  {pick}")
            rows_out.append({"case": name, "rows": rows, "k": k, "cols": cols, "density": density, "pick": pick,
                             "seconds": {p: times[name, density, p] for p in paths}})
    write_json(args.json, {"repeats": args.repeats, "rows": rows_out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
