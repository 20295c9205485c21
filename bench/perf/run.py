"""``make bench-perf``: fedmpi against the bare PyTorch loop doing the same work (docs/performance.md).

For each workload (bench/perf/workloads.py) and algorithm (FedAvg dense, FedDST S = 0.8), one run of
every system per repeat, interleaved (the order rotates every repeat, so machine noise spreads
over all systems alike):

    loop          the bare loop (bench/perf/bare.py), 1 process, 1 torch thread
    loop-mt       the bare loop, 1 process, one torch thread per core (only with > 1 core)
    floor-Q       the bare loop split over Q processes (Q = fedmpi's training ranks, 1 thread each,
                  one Allreduce per round): the ideal floor for fedmpi at P = Q + 1
    fedmpi-P      python -m fedmpi run at P = 1 (rank 0 trains), P = 3 and P = 5 (2 and 4 worker
                  ranks + the server), under mpiexec for P > 1
    fedmpi-P-cbG  the same with local.client_batch = G (several clients of a rank trained at once)
    ...-w         (P > 1) the same with aggregation.where: workers (fixed-point sums on the worker
                  ranks instead of every upload gathered on rank 0)

The timed quantity is the round loop: ``rounds`` rounds after a warm-up round, without the final
round (where fedmpi also evaluates). Per system: median, min and max over the repeats; ratios
fedmpi / floor-Q (its own training ranks), fedmpi / loop and fedmpi / loop-mt. Start-up (launch,
imports, MPI, data, partition, model, lazy imports) is measured separately by
bench/perf/startup.py, and each fedmpi run's whole-process wall minus its rounds is reported too.
No pass/fail: the benchmark reports. The check column compares the final model's test accuracy
with the one-process bare loop's (FedAvg: identical at P = 1; FedDST: close).

    python bench/perf/run.py [--quick] [--repeats 5] [--workloads compute overhead overhead1000]
                             [--algorithms fedavg feddst] [--ranks 1 3 5] [--out results/perf]

Writes ``OUT/<workload>.json`` and ``OUT/startup.json`` (``--quick``: ``*-quick.json``); ``make
plots`` draws them (fedmpi/figures/perf.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from workloads import ALGORITHMS, WORKLOADS, fedmpi_config  # noqa: E402

from fedmpi.figures.perf import STARTUP_MEMORY  # noqa: E402


def mpiexec() -> str:
    return os.environ.get("MPIEXEC", str(Path(sys.executable).parent / "mpiexec"))


def env(threads: int = 1, tree: Path = ROOT) -> dict:
    """The environment of a benchmarked process: ``threads`` torch threads, fedmpi from ``tree``."""
    e = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = str(threads)
    e["PYTHONPATH"] = str(tree) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("SLURM_JOB_ID", None)
    return e


def launch(cmd: list[str], processes: int, threads: int = 1, extra_env: dict | None = None, tree: Path = ROOT):
    """Run ``cmd`` (under mpiexec for ``processes`` > 1) in the fedmpi source tree ``tree``."""
    if processes > 1:
        cmd = [mpiexec(), "-n", str(processes), *cmd]
    started = time.time()
    proc = subprocess.run(cmd, cwd=tree, env={**env(threads, tree), **(extra_env or {})}, capture_output=True,
                          text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


# ------------------------------------------------------------------------------ one run per system
def run_bare(workload, algorithm, rounds, processes, threads) -> dict:
    cmd = [sys.executable, str(HERE / "bare.py"), "--workload", workload, "--algorithm", algorithm,
           "--rounds", str(rounds), "--threads", str(threads)] + (["--mpi"] if processes > 1 else [])
    proc, wall = launch(cmd, processes, threads)
    out = last_json(proc.stdout)
    seconds = out["round_seconds"]
    return {"timed": sum(seconds[1:-1]), "warmup": seconds[0], "wall": wall, "fixed": wall - sum(seconds),
            "test_accuracy": out["test_accuracy"]}


def run_fedmpi(workload, algorithm, rounds, ranks, client_batch, tmp: Path, workers: bool = False,
               tree: Path = ROOT) -> dict:
    """One fedmpi run of a workload; ``tree``: the fedmpi source tree to run (bench/perf/ab.py)."""
    import h5py
    import yaml

    cfg = fedmpi_config(workload, algorithm, rounds, client_batch=client_batch, workers=workers)
    tag = f"{workload}_{algorithm}_cb{client_batch}" + ("_w" if workers else "")
    cfg_path = tmp / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp / f"{tag}_p{ranks}.h5"
    cmd = [sys.executable, "-m", "fedmpi", "run", str(cfg_path), "--out", str(out), "--force", "--quiet"]
    _, wall = launch(cmd, ranks, tree=tree)
    with h5py.File(out, "r") as f:
        seconds = f["rounds/wall_seconds"][:].tolist()
        accuracy = float(f["rounds/test_accuracy"][-1])
    out.unlink()
    return {"timed": sum(seconds[1:-1]), "warmup": seconds[0], "wall": wall, "fixed": wall - sum(seconds),
            "test_accuracy": accuracy}


def run_startup(workload, ranks, share_data: bool = True) -> dict:
    cmd = [sys.executable, str(HERE / "startup.py"), workload] + ([] if share_data else ["--no-share-data"])
    proc, wall = launch(cmd, ranks, extra_env={"FEDMPI_PERF_T0": repr(time.time())})
    report = last_json(proc.stdout)
    return {**report["stages"], "wall": wall, **report["memory"]}


# ------------------------------------------------------------------------------ the benchmark
def systems_for(workload: str, ranks: list[int], cores: int) -> dict[str, dict]:
    systems = {"loop": {"kind": "bare", "processes": 1, "threads": 1}}
    if cores > 1:
        systems["loop-mt"] = {"kind": "bare", "processes": 1, "threads": cores}
    for p in ranks:
        q = max(p - 1, 1)
        if q > 1:
            systems[f"floor-{q}"] = {"kind": "bare", "processes": q, "threads": 1}
    for p in ranks:
        for cb in WORKLOADS[workload]["client_batches"]:
            label = f"fedmpi-{p}" + (f"-cb{cb}" if cb > 1 else "")
            systems[label] = {"kind": "fedmpi", "processes": p, "training_processes": max(p - 1, 1), "client_batch": cb}
            if p > 1:   # the same with the sums on the workers
                systems[label + "-w"] = {**systems[label], "workers": True}
    return systems


def summarise(samples: list[dict]) -> dict:
    timed = [s["timed"] for s in samples]
    median = statistics.median(timed)
    return {"median": median, "min": min(timed), "max": max(timed),
            "spread": (max(timed) - min(timed)) / median if median > 0 else float("nan"),
            "warmup_median": statistics.median(s["warmup"] for s in samples),
            "wall_median": statistics.median(s["wall"] for s in samples),
            "fixed_median": statistics.median(s["fixed"] for s in samples),
            "test_accuracy": samples[0]["test_accuracy"], "repeats": len(samples)}


def ratios(summary: dict, systems: dict) -> dict:
    out = {}
    for label, spec in systems.items():
        if spec["kind"] != "fedmpi":
            continue
        q = spec["training_processes"]
        floor = "loop" if q == 1 else f"floor-{q}"
        med = summary[label]["median"]
        out[label] = {}
        if floor in summary:
            out[label].update(floor=floor, vs_floor=med / summary[floor]["median"])
        if "loop" in summary:
            out[label]["vs_loop"] = med / summary["loop"]["median"]
        if "loop-mt" in summary:
            out[label]["vs_loop_mt"] = med / summary["loop-mt"]["median"]
    return out


def bench_workload(workload, algorithms, ranks, repeats, rounds, cores, tmp: Path, log, skip=()) -> dict:
    systems = {k: v for k, v in systems_for(workload, ranks, cores).items() if k not in skip}
    jobs = [(a, label) for a in algorithms for label in systems]
    samples = {a: {label: [] for label in systems} for a in algorithms}
    for rep in range(repeats):
        shift = rep % len(jobs)
        order = jobs[shift:] + jobs[:shift]
        if rep % 2:
            order.reverse()
        for algorithm, label in order:
            spec = systems[label]
            if spec["kind"] == "bare":
                result = run_bare(workload, algorithm, rounds, spec["processes"], spec["threads"])
            else:
                result = run_fedmpi(workload, algorithm, rounds, spec["processes"], spec["client_batch"], tmp,
                                    spec.get("workers", False))
            samples[algorithm][label].append(result)
            log(f"  [{workload} {rep + 1}/{repeats}] {algorithm:7s} {label:16s} round loop {result['timed']:7.2f} s"
                f"  (warm-up round {result['warmup']:.2f} s, process {result['wall']:.1f} s)")
    summary = {a: {label: summarise(s) for label, s in per.items()} for a, per in samples.items()}
    return {"kind": "bench-perf", "workload": workload, "title": WORKLOADS[workload]["title"],
            "timed_rounds": rounds, "repeats": repeats, "systems": systems, "samples": samples,
            "summary": summary, "ratios": {a: ratios(summary[a], systems) for a in algorithms}}


def bench_startup(workload, ranks, repeats, log) -> dict:
    """Start-up per P; for P > 1 also with ``mpi.share_data: false`` (label ``P-copy``): every rank
    reading its own copy of the dataset."""
    variants = [(str(p), p, True) for p in ranks] + [(f"{p}-copy", p, False) for p in ranks if p > 1]
    samples = {label: [] for label, _, _ in variants}
    for rep in range(repeats):
        for label, p, share in (variants if rep % 2 == 0 else list(reversed(variants))):
            samples[label].append(run_startup(workload, p, share))
            log(f"  [start-up {rep + 1}/{repeats}] P={label}: {samples[label][-1]['total']:.2f} s")
    stages = list(samples[variants[0][0]][0])
    median = {p: {k: statistics.median(s[k] for s in runs) for k in stages} for p, runs in samples.items()}
    return {"kind": "bench-perf-startup", "workload": workload, "repeats": repeats, "samples": samples,
            "median": median}


# ------------------------------------------------------------------------------ report
def table(result: dict) -> str:
    lines = [f"\n{result['title']} ({result['timed_rounds']} timed rounds, {result['repeats']} repeats; "
             f"round-loop seconds: median [min-max])"]
    head = f"{'algorithm':9s} {'system':16s} {'median s':>9s} {'min-max':>15s} {'vs floor':>9s} " \
           f"{'vs loop':>8s} {'vs loop-mt':>10s} {'warm-up':>8s} {'fixed':>7s} {'test acc':>9s}"
    lines.append(head)
    lines.append("-" * len(head))
    for algorithm, per in result["summary"].items():
        for label, s in per.items():
            r = result["ratios"][algorithm].get(label, {})
            fmt = (lambda k: f"{r[k]:.2f}x" if k in r else "")
            lines.append(f"{algorithm:9s} {label:16s} {s['median']:9.2f} {s['min']:7.2f}-{s['max']:<7.2f} "
                         f"{fmt('vs_floor'):>9s} {fmt('vs_loop'):>8s} {fmt('vs_loop_mt'):>10s} "
                         f"{s['warmup_median']:8.2f} {s['fixed_median']:7.2f} {s['test_accuracy']:9.4f}")
    lines.append("vs floor: fedmpi / the bare loop split over as many processes as fedmpi has training ranks "
                 "(loop for P = 1); fixed: process wall - all rounds")
    return "\n".join(lines)


def startup_table(result: dict) -> str:
    stages = [k for k in next(iter(result["median"].values())) if k not in ("wall", *STARTUP_MEMORY)]
    lines = [f"\nstart-up before round 1 ({result['workload']} workload; slowest rank; median of "
             f"{result['repeats']}), seconds; then the ranks' memory, MiB (sum of proportional set sizes, "
             f"largest resident set; P-copy: mpi.share_data false)",
             f"{'P':>6s} " + " ".join(f"{k:>12s}" for k in [*stages, *STARTUP_MEMORY])]
    for p, med in result["median"].items():
        lines.append(f"{p:>6s} " + " ".join(f"{med[k]:12.2f}" for k in stages)
                     + " " + " ".join(f"{med[k]:12.0f}" if k in med else f"{'':>12s}" for k in STARTUP_MEMORY))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 repeat and fewer rounds (a smoke test, not a measurement)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per system (default 5; --quick: 1)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 3, 5], help="fedmpi's P values")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: per workload)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--startup-only", action="store_true", help="only the start-up measurement")
    parser.add_argument("--skip", nargs="+", default=[], metavar="SYSTEM",
                        help="leave out these systems (e.g. loop-mt on a machine with other load)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    cores = os.cpu_count() or 1
    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"quick": args.quick, "cores": cores, "host": platform.node(), "python": platform.python_version(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        import torch
        meta["torch"] = torch.__version__
    except ImportError:   # pragma: no cover
        pass

    def log(text):
        print(text, flush=True)

    log(f"bench-perf: {cores} cores, {repeats} repeat(s), workloads {', '.join(args.workloads)}; "
        f"round-loop timings; machine noise hits every system alike (interleaved)")
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_startup:
            startup = {**meta, **bench_startup(args.workloads[0], args.ranks, repeats, log)}
            (args.out / f"startup{suffix}.json").write_text(json.dumps(startup, indent=1))
            tables.append(startup_table(startup))
            log(tables[-1])
        for workload in ([] if args.startup_only else args.workloads):
            rounds = args.rounds or WORKLOADS[workload]["quick_rounds" if args.quick else "rounds"]
            result = {**meta, **bench_workload(workload, args.algorithms, args.ranks, repeats, rounds, cores,
                                               Path(tmp), log, skip=args.skip)}
            path = args.out / f"{workload}{suffix}.json"
            path.write_text(json.dumps(result, indent=1))
            tables.append(table(result))
            log(tables[-1])
            log(f"wrote {path}")
    print("\n".join(["", "=" * 40, "bench-perf summary" + (" (QUICK: 1 repeat, few rounds; not a measurement)"
                                                          if args.quick else ""), *tables]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
