"""Reading results files (docs/interface.md, "Results file").

Used by ``fedmpi info``, ``fedmpi summarize`` and the figures in :mod:`fedmpi.figures`.
Files may still be growing (a run in progress writes in SWMR mode) or be cut short by a kill;
everything here works on whatever rounds are present. Every column in the file is read, the
algorithm-declared ones (root attributes ``extra_round_fields`` / ``extra_client_fields``)
included.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from fedmpi.errors import DataError
from fedmpi.results.writer import TABLES, missing_value

# Per-round datasets that older files may lack; the cumulative ones are rebuilt from the
# per-round ones when missing so every consumer can rely on them.
CUMULATIVE_FROM_PER_ROUND = {
    "cum_upload_bytes": "upload_bytes",
    "cum_download_bytes": "download_bytes",
    "cum_wall_seconds": "wall_seconds",
    "cum_sim_seconds": "sim_seconds",
    "cum_train_flops": "train_flops",
}

# A global model whose measured density stays above this is dense, whatever `sparsity` says
# (a fully resolved config may carry a default `sparsity` that a dense algorithm ignores).
DENSE_DENSITY = 0.999

MIB = 2**20


@dataclass
class RunResult:
    """One results file: its resolved config, root attributes and per-round arrays."""

    path: Path
    config: dict
    finished: bool
    rounds: dict  # name -> 1-D np.ndarray, all of one length (rounds completed)
    attrs: dict  # root attributes, strings decoded
    clients: dict = field(default_factory=dict)  # per-(round, client) rows, name -> np.ndarray

    @property
    def algorithm(self) -> str:
        name = str(self.config.get("algorithm", "?"))
        # a `depthfl` run written before DepthFL had its distillation (and its own `depthfl`
        # section) ran the plain depth-wise averaging, whose name is `depthwise_avg` now
        if name == "depthfl" and "depthfl" not in self.config:
            return "depthwise_avg"
        return name

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def experiment(self) -> str:
        return experiment_name(self.config)

    @property
    def rounds_done(self) -> int:
        return len(next(iter(self.rounds.values()))) if self.rounds else 0

    @property
    def rounds_total(self):
        return self.config.get("rounds")

    @property
    def clients_total(self) -> int:
        total = config_get(self.config, "clients.total")
        return int(total) if total else 1

    def extra_fields(self, group: str = "rounds") -> dict:
        """The algorithm-declared columns of ``group`` ("rounds" or "clients"), name -> dtype;
        empty for files written before such columns existed."""
        try:
            declared = json.loads(self.attrs.get(TABLES[group][1], "{}"))
        except (TypeError, ValueError):
            return {}
        return {name: np.dtype(dtype) for name, dtype in declared.items()}

    def column(self, name: str, group: str = "rounds") -> np.ndarray:
        """Values of ``name`` (float), all-NaN if the file lacks the dataset; the missing value
        of an algorithm-declared integer column (-1) reads as NaN."""
        table = self.rounds if group == "rounds" else self.clients
        if name not in table:
            return np.full(len(next(iter(table.values()))) if table else 0, np.nan)
        values = np.asarray(table[name], dtype=float)
        declared = self.extra_fields(group).get(name)
        if declared is not None and declared.kind == "i":
            values[values == missing_value(declared)] = np.nan
        return values

    def round_numbers(self) -> np.ndarray:
        if "round" in self.rounds:
            return np.asarray(self.rounds["round"], dtype=np.int64)
        return np.arange(1, self.rounds_done + 1, dtype=np.int64)

    def final(self, name: str) -> float:
        """Last evaluated (finite) value of ``name``; NaN if there is none."""
        values = self.column(name)
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if finite.size else math.nan

    def best(self, name: str) -> float:
        """Largest finite value of ``name``; NaN if there is none."""
        values = self.column(name)
        finite = values[np.isfinite(values)]
        return float(finite.max()) if finite.size else math.nan

    def upload_mib_per_client(self) -> np.ndarray:
        """Cumulative upload after each round in MiB per client (the FedDST figure's x axis)."""
        return self.column("cum_upload_bytes") / self.clients_total / MIB

    def is_sparse(self) -> bool:
        """True for a sparse run: `sparsity` > 0 and, where measured, a final density below 1."""
        sparsity = self.config.get("sparsity") or 0
        if not float(sparsity) > 0:
            return False
        density = self.final("density")
        return math.isnan(density) or density < DENSE_DENSITY


# --------------------------------------------------------------------------- reading

def experiment_name(config: dict) -> str:
    """The experiment a run belongs to: config `experiment`, else the dataset name."""
    name = config.get("experiment") or config_get(config, "data.name") or "results"
    return str(name)


def config_get(config: dict, dotted: str, default=None):
    """``config["a"]["b"]`` for ``"a.b"``; ``default`` where a part is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def column_families(names: Iterable[str]) -> dict[str, list[str]]:
    """Column names by family, the part before ``[``: ``x[fc1.weight]`` and ``x[conv1.weight]``
    are family ``x`` (one value per layer); a name without ``[`` is a family of its own."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(name.split("[", 1)[0], []).append(name)
    return families


def family_member(name: str) -> str:
    """What tells a column apart within its family: ``fc1.weight`` for ``x[fc1.weight]``."""
    return name.split("[", 1)[1].removesuffix("]") if "[" in name else name


def read_run(path) -> RunResult:
    """Read one results file, also while its writer is still appending (SWMR)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such results file")
    try:
        with _open_for_reading(path) as h5:
            attrs = {key: _decode(value) for key, value in h5.attrs.items()}
            rounds = _read_table(h5, "rounds")
            clients = _read_table(h5, "clients")
    except DataError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError... for broken files
        raise DataError(path, f"not a readable results file ({exc})") from exc

    if "config" not in attrs:
        raise DataError(path, "no 'config' attribute: not a fedmpi results file")
    try:
        config = json.loads(attrs["config"])
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"'config' attribute is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DataError(path, "'config' attribute is not a JSON object")

    for cumulative, per_round in CUMULATIVE_FROM_PER_ROUND.items():
        if cumulative not in rounds and per_round in rounds:
            rounds[cumulative] = np.cumsum(rounds[per_round])
    return RunResult(path=path, config=config, finished="finished" in attrs,
                     rounds=rounds, attrs=attrs, clients=clients)


def read_runs(directory_or_paths, skipped: list | None = None) -> list[RunResult]:
    """Read every ``*.h5`` in a directory (or the given files/directories), sorted by path.

    Unreadable files are skipped with a warning on stderr, so one broken file does not stop
    a summary of the others; ``skipped``, when given, receives the path of each.
    """
    if isinstance(directory_or_paths, (str, Path)):
        directory_or_paths = [directory_or_paths]
    paths: list[Path] = []
    for item in directory_or_paths:
        item = Path(item)
        paths.extend(sorted(item.rglob("*.h5")) if item.is_dir() else [item])
    runs = []
    for path in paths:
        try:
            runs.append(read_run(path))
        except DataError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
            if skipped is not None:
                skipped.append(path)
    return runs


def unreadable_message(skipped: list) -> str:
    """Names the results files that could not be read (their reasons are in the warnings printed
    while reading)."""
    if not skipped:
        return "no *.h5 results file there"
    names = ", ".join(str(p) for p in skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
    return f"could not read {names} (reasons above)"


def _open_for_reading(path: Path):
    import h5py

    # SWMR first: it is the only safe way to read a file its writer is still appending to.
    # A file not written with libver="latest" may refuse SWMR; a non-SWMR writer holding the
    # file lock refuses plain opens too, and then a lock-free read still gets the flushed rounds.
    attempts = ({"swmr": True}, {}, {"locking": False})
    error = None
    for options in attempts:
        try:
            return h5py.File(path, "r", **options)
        except (OSError, ValueError, TypeError) as exc:
            error = exc
    raise error


def _read_table(h5, group_name: str) -> dict:
    """All 1-D datasets of a group, cut to the shortest length (a writer may be mid-append)."""
    if group_name not in h5:
        return {}
    group = h5[group_name]
    datasets = {}
    for name, obj in group.items():
        if not hasattr(obj, "shape") or len(obj.shape) != 1:
            continue
        if hasattr(obj, "refresh"):
            try:
                obj.refresh()  # picks up rows appended since the file was opened (SWMR)
            except Exception:
                pass
        datasets[name] = obj
    if not datasets:
        return {}
    length = min(ds.shape[0] for ds in datasets.values())
    return {name: np.asarray(ds[:length]) for name, ds in datasets.items()}


def _decode(value):
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
