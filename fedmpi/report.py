"""Reading results files (CONTRACT.md "Results file") and turning them into text tables.

Used by ``fedmpi info``, ``fedmpi summarize`` and the figures in :mod:`fedmpi.plotting`.
Files may still be growing (a run in progress writes in SWMR mode) or be cut short by a kill;
everything here works on whatever rounds are present.

Accuracies are shown in the units the file stores them in (fractions, 4 decimals).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from fedmpi.config import flatten
from fedmpi.errors import DataError

# Per-round datasets that older files may lack; the cumulative ones are rebuilt from the
# per-round ones when missing so every consumer can rely on them.
CUMULATIVE_FROM_PER_ROUND = {
    "cum_upload_bytes": "upload_bytes",
    "cum_download_bytes": "download_bytes",
    "cum_wall_seconds": "wall_seconds",
    "cum_sim_seconds": "sim_seconds",
    "cum_train_flops": "train_flops",
}

# Config keys that change where/how output is written but not the metrics, so runs differing
# only in these (or in the seed) are repetitions of one setting. Matched as dotted-name prefixes.
NON_SETTING_KEYS = (
    "seed",
    "experiment",
    "data.root",
    "out",
    "output",
    "output_dir",
    "results_dir",
    "checkpoint",
    "log",
    "log_level",
    "verbose",
    "quiet",
    "progress",
)

# Short names for settings that show up in group labels.
LABEL_ABBREVIATIONS = {"sparsity": "S"}

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
        return str(self.config.get("algorithm", "?"))

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
        total = _config_get(self.config, "clients.total")
        return int(total) if total else 1

    def column(self, name: str) -> np.ndarray:
        """Per-round values of ``name`` (float), all-NaN if the file lacks the dataset."""
        if name in self.rounds:
            return np.asarray(self.rounds[name], dtype=float)
        return np.full(self.rounds_done, np.nan)

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


@dataclass
class RunGroup:
    """Runs of one setting (differing only in seed); ``label`` names it within its experiment."""

    key: tuple
    experiment: str
    label: str
    runs: list

    @property
    def algorithm(self) -> str:
        return self.runs[0].algorithm

    @property
    def seeds(self) -> list:
        numeric = lambda s: isinstance(s, (int, float))  # noqa: E731
        return sorted((r.seed for r in self.runs),
                      key=lambda s: (not numeric(s), s if numeric(s) else str(s)))

    def is_sparse(self) -> bool:
        return any(r.is_sparse() for r in self.runs)


# --------------------------------------------------------------------------- reading

def experiment_name(config: dict) -> str:
    """The experiment a run belongs to: config `experiment`, else the dataset name."""
    name = config.get("experiment") or _config_get(config, "data.name") or "results"
    return str(name)


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


def read_runs(directory_or_paths) -> list[RunResult]:
    """Read every ``*.h5`` in a directory (or the given files/directories), sorted by path.

    Unreadable files are skipped with a warning on stderr, so one broken file does not stop
    a summary of the others.
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
    return runs


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


