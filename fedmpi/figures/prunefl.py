"""PruneFL's figures and table (``make plots`` draws them for every experiment that holds a
PruneFL-family run: a method whose class lists ``"prunefl"`` in ``figures``: ``prunefl``,
``snip``, ``imp``, ``lotteryfl``).

- ``<stem>_prunefl_accuracy_vs_time.png``: global test accuracy vs modelled time
  (``cum_sim_seconds``), the paper's main figure;
- ``<stem>_prunefl_accuracy_vs_round.png``: the same vs round;
- ``<stem>_prunefl_model_size.png``: model size vs round: the ``active_params`` column (active
  weights + dense tensors; LotteryFL: the mean over clients), or, for a run without it (FedAvg
  and other dense methods), the mean client upload per round / 4 bytes, exact for a dense model;
- ``<stem>_prunefl_personalised.png``: LotteryFL's personalised accuracy (mean over clients of
  its own masked model on its local test set, and the mean best-so-far) beside its global-model
  accuracy, on its own axes;
- ``<stem>_prunefl_time_to_target.md``: per method the modelled time to reach the target
  accuracy = the conventional-FL reference's final test accuracy (mean over its seeds) minus
  1 point, its ratio to the reference's time, the measured compute time of the same rounds
  (slowest client per round, summed), final accuracy and final model size.

The reference ("conventional FL") is the ``fedavg`` group when there is one, else the ``prunefl``
group with ``prunefl.initial_pruning`` and ``prunefl.adaptive`` both off (FedAvg with PruneFL's
local iterations, as the public code runs conventional FL). Lines: the mean over seeds, bands:
min–max over seeds; rounds without evaluation are left out. Methods are named by their class's
``label`` (the reference FedAvg: "FedAvg (conventional FL)"; PruneFL: by its settings; a method
that is not installed: its algorithm name).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fedmpi.figures.common import BAND_NOTE, algorithm_figures, algorithm_label
from fedmpi.results.groups import RunGroup
from fedmpi.results.reader import config_get
from fedmpi.results.tables import format_mean_std, markdown_table, mean_std

TARGET_GAP = 0.01


# --------------------------------------------------------------------------- names and values

def in_family(group) -> bool:
    """A PruneFL-family group: its algorithm's class lists these figures (``"prunefl"``)."""
    return "prunefl" in algorithm_figures(group.algorithm)


def method_name(group) -> str:
    """A reader's name for the group: the paper's method names, other differing settings after it."""
    run = group.runs[0]
    algorithm = group.algorithm
    skip = set()
    if algorithm == "prunefl":
        initial = bool(config_get(run.config, "prunefl.initial_pruning", True))
        adaptive = bool(config_get(run.config, "prunefl.adaptive", True))
        name = {(True, True): "PruneFL", (False, True): "PruneFL without initial pruning",
                (True, False): "PruneFL, initial pruning only",
                (False, False): "conventional FL (5 local iterations)"}[(initial, adaptive)]
        # its extra initial-pruning round is not a setting a reader compares
        skip = {"initial_pruning", "adaptive", "prunefl.initial_pruning", "prunefl.adaptive", "rounds"}
    elif getattr(group, "per_seed_density", False):
        name = f"{algorithm_label(algorithm)} to PruneFL's final density (each seed's)"
        skip = {part.split("=")[0] for part in group.label.split(" ")[1:] if part.split("=")[0].endswith("density")}
    else:
        name = algorithm_label(algorithm)
        if is_reference(group):    # FedAvg: the conventional FL PruneFL is measured against
            name += " (conventional FL)"
    extra = [part for part in group.label.split(" ")[1:] if part.split("=")[0] not in skip]
    return f"{name} ({' '.join(extra)})" if extra else name


def is_reference(group) -> bool:
    if group.algorithm == "fedavg":
        return True
    run = group.runs[0]
    return (group.algorithm == "prunefl" and not config_get(run.config, "prunefl.initial_pruning", True)
            and not config_get(run.config, "prunefl.adaptive", True))


def model_size(run) -> np.ndarray:
    """Per round: the ``active_params`` column, else the mean client upload / 4 (dense runs)."""
    if "active_params" in run.rounds:
        return run.column("active_params")
    clients = run.clients
    rounds = run.round_numbers()
    if not clients or "upload_bytes" not in clients:
        return np.full(len(rounds), np.nan)
    out = np.full(len(rounds), np.nan)
    for i, r in enumerate(rounds):
        this = clients["round"] == r
        if this.any():
            out[i] = float(np.mean(clients["upload_bytes"][this])) / 4
    return out


