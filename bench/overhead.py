"""Framework overhead and the cost of MPI busy-polling, measured side by side in one run.

Runs the same small Fashion-MNIST experiment under ``mpiexec -n P`` with ``mpi.wait=spin`` (MPI's
blocking calls, which busy-poll) and ``mpi.wait=sleep`` (fedmpi's default: non-blocking
collectives completed by Test + short sleeps), alternating the two ``--repeats`` times so machine
noise hits both alike. Reports per mode the mean round wall time, the summed client compute time
per round, and their ratio (wall / compute: < 1 means clients ran in parallel, the rest is
framework and MPI time), and the spin/sleep wall-time ratio.

    python bench/overhead.py [--ranks 3 4] [--repeats 2] [--rounds 6] [--json results/overhead.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "fmnist_shards.yaml"


def run_once(ranks: int, wait: str, rounds: int, out: Path) -> dict:
    mpiexec = os.environ.get("MPIEXEC", str(Path(sys.executable).parent / "mpiexec"))
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "fedmpi", "run", str(CONFIG), "--quiet",
           "--force", "--out", str(out), "--set", f"rounds={rounds}", "--set", f"mpi.wait={wait}",
           "--set", "eval.every=0", "--set", "algorithm=fedavg", "--set", "sparsity=0.0"]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with h5py.File(out, "r") as f:
        wall = f["rounds/wall_seconds"][:-1]       # the last round also evaluates: leave it out
        compute = f["rounds/compute_seconds"][:-1]
    return {"wall": float(np.mean(wall)), "compute": float(np.mean(compute))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"cores": os.cpu_count(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            samples = {"spin": [], "sleep": []}
            for i in range(args.repeats):
                for wait in ("spin", "sleep") if i % 2 == 0 else ("sleep", "spin"):
                    samples[wait].append(run_once(ranks, wait, args.rounds, Path(tmp) / f"{wait}{i}.h5"))
            row = {"ranks": ranks}
            for wait, runs in samples.items():
                row[f"{wait}_wall"] = float(np.mean([r["wall"] for r in runs]))
                row[f"{wait}_compute"] = float(np.mean([r["compute"] for r in runs]))
                row[f"{wait}_wall_over_compute"] = row[f"{wait}_wall"] / row[f"{wait}_compute"]
            row["spin_over_sleep_wall"] = row["spin_wall"] / row["sleep_wall"]
            report["rows"].append(row)
    print(f"{'ranks':>5} {'mode':>6} {'round wall s':>13} {'client compute s':>17} {'wall/compute':>13}")
    for row in report["rows"]:
        for wait in ("spin", "sleep"):
            print(f"{row['ranks']:>5} {wait:>6} {row[f'{wait}_wall']:>13.2f} {row[f'{wait}_compute']:>17.2f} "
                  f"{row[f'{wait}_wall_over_compute']:>13.2f}")
        print(f"{'':>5} spin/sleep round wall time: {row['spin_over_sleep_wall']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