def _config_get(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _is_setting(dotted: str) -> bool:
    return not any(dotted == key or dotted.startswith(key + ".") for key in NON_SETTING_KEYS)


def _settings(run: RunResult) -> dict:
    """The flattened config keys that change results, values made hashable/comparable."""
    return {key: json.dumps(value, sort_keys=True)
            for key, value in flatten(run.config).items() if _is_setting(key)}


# --------------------------------------------------------------------------- grouping

def group_key(run: RunResult) -> tuple:
    """(experiment, algorithm, settings fingerprint): equal for runs differing only in seed
    or in output-only keys (NON_SETTING_KEYS). Labels come from :func:`group_runs`."""
    fingerprint = json.dumps(_settings(run), sort_keys=True)
    return (run.experiment, run.algorithm, fingerprint)


def group_runs(runs: Iterable[RunResult]) -> list[RunGroup]:
    """Runs grouped by :func:`group_key`, labelled, sorted by experiment then label.

    A label is the algorithm, ``S=<sparsity>`` for sparse runs, and every setting that differs
    between groups of the same algorithm in the same experiment (e.g. "feddst S=0.8 alpha=0.05").
    """
    by_key: dict[tuple, list] = {}
    for run in runs:
        by_key.setdefault(group_key(run), []).append(run)

    groups = []
    for key, members in by_key.items():
        experiment, algorithm, _ = key
        siblings = [k for k in by_key if k[0] == experiment and k[1] == algorithm]
        sibling_settings = [_settings(by_key[k][0]) for k in siblings]
        differing = sorted(
            name for name in set().union(*sibling_settings)
            if len({s.get(name) for s in sibling_settings}) > 1 and name != "algorithm"
        )
        own = _settings(members[0])
        parts = [algorithm]
        sparse = any(r.is_sparse() for r in members)
        if sparse:
            parts.append(f"S={_format_setting(members[0].config.get('sparsity'))}")
        for name in differing:
            if name == "sparsity" and sparse:
                continue
            short = LABEL_ABBREVIATIONS.get(name, name.removeprefix(algorithm + "."))
            value = json.loads(own[name]) if name in own else None
            parts.append(f"{short}={_format_setting(value)}")
        groups.append(RunGroup(key=key, experiment=experiment, label=" ".join(parts), runs=members))
    groups.sort(key=lambda g: (g.experiment, g.label))
    return groups


def _format_setting(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "unset"
    return str(value)


# --------------------------------------------------------------------------- formatting

def format_bytes(n) -> str:
    """Binary units (KiB, MiB, GiB), e.g. '12.3 MiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds:.1f} s ({seconds / 60:.1f} min)"
    return f"{seconds:.1f} s ({seconds / 3600:.2f} h)"


def _fmt(value, digits: int = 4) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_std(values) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values, and their count."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def _fmt_mean_std(values, digits: int = 4) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    return _fmt(mean, digits) if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: list, rows: list) -> str:
    """A GitHub-markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(r) for r in cells[1:]])


# --------------------------------------------------------------------------- fedmpi info

def info_text(path) -> str:
    """Human-readable overview of one results file (``fedmpi info FILE.h5``)."""
    run = read_run(path)
    cfg = run.config
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}

    partition = str(data.get("partition", "?"))
    if partition == "dirichlet":
        partition += f" (alpha={_format_setting(data.get('alpha'))})"
    elif partition == "shards":
        partition += (f" ({_format_setting(data.get('shards_per_client'))} shards/client"
                      f" of {_format_setting(data.get('shard_size'))})")

    algorithm = run.algorithm
    if run.is_sparse():
        algorithm += f" (sparsity {_format_setting(cfg.get('sparsity'))})"
    if cfg.get("experiment"):
        algorithm += f", experiment '{cfg['experiment']}'"

    total = run.rounds_total
    status = "finished" if run.finished else "NOT finished (no 'finished' mark: running or killed)"
    rounds_line = f"{run.rounds_done}/{total if total is not None else '?'} done, {status}"
    if run.finished:
        rounds_line += f"; started {run.attrs.get('started', '?')}, finished {run.attrs['finished']}"
    else:
        rounds_line += f"; started {run.attrs.get('started', '?')}"

    def accuracy_line(name):
        final, best = run.final(name), run.best(name)
        if math.isnan(final):
            return "not evaluated yet"
        rounds = run.round_numbers()
        values = run.column(name)
        final_round = rounds[np.flatnonzero(np.isfinite(values))[-1]]
        best_round = rounds[int(np.nanargmax(values))]
        return f"final {final:.4f} (round {final_round}), best {best:.4f} (round {best_round})"

    upload, download = run.final("cum_upload_bytes"), run.final("cum_download_bytes")
    clients_total = run.clients_total
    versions = run.attrs.get("versions")
    try:
        versions = json.loads(versions) if isinstance(versions, str) else versions
    except ValueError:
        pass
    if isinstance(versions, dict):
        versions = ", ".join(f"{k} {v}" for k, v in versions.items())

    lines = [
        ("file", str(run.path)),
        ("algorithm", algorithm),
        ("data", f"{data.get('name', '?')}, partition {partition}, model {cfg.get('model', '?')}"),
        ("clients", f"{_format_setting(_config_get(cfg, 'clients.total'))} total, "
                    f"{_format_setting(_config_get(cfg, 'clients.per_round'))} per round"),
        ("seed", _format_setting(run.seed)),
        ("rounds", rounds_line),
        ("test_accuracy", accuracy_line("test_accuracy")),
        ("client_accuracy", accuracy_line("client_accuracy")),
        ("upload", f"{format_bytes(upload)} total ({format_bytes(upload / clients_total)} per client)"),
        ("download", f"{format_bytes(download)} total"
                     f" ({format_bytes(download / clients_total)} per client)"),
        ("density", f"final {_fmt(run.final('density'))}"),
        ("time", f"wall {format_seconds(run.final('cum_wall_seconds'))}, "
                 f"modelled {format_seconds(run.final('cum_sim_seconds'))}"),
        ("mpi_size", str(run.attrs.get("mpi_size", "?"))),
        ("fedmpi", f"{run.attrs.get('fedmpi_version', '?')} (git {run.attrs.get('git_commit', '?')})"),
        ("versions", str(versions) if versions else "not recorded"),
    ]
    width = max(len(name) for name, _ in lines) + 1
    return "\n".join(f"{name + ':':<{width}} {text}" for name, text in lines)


