"""The results file: one HDF5 per run, written by rank 0, flushed after every round.

The file is opened in SWMR mode (single writer, multiple readers) so a user can read it while the
run appends; every dataset exists from the start and grows by one entry per round, so a run killed
part-way leaves a file holding every completed round. ``finished`` is set only on completion.
Schema: docs/interface.md ("Results file (HDF5)").

Besides the fixed columns (``ROUND_FIELDS``, ``CLIENT_FIELDS``) an algorithm may declare its own,
``{name: numpy dtype}``, float or signed integer. They are created with the fixed ones, since SWMR
cannot add datasets later, and their names and dtypes are recorded as JSON in the root attributes
``extra_round_fields`` / ``extra_client_fields`` so readers can tell them apart. A row without a
value for one of them stores the missing value: NaN (floats) or -1 (integers). Names may hold
``.`` and ``[ ]`` (``mask_moved[fc1.weight]``: a per-layer family), never ``/``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import h5py
import numpy as np

from fedmpi.config import flatten, plugin_provenance
from fedmpi.errors import OutputError

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
    "server_peak_rss_bytes": np.int64,
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

# group in the file -> (its fixed columns, the root attribute naming its algorithm-declared ones)
TABLES = {
    "rounds": (ROUND_FIELDS, "extra_round_fields"),
    "clients": (CLIENT_FIELDS, "extra_client_fields"),
}

# Config keys that leave a run's metrics unchanged: where output goes and how it is shown
# (experiment, output, checkpoint), how ranks wait on MPI (mpi: results are bit-identical either
# way), where the dataset is read from (data.root: a requeued job may see it mounted elsewhere).
# Matched as dotted-name prefixes. Runs differing only in these are the same run: --resume accepts
# them, and the reader groups them (and other seeds) as one setting. The seed stays part of the
# identity; only the grouping drops it. The former report-side list also named out, output_dir,
# results_dir, log, log_level, verbose, quiet and progress: no config has those keys (progress
# lives under output), so they are gone.
# local.client_batch: clients trained together give the same results as one by one, bit for bit;
# local.backward: the explicit MLP step gives autograd's bits; aggregation.where: the fixed-point
# sum has the same bits on the server and on the workers
NON_IDENTITY_KEYS = ("experiment", "data.root", "output", "checkpoint", "mpi", "local.client_batch",
                     "local.backward", "aggregation.where")


def identity_settings(cfg: dict) -> dict:
    """The flattened config keys that define a run: all but ``NON_IDENTITY_KEYS`` and the config
    sections of other methods than the run's."""
    return run_identity(flatten(cfg))


def run_identity(settings: dict) -> dict:
    """``settings`` (flattened config keys) without ``NON_IDENTITY_KEYS`` and without the sections
    of methods other than ``settings["algorithm"]``: a method reads only its own section, so a
    PruneFL run is the same run whatever ``scalefl.kd_gamma`` (or its default) says. Applied to
    identities stored by a fedmpi that still kept every section, too."""
    unread = unread_sections(settings.get("algorithm"))
    return {key: value for key, value in settings.items()
            if not any(key == k or key.startswith(k + ".") for k in NON_IDENTITY_KEYS)
            and key.split(".", 1)[0] not in unread}


def unread_sections(algorithm) -> set[str]:
    """The method sections that ``algorithm`` does not read; none known (every section counts) for
    a method that is not installed here or a registry that cannot be read."""
    from fedmpi.algorithms import ALGORITHMS, config_sections   # torch: only when identities are compared
    from fedmpi.errors import ConfigError

    try:
        if algorithm not in ALGORITHMS:
            return set()
        return set(config_sections(algorithm)) - {ALGORITHMS[algorithm].section}
    except ConfigError:
        return set()


def config_identity(cfg: dict) -> str:
    """What a checkpoint and the run resuming it must agree on (JSON of :func:`identity_settings`)."""
    return json.dumps(identity_settings(cfg), sort_keys=True)


