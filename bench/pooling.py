"""fedmpi's max-pooling (fedmpi/models/nets.py ``max_pool2d``: shifted slices without gradients, a
channels-last copy with them) against torch's own ``F.max_pool2d``, on the pools of the suite's
networks and on whole steps of the networks that use them.

Pools: MNISTNet's two 3×3 stride-1 pools (10 channels of 24×24, 20 of 18×18), the FEMNIST CNN's
2×2 pools (32 of 28×28, 64 of 14×14), at a training batch (forward + backward of the sum) and an
evaluation batch (forward under no_grad). Models: a training step (forward, cross-entropy,
backward) and an evaluation forward of ``mnistnet``, ``femnist_cnn`` and ``multiexit_vgg_small``
with either pooling (the other is swapped in by replacing ``nets.max_pool2d`` and
``nets.MaxPool2d.forward``, as tests/test_models.py does). Interleaved repeats, order rotated every
repeat, the thread's CPU time, one torch thread; median ms.

    OMP_NUM_THREADS=1 python bench/pooling.py [--repeats 7] [--min-time 0.05] [--json FILE] [--force]
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fedmpi.models.nets as nets  # noqa: E402
from fedmpi.models import build_model  # noqa: E402
from fedmpi.timing.measure import _timed  # noqa: E402

POOLS = {  # name: (input shape without batch, kernel, stride)
    "mnistnet pool 1 (3x3 s1)": ((10, 24, 24), 3, 1), "mnistnet pool 2 (3x3 s1)": ((20, 18, 18), 3, 1),
    "femnist_cnn pool 1 (2x2)": ((32, 28, 28), 2, 2), "femnist_cnn pool 2 (2x2)": ((64, 14, 14), 2, 2)}
MODELS = {"mnistnet": (1, 28, 28), "femnist_cnn": (1, 28, 28), "multiexit_vgg_small": (1, 28, 28)}
TRAIN_BATCH, EVAL_BATCH = 32, 1000
FEDMPI_POOL, FEDMPI_MODULE = nets.max_pool2d, nets.MaxPool2d.forward


def torch_pool(x, kernel_size, stride=None, padding=0):
    return F.max_pool2d(x, kernel_size, stride, padding)


def use(which: str) -> None:
    nets.max_pool2d = FEDMPI_POOL if which == "fedmpi" else torch_pool
    nets.MaxPool2d.forward = FEDMPI_MODULE if which == "fedmpi" else nn.MaxPool2d.forward


def cases(generator):
    out = {}
    for name, (shape, kernel, stride) in POOLS.items():
        x_train = torch.randn(TRAIN_BATCH, *shape, generator=generator, requires_grad=True)
        x_eval = torch.randn(EVAL_BATCH, *shape, generator=generator)

        def train(x=x_train, k=kernel, s=stride):
            nets.max_pool2d(x, k, s).sum().backward()

        def evaluate(x=x_eval, k=kernel, s=stride):
            with torch.no_grad():
                nets.max_pool2d(x, k, s)
        out[name, f"fwd+bwd, batch {TRAIN_BATCH}"] = train
        out[name, f"forward no_grad, batch {EVAL_BATCH}"] = evaluate
    for name, shape in MODELS.items():
        model = build_model(name, shape, 10)
        x_train, y_train = torch.randn(TRAIN_BATCH, *shape, generator=generator), torch.randint(0, 10, (TRAIN_BATCH,), generator=generator)
        x_eval = torch.randn(EVAL_BATCH, *shape, generator=generator)

        def step(model=model, x=x_train, y=y_train):
            model.zero_grad()
            out = model(x)
            sum(F.cross_entropy(o, y) for o in (out if isinstance(out, list) else [out])).backward()

        def evaluate(model=model, x=x_eval):
            with torch.no_grad():
                model(x)
        out[name, f"training step, batch {TRAIN_BATCH}"] = step
        out[name, f"evaluation, batch {EVAL_BATCH}"] = evaluate
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_time <= 0:
        print("pooling.py: --repeats must be >= 1 and --min-time > 0", file=sys.stderr)
        return 2
    if args.json and Path(args.json).exists() and not args.force:
        print(f"pooling.py: --json {args.json} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    steps = cases(torch.Generator().manual_seed(0))
    keys = [(case, which) for case in steps for which in ("torch", "fedmpi")]
    inner = {}
    for case, which in keys:        # warm-up; steps per measurement
        use(which)
        steps[case]()
        inner[case, which] = max(1, int(args.min_time / max(_timed(steps[case], 1), 1e-6)))
    times = {key: [] for key in keys}
    for r in range(args.repeats):
        shift = (r * 3) % len(keys)
        for case, which in keys[shift:] + keys[:shift]:
            use(which)
            times[case, which].append(_timed(steps[case], inner[case, which]))
    use("fedmpi")
    print(f"ms, median of {args.repeats} interleaved repeats; ratio = fedmpi / torch (paired)")
    rows = []
    for case in steps:
        t, f = times[case, "torch"], times[case, "fedmpi"]
        ratio = statistics.median(b / a for a, b in zip(t, f))
        print(f"{case[0]:>26}  {case[1]:<28} torch {statistics.median(t) * 1e3:8.2f}  "
              f"fedmpi {statistics.median(f) * 1e3:8.2f}  ratio {ratio:.2f}")
        rows.append({"case": case[0], "part": case[1], "torch": t, "fedmpi": f, "ratio": ratio})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
