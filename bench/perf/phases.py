"""Where a round's time goes on each rank: one workload run with ``FEDMPI_PHASE_TIMES=1``
(fedmpi/engine/phases.py), tabulated.

Runs fedmpi on a workload of bench/perf/workloads.py (its warm-up round and last round left out,
as in ``make bench-perf``) and prints, per rank, the median milliseconds per round of each phase
in the order the round meets them. The phases of one rank add up to its round; a worker's
"wait for plan" is the server's merge, results writing and preparation of the next round, plus the
other workers' lateness. ``--json`` writes the table with every round's times.

    python bench/perf/phases.py [--workload overhead] [--algorithm fedavg] [--ranks 3] [--workers]
                                [--client-batch 1] [--rounds N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import launch  # noqa: E402
from workloads import WORKLOADS, fedmpi_config  # noqa: E402

LINE = re.compile(r"^fedmpi phases rank (\d+): (.*)$")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="overhead", choices=list(WORKLOADS))
    parser.add_argument("--algorithm", default="fedavg", choices=["fedavg", "feddst"])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--workers", action="store_true", help="aggregation.where: workers")
    parser.add_argument("--client-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="timed rounds (default: the workload's)")
    parser.add_argument("--json", help="write the table and every round's times here")
    args = parser.parse_args()

    import yaml

    rounds = args.rounds or WORKLOADS[args.workload]["rounds"]
    cfg = fedmpi_config(args.workload, args.algorithm, rounds, client_batch=args.client_batch, workers=args.workers)
    with tempfile.TemporaryDirectory(prefix="fedmpi-phases-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        proc, _ = launch([sys.executable, "-m", "fedmpi", "run", str(config), "--out", str(Path(tmp) / "run.h5"),
                          "--force", "--quiet"], args.ranks, extra_env={"FEDMPI_PHASE_TIMES": "1"})
    per_rank = {}
    for line in proc.stderr.splitlines():
        match = LINE.match(line)
        if match:
            per_rank[int(match.group(1))] = json.loads(match.group(2))[1:-1]   # timed rounds only
    if sorted(per_rank) != list(range(args.ranks)):
        raise SystemExit(f"expected a phase line from every rank, got ranks {sorted(per_rank)}")
    table = {}
    for rank, timed in sorted(per_rank.items()):
        phases = list(dict.fromkeys(p for r in timed for p in r))
        table[rank] = {p: 1e3 * statistics.median(r.get(p, 0.0) for r in timed) for p in phases}
        table[rank]["round"] = 1e3 * statistics.median(sum(r.values()) for r in timed)
    title = (f"{args.workload} {args.algorithm} P={args.ranks}" + (" workers" if args.workers else "")
             + (f" client_batch {args.client_batch}" if args.client_batch > 1 else "")
             + f": median ms per round over {rounds} timed rounds")
    print(title)
    for rank, row in table.items():
        print(f"rank {rank}: " + ", ".join(f"{p} {ms:.1f}" for p, ms in row.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"kind": "bench-phases", "title": title, "config": cfg, "ranks": args.ranks,
                       "median_ms": {str(r): row for r, row in table.items()},
                       "rounds": {str(r): t for r, t in per_rank.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
