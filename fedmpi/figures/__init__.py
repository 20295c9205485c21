"""Figures and tables from results files (``make plots``, ``fedmpi plots``): :func:`draw_all`.

One set per experiment (config ``experiment``, else the dataset name):

- :mod:`fedmpi.figures.common`: what every experiment gets, every algorithm group on the same axes
  (accuracy vs round, vs cumulative upload, vs modelled time, density, the algorithm-declared
  columns, the budget and mask tables);
- a method-specific module per name the groups' algorithm classes list in ``figures``
  (``Algorithm.figures``, e.g. ``("prunefl",)``): :mod:`fedmpi.figures.prunefl`,
  :mod:`fedmpi.figures.heterogeneous`. A group whose algorithm is not registered (results of a
  plug-in that is not installed here) gets the common figures only.

A figure module is called once per experiment that holds one of its methods, through one entry
function::

    draw(experiment: str, groups: list[RunGroup], colors: dict[str, color], plots_dir: Path,
         stem: str) -> list[Path]

``groups``: every group of the experiment (the module picks what it shows), ``colors``: group
label → the colour the common figures give it, ``stem``: the experiment name made safe for a
file name, to start every file name with. It writes into ``plots_dir`` (which exists) and returns
the paths written. Besides, :mod:`fedmpi.figures.perf` draws ``make bench-perf``'s figures from
``results/perf/*.json``, once per call, with or without runs.

Figures are drawn with matplotlib's object API on the Agg canvas, so importing this package never
changes the caller's pyplot backend.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from fedmpi.errors import DataError
from fedmpi.figures.common import algorithm_figures, color, file_stem
from fedmpi.figures.common import draw as draw_common
from fedmpi.figures.perf import draw_perf
from fedmpi.results import RunGroup, group_runs, read_runs, summarize_table, unreadable_message


def draw_all(results_dir, plots_dir) -> list[Path]:
    """Draw every figure and table from ``results_dir/*.h5`` into ``plots_dir``; return the paths.
    ``DataError`` naming the files when there are some and none is readable; unreadable files
    beside readable ones are left out and named on stderr."""
    results_dir, plots_dir = Path(results_dir), Path(plots_dir)
    draw_perf(results_dir, plots_dir)   # make bench-perf's figures (results/perf/*.json), with or without runs
    if not results_dir.is_dir() or not any(results_dir.rglob("*.h5")):
        print(f"no results in {results_dir}/*.h5 yet: run `make bench` or "
              "`python -m fedmpi run CONFIG.yaml --out results/NAME.h5` first")
        return []
    skipped: list[Path] = []
    runs = read_runs(results_dir, skipped)
    if not runs:
        raise DataError(results_dir, f"no readable results file: {unreadable_message(skipped)}; "
                                     "remove them or point --results at results that `fedmpi run` wrote")
    plots_dir.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    groups_by_experiment: dict[str, list[RunGroup]] = {}
    for group in group_runs(runs):
        groups_by_experiment.setdefault(group.experiment, []).append(group)

    for experiment, groups in groups_by_experiment.items():
        stem = file_stem(experiment)
        colors = {g.label: color(i) for i, g in enumerate(groups)}
        written += draw_common(experiment, groups, colors, plots_dir, stem)
        for name in figure_modules(groups):
            module = _module(name)
            if module is not None:
                written += module.draw(experiment, groups, colors, plots_dir, stem)

    summary_path = plots_dir / "summary.md"
    summary_path.write_text("# fedmpi results summary\n\n" + summarize_table(runs) + "\n")
    written.append(summary_path)

    for path in written:
        print(f"wrote {path}")
    if skipped:  # after the "wrote" lines, where it is seen
        print(f"fedmpi: the figures leave out {len(skipped)} unreadable file(s): {unreadable_message(skipped)}",
              file=sys.stderr)
    return written


def figure_modules(groups) -> list[str]:
    """The method-specific figure modules of an experiment: the ``figures`` its groups' registered
    algorithm classes declare, each once, in order of first appearance."""
    names: list[str] = []
    for group in groups:
        names += [n for n in algorithm_figures(group.algorithm) if n not in names]
    return names


def _module(name: str):
    """``fedmpi.figures.<name>`` (a plug-in's own: a dotted module path, ``my_package.figures``),
    or None (and a line saying so) when there is no such module or it has no ``draw``
    (``common`` is drawn for every experiment anyway)."""
    full = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise
        module = None
    if name == "common":
        return None
    if not callable(getattr(module, "draw", None)):
        print(f"skipped figures {name!r}, declared by an algorithm: no module {full} with an entry function draw")
        return None
    return module


__all__ = ["draw_all", "figure_modules"]
