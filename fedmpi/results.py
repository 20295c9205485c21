"""The results file: one HDF5 per run, written by rank 0, flushed after every round.

The file is opened in SWMR mode (single writer, multiple readers) so a user can read it while the
run appends; every dataset exists from the start and grows by one entry per round, so a run killed
part-way leaves a file holding every completed round. ``finished`` is set only on completion.
Schema: ../shared/CONTRACT.md ("Results file").
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import h5py
import numpy as np

ROUND_FIELDS = {
    "round": np.int64,
    "test_accuracy": np.float64,
    "client_accuracy": np.float64,
    "test_loss": np.float64,
    "upload_bytes": np.int64,
    "download_bytes": np.int64,
    "cum_upload_bytes": np.int64,
    "cum_download_bytes": np.int64,
    "header_bytes": np.int64,
    "density": np.float64,
    "wall_seconds": np.float64,
    "cum_wall_seconds": np.float64,
    "compute_seconds": np.float64,
    "sim_seconds": np.float64,
    "cum_sim_seconds": np.float64,
    "train_flops": np.float64,
    "cum_train_flops": np.float64,
    "mpi_payload_bytes": np.int64,
    "mpi_control_bytes": np.int64,
}

CLIENT_FIELDS = {
    "round": np.int64,
    "client_id": np.int64,
    "rank": np.int64,
    "num_samples": np.int64,
    "upload_bytes": np.int64,
    "download_bytes": np.int64,
    "header_bytes": np.int64,
    "train_loss": np.float64,
    "compute_seconds": np.float64,
    "train_flops": np.float64,
    "sim_seconds": np.float64,
}


def checkpoint_path(results: str | Path) -> Path:
    """The checkpoint of a run lives beside its results file."""
    return Path(results).with_suffix(".ckpt")


def run_status(result: str | Path) -> str:
    """``finished``, ``partial`` (a file without the finished mark, or only a checkpoint) or
    ``missing``."""
    result = Path(result)
    if not result.exists():
        return "partial" if checkpoint_path(result).exists() else "missing"
    try:
        # locking=False: a running job may hold the file open for writing; never block it.
        with h5py.File(result, "r", locking=False) as f:
            return "finished" if "finished" in f.attrs else "partial"
    except OSError:
        return "partial"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultsWriter:
    def __init__(self, path: str | Path, attrs: dict, *, resume_rounds: int | None = None):
        """Create ``path``; with ``resume_rounds``, rewrite it keeping only rounds up to that one.

        Resuming writes a fresh file rather than reopening the old one: a writer killed with
        SIGKILL leaves HDF5's "open for SWMR write" flag set, and HDF5 refuses to reopen such a
        file for writing (readers can still open it with ``swmr=True``).
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_rounds is None:
            self.file = self._create(self.path, attrs)
        else:
            with h5py.File(self.path, "r", swmr=True) as old:
                attrs = {k: v for k, v in old.attrs.items() if k != "finished"}
                kept = {}
                for group in ("rounds", "clients"):
                    rounds = old[group]["round"][:]
                    keep = int(np.searchsorted(rounds, resume_rounds, side="right"))
                    kept[group] = {name: ds[:keep] for name, ds in old[group].items()}
            attrs["resumed"] = now_iso()
            tmp = self.path.with_suffix(".h5.tmp")
            with self._create(tmp, attrs) as new:
                for group, columns in kept.items():
                    for name, values in columns.items():
                        new[group][name].resize((len(values),))
                        new[group][name][:] = values
            os.replace(tmp, self.path)
            self.file = h5py.File(self.path, "r+", libver="latest")
        self.file.swmr_mode = True
        self.file.flush()

    @staticmethod
    def _create(path: Path, attrs: dict) -> h5py.File:
        f = h5py.File(path, "w", libver="latest")
        for key, value in attrs.items():
            f.attrs[key] = value
        for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
            g = f.create_group(group)
            for name, dtype in fields.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        return f

    def append_round(self, round_row: dict, client_rows: list[dict]) -> None:
        self._append(self.file["clients"], CLIENT_FIELDS, client_rows)
        self._append(self.file["rounds"], ROUND_FIELDS, [round_row])
        self.file.flush()

    @staticmethod
    def _append(group, fields, rows) -> None:
        if not rows:
            return
        start = group["round"].shape[0]
        for name in fields:
            ds = group[name]
            ds.resize((start + len(rows),))
            ds[start:] = np.array([row[name] for row in rows], dtype=fields[name])
            ds.flush()

    def close(self, *, finished: bool) -> None:
        self.file.close()
        if finished:
            # attributes cannot be added in SWMR mode: reopen plainly to mark completion
            with h5py.File(self.path, "r+") as f:
                f.attrs["finished"] = now_iso()


def run_attrs(cfg: dict, mpi_size: int, versions: dict, version: str, commit: str) -> dict:
    return {
        "config": json.dumps(cfg, sort_keys=True),
        "fedmpi_version": version,
        "git_commit": commit,
        "mpi_size": mpi_size,
        "started": now_iso(),
        "versions": json.dumps(versions, sort_keys=True),
    }
