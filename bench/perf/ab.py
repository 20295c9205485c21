"""Two or more versions of fedmpi on the same run, interleaved: did a change make it faster?

Each REV is a git revision (checked out into a temporary worktree) or a directory holding a
fedmpi tree ("." for the working tree). Every repeat runs each version once, in alternating
order, on one workload of bench/perf/workloads.py, exactly as ``make bench-perf`` runs fedmpi
(``run.run_fedmpi``: the round loop without the warm-up and last rounds is timed). Prints per
version the median, min and max and the ratio to the first version, and checks that all end at
the same test accuracy.

    python bench/perf/ab.py HEAD . [--workload overhead] [--algorithm fedavg] [--ranks 3]
                            [--workers] [--client-batch 1] [--repeats 5] [--rounds N]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from run import run_fedmpi  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def checkout(rev: str, trees: Path) -> Path:
    if Path(rev).is_dir():
        return Path(rev).resolve()
    tree = trees / f"tree-{len(list(trees.iterdir()))}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True, text=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+", help="git revisions or fedmpi trees ('.': the working tree)")
    parser.add_argument("--workload", default="overhead", choices=list(WORKLOADS))
    parser.add_argument("--algorithm", default="fedavg", choices=["fedavg", "feddst"])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--workers", action="store_true", help="aggregation.where: workers")
    parser.add_argument("--client-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, help="timed rounds (default: the workload's)")
    args = parser.parse_args()
    if len(args.revs) < 2:
        parser.error("give at least two versions to compare")

    rounds = args.rounds or WORKLOADS[args.workload]["rounds"]
    runs = {rev: [] for rev in args.revs}
    with tempfile.TemporaryDirectory(prefix="fedmpi-ab-") as name:
        tmp = Path(name)
        (tmp / "trees").mkdir()
        trees = [checkout(rev, tmp / "trees") for rev in args.revs]
        try:
            for rep in range(args.repeats):
                pairs = list(zip(args.revs, trees))
                for rev, tree in (pairs if rep % 2 == 0 else pairs[::-1]):
                    runs[rev].append(run_fedmpi(args.workload, args.algorithm, rounds, args.ranks, args.client_batch,
                                                tmp, args.workers, tree=tree))
                    print(f"  [{rep + 1}/{args.repeats}] {rev:12s} round loop {runs[rev][-1]['timed']:.3f} s",
                          flush=True)
        finally:
            for tree in trees:
                if tree.is_relative_to(tmp):
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    first = statistics.median(r["timed"] for r in runs[args.revs[0]])
    print(f"{args.workload} {args.algorithm} P={args.ranks}" + (" workers" if args.workers else "")
          + f", {rounds} timed rounds, {args.repeats} repeats")
    accuracy = {rev: sorted({r["test_accuracy"] for r in results}) for rev, results in runs.items()}
    for rev, results in runs.items():
        timed = [r["timed"] for r in results]
        median = statistics.median(timed)
        print(f"{rev:12s} median {median:.3f} s  min {min(timed):.3f}  max {max(timed):.3f}  "
              f"ratio {median / first:.3f}  test accuracy {accuracy[rev]}")
    same = len({a for values in accuracy.values() for a in values}) == 1
    print("same test accuracy everywhere" if same else "TEST ACCURACY DIFFERS between versions")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
