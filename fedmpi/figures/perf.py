"""Figures of ``make bench-perf`` (bench/perf/run.py), drawn by ``make plots`` (:func:`draw_perf`, once
per call of :func:`fedmpi.figures.draw_all`, not per experiment).

Reads ``RESULTS/perf/<workload>.json`` (full runs; a workload with only a ``--quick`` file is
drawn from that, marked "quick") and ``startup.json``, and writes into PLOTS:

- ``perf_ratios.png``: per workload, fedmpi's round-loop time over the ideal floor (the bare loop
  split over as many processes as fedmpi has training ranks) as bars, and over the one-process bare
  loop as dots, per algorithm and fedmpi configuration; whiskers span the repeats (min to max of
  fedmpi over the floor's median); dashed lines at 1 and at 0.5.
- ``perf_startup.png``: the start-up before round 1, stage by stage, per rank count.
- ``perf_summary.md``: the same numbers as tables.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

COLORS = {"fedavg": "#1f77b4", "feddst": "#d62728"}
# memory columns of startup.json (bench/perf/startup.py), not stages
STARTUP_MEMORY = ("node_pss_mib", "max_rss_mib")


def _load(perf_dir: Path) -> tuple[list[dict], dict | None]:
    chosen: dict[str, dict] = {}
    for path in sorted(perf_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipped {path}: {exc}")
            continue
        key = data.get("workload") if data.get("kind") == "bench-perf" else (
            "startup" if data.get("kind") == "bench-perf-startup" else None)
        if key is None:
            continue
        if key not in chosen or (chosen[key].get("quick") and not data.get("quick")):
            chosen[key] = data
    startup = chosen.pop("startup", None)
    order = ["compute", "overhead", "overhead1000"]
    workloads = sorted(chosen.values(), key=lambda d: (order.index(d["workload"]) if d["workload"] in order
                                                       else len(order), d["workload"]))
    return workloads, startup


def draw_perf(results_dir, plots_dir) -> list[Path]:
    """Draw the bench-perf figures if ``results_dir/perf`` holds any; return the paths written."""
    perf_dir = Path(results_dir) / "perf"
    if not perf_dir.is_dir():
        return []
    workloads, startup = _load(perf_dir)
    if not workloads and startup is None:
        return []
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if workloads:
        path = plots_dir / "perf_ratios.png"
        _draw_ratios(path, workloads)
        written.append(path)
    if startup is not None:
        path = plots_dir / "perf_startup.png"
        _draw_startup(path, startup)
        written.append(path)
    path = plots_dir / "perf_summary.md"
    path.write_text(summary_markdown(workloads, startup))
    written.append(path)
    for p in written:
        print(f"wrote {p}")
    return written


def _fedmpi_labels(data: dict) -> list[str]:
    return [label for label, spec in data["systems"].items() if spec["kind"] == "fedmpi"]


def _draw_ratios(path: Path, workloads: list[dict]) -> None:
    fig = Figure(figsize=(6.4 * len(workloads), 4.8), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(workloads), squeeze=False)[0]
    for ax, data in zip(axes, workloads):
        labels = _fedmpi_labels(data)
        algorithms = list(data["ratios"])
        width = 0.8 / max(len(algorithms), 1)
        x = np.arange(len(labels))
        for i, algorithm in enumerate(algorithms):
            ratios, summary = data["ratios"][algorithm], data["summary"][algorithm]
            nan = float("nan")
            floor = np.array([summary[ratios[label]["floor"]]["median"] if "floor" in ratios[label] else nan
                              for label in labels])
            heights = np.array([ratios[label].get("vs_floor", nan) for label in labels])
            low = np.array([summary[label]["min"] for label in labels]) / floor
            high = np.array([summary[label]["max"] for label in labels]) / floor
            offset = x + (i - (len(algorithms) - 1) / 2) * width
            ax.bar(offset, heights, width, color=COLORS.get(algorithm, f"C{i}"), alpha=0.8,
                   label=f"{algorithm}: / floor", yerr=[heights - low, high - heights], capsize=3)
            ax.plot(offset, [ratios[label].get("vs_loop", nan) for label in labels], "o", color="black",
                    markersize=4, label="/ 1-process bare loop" if i == 0 else None)
        ax.axhline(1.0, color="0.3", linestyle="--", linewidth=0.9)
        ax.axhline(0.5, color="0.5", linestyle=":", linewidth=0.9)
        ax.set_xticks(x, [label.replace("fedmpi-", "P=").replace("-cb", "\ncb=") for label in labels])
        ax.set_ylabel("fedmpi round-loop time / bare loop")
        quick = "\n(QUICK: 1 repeat, a smoke run)" if data.get("quick") else ""
        ax.set_title(f"{textwrap.fill(data['title'], 60)}{quick}\n{data['repeats']} repeats x "
                     f"{data['timed_rounds']} rounds, {data.get('cores', '?')} cores", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle("bench-perf: fedmpi / the bare PyTorch loop doing the same work\n"
                 "bars: / the loop split over fedmpi's training ranks\n(whiskers: min-max over repeats)",
                 fontsize="medium")
    fig.savefig(path)


def _draw_startup(path: Path, startup: dict) -> None:
    ranks = list(startup["median"])
    stages = [k for k in next(iter(startup["median"].values())) if k not in ("total", "wall", *STARTUP_MEMORY)]
    fig = Figure(figsize=(6.4, 4.6), dpi=110, layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(ranks))
    for i, stage in enumerate(stages):
        values = np.array([startup["median"][p][stage] for p in ranks])
        ax.bar([f"P={p}" for p in ranks], values, bottom=bottom, label=stage, color=f"C{i}")
        bottom += values
    ax.set_ylabel("seconds before round 1 (slowest rank, median)")
    quick = " (QUICK)" if startup.get("quick") else ""
    ax.set_title(f"fedmpi start-up by stage{quick}, {startup['workload']} workload", fontsize="small")
    ax.legend(fontsize="x-small")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path)


def summary_markdown(workloads: list[dict], startup: dict | None) -> str:
    lines = ["# bench-perf", ""]
    for data in workloads:
        quick = " — QUICK (1 repeat, few rounds): not a measurement" if data.get("quick") else ""
        lines += [f"## {data['title']}{quick}", "",
                  f"{data['repeats']} repeats x {data['timed_rounds']} timed rounds, {data.get('cores', '?')} cores, "
                  f"started {data.get('started', '?')}. Round-loop seconds, median [min–max].", "",
                  "| algorithm | system | median s | min–max s | / floor | / loop | / loop-mt | test acc |",
                  "|---|---|---|---|---|---|---|---|"]
        for algorithm, per in data["summary"].items():
            for label, s in per.items():
                r = data["ratios"][algorithm].get(label, {})
                cell = (lambda k: f"{r[k]:.2f}×" if k in r else "")
                lines.append(f"| {algorithm} | {label} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} | "
                             f"{cell('vs_floor')} | {cell('vs_loop')} | {cell('vs_loop_mt')} | "
                             f"{s['test_accuracy']:.4f} |")
        lines.append("")
    if startup is not None:
        stages = [k for k in next(iter(startup["median"].values())) if k not in ("wall", *STARTUP_MEMORY)]
        memory = [k for k in STARTUP_MEMORY if k in next(iter(startup["median"].values()))]
        lines += ["## start-up before round 1 (slowest rank, median seconds; memory in MiB: the ranks' "
                  "summed proportional set sizes, the largest resident set)", "",
                  "| P | " + " | ".join(stages + memory) + " |", "|---" * (len(stages) + len(memory) + 1) + "|"]
        for p, med in startup["median"].items():
            lines.append(f"| {p} | " + " | ".join([f"{med[k]:.2f}" for k in stages] + [f"{med[k]:.0f}" for k in memory])
                         + " |")
        lines.append("")
    return "\n".join(lines)
