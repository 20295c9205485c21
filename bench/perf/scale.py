"""``make bench-scale``: 1,000 clients per round on up to 8 ranks (docs/performance.md, "Scale run").

The ``overhead1000`` workload (bench/perf/workloads.py: MLP 784-200-200-10, Fashion-MNIST iid over
1,000 clients of 60 images, all 1,000 per round) with FedAvg, under ``mpiexec -n P`` with one torch
thread per rank:

    server-P    aggregation.where: server (float64, the default): rank 0 gathers and decodes every
                upload and merges them
    workers-P   aggregation.sum: fixed_point, aggregation.where: workers: each rank sums its own
                clients, two MPI reductions combine the sums on rank 0
    baseline-P  workers-P with one client per worker rank (K = P - 1) and one round: rank 0's memory
                without the 1,000 clients (interpreter, torch, data, MPI, the O(model) merge)

by default server-8 and workers-3, -5, -8, and a baseline for each P. Per run, from its results
file: the median wall seconds of the timed rounds (round 1 is a warm-up, the last round evaluates
and is not timed, as in ``make bench-perf``), rank 0's peak resident set (``server_peak_rss_bytes``,
the largest over the rounds) and its growth over the baseline of the same P, both also as
multiples of P x model bytes, and ``mpi_payload_bytes`` per round. For the workers runs, the round
time against the ideal K / (P - 1): each run's median relative to the smallest P's, next to the
ideal ratio. No pass/fail: the benchmark reports. Run it on an otherwise idle machine with at least
8 cores; oversubscribed, the ranks share cores and the round time cannot follow K / (P - 1).

    python bench/perf/scale.py [--quick] [--rounds 3] [--ranks 3 5 8] [--server-ranks 8]
                               [--client-batch 1] [--no-baseline] [--out results/perf]

Writes ``OUT/scale.json`` (``--quick``: ``scale-quick.json``) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from run import launch  # noqa: E402  (mpiexec path, one torch thread per rank)
from workloads import WORKLOADS, fedmpi_config  # noqa: E402

WORKLOAD = "overhead1000"
ALGORITHM = "fedavg"
AGGREGATION = {
    "server": {"sum": "float64", "where": "server"},
    "workers": {"sum": "fixed_point", "where": "workers"},
}


def model_parameters() -> int:
    """n of the workload's model (the MLP on 1x28x28 Fashion-MNIST, 10 classes)."""
    sys.path.insert(0, str(ROOT))
    from fedmpi.models import build_model

    model = build_model(WORKLOADS[WORKLOAD]["config"]["model"], (1, 28, 28), 10)
    return sum(t.numel() for t in model.state_dict().values())


def run_one(label: str, where: str, ranks: int, timed_rounds: int, client_batch: int, tmp: Path, *,
            per_round: int | None = None, rounds: int | None = None) -> dict:
    import h5py
    import yaml

    cfg = fedmpi_config(WORKLOAD, ALGORITHM, timed_rounds, client_batch=client_batch)
    cfg["experiment"] = "perf-scale"
    cfg["aggregation"] = dict(AGGREGATION[where])
    if per_round is not None:
        cfg["clients"]["per_round"] = per_round
    if rounds is not None:
        cfg["rounds"] = rounds
    cfg_path = tmp / f"{label}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp / f"{label}.h5"
    _, wall = launch([sys.executable, "-m", "fedmpi", "run", str(cfg_path), "--out", str(out), "--force", "--quiet"],
                     ranks)
    with h5py.File(out, "r") as f:
        rounds_table = {name: f["rounds"][name][:].tolist() for name in
                        ("wall_seconds", "server_peak_rss_bytes", "mpi_payload_bytes", "upload_bytes",
                         "test_accuracy")}
    out.unlink()
    seconds = rounds_table["wall_seconds"]
    timed = seconds[1:-1] or seconds     # a one-round baseline has no timed rounds
    return {
        "where": where, "aggregation": cfg["aggregation"], "ranks": ranks, "worker_ranks": max(ranks - 1, 1),
        "clients_per_round": cfg["clients"]["per_round"], "client_batch": client_batch,
        "round_seconds": seconds, "median_round_seconds": statistics.median(timed), "warmup_seconds": seconds[0],
        "wall": wall, "peak_rss_bytes": max(rounds_table["server_peak_rss_bytes"]),
        "rss_per_round": rounds_table["server_peak_rss_bytes"],
        "mpi_payload_bytes_per_round": statistics.median(rounds_table["mpi_payload_bytes"]),
        "upload_bytes_per_round": statistics.median(rounds_table["upload_bytes"]),
        "test_accuracy": rounds_table["test_accuracy"][-1],
    }


def memory_ratios(runs: dict, model_bytes: int) -> None:
    """RSS and its growth over the same P's baseline, as multiples of P x model bytes (in place)."""
    for result in runs.values():
        p_model = result["ranks"] * model_bytes
        result["rss_over_p_model"] = result["peak_rss_bytes"] / p_model
        baseline = runs.get(f"baseline-{result['ranks']}")
        if baseline is not None and result is not baseline:
            result["baseline_rss_bytes"] = baseline["peak_rss_bytes"]
            result["rss_growth_bytes"] = result["peak_rss_bytes"] - baseline["peak_rss_bytes"]
            result["growth_over_p_model"] = result["rss_growth_bytes"] / p_model