# --------------------------------------------------------------------------- fedmpi summarize

def summarize_table(runs) -> str:
    """One markdown row per group: final/best accuracy mean ± sample std over seeds, etc.

    Final = last evaluated round of each run. Upload is the total over all clients, mean over
    seeds; modelled time is the final cum_sim_seconds, mean over seeds.
    """
    headers = ["experiment", "group", "seeds (n)", "rounds", "final client_accuracy",
               "final test_accuracy", "best client_accuracy", "best test_accuracy",
               "cum upload (MiB, all clients)", "modelled time (s)", "finished"]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for group in group_runs(runs):
            members = group.runs
            done = sorted({r.rounds_done for r in members})
            totals = {r.rounds_total for r in members}
            total = totals.pop() if len(totals) == 1 else None
            total = "?" if total is None else total
            done_text = str(done[0]) if len(done) == 1 else f"{done[0]}–{done[-1]}"
            seeds = ", ".join(_format_setting(s) for s in group.seeds)
            rows.append([
                group.experiment,
                group.label,
                f"{seeds} ({len(members)})",
                f"{done_text}/{total}",
                _fmt_mean_std([r.final("client_accuracy") for r in members]),
                _fmt_mean_std([r.final("test_accuracy") for r in members]),
                _fmt(mean_std([r.best("client_accuracy") for r in members])[0]),
                _fmt(mean_std([r.best("test_accuracy") for r in members])[0]),
                _fmt(mean_std([r.final("cum_upload_bytes") / MIB for r in members])[0], 2),
                _fmt(mean_std([r.final("cum_sim_seconds") for r in members])[0], 1),
                f"{sum(r.finished for r in members)}/{len(members)}",
            ])
    if not rows:
        return "no runs"
    return (markdown_table(headers, rows) +
            "\n\nMean ± sample std over seeds; final = last evaluated round; best = mean over seeds"
            " of each run's best.")


# --------------------------------------------------------------------------- budget table

@dataclass
class BudgetRow:
    """One group's `metric` within upload budgets (means over seeds; NaN = none in budget)."""

    label: str
    seeds: int
    final_upload_mib_per_client: float
    best_within_budget: float  # best metric over rounds with cumulative upload <= B
    best_within_2budget: float  # ... <= 2B
    final: float
    best: float


@dataclass
class BudgetSummary:
    experiment: str
    metric: str
    budget_mib_per_client: float  # B
    budget_source: str  # the group that set B and why
    rows: list


