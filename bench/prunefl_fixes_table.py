"""Which fairness change moves PruneFL's lead, seed 0: each change taken back alone
(bench/prunefl_fmnist_fixes_campaign.yaml) against all changes in (seed 0 of
bench/prunefl_fmnist_campaign.yaml). Each PruneFL run is measured against the conventional-FL run
trained and timed the same way: target = that run's final accuracy − 1 point, times modelled
(cum_sim_seconds). Prints a markdown table (docs/results.md quotes it).

    .venv/bin/python bench/prunefl_fixes_table.py [results/prunefl-fmnist results/prunefl-fmnist-fixes]
"""
from __future__ import annotations

import sys

from fedmpi.figures.prunefl import TARGET_GAP, first_time_at, model_size
from fedmpi.results.reader import config_get, read_runs
from fedmpi.results.tables import markdown_table

# change taken back → (settings that mark its PruneFL run, settings that mark its conventional FL run)
CHANGES = {
    "none (all changes in)": ({}, {}),
    "loss: cross-entropy at lr 0.1": ({"local.loss": "cross_entropy"}, {"local.loss": "cross_entropy"}),
    "initial pruning: all k0's data, up to 300 iterations": ({"prunefl.ip_data_batches": 0}, None),
    "time model: FLOP-based, c0 in Γ only": ({"device.profile": "raspberry-pi-4"}, {"device.profile": "raspberry-pi-4"}),
    "importance upload: every weight's": ({"prunefl.importance_upload": "dense"}, None),
}
BASE = {"local.loss": "bce_onehot", "prunefl.ip_data_batches": 10, "device.profile": "profiles/prunefl-raspberry-pi.yaml",
        "prunefl.importance_upload": "pruned", "prunefl.ip_time": "charged"}


def matches(run, settings: dict, prunefl: bool) -> bool:
    if run.algorithm != "prunefl" or run.seed != 0:
        return False
    if bool(config_get(run.config, "prunefl.initial_pruning", True)) != prunefl or \
            bool(config_get(run.config, "prunefl.adaptive", True)) != prunefl:
        return False
    return all(config_get(run.config, key) == value for key, value in {**BASE, **settings}.items())


def main(directories: list[str]) -> None:
    runs = [r for d in directories for r in read_runs(d)]
    rows = []
    for change, (pruned, conventional) in CHANGES.items():
        prune = [r for r in runs if matches(r, pruned, True)]
        conv = [r for r in runs if matches(r, conventional if conventional is not None else {}, False)]
        if len(prune) != 1 or len(conv) != 1:
            rows.append([change, f"{len(prune)} PruneFL / {len(conv)} conventional runs found", "", "", "", ""])
            continue
        prune, conv = prune[0], conv[0]
        target = conv.final("test_accuracy") - TARGET_GAP
        t_prune, r_prune, _ = first_time_at(prune, target)
        t_conv, _, _ = first_time_at(conv, target)
        rows.append([change, f"{prune.final('test_accuracy'):.4f} / {conv.final('test_accuracy'):.4f}",
                     f"{model_size(prune)[-1]:,.0f}", f"{t_prune:,.0f} s (round {r_prune:.0f})", f"{t_conv:,.0f} s",
                     f"{t_prune / t_conv:.2f}"])
    print(markdown_table(["change taken back", "final accuracy PruneFL / conventional FL", "PruneFL final size",
                          "PruneFL time to target", "conventional FL time to target", "× conventional FL"], rows))


if __name__ == "__main__":
    main(sys.argv[1:] or ["results/prunefl-fmnist", "results/prunefl-fmnist-fixes"])
