"""What the small interleaved benchmarks (pooling.py, sampled_paths.py) share: their command line
(--repeats, --min-time, --json, --force) and the timing protocol of fedmpi/timing/measure.py —
a warm-up, the calls per measurement for about ``min_time`` seconds, then ``repeats`` rounds each
timing every case once, in an order rotated between rounds, on the thread's CPU time."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fedmpi.timing.measure import _timed


def arguments(doc: str, script: str, argv=None):
    """The parsed command line, or an exit status 2 after saying what to fix."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    parser.add_argument("--json", help="write every sample here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_time <= 0:
        print(f"{script}: --repeats must be >= 1 and --min-time > 0", file=sys.stderr)
        return 2
    if args.json and Path(args.json).exists() and not args.force:
        print(f"{script}: --json {args.json} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    return args


def time_cases(calls: dict, repeats: int, min_time: float, before=lambda key: None) -> dict:
    """{key: seconds per call, one per repeat}; ``before(key)`` runs untimed before each measurement."""
    keys, inner = list(calls), {}
    for key in keys:
        before(key)
        calls[key]()
        inner[key] = max(1, int(min_time / max(_timed(calls[key], 1), 1e-6)))
    times = {key: [] for key in keys}
    for r in range(repeats):
        shift = (r * 7) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            before(key)
            times[key].append(_timed(calls[key], inner[key]))
    return times


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))