def best_within_upload(run: RunResult, metric: str, budget_mib_per_client: float) -> float:
    """Best finite ``metric`` over rounds whose cumulative upload per client is <= the budget."""
    upload = run.upload_mib_per_client()
    values = run.column(metric)
    # relative slack: B is itself a (mean of) cumulative upload, recomputed in floating point
    within = (upload <= budget_mib_per_client * (1 + 1e-9)) & np.isfinite(values)
    return float(values[within].max()) if within.any() else math.nan


def budget_summary(runs, metric: str = "client_accuracy") -> list[BudgetSummary]:
    """Per experiment: the budget B and each group's best ``metric`` within B and 2B.

    B = the smallest final cumulative upload per client (mean over a group's seeds) among the
    experiment's sparse groups (sparsity > 0 and measured density < 1), or among all groups if
    none is sparse. This is the FedDST comparison: what a dense method reaches with the upload
    a sparse one needed for its whole run, and with twice that.
    """
    by_experiment: dict[str, list[RunGroup]] = {}
    for group in group_runs(runs):
        by_experiment.setdefault(group.experiment, []).append(group)

    summaries = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for experiment, groups in by_experiment.items():
            final_upload = {
                g.label: mean_std([r.upload_mib_per_client()[-1] if r.rounds_done else math.nan
                                   for r in g.runs])[0]
                for g in groups
            }
            sparse = [g for g in groups if g.is_sparse() and not math.isnan(final_upload[g.label])]
            candidates = sparse or [g for g in groups if not math.isnan(final_upload[g.label])]
            if not candidates:
                continue
            setter = min(candidates, key=lambda g: final_upload[g.label])
            budget = final_upload[setter.label]
            why = "smallest final upload among sparse groups" if sparse else \
                "smallest final upload (no sparse group)"
            rows = [
                BudgetRow(
                    label=g.label,
                    seeds=len(g.runs),
                    final_upload_mib_per_client=final_upload[g.label],
                    best_within_budget=mean_std(
                        [best_within_upload(r, metric, budget) for r in g.runs])[0],
                    best_within_2budget=mean_std(
                        [best_within_upload(r, metric, 2 * budget) for r in g.runs])[0],
                    final=mean_std([r.final(metric) for r in g.runs])[0],
                    best=mean_std([r.best(metric) for r in g.runs])[0],
                )
                for g in groups
            ]
            summaries.append(BudgetSummary(experiment=experiment, metric=metric,
                                           budget_mib_per_client=budget,
                                           budget_source=f"{setter.label} ({why})", rows=rows))
    return summaries


def budget_table(runs, metric: str = "client_accuracy") -> str:
    """Markdown: per experiment, each group's best ``metric`` within upload budgets B and 2B.

    See :func:`budget_summary` for the definition of B. Values are means over seeds of each
    run's best; "—" means no evaluated round fits in the budget.
    """
    sections = []
    for summary in budget_summary(runs, metric):
        b = summary.budget_mib_per_client
        headers = ["group", "seeds", "final upload (MiB/client)", "best ≤ B",
                   "best ≤ 2B", f"final {metric}", f"best {metric}"]
        rows = [[row.label, row.seeds, _fmt(row.final_upload_mib_per_client, 3),
                 _fmt(row.best_within_budget), _fmt(row.best_within_2budget),
                 _fmt(row.final), _fmt(row.best)] for row in summary.rows]
        sections.append("\n".join([
            f"## {summary.experiment}: best {metric} within a cumulative upload budget",
            "",
            f"B = {b:.3f} MiB per client (cumulative upload / clients.total), set by "
            f"{summary.budget_source}; 2B = {2 * b:.3f} MiB per client.",
            f"Best = highest {metric} over evaluated rounds whose cumulative upload fits the budget;"
            " all values are means over seeds.",
            "",
            markdown_table(headers, rows),
        ]))
    return "\n\n".join(sections) if sections else "no runs"