def identity_differences(stored: str, requested: str, limit: int = 4) -> str:
    """Where two :func:`config_identity` strings differ, as ``key: stored → requested`` (the first
    ``limit`` keys, then how many more); empty when they agree. A key the stored identity lacks
    counts as its default (the identity was written by a fedmpi without that key, which behaved
    as its default does, or as the method's ``before_key_existed`` says), as results grouping counts it."""
    from fedmpi.config.defaults import stored_defaults   # the method registry: only when identities are compared

    stored_settings = json.loads(stored)
    old = {**identity_settings(stored_defaults(stored_settings.get("algorithm"))), **run_identity(stored_settings)}
    new = run_identity(json.loads(requested))
    show = lambda settings, key: json.dumps(settings[key]) if key in settings else "(absent)"  # noqa: E731
    keys = sorted(k for k in old.keys() | new.keys() if show(old, k) != show(new, k))   # 1 and 1.0 differ
    text = "; ".join(f"{k}: {show(old, k)} → {show(new, k)}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


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


def missing_value(dtype):
    """What a row without a value stores: NaN for floats, -1 for integers."""
    return np.nan if np.dtype(dtype).kind == "f" else -1


def _checked_extras(extras: dict | None, group: str) -> dict:
    fixed, attr = TABLES[group]
    checked = {}
    for name, dtype in (extras or {}).items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{attr}: {name!r} is not a usable column name (non-empty, no '/')")
        if name in fixed:
            raise ValueError(f"{attr}: {name!r} is a fixed column")
        dtype = np.dtype(dtype)
        if dtype.kind not in "fi":
            raise ValueError(f"{attr}: column {name!r} must be a float or signed integer, "
                             f"not {dtype}")
        checked[name] = dtype
    return checked


class ResultsWriter:
    def __init__(self, path: str | Path, attrs: dict, *, resume_rounds: int | None = None,
                 extra_round_fields: dict | None = None, extra_client_fields: dict | None = None):
        """Create ``path``; with ``resume_rounds``, rewrite it keeping only rounds up to that one.

        ``extra_round_fields`` / ``extra_client_fields``: the algorithm's own columns, ``{name:
        dtype}``. On resume the old file's columns are all kept, with any newly declared ones
        added (earlier rounds hold the missing value there).

        Resuming writes a fresh file rather than reopening the old one: a writer killed with
        SIGKILL leaves HDF5's "open for SWMR write" flag set, and HDF5 refuses to reopen such a
        file for writing (readers can still open it with ``swmr=True``).
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        extras = {"rounds": _checked_extras(extra_round_fields, "rounds"),
                  "clients": _checked_extras(extra_client_fields, "clients")}
        if resume_rounds is None:
            self.extras = extras
            self.file = self._create(self.path, attrs)
        else:
            self._rewrite(resume_rounds, extras)
            self.file = h5py.File(self.path, "r+", libver="latest")
        self.file.swmr_mode = True
        self.file.flush()
        # (name, dataset, dtype, missing value) per column, looked up once: a group lookup per
        # column and round cost rank 0 milliseconds per round of the run's serial path
        self._datasets = {group: [(name, self.file[group][name], dtype, missing_value(dtype))
                                  for name, dtype in self._columns(group).items()] for group in TABLES}

    def _columns(self, group: str) -> dict:
        return {**TABLES[group][0], **self.extras[group]}

    def _create(self, path: Path, attrs: dict) -> h5py.File:
        f = h5py.File(path, "w", libver="latest")
        for key, value in attrs.items():
            f.attrs[key] = value
        for group, (_, attr) in TABLES.items():
            f.attrs[attr] = json.dumps({name: dtype.name for name, dtype in self.extras[group].items()})
            g = f.create_group(group)
            for name, dtype in self._columns(group).items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,))
        return f

    def _rewrite(self, resume_rounds: int, declared: dict) -> None:
        with h5py.File(self.path, "r", swmr=True) as old:
            attrs = {k: v for k, v in old.attrs.items() if k != "finished"}
            kept, self.extras = {}, {}
            for group, (fixed, _) in TABLES.items():
                keep = int(np.searchsorted(old[group]["round"][:], resume_rounds, side="right"))
                kept[group] = {name: ds[:keep] for name, ds in old[group].items()}
                # every column of the old file survives, recorded as declared or not
                old_extras = {name: values.dtype for name, values in kept[group].items()
                              if name not in fixed}
                self.extras[group] = {**_checked_extras(old_extras, group), **declared[group]}
        attrs["resumed"] = now_iso()
        tmp = self.path.with_suffix(".h5.tmp")
        with self._create(tmp, attrs) as new:
            for group, columns in kept.items():
                rows = len(columns["round"])
                for name, dtype in self._columns(group).items():
                    values = columns.get(name, np.full(rows, missing_value(dtype)))
                    new[group][name].resize((rows,))
                    new[group][name][:] = values
        os.replace(tmp, self.path)

    def append_round(self, round_row: dict, client_rows: list[dict]) -> None:
        """Append one round; rows must hold every fixed column and no undeclared one."""
        for group, rows in (("clients", client_rows), ("rounds", [round_row])):
            for row in rows:
                self._check_row(group, row)
        try:
            self._append(self._datasets["clients"], client_rows)
            self._append(self._datasets["rounds"], [round_row])
            self.file.flush()
        except (OSError, RuntimeError) as exc:   # disk full, I/O error (h5py raises either)
            self._abandon()
            raise OutputError(self.path, f"cannot write round {round_row['round']} "
                              f"({str(exc).splitlines()[0]})") from None
        # HDF5 keeps writing into an unlinked file without complaint: check it is still there
        if not self.path.exists():
            raise OutputError(self.path, "the results file was removed while the run was writing it")

    def _abandon(self) -> None:
        """Close a file HDF5 can no longer write, now: left open, its close at interpreter exit
        fails again and can crash the process before the error is reported."""
        try:
            self.file.close()
        except (OSError, RuntimeError):
            pass

    def _check_row(self, group: str, row: dict) -> None:
        fixed, attr = TABLES[group]
        absent = fixed.keys() - row.keys()
        undeclared = row.keys() - self._columns(group).keys()
        if absent:
            raise ValueError(f"{group} row lacks the columns {sorted(absent)}")
        if undeclared:
            raise ValueError(f"{group} row has the undeclared columns {sorted(undeclared)}; "
                             f"declare them in {attr}")

    @staticmethod
    def _append(datasets: list, rows: list[dict]) -> None:
        if not rows:
            return
        start = datasets[0][1].shape[0]    # every column has as many rows
        for name, ds, dtype, fill in datasets:
            ds.resize((start + len(rows),))
            ds[start:] = np.array([row.get(name, fill) for row in rows], dtype=dtype)
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
        # the methods, models and data sets that came from plug-in packages, with their versions
        "plugins": json.dumps(plugin_provenance(cfg), sort_keys=True),
    }