def scaling(runs: dict) -> dict:
    """Workers runs against K / (P - 1): each median relative to the smallest P's, and the ideal."""
    workers = sorted((r for label, r in runs.items() if label.startswith("workers-")), key=lambda r: r["ranks"])
    if not workers:
        return {}
    first = workers[0]
    out = {"reference_ranks": first["ranks"], "runs": {}}
    for r in workers:
        per_worker = r["clients_per_round"] / r["worker_ranks"]
        actual = r["median_round_seconds"] / first["median_round_seconds"]
        ideal = per_worker / (first["clients_per_round"] / first["worker_ranks"])
        out["runs"][f"workers-{r['ranks']}"] = {
            "clients_per_worker_rank": per_worker, "time_ratio": actual, "ideal_ratio": ideal,
            "efficiency": ideal / actual, "seconds_per_client_per_worker": r["median_round_seconds"] / per_worker,
        }
    return out


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def table(result: dict) -> str:
    model_bytes = result["model_bytes"]
    lines = [f"\n{result['title']}; FedAvg, {result['timed_rounds']} timed round(s), client_batch "
             f"{result['client_batch']}; model {result['model_parameters']:,} parameters = {mib(model_bytes)} MiB",
             "",
             "| run | P | K | median round s | rank-0 peak RSS MiB | RSS / (P·model) | growth over baseline MiB "
             "| growth / (P·model) | MPI payload MiB / round | uploads MiB / round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in result["runs"].items():
        growth = r.get("rss_growth_bytes")
        timed = "" if label.startswith("baseline-") else f"{r['median_round_seconds']:.2f}"   # one untimed round
        cells = [label, str(r["ranks"]), str(r["clients_per_round"]), timed,
                 mib(r["peak_rss_bytes"]), f"{r['rss_over_p_model']:.1f}",
                 mib(growth) if growth is not None else "", f"{r['growth_over_p_model']:.1f}" if growth is not None else "",
                 mib(r["mpi_payload_bytes_per_round"]), mib(r["upload_bytes_per_round"])]
        lines.append("| " + " | ".join(cells) + " |")
    scale = result["scaling"]
    if scale:
        lines += ["", f"round time against K / (P - 1), relative to P = {scale['reference_ranks']}:", "",
                  "| run | clients per worker rank | time ratio | ideal ratio | efficiency | s per (client / worker rank) |",
                  "|---|---|---|---|---|---|"]
        for label, s in scale["runs"].items():
            lines.append(f"| {label} | {s['clients_per_worker_rank']:.1f} | {s['time_ratio']:.2f} "
                         f"| {s['ideal_ratio']:.2f} | {s['efficiency']:.2f} | {s['seconds_per_client_per_worker']:.4f} |")
    lines += ["", "baseline-P: the workers run with one client per worker rank and one round (rank 0 without "
                  "the 1,000 clients); growth = peak RSS - baseline of the same P; efficiency = ideal / time ratio"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed round (a smoke test, not a measurement)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; --quick: 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[3, 5, 8],
                        help="P of the workers runs (>= 2: rank 0 is the server)")
    parser.add_argument("--server-ranks", type=int, nargs="*", default=[8], help="P of the where: server runs")
    parser.add_argument("--client-batch", type=int, default=1, help="local.client_batch (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the K = P - 1 baseline runs")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    args = parser.parse_args()
    if any(p < 2 for p in [*args.ranks, *args.server_ranks]):
        parser.error("every P must be >= 2 (rank 0 serves, the others train)")
    timed_rounds = args.rounds or (1 if args.quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    n = model_parameters()
    result = {
        "kind": "bench-scale", "workload": WORKLOAD, "title": WORKLOADS[WORKLOAD]["title"], "algorithm": ALGORITHM,
        "timed_rounds": timed_rounds, "client_batch": args.client_batch, "model_parameters": n, "model_bytes": 4 * n,
        "quick": args.quick, "cores": os.cpu_count(), "host": platform.node(), "python": platform.python_version(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    plan = [(f"server-{p}", "server", p, {}) for p in args.server_ranks]
    plan += [(f"workers-{p}", "workers", p, {}) for p in args.ranks]
    if not args.no_baseline:
        plan += [(f"baseline-{p}", "workers", p, {"per_round": p - 1, "rounds": 1})
                 for p in sorted(set(args.ranks) | set(args.server_ranks))]
    print(f"bench-scale: {result['cores']} cores, {len(plan)} runs of {WORKLOAD} ({timed_rounds} timed rounds)",
          flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, where, p, extra in plan:
            runs[label] = run_one(label, where, p, timed_rounds, args.client_batch, Path(tmp), **extra)
            r = runs[label]
            print(f"  {label:12s} median round {r['median_round_seconds']:7.2f} s, rank-0 peak RSS "
                  f"{mib(r['peak_rss_bytes'])} MiB (process {r['wall']:.1f} s)", flush=True)
    memory_ratios(runs, 4 * n)
    result["runs"] = runs
    result["scaling"] = scaling(runs)
    accuracies = {r["test_accuracy"] for label, r in runs.items() if label.startswith("workers-")}
    result["workers_same_test_accuracy"] = len(accuracies) <= 1   # fixed point: the same bits at any P
    path = args.out / f"scale{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nworkers runs with the same final test accuracy at every P: {result['workers_same_test_accuracy']}")
    print(f"wrote {path}" + ("  (QUICK: 1 timed round; not a measurement)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
