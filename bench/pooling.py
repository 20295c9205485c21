"""fedmpi's max-pooling (fedmpi/models/nets.py ``max_pool2d``: shifted slices without gradients, a
channels-last copy with them) against torch's own ``F.max_pool2d``, on the pools of the suite's
networks and on whole steps of the networks that use them.

Pools: MNISTNet's two 3×3 stride-1 pools (10 channels of 24×24, 20 of 18×18), the FEMNIST CNN's
2×2 pools (32 of 28×28, 64 of 14×14), at a training batch (forward + backward of the sum) and an
evaluation batch (forward under no_grad). Models: a training step (forward, cross-entropy,
backward) and an evaluation forward of ``mnistnet``, ``femnist_cnn`` and ``multiexit_vgg_small``
with either pooling (the other is swapped in by replacing ``nets.max_pool2d`` and
``nets.MaxPool2d.forward``, as tests/test_pooling.py does). Interleaved repeats, order rotated every
repeat, the thread's CPU time, one torch thread; median ms.

    OMP_NUM_THREADS=1 python bench/pooling.py [--repeats 7] [--min-time 0.05] [--json FILE] [--force]
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
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fedmpi.models.nets as nets  # noqa: E402
from fedmpi.models import build_model  # noqa: E402
from interleaved import arguments, time_cases, write_json  # noqa: E402

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
    args = arguments(__doc__, "pooling.py", argv)
    if args == 2:
        return 2
    steps = cases(torch.Generator().manual_seed(0))
    calls = {(case, which): steps[case] for case in steps for which in ("torch", "fedmpi")}
    times = time_cases(calls, args.repeats, args.min_time, before=lambda key: use(key[1]))
    use("fedmpi")
    print(f"ms, median of {args.repeats} interleaved repeats; ratio = fedmpi / torch (paired)")
    rows = []
    for case in steps:
        t, f = times[case, "torch"], times[case, "fedmpi"]
        ratio = statistics.median(b / a for a, b in zip(t, f))
        print(f"{case[0]:>26}  {case[1]:<28} torch {statistics.median(t) * 1e3:8.2f}  "
              f"fedmpi {statistics.median(f) * 1e3:8.2f}  ratio {ratio:.2f}")
        rows.append({"case": case[0], "part": case[1], "torch": t, "fedmpi": f, "ratio": ratio})
    write_json(args.json, {"repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
