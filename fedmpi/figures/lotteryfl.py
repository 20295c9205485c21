"""LotteryFL's table (``make plots`` writes it for every experiment that holds a ``lotteryfl`` run):
``<stem>_lotteryfl_upload_to_target.md``, per method its personalised accuracy and the upload it
needs to reach a target personalised accuracy (the paper's claim: higher personalised accuracy at a
lower communication cost).

Personalised accuracy: the mean over clients of the accuracy, on the client's local test set, of
the model that client uses: LotteryFL's ``personal_accuracy`` (the global model under the client's
own mask); for a method without personal models its one global model (``client_accuracy``).
Target: the reference's final personalised accuracy (mean over its seeds) minus 1 point; the
reference is FedAvg, or conventional FL as the PruneFL campaigns run it
(``figures.prunefl.is_reference``). Upload: cumulative upload per client (MiB; cum_upload_bytes /
clients.total) after the first evaluated round at or above the target, mean over the seeds that
reach it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedmpi.figures.prunefl import method_name, per_seed_density_groups, reference_target
from fedmpi.results.tables import format_mean_std, format_number, markdown_table, mean_std

TARGET_GAP = 0.01


def personalised(run) -> np.ndarray:
    """Per round, the run's personalised accuracy (NaN on rounds without evaluation)."""
    return run.column("personal_accuracy" if run.algorithm == "lotteryfl" else "client_accuracy")


def first_upload_at(run, target: float) -> tuple[float, float]:
    """(cumulative upload per client in MiB, round) at the first evaluated round whose personalised
    accuracy is ≥ target; NaNs if never."""
    reached = np.flatnonzero(np.isfinite(personalised(run)) & (personalised(run) >= target))
    if reached.size == 0:
        return math.nan, math.nan
    i = int(reached[0])
    return float(run.upload_mib_per_client()[i]), float(run.round_numbers()[i])


def _final(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def upload_to_target_table(groups) -> str:
    found = reference_target(groups, lambda r: _final(personalised(r)), lambda r, t: first_upload_at(r, t)[0])
    if found is None:
        return ("No FedAvg (or conventional-FL) reference in this experiment: no target personalised "
                "accuracy.")
    reference, finals, target, ref_upload = found
    rows = []
    for group in groups:
        runs = [r for r in group.runs if r.rounds_done]
        if not runs:
            continue
        hits = [first_upload_at(r, target) for r in runs]
        uploads = [u for u, _ in hits if math.isfinite(u)]
        rounds = [k for _, k in hits if math.isfinite(k)]
        mean_upload = float(np.mean(uploads)) if uploads else math.nan
        ratio = mean_upload / ref_upload if uploads and math.isfinite(ref_upload) and ref_upload > 0 else math.nan
        best = format_mean_std([_final(r.column("personal_accuracy_best")) for r in runs]) \
            if group.algorithm == "lotteryfl" else "—"
        rows.append([method_name(group), len(runs),
                     format_mean_std([_final(personalised(r)) for r in runs]), best,
                     format_number(mean_std([_final(r.upload_mib_per_client()) for r in runs])[0], 2),
                     f"{len(uploads)}/{len(runs)}",
                     f"{mean_upload:,.2f}" if uploads else "not reached",
                     f"{np.mean(rounds):.0f}" if rounds else "—",
                     f"{ratio:.2f}" if math.isfinite(ratio) else "—"])
    header = (f"Target personalised accuracy {target:.4f} = {method_name(reference)}'s final personalised "
              f"accuracy ({np.nanmean(finals):.4f}, mean over {len(finals)} seeds) − {TARGET_GAP * 100:.0f} point. "
              "Personalised accuracy: mean over clients of the accuracy on the client's local test set of the "
              "model it uses (LotteryFL: personal_accuracy, the global model under the client's mask; other "
              "methods: client_accuracy, their one global model). Upload: cumulative upload per client (MiB) "
              "after the first evaluated round at or above the target, mean over the seeds that reach it. "
              "Best-so-far: LotteryFL's personal_accuracy_best, the public code's reported number.\n\n")
    return header + markdown_table(
        ["method", "seeds", "final personalised accuracy", "final best-so-far", "final upload (MiB/client, mean)",
         "seeds reaching target", "upload to target (MiB/client)", "rounds to target", "× reference's upload"],
        rows)


def draw(experiment: str, groups, colors: dict, plots_dir: Path, stem: str) -> list[Path]:
    """The table for one experiment; [] unless it holds a LotteryFL run."""
    if not any(g.algorithm == "lotteryfl" for g in groups):
        return []
    table = plots_dir / f"{stem}_lotteryfl_upload_to_target.md"
    table.write_text(f"# {experiment}: personalised accuracy and upload to target\n\n"
                     f"{upload_to_target_table(per_seed_density_groups(groups))}\n")
    return [table]
