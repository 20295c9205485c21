"""Figures and table of the heterogeneous-client methods (``make plots`` draws them for every
experiment with a method whose class lists ``"heterogeneous"`` in ``figures`` — HypeMeFed,
depth-wise averaging, DepthFL, FedAvg-S, FedAvg on the full-depth clients only, HeteroFL, ScaleFL — and a
run that has ``exit_accuracy[*]`` or ``tier_accuracy[*]`` columns):

- ``<stem>_exit_accuracy.png``: each exit's accuracy on the global test set at the final evaluated
  round, a bar group per method, a bar per exit;
- ``<stem>_tier_accuracy.png``: each tier's client accuracy (the mean over the tier's clients of
  their tier's submodel -- depth exit, width slice or both -- on their local test splits), the
  same way;
- ``<stem>_heterogeneous_table.md``: a table like the paper's main table, a row per method:
  ``client_accuracy`` (the paper's metric; also its mean over the last quarter of the rounds and
  the change from the quarter before, to tell a flat curve from a rising one), ``test_accuracy``,
  each exit, each tier, the upload per client and the modelled time.

Bars and table cells are the mean over seeds ± the sample standard deviation (none for one seed)
of each run's final evaluated value. A method without a column (FedAvg at full depth declares no
exits or tiers) has no bar there and "—" in the table. Methods are named by their class's
``label`` (a method that is not installed here: by its algorithm name). A method that is not tiered
(its class declares ``tiered = False``) trains the whole model at every client: on a model with
depth variants (its builder takes ``level``, as ``multiexit_vgg`` does) that is the model the
tiered methods shrink for their smaller clients, so the run ignores the tiers' limits and is named
"(upper bound: every client at full depth)"; on another model "(full depth)". Accuracy vs round and
vs modelled time are the common figures of :mod:`fedmpi.figures.common`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fedmpi.figures.common import algorithm_class, algorithm_label
from fedmpi.results.reader import MIB, family_member
from fedmpi.results.tables import format_mean_std, markdown_table, mean_std

FAMILIES = {"exit_accuracy": "exit", "tier_accuracy": "tier"}
# what a reader of these figures needs besides a family method's label
CONTEXT = {"fedavg_s": "smallest depth"}
BAR_NOTE = "final evaluated round; bar = mean, whisker = sample std over seeds"


def has_depth_variants(model: str) -> bool:
    """Whether ``model``'s builder takes a ``level`` (depth) variant option; False for a model
    that is not installed here."""
    from fedmpi.errors import ConfigError
    from fedmpi.models import variant_options   # imports torch: only when figures are drawn

    try:
        return "level" in variant_options(model)
    except ConfigError:
        return False


def is_upper_bound(group) -> bool:
    """The group's method is not tiered (every client trains the whole model) and its model has
    depth variants: every client at full depth, which no tier-limited method can beat."""
    cls = algorithm_class(group.algorithm)
    return (cls is not None and not cls.tiered
            and any(has_depth_variants(str(run.config.get("model", ""))) for run in group.runs))


def method_name(group) -> str:
    """The paper's name of the group's method, other differing settings after it."""
    cls = algorithm_class(group.algorithm)
    name = algorithm_label(group.algorithm)
    if is_upper_bound(group):
        name += " (upper bound: every client at full depth)"
    elif cls is not None and not cls.tiered:
        name += " (full depth)"      # a method that trains the whole model, on a model without depths
    elif group.algorithm in CONTEXT:
        name += f" ({CONTEXT[group.algorithm]})"
    extra = group.label.split(" ")[1:]
    return f"{name} ({' '.join(extra)})" if extra else name


def members(groups, family: str) -> list[str]:
    """The columns of ``family`` any run of ``groups`` has, in numeric order of their index."""
    names = {n for g in groups for r in g.runs for n in r.rounds if n.startswith(family + "[")}

    def index(name):
        member = family_member(name)
        return (0, int(member), "") if member.isdigit() else (1, 0, member)

    return sorted(names, key=index)


def final_values(group, name: str) -> list[float]:
    """Each run's final evaluated value of ``name`` (NaN for a run without the column)."""
    return [run.final(name) if name in run.rounds else math.nan for run in group.runs if run.rounds_done]


def quarter_means(run, name: str = "client_accuracy") -> tuple[float, float]:
    """The means of ``name``'s evaluated values over rounds (R/2, 3R/4] and (3R/4, R], R the rounds
    run (NaN for a quarter without one): whether the curve has flattened."""
    rounds, values, total = run.round_numbers(), run.column(name), run.rounds_done

    def mean(low, high):
        chosen = (rounds > low) & (rounds <= high) & np.isfinite(values)
        return float(values[chosen].mean()) if chosen.any() else math.nan

    return mean(total / 2, 3 * total / 4), mean(3 * total / 4, total)


def upload_mib_per_client(run) -> float:
    return run.final("cum_upload_bytes") / run.clients_total / MIB


