"""The figures and tables every experiment gets, whatever its methods (``make plots``).

Every algorithm group of the experiment on the same axes, registered method or not (a group whose
algorithm is not installed is labelled by its algorithm name, as every group is here: by its
:class:`~fedmpi.results.RunGroup` label): a line for the mean over seeds and, for groups with
several seeds, a band from the minimum to the maximum seed. Rounds without evaluation (NaN) are
left out of the lines.

- ``<stem>_accuracy_vs_upload.png``: accuracy vs cumulative upload per client (the FedDST paper's
  figure), with the upload budget B of ``<stem>_budget_table.md`` and 2B marked;
- ``<stem>_accuracy_vs_round.png``, ``<stem>_density_vs_round.png``, ``<stem>_accuracy_vs_time.png``
  (modelled time);
- ``<stem>_algorithm_columns.png``: the per-round columns the groups' algorithms declared;
- ``<stem>_budget_table.md`` and, when a run recorded masks, ``<stem>_mask_table.md``.

Also the helpers the method-specific figure modules share: a group's display name from the
algorithm registry (:func:`algorithm_label`), colours, file stems.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from fedmpi.results import RunGroup, budget_summary, budget_table, column_families, family_member, mask_table

ACCURACY_PANELS = [
    ("client_accuracy", "client accuracy (mean over clients' local test sets)"),
    ("test_accuracy", "test accuracy (global test set)"),
]
BAND_NOTE = "line = mean over seeds, band = min–max over seeds"
MAX_GROUPS_PER_LAYER_PANEL = 4
MAX_GROUPS_WITH_BANDS = 6      # beyond this, min–max bands hide the lines
MAX_LABEL = 70                 # legend entries are cut here (the tables keep the whole label)


# --------------------------------------------------------------------------- the methods' declarations

def algorithm_class(name: str):
    """The registered class of algorithm ``name`` (built in or an installed plug-in), or None for
    results of a method that is not installed here."""
    from fedmpi.algorithms import ALGORITHMS   # imports torch: only when figures are drawn
    from fedmpi.errors import ConfigError

    try:
        return ALGORITHMS[name] if name in ALGORITHMS else None
    except ConfigError as exc:   # a broken plug-in: its groups get the common figures only
        warnings.warn(f"figures: the algorithm registry cannot be read ({exc}); {name!r} is drawn "
                      f"without its method's figures", stacklevel=2)
        return None


def algorithm_label(name: str) -> str:
    """A method's display name: its class's ``label``, else (not installed, or no label) ``name``."""
    cls = algorithm_class(name)
    return (getattr(cls, "label", "") or name) if cls is not None else name


def algorithm_figures(name: str) -> tuple[str, ...]:
    """The figure modules (under ``fedmpi.figures``) the class of algorithm ``name`` declares."""
    cls = algorithm_class(name)
    return tuple(getattr(cls, "figures", ())) if cls is not None else ()


# --------------------------------------------------------------------------- entry point

def draw(experiment: str, groups, colors: dict, plots_dir: Path, stem: str) -> list[Path]:
    """The common figures and tables of one experiment; the paths written."""
    written: list[Path] = []
    budgets = budget_summary([r for g in groups for r in g.runs])
    budget = budgets[0].budget_mib_per_client if budgets else None
    figures = [
        (f"{stem}_accuracy_vs_upload.png", "accuracy vs cumulative upload", "upload",
         "cumulative upload per client (MiB) = cum_upload_bytes / clients.total",
         ACCURACY_PANELS),
        (f"{stem}_accuracy_vs_round.png", "accuracy vs round", "round", "round",
         ACCURACY_PANELS),
        (f"{stem}_density_vs_round.png", "global model density vs round", "round", "round",
         [("density", "density (nonzero fraction of maskable weights)")]),
        (f"{stem}_accuracy_vs_time.png", "accuracy vs modelled time", "time",
         "modelled time (s, cumulative sim_seconds under the device profile)",
         ACCURACY_PANELS),
    ]
    for filename, title, x_name, x_label, panels in figures:
        path = plots_dir / filename
        drawn = _draw_figure(path, f"{experiment}: {title}", groups, colors, x_name, x_label,
                             panels, budget if x_name == "upload" else None)
        if drawn:
            written.append(path)
        else:
            print(f"skipped {path}: no group has data for it")

    path = plots_dir / f"{stem}_algorithm_columns.png"
    fig = algorithm_columns_figure(f"{experiment}: algorithm-declared columns vs round", groups, colors)
    if fig is not None:
        fig.savefig(path)
        written.append(path)

    table_path = plots_dir / f"{stem}_budget_table.md"
    table_path.write_text(budget_table([r for g in groups for r in g.runs]) + "\n")
    written.append(table_path)
    masks = mask_table([r for g in groups for r in g.runs])
    if masks is not None:
        table_path = plots_dir / f"{stem}_mask_table.md"
        table_path.write_text(masks + "\n")
        written.append(table_path)
    return written


# --------------------------------------------------------------------------- lines over rounds

def _x_values(run, x_name: str) -> np.ndarray:
    if x_name == "round":
        return run.round_numbers().astype(float)
    if x_name == "upload":
        return run.upload_mib_per_client()
    if x_name == "time":
        return run.column("cum_sim_seconds")
    raise ValueError(f"unknown x axis {x_name!r}")


def _aligned(runs, x_name: str, metric: str):
    """x and metric per run laid out on the union of round numbers: (x[n_runs, R], y[n_runs, R]).

    Seeds are matched by round number, so a run cut short just stops contributing.
    """
    all_rounds = np.unique(np.concatenate([r.round_numbers() for r in runs]))
    xs = np.full((len(runs), all_rounds.size), np.nan)
    ys = np.full_like(xs, np.nan)
    for i, run in enumerate(runs):
        where = np.searchsorted(all_rounds, run.round_numbers())
        xs[i, where] = _x_values(run, x_name)
        ys[i, where] = run.column(metric)
    return xs, ys


def _draw_figure(path: Path, title: str, groups, colors, x_name, x_label, panels, budget) -> bool:
    """One figure, a panel per metric; False (nothing written) if no group has any data.
    With many groups the legend goes below the panels and the bands are left out."""
    crowded = len(groups) > MAX_GROUPS_WITH_BANDS
    fig = Figure(figsize=(6.2 * len(panels), 4.6 + (0.22 * len(groups) if crowded else 0)), dpi=110,
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    anything = False
    for ax, (metric, y_label) in zip(axes, panels):
        for index, group in enumerate(groups):
            runs = [r for r in group.runs if r.rounds_done]
            if runs:
                anything |= _plot_group(ax, runs, group, colors[group.label], x_name, metric,
                                        bands=not crowded, linestyle=_linestyle(index))
        if budget is not None and math.isfinite(budget) and budget > 0:
            ax.axvline(budget, color="0.4", linestyle="--", linewidth=0.9,
                       label=f"B = {budget:.3g} MiB (sparse run's total)")
            ax.axvline(2 * budget, color="0.4", linestyle=":", linewidth=0.9, label="2B")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if x_name == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and not crowded:
            ax.legend(fontsize="small")
    if not anything:
        return False
    if crowded:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    note = BAND_NOTE if not crowded else "line = mean over seeds; bands left out with this many groups"
    fig.suptitle(f"{title}\n({note})")
    fig.savefig(path)
    return True


def _plot_group(ax, runs, group: RunGroup, color, x_name: str, metric: str, *, bands: bool = True,
                linestyle: str = "-") -> bool:
    xs, ys = _aligned(runs, x_name, metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rounds (no evaluation)
        x = np.nanmean(xs, axis=0)
        mean = np.nanmean(ys, axis=0)
        low, high = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    keep = np.isfinite(x) & np.isfinite(mean)
    if not keep.any():
        return False
    seeds = len(runs)
    name = group.label if len(group.label) <= MAX_LABEL else group.label[:MAX_LABEL - 1] + "…"
    label = f"{name} ({seeds} seed{'s' if seeds > 1 else ''})"
    # markers only when sparse enough to tell points apart (short runs, eval every k rounds)
    marker = "o" if keep.sum() <= 40 else None
    ax.plot(x[keep], mean[keep], color=color, label=label, marker=marker, markersize=3,
            linewidth=1.5, linestyle=linestyle)
    if seeds > 1 and bands:
        ax.fill_between(x[keep], low[keep], high[keep], color=color, alpha=0.2, linewidth=0)
    return True


# --------------------------------------------------------------------------- algorithm-declared columns

def algorithm_columns_figure(title: str, groups, colors) -> Figure | None:
    """The per-round columns the groups' algorithms declared, vs round: a panel per family, its y
    axis labelled with the column and its values written out in full (no offset: the columns are
    often near-constant, and an axis reading "1e-5 + 1.999e-1" hides the value).

    A plain column gets a line per group (mean over seeds, min–max band). A per-layer family
    ``x[layer]`` gets a line per layer and group, drawn from the group's first seed only (a band
    per layer would bury the lines); layers differ in colour, groups in line style. Per-layer
    panels are left out when more than ``MAX_GROUPS_PER_LAYER_PANEL`` groups share the figure.
    None when no run declared a column.
    """
    families: dict[str, list[str]] = {}
    counts: set[str] = set()   # integer columns: their panels get integer y ticks
    for group in groups:
        for run in group.runs:
            fields = run.extra_fields("rounds")
            counts |= {name for name, dtype in fields.items() if np.dtype(dtype).kind in "iub"}
            for family, members in column_families(fields).items():
                known = families.setdefault(family, [])
                known += [m for m in members if m not in known]
    # a plain column named like a per-layer family (``mask_changed`` beside ``mask_changed[fc1]``)
    # is the family's total: its own panel, with bands over seeds
    for family, members in list(families.items()):
        if family in members and len(members) > 1:
            members.remove(family)
            families[f"{family} (total)"] = [family]
    if len(groups) > MAX_GROUPS_PER_LAYER_PANEL:   # a line per layer and group would be unreadable
        families = {f: m for f, m in families.items() if not any("[" in n for n in m)}
    if not families:
        return None
    columns = min(3, len(families))
    rows = math.ceil(len(families) / columns)
    fig = Figure(figsize=(6.2 * columns, 4.6 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(families):]:
        ax.set_visible(False)
    styles = ["-", "--", ":", "-."]
    for ax, (family, members) in zip(axes, families.items()):
        per_layer = any("[" in name for name in members)
        for g, group in enumerate(groups):
            runs = [r for r in group.runs if r.rounds_done]
            if not runs:
                continue
            if not per_layer:
                _plot_group(ax, runs, group, colors[group.label], "round", members[0])
                continue
            first = runs[0]
            for i, name in enumerate(members):
                y = first.column(name)
                keep = np.isfinite(y)
                if keep.any():
                    ax.plot(first.round_numbers()[keep], y[keep], color=color(i),
                            linestyle=styles[g % len(styles)], marker="o", markersize=2,
                            linewidth=1.2, label=f"{group.label} seed {first.seed}: {family_member(name)}")
        ax.set_title(f"{family}[layer]" if per_layer else family)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{family}[layer]" if per_layer else members[0])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(_plain_formatter())
        if all(name in counts for name in members):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{title}\n(per-layer panels: first seed of each group; others: {BAND_NOTE})")
    return fig


def _plain_formatter() -> ScalarFormatter:
    """Tick labels that are the values themselves: no offset, no ×10^k multiplier."""
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    return formatter


# --------------------------------------------------------------------------- styles and names

def _linestyle(index: int) -> str:
    """Solid for the first palette's worth of groups, then dashed, so colours never repeat alone."""
    return ["-", "--", ":", "-."][(index // 10) % 4]


def color(index: int):
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
               "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return palette[index % len(palette)]


def file_stem(experiment: str) -> str:
    """The experiment name made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._") or "results"
