"""Synthetic results files in the layout of docs/interface.md, for tests of the readers and figures."""
from __future__ import annotations

import json

import h5py
import numpy as np

from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, ResultsWriter, run_attrs

MIB = 2**20

# Datasets older writers did not produce; readers must cope without them.
OPTIONAL_ROUND_DATASETS = ("cum_download_bytes", "cum_wall_seconds", "cum_sim_seconds",
                           "train_flops", "cum_train_flops")

INT_DATASETS = {"round", "upload_bytes", "download_bytes", "cum_upload_bytes",
                "cum_download_bytes", "client_id", "rank", "num_samples"}


def make_config(algorithm="fedavgm", seed=0, sparsity=0.0, experiment="toy", rounds=8,
                clients_total=10, per_round=5, **sections) -> dict:
    """A fully resolved config like the runner writes; ``sections`` override whole sections."""
    config = {
        "seed": seed,
        "rounds": rounds,
        "algorithm": algorithm,
        "model": "mnistnet",
        "sparsity": sparsity,
        "experiment": experiment,
        "data": {"name": "fashion_mnist", "root": "data", "partition": "shards", "alpha": 0.5,
                 "shard_size": 20, "shards_per_client": 2},
        "clients": {"total": clients_total, "per_round": per_round},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.01},
        "eval": {"every": 1},
        "checkpoint": {"every": 0},
        "fedavgm": {"momentum": 0.9, "server_lr": 1.0},
        "fedprox": {"mu": 0.01},
        "feddst": {"alpha": 0.05, "readjust_every": 2, "r_end": rounds // 2},
    }
    config.update(sections)
    return config


def make_rounds(client_accuracy, upload_bytes_per_round, density=1.0, sim_seconds_per_round=2.0,
                test_accuracy=None) -> dict:
    """Per-round arrays consistent with each other (cumulative = running sums)."""
    client_accuracy = np.asarray(client_accuracy, dtype=float)
    n = client_accuracy.size
    if test_accuracy is None:
        test_accuracy = client_accuracy - 0.05
    upload = np.full(n, int(upload_bytes_per_round), dtype=np.int64)
    download = upload * 2
    wall = np.linspace(1.0, 1.5, n)
    sim = np.full(n, float(sim_seconds_per_round))
    flops = np.full(n, 1e9 * density)
    return {
        "round": np.arange(1, n + 1, dtype=np.int64),
        "test_accuracy": np.asarray(test_accuracy, dtype=float),
        "client_accuracy": client_accuracy,
        "test_loss": np.where(np.isfinite(client_accuracy), 2.0 - client_accuracy, np.nan),
        "upload_bytes": upload,
        "download_bytes": download,
        "cum_upload_bytes": np.cumsum(upload),
        "cum_download_bytes": np.cumsum(download),
        "density": np.full(n, float(density)),
        "wall_seconds": wall,
        "sim_seconds": sim,
        "cum_wall_seconds": np.cumsum(wall),
        "cum_sim_seconds": np.cumsum(sim),
        "train_flops": flops,
        "cum_train_flops": np.cumsum(flops),
    }


def write_root_attrs(h5, config, finished=True, versions=True):
    h5.attrs["config"] = json.dumps(config)
    h5.attrs["fedmpi_version"] = "0.1.0"
    h5.attrs["git_commit"] = "abc1234"
    h5.attrs["mpi_size"] = 3
    h5.attrs["started"] = "2024-05-01T12:00:00"
    if finished:
        h5.attrs["finished"] = "2024-05-01T12:05:00"
    if versions:
        h5.attrs["versions"] = json.dumps({"python": "3.11.2", "torch": "2.3.0", "h5py": "3.16.0"})


def write_fake_run(path, config, rounds, finished=True, omit=(), versions=True):
    """Write a complete results file; ``omit`` drops optional per-round datasets."""
    per_round = config["clients"]["per_round"]
    with h5py.File(path, "w") as h5:
        write_root_attrs(h5, config, finished=finished, versions=versions)
        group = h5.create_group("rounds")
        for name, values in rounds.items():
            if name not in omit:
                group.create_dataset(name, data=values)
        n = len(rounds["round"])
        clients = h5.create_group("clients")
        clients["round"] = np.repeat(rounds["round"], per_round)
        clients["client_id"] = np.tile(np.arange(per_round, dtype=np.int64), n)
        clients["rank"] = clients["client_id"][:] % 2 + 1
        clients["num_samples"] = np.full(n * per_round, 40, dtype=np.int64)
        clients["upload_bytes"] = np.repeat(rounds["upload_bytes"] // per_round, per_round)
        clients["download_bytes"] = np.repeat(rounds["download_bytes"] // per_round, per_round)
        clients["train_loss"] = np.linspace(2.0, 0.5, n * per_round)
        clients["compute_seconds"] = np.full(n * per_round, 0.1)
        clients["train_flops"] = np.full(n * per_round, 1e8)
    return path


def write_run_with_writer(path, config, rounds, *, extra_rounds=None, extra_clients=None,
                          finished=True):
    """Write ``rounds`` (from :func:`make_rounds`) through the real ResultsWriter, with
    algorithm-declared columns.

    ``extra_rounds``: ``{name: (dtype, values)}``, one value per round; ``extra_clients`` the same
    with one value per (round, client) row. A value of None is left out of its row (the writer
    stores the missing value). Fixed columns absent from ``rounds`` are written as 0.
    """
    extra_rounds, extra_clients = extra_rounds or {}, extra_clients or {}
    per_round = config["clients"]["per_round"]
    writer = ResultsWriter(path, run_attrs(config, 3, {"python": "3.11.2"}, "0.1.0", "abc1234"),
                           extra_round_fields={k: d for k, (d, _) in extra_rounds.items()},
                           extra_client_fields={k: d for k, (d, _) in extra_clients.items()})
    for i, round_number in enumerate(rounds["round"]):
        round_row = {name: rounds[name][i] if name in rounds else 0 for name in ROUND_FIELDS}
        round_row.update({k: v[i] for k, (_, v) in extra_rounds.items() if v[i] is not None})
        client_rows = []
        for c in range(per_round):
            row = {name: 0 for name in CLIENT_FIELDS}
            row.update(round=round_number, client_id=c, rank=c % 2 + 1, num_samples=40,
                       upload_bytes=rounds["upload_bytes"][i] // per_round)
            j = i * per_round + c
            row.update({k: v[j] for k, (_, v) in extra_clients.items() if v[j] is not None})
            client_rows.append(row)
        writer.append_round(round_row, client_rows)
    writer.close(finished=finished)
    return path