def _bars(path: Path, title: str, y_label: str, groups, columns: list[str], what: str) -> bool:
    """A bar group per method with data, a bar per column; False (nothing written) without data."""
    stats = {g.label: [mean_std(final_values(g, c)) for c in columns] for g in groups}
    shown = [g for g in groups if any(n > 0 for _, _, n in stats[g.label])]
    if not shown:
        return False
    fig = Figure(figsize=(max(7.0, 1.0 + len(shown) * (0.6 + 0.4 * len(columns))), 4.8), dpi=110,
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(columns)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for j, column in enumerate(columns):
        x, mean, std = [], [], []
        for i, group in enumerate(shown):
            m, s, n = stats[group.label][j]
            if n:
                x.append(i - 0.4 + width * (j + 0.5))
                mean.append(m)
                std.append(s if n > 1 else math.nan)   # one seed: no whisker
        if x:
            ax.bar(x, mean, width * 0.92, color=palette[j % len(palette)], label=f"{what} {family_member(column)}")
            spread = [k for k, s in enumerate(std) if math.isfinite(s)]
            if spread:
                ax.errorbar([x[k] for k in spread], [mean[k] for k in spread], yerr=[std[k] for k in spread],
                            fmt="none", ecolor="black", capsize=3, linewidth=1)
    seeds = [len([r for r in g.runs if r.rounds_done]) for g in shown]
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([f"{method_name(g)}\n({n} seed{'s' if n > 1 else ''})" for g, n in zip(shown, seeds)],
                       fontsize="small")
    ax.set_ylabel(y_label)
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(f"{title}\n({BAR_NOTE})")
    fig.savefig(path)
    return True


def heterogeneous_table(groups) -> str:
    """Markdown: a row per method, mean ± std over seeds of the final evaluated values."""
    exits, tiers = members(groups, "exit_accuracy"), members(groups, "tier_accuracy")
    headers = (["method", "seeds", "client_accuracy (deepest exit, local test)", "last quarter",
                "change from the quarter before", "test_accuracy"]
               + [f"exit {family_member(c)}" for c in exits] + [f"tier {family_member(c)}" for c in tiers]
               + ["upload per client (MiB)", "modelled time (s)"])
    rows = []
    for group in groups:
        runs = [r for r in group.runs if r.rounds_done]
        if not runs:
            continue
        quarters = [quarter_means(r) for r in runs]
        rows.append([method_name(group), len(runs),
                     format_mean_std(final_values(group, "client_accuracy")),
                     format_mean_std([last for _, last in quarters]),
                     format_mean_std([last - before for before, last in quarters]),
                     format_mean_std(final_values(group, "test_accuracy")),
                     *[format_mean_std(final_values(group, c)) for c in exits + tiers],
                     format_mean_std([upload_mib_per_client(r) for r in runs], 3),
                     format_mean_std([r.final("cum_sim_seconds") for r in runs], 1)])
    rounds = sorted({r.rounds_done for g in groups for r in g.runs if r.rounds_done})
    span = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]}"
    note = (f"Final evaluated round of each run ({span} rounds); mean ± sample std over seeds. "
            "client_accuracy: the paper's metric, the mean over clients of each client's tier submodel "
            "(its depth exit and width slice) on its local test split; last quarter: its mean over the "
            "evaluations of the last quarter of the rounds, and its change from the quarter before (near "
            "0 where the curve has flattened); test_accuracy: the full model's "
            "deepest exit on the global test set; exit e: exit e on the global test set, at the narrowest "
            "width holding it; tier t: client_accuracy over tier t's clients; "
            "upload per client: cumulative upload / clients.total; modelled time: cum_sim_seconds "
            "(each tier on its device profile, a round as long as its slowest client). "
            "upper bound: every client trains the full-depth model, which the tiers' smaller clients "
            "cannot hold. — : the method has no such column.")
    return note + "\n\n" + markdown_table(headers, rows)


def draw(experiment: str, groups, colors: dict, plots_dir: Path, stem: str) -> list[Path]:
    """The heterogeneous methods' bars and table for one experiment; [] unless a run in it has
    ``exit_accuracy[*]`` or ``tier_accuracy[*]`` columns."""
    if not any(members(groups, family) for family in FAMILIES):
        return []
    written = []
    figures = [
        ("exit_accuracy", f"{stem}_exit_accuracy.png", "accuracy of each exit on the global test set",
         "test accuracy (global test set)"),
        ("tier_accuracy", f"{stem}_tier_accuracy.png", "client accuracy per tier",
         "client accuracy of the tier (deepest exit, local test sets)"),
    ]
    for family, filename, title, y_label in figures:
        columns = members(groups, family)
        path = plots_dir / filename
        if columns and _bars(path, f"{experiment}: {title}", y_label, groups, columns, FAMILIES[family]):
            written.append(path)
    table = plots_dir / f"{stem}_heterogeneous_table.md"
    table.write_text(f"# {experiment}: heterogeneous clients, final accuracy\n\n{heterogeneous_table(groups)}\n")
    written.append(table)
    return written
