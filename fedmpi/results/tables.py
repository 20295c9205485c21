"""Text tables over many runs: ``fedmpi summarize``, the upload-budget table, and the number
formatting they share with ``fedmpi info``.

Accuracies are shown in the units the file stores them in (fractions, 4 decimals).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from fedmpi.results.groups import RunGroup, format_setting, group_runs
from fedmpi.results.reader import MIB, RunResult


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


def format_number(value, digits: int = 4) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def mean_std(values) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values, and their count."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    std = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    return float(finite.mean()), std, int(finite.size)


def format_mean_std(values, digits: int = 4) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return "—"
    return format_number(mean, digits) if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: list, rows: list) -> str:
    """A GitHub-markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(r) for r in cells[1:]])


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
            seeds = ", ".join(format_setting(s) for s in group.seeds)
            rows.append([
                group.experiment,
                group.label,
                f"{seeds} ({len(members)})",
                f"{done_text}/{total}",
                format_mean_std([r.final("client_accuracy") for r in members]),
                format_mean_std([r.final("test_accuracy") for r in members]),
                format_number(mean_std([r.best("client_accuracy") for r in members])[0]),
                format_number(mean_std([r.best("test_accuracy") for r in members])[0]),
                format_number(mean_std([r.final("cum_upload_bytes") / MIB for r in members])[0], 2),
                format_number(mean_std([r.final("cum_sim_seconds") for r in members])[0], 1),
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
        rows = [[row.label, row.seeds, format_number(row.final_upload_mib_per_client, 3),
                 format_number(row.best_within_budget), format_number(row.best_within_2budget),
                 format_number(row.final), format_number(row.best)] for row in summary.rows]
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


# --------------------------------------------------------------------------- sparse-mask table

def mask_table(runs, metric: str = "client_accuracy") -> str | None:
    """For groups of masked methods (runs with a ``mask_changed`` column, e.g. FedDST and
    RandomMask): best and final ``metric`` (mean ± sample std over seeds), total upload per
    client, and how many global-mask positions changed over the run (the sum of
    ``mask_changed``, mean over seeds) and on how many rounds. None when no run has the column."""
    headers = ["group", "seeds", f"best {metric}", f"final {metric}", "upload per client (MiB)",
               "mask positions changed", "rounds with changes"]
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for group in group_runs(runs):
            members = [r for r in group.runs if "mask_changed" in r.extra_fields()]
            if not members:
                continue
            changed = [r.column("mask_changed") for r in members]
            rows.append([
                group.label, str(len(members)),
                format_mean_std([r.best(metric) for r in members]),
                format_mean_std([r.final(metric) for r in members]),
                format_number(mean_std([r.upload_mib_per_client()[-1] for r in members])[0], 3),
                format_number(mean_std([float(np.nansum(c)) for c in changed])[0], 0),
                format_number(mean_std([float(np.count_nonzero(np.nan_to_num(c))) for c in changed])[0], 1),
            ])
    if not rows:
        return None
    return (markdown_table(headers, rows) + "\n\nMean ± sample std over seeds; best = each run's best "
            "evaluated round; mask positions changed = Σ over rounds of positions whose membership in "
            "the global mask changed (a move in and a move out count 2).")
