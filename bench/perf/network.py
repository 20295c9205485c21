"""Sparse payloads where bytes cost: dense and sparse uploads across a real (shaped) link, on the
two-node cluster of tests/cluster (network namespaces on this machine, each node's veth link
shaped by ``tc tbf`` in both directions; see tests/cluster/netns_cluster.py). Needs root.

Rank 0 (the server) runs on node 1 and ``--workers`` worker ranks on node 2, so every upload and
download crosses node 2's link. For each ``--rates`` (default 1 and 10 Gbit/s):

transport   bench/perf/gather.py across the link: each worker rank encodes one client's update
            of a 1,000,000-parameter model; dense (FedAvg), bitmap + values (a FedDST
            readjustment round) and values only (RandomMask, FedDST's other rounds) at S = 0.8.
            "transport" is the gatherv alone, "path" adds encoding, decoding and the merge.
rounds      ``fedmpi run`` of a ``make bench-perf`` workload (bench/perf/workloads.py, default
            ``overhead``: 100 clients a round, each upload 0.8 MB dense) with FedAvg, RandomMask
            and FedDST at S = 0.8, rounds timed as in ``make bench-perf`` (round 1 a warm-up,
            the last, which evaluates, not timed); the same runs on one node (no link, outside
            the namespaces) give what the link adds. Each round's uploads all go to rank 0
            (``aggregation.where: server``, the default).

Against the bytes: the bytes fedmpi counted (upload + download per round), the bytes that crossed
node 2's link (its interface counters, start-up included), and the time those bytes take at the
link's rate. The time model's communication part (``sim_seconds``: a client's upload bytes /
uplink + download bytes / downlink, docs/timing.md) is set against the measured transport with
uplink = downlink = the link's rate; it charges each client its own link, while here the
workers' uploads share one.

Repeats are interleaved: every repeat runs each rate (the link reshaped in place) in turn.

    python bench/perf/network.py [--rates 1gbit 10gbit] [--repeats 3] [--workers 2]
                                 [--workload overhead] [--rounds 4] [--json results/perf/network.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from cluster import netns_cluster  # noqa: E402
from workloads import fedmpi_config  # noqa: E402

ALGORITHMS = {"fedavg": {"algorithm": "fedavg", "sparsity": 0.0},
              "randommask": {"algorithm": "randommask", "sparsity": 0.8},
              "feddst": {"algorithm": "feddst", "sparsity": 0.8}}
PYTHON = sys.executable
MPIEXEC = os.environ.get("MPIEXEC", str(Path(PYTHON).parent / "mpiexec"))


def environment() -> dict:
    return {**os.environ, **netns_cluster.MPI_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:8])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def placement(cluster, workers: int) -> list[str]:
    """mpiexec and its options: rank 0 on node 1, the workers on node 2 (None: one node)."""
    if cluster is None:
        return [MPIEXEC, "-n", str(1 + workers)]
    return [MPIEXEC, *cluster.mpiexec_args([1, workers])]


def gather_once(cluster, workers: int, repeats: int, tmp: Path) -> dict:
    out = tmp / "gather.json"
    before = cluster.link_bytes(netns_cluster.NODES[1])
    run([*placement(cluster, workers), PYTHON, str(HERE / "gather.py"), "--repeats", str(repeats),
         "--json", str(out)])
    report = json.loads(out.read_text())
    report["link_bytes"] = cluster.link_bytes(netns_cluster.NODES[1]) - before
    return report


def round_once(cluster, workers: int, config: Path, tmp: Path) -> dict:
    out = tmp / "round.h5"
    node2 = netns_cluster.NODES[1]
    before = cluster.link_bytes(node2) if cluster else 0
    run([*placement(cluster, workers), PYTHON, "-m", "fedmpi", "run", str(config), "--out", str(out),
         "--force", "--quiet"])
    with h5py.File(out, "r") as f:
        rounds, clients = f["rounds"], f["clients"]
        timed = slice(1, len(rounds["round"]) - 1)
        return {"round_seconds": float(np.median(rounds["wall_seconds"][timed])),
                "counted_bytes": float(np.median((rounds["upload_bytes"][:] + rounds["download_bytes"][:])[timed])),
                "mpi_payload_bytes": float(np.median(rounds["mpi_payload_bytes"][timed])),
                # the slowest client's bytes: what sim_seconds' communication part charges a round
                "largest_client_bytes": float(np.max(clients["upload_bytes"][:] + clients["download_bytes"][:])),
                "rounds": int(len(rounds["round"])),
                "link_bytes": (cluster.link_bytes(node2) - before) if cluster else 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gather-repeats", type=int, default=7, help="gather.py --repeats per repeat")
    parser.add_argument("--workers", type=int, default=2, help="worker ranks on node 2")
    parser.add_argument("--workload", default="overhead")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    reason = netns_cluster.unavailable_reason()
    if reason:
        print(f"no namespace cluster here: {reason}", file=sys.stderr)
        return 2

    gathers = {rate: [] for rate in args.rates}
    rounds = {(where, alg): [] for where in ["one node", *args.rates] for alg in ALGORITHMS}
    with tempfile.TemporaryDirectory(prefix="fedmpi-network-") as tmp_dir, \
            netns_cluster.NetnsCluster(rate=args.rates[0]) as cluster:
        tmp = Path(tmp_dir)
        configs = {}
        for name, changes in ALGORITHMS.items():
            cfg = {**fedmpi_config(args.workload, "feddst" if name == "feddst" else "fedavg", args.rounds),
                   **changes}
            configs[name] = tmp / f"{name}.yaml"
            configs[name].write_text(yaml.safe_dump(cfg))
        for repeat in range(args.repeats):
            for where in ["one node", *args.rates]:
                if where != "one node":
                    cluster.set_rate(where)
                    gathers[where].append(gather_once(cluster, args.workers, args.gather_repeats, tmp))
                for name in ALGORITHMS:
                    rounds[(where, name)].append(round_once(None if where == "one node" else cluster,
                                                            args.workers, configs[name], tmp))
                print(f"repeat {repeat + 1}/{args.repeats}: {where} done", file=sys.stderr, flush=True)

    report = {"rates": args.rates, "workers": args.workers, "workload": args.workload,
              "timed_rounds": args.rounds, "repeats": args.repeats, "gather": gathers,
              "rounds": {f"{where}|{alg}": samples for (where, alg), samples in rounds.items()}}
    print_tables(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def rate_bytes_per_second(rate: str) -> float:
    return netns_cluster._rate_bits(rate) / 8


def print_tables(report: dict) -> None:
    workers = report["workers"]
    print(f"\ntransport: gather.py, rank 0 on node 1, {workers} worker rank(s) on node 2, one client each; "
          f"median over {report['repeats']} repeats of each repeat's median")
    print("| link | upload | bytes per client | transport ms | × dense | path ms | × dense "
          "| model: clients × bytes / rate, ms | measured / model |\n|---|---|---|---|---|---|---|---|---|")
    for rate, samples in report["gather"].items():
        kinds = samples[0]["kinds"]
        med = {k: statistics.median(s["kinds"][k]["transport_median"] for s in samples) for k in kinds}
        path = {k: statistics.median(s["kinds"][k]["median"] for s in samples) for k in kinds}
        for kind in kinds:
            payload = kinds[kind]["payload_bytes_per_client"]
            model = workers * payload / rate_bytes_per_second(rate)
            print(f"| {rate} | {kind} | {payload:,} | {med[kind] * 1e3:.2f} | {med[kind] / med['dense']:.2f} "
                  f"| {path[kind] * 1e3:.2f} | {path[kind] / path['dense']:.2f} | {model * 1e3:.2f} "
                  f"| {med[kind] / model:.2f} |")
    print(f"\nrounds: fedmpi run, workload {report['workload']}, P = {1 + workers} (rank 0 on node 1, the "
          f"workers on node 2; 'one node': no link), median of per-run medians over {report['timed_rounds']} "
          f"timed rounds")
    print("| link | algorithm | round s | × FedAvg | link adds, s | counted MB per round | link MB per round "
          "| link MB / rate, s | model comm (largest client), s |\n|---|---|---|---|---|---|---|---|---|")
    samples = {tuple(key.split("|")): value for key, value in report["rounds"].items()}
    one_node = {alg: statistics.median(s["round_seconds"] for s in samples[("one node", alg)])
                for alg in ALGORITHMS}
    for where in ["one node", *report["rates"]]:
        fedavg = statistics.median(s["round_seconds"] for s in samples[(where, "fedavg")])
        for alg in ALGORITHMS:
            runs = samples[(where, alg)]
            seconds = statistics.median(s["round_seconds"] for s in runs)
            counted = statistics.median(s["counted_bytes"] for s in runs)
            if where == "one node":
                print(f"| {where} | {alg} | {seconds:.3f} | {seconds / fedavg:.2f} | – | {counted / 1e6:.1f} "
                      f"| – | – | – |")
                continue
            link = statistics.median(s["link_bytes"] / s["rounds"] for s in runs)
            model = statistics.median(s["largest_client_bytes"] for s in runs) / rate_bytes_per_second(where)
            print(f"| {where} | {alg} | {seconds:.3f} | {seconds / fedavg:.2f} | {seconds - one_node[alg]:.3f} "
                  f"| {counted / 1e6:.1f} | {link / 1e6:.1f} | {link / rate_bytes_per_second(where):.3f} "
                  f"| {model:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