def _series(run, x_name: str, y) -> tuple[np.ndarray, np.ndarray]:
    x = run.round_numbers().astype(float) if x_name == "round" else run.column("cum_sim_seconds")
    values = y(run) if callable(y) else run.column(y)
    return x, values


def _plot(ax, group, color, label, x_name, y, style="-") -> bool:
    runs = [r for r in group.runs if r.rounds_done]
    if not runs:
        return False
    rounds = np.unique(np.concatenate([r.round_numbers() for r in runs]))
    xs = np.full((len(runs), rounds.size), np.nan)
    ys = np.full_like(xs, np.nan)
    for i, run in enumerate(runs):
        where = np.searchsorted(rounds, run.round_numbers())
        xs[i, where], ys[i, where] = _series(run, x_name, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, mean = np.nanmean(xs, axis=0), np.nanmean(ys, axis=0)
        low, high = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    keep = np.isfinite(x) & np.isfinite(mean)
    if not keep.any():
        return False
    seeds = len(runs)
    ax.plot(x[keep], mean[keep], style, color=color, linewidth=1.5, marker="o" if keep.sum() <= 40 else None,
            markersize=3, label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
    if seeds > 1:
        ax.fill_between(x[keep], low[keep], high[keep], color=color, alpha=0.2, linewidth=0)
    return True


def _figure(path: Path, title: str, groups, colors, x_name: str, x_label: str, y, y_label: str,
            log_y: bool = False) -> bool:
    fig = Figure(figsize=(7.5, 5.0), dpi=110, layout="constrained")
    ax = fig.subplots()
    drawn = False
    for group in groups:
        drawn |= _plot(ax, group, colors[group.label], method_name(group), x_name, y)
    if not drawn:
        return False
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{title}\n({BAND_NOTE})")
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------- time to target

def measured_round_seconds(run) -> np.ndarray:
    """Per round, the slowest client's measured ``compute_seconds`` on the machine that ran it: the
    measured counterpart of ``sim_seconds`` (a round lasts as long as its slowest client)."""
    rounds = run.round_numbers()
    clients = run.clients
    out = np.full(len(rounds), np.nan)
    if not clients or "compute_seconds" not in clients:
        return out
    for i, r in enumerate(rounds):
        this = clients["round"] == r
        if this.any():
            out[i] = float(np.max(clients["compute_seconds"][this]))
    return out


def first_time_at(run, target: float) -> tuple[float, float, float]:
    """(cum_sim_seconds, round, cumulative measured seconds) at the first evaluated round with
    test_accuracy ≥ target; NaNs if never."""
    accuracy = run.column("test_accuracy")
    reached = np.flatnonzero(np.isfinite(accuracy) & (accuracy >= target))
    if reached.size == 0:
        return math.nan, math.nan, math.nan
    i = int(reached[0])
    measured = float(np.sum(measured_round_seconds(run)[:i + 1]))
    return float(run.column("cum_sim_seconds")[i]), float(run.round_numbers()[i]), measured


def reference_target(groups, final_value, cost_at):
    """The to-target tables' reference: (its group, its runs' final values, the target = their mean
    − TARGET_GAP, its mean ``cost_at(run, target)`` over the runs that reach it); None without a
    reference group."""
    reference = next((g for g in groups if is_reference(g)), None)
    if reference is None:
        return None
    runs = [r for r in reference.runs if r.rounds_done]
    finals = [final_value(r) for r in runs]
    target = float(np.nanmean(finals)) - TARGET_GAP
    costs = [cost_at(r, target) for r in runs]
    return reference, finals, target, float(np.nanmean(costs)) if np.isfinite(costs).any() else math.nan


def time_to_target_table(groups) -> str:
    found = reference_target(groups, lambda r: r.final("test_accuracy"), lambda r, t: first_time_at(r, t)[0])
    if found is None:
        return ("No conventional-FL reference in this experiment (algorithm fedavg, or prunefl with "
                "initial_pruning and adaptive off): no target accuracy.")
    reference, finals, target, ref_time = found
    rows = []
    for group in groups:
        runs = [r for r in group.runs if r.rounds_done]
        if not runs:
            continue
        hits = [first_time_at(r, target) for r in runs]
        times = [t for t, _, _ in hits if math.isfinite(t)]
        rounds = [k for _, k, _ in hits if math.isfinite(k)]
        measured = [m for t, _, m in hits if math.isfinite(t) and math.isfinite(m)]
        mean_time = float(np.mean(times)) if times else math.nan
        sizes = [model_size(r)[-1] for r in runs]
        ratio = mean_time / ref_time if times and math.isfinite(ref_time) and ref_time > 0 else math.nan
        rows.append([method_name(group), len(runs),
                     format_mean_std([r.final("test_accuracy") for r in runs]),
                     f"{mean_std(sizes)[0]:,.0f}" if np.isfinite(sizes).all() else "n/a",
                     f"{len(times)}/{len(runs)}",
                     f"{mean_time:,.0f}" if times else "not reached",
                     f"{np.mean(measured):,.1f}" if measured else "—",
                     f"{np.mean(rounds):.0f}" if rounds else "—",
                     f"{ratio:.2f}" if math.isfinite(ratio) else "—"])
    header = (f"Target accuracy {target:.4f} = {method_name(reference)}'s final test accuracy "
              f"({np.nanmean(finals):.4f}, mean over {len(finals)} seeds) − {TARGET_GAP * 100:.0f} point. "
              "Time: modelled (cum_sim_seconds) at the first evaluated round at or above the target, mean over "
              "the seeds that reach it; measured: the same rounds' slowest-client compute_seconds on the machine "
              "that ran them, summed (no communication); model size: parameters of the final model.\n\n")
    return header + markdown_table(
        ["method", "seeds", "final test accuracy", "final model size", "seeds reaching target",
         "modelled time to target (s)", "measured compute to target (s)", "rounds to target",
         "× conventional FL's time"], rows)


# --------------------------------------------------------------------------- entry point

def per_seed_density_groups(groups) -> list:
    """SNIP and IMP runs pruned to a density of their own seed's (a campaign's ``from_run``: the
    final density of that seed's PruneFL run) are one setting: groups of one run each that differ
    only in the density and not in seed are merged, named "... to PruneFL's final density"."""
    def rest(group):
        return (group.experiment, group.algorithm,
                tuple(p for p in group.label.split(" ")[1:] if not p.split("=")[0].endswith("density")))

    candidates: dict = {}
    for group in groups:
        if group.algorithm in ("snip", "imp") and len(group.runs) == 1:
            candidates.setdefault(rest(group), []).append(group)
    out, done = [], set()
    for group in groups:
        family = candidates.get(rest(group), []) if group.algorithm in ("snip", "imp") else []
        if len(family) < 2 or len({g.runs[0].seed for g in family}) < len(family):
            out.append(group)
        elif rest(group) not in done:
            done.add(rest(group))
            merged = RunGroup(group.key, group.experiment, group.label, [g.runs[0] for g in family])
            merged.per_seed_density = True
            out.append(merged)
    return out


def draw(experiment: str, groups, colors: dict, plots_dir: Path, stem: str) -> list[Path]:
    """PruneFL's figures and table for one experiment; [] unless a PruneFL-family run is in it."""
    if not any(in_family(g) for g in groups):
        return []
    groups = per_seed_density_groups(groups)
    written = []
    figures = [
        (f"{stem}_prunefl_accuracy_vs_time.png", "test accuracy vs modelled training time", "time",
         "modelled time (s, cumulative sim_seconds)", "test_accuracy", "test accuracy (global test set)", False),
        (f"{stem}_prunefl_accuracy_vs_round.png", "test accuracy vs round", "round", "round",
         "test_accuracy", "test accuracy (global test set)", False),
        (f"{stem}_prunefl_model_size.png", "model size vs round", "round", "round", model_size,
         "model size (active parameters)", True),
    ]
    for filename, title, x_name, x_label, y, y_label, log_y in figures:
        path = plots_dir / filename
        if _figure(path, f"{experiment}: {title}", groups, colors, x_name, x_label, y, y_label, log_y):
            written.append(path)
    lottery = [g for g in groups if g.algorithm == "lotteryfl"]
    if lottery:
        path = plots_dir / f"{stem}_prunefl_personalised.png"
        fig = Figure(figsize=(7.5, 5.0), dpi=110, layout="constrained")
        ax = fig.subplots()
        drawn = False
        for group in lottery:
            color, name = colors[group.label], method_name(group)
            drawn |= _plot(ax, group, color, f"{name}: personalised accuracy", "round", "personal_accuracy")
            _plot(ax, group, color, f"{name}: mean best-so-far personalised", "round", "personal_accuracy_best", ":")
            _plot(ax, group, color, f"{name}: global model, local test sets", "round", "client_accuracy", "--")
        if drawn:
            ax.set_xlabel("round")
            ax.set_ylabel("accuracy on the clients' local test sets (mean over clients)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
            fig.suptitle(f"{experiment}: LotteryFL personalised accuracy\n({BAND_NOTE})")
            fig.savefig(path)
            written.append(path)
    table = plots_dir / f"{stem}_prunefl_time_to_target.md"
    table.write_text(f"# {experiment}: time to target accuracy\n\n{time_to_target_table(groups)}\n")
    written.append(table)
    return written
