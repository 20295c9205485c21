"""``make plots`` for the heterogeneous-client methods (fedmpi/figures/heterogeneous.py): per-exit and
per-tier bars and the main table, from results files written by the real ResultsWriter with the
``exit_accuracy[*]`` / ``tier_accuracy[*]`` columns; table values against a hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fake_results import MIB, make_config, make_rounds, write_run_with_writer
from fedmpi.figures import draw_all
from fedmpi.figures.heterogeneous import members
from fedmpi.results import group_runs, read_runs

NAN = math.nan
PNG = b"\x89PNG\r\n\x1a\n"


def write_tiered(path, algorithm, seed, client_accuracy, exits, tiers, upload_per_round, sim_per_round,
                 experiment="hetero"):
    """Three rounds, round 2 not evaluated; ``exits``/``tiers``: the final round's values (round 1
    gets other values, which must not show)."""
    rounds = make_rounds(client_accuracy, upload_per_round, sim_seconds_per_round=sim_per_round)
    extra = {}
    for family, finals in (("exit_accuracy", exits), ("tier_accuracy", tiers)):
        for i, value in enumerate(finals, start=1):
            extra[f"{family}[{i}]"] = ("float64", [0.01 * i, NAN, value])
    extra["server_seconds"] = ("float64", [1.0, 1.5, 2.0])
    config = make_config(algorithm=algorithm, seed=seed, experiment=experiment, rounds=3, clients_total=10,
                         per_round=5)
    return write_run_with_writer(path, config, rounds, extra_rounds=extra,
                                 extra_clients={"tier": ("int64", [1 + c % 3 for c in range(15)])})


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    results = tmp_path_factory.mktemp("hetero_results")
    plots = results.parent / "hetero_plots"
    write_tiered(results / "hyp0.h5", "hypemefed", 0, [0.10, NAN, 0.52], [0.40, 0.50, 0.60], [0.30, 0.55, 0.75],
                 2 * MIB, 2.0)
    write_tiered(results / "hyp1.h5", "hypemefed", 1, [0.20, NAN, 0.58], [0.50, 0.70, 0.80], [0.40, 0.65, 0.85],
                 4 * MIB, 3.0)
    write_tiered(results / "depth0.h5", "depthwise_avg", 0, [0.10, NAN, 0.45], [0.30, 0.40, 0.50], [0.35, 0.45, 0.55],
                 MIB, 1.0)
    for seed in (0, 1):   # full-depth FedAvg: no exit or tier columns
        write_run_with_writer(results / f"fedavg{seed}.h5",
                              make_config(algorithm="fedavg", seed=seed, experiment="hetero", rounds=3,
                                          clients_total=10, per_round=5),
                              make_rounds([0.3, NAN, 0.60 + 0.02 * seed], 3 * MIB))
    write_run_with_writer(results / "plain.h5", make_config(algorithm="fedavgm", experiment="plain", rounds=3),
                          make_rounds([0.3, 0.4, 0.5], MIB))
    written = draw_all(results, plots)
    return plots, written


def table_rows(path) -> dict[str, list[str]]:
    lines = [l for l in path.read_text().splitlines() if l.startswith("| ")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    header, body = cells[0], cells[1:]
    return {row[0]: dict(zip(header, row)) for row in body}


def test_bars_are_drawn_only_for_experiments_with_exit_or_tier_columns(drawn):
    plots, written = drawn
    for name in ("hetero_exit_accuracy.png", "hetero_tier_accuracy.png", "hetero_heterogeneous_table.md"):
        assert plots / name in written, name
    for name in ("hetero_exit_accuracy.png", "hetero_tier_accuracy.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    assert not list(plots.glob("plain_*exit*")) and not list(plots.glob("plain_*tier*"))
    assert not (plots / "plain_heterogeneous_table.md").exists()
    # the generic figures are still there for both experiments
    assert (plots / "hetero_accuracy_vs_time.png").exists() and (plots / "plain_accuracy_vs_round.png").exists()


def test_table_values_by_hand(drawn):
    plots, _ = drawn
    text = (plots / "hetero_heterogeneous_table.md").read_text()
    assert text.startswith("# hetero: heterogeneous clients, final accuracy")
    assert "(3 rounds)" in text
    rows = table_rows(plots / "hetero_heterogeneous_table.md")
    assert set(rows) == {"HypeMeFed", "depth-wise averaging", "FedAvg (full depth)"}
    hyp = rows["HypeMeFed"]
    sd = lambda a, b: abs(a - b) / math.sqrt(2)   # noqa: E731  sample std of two values
    assert hyp["seeds"] == "2"
    # client_accuracy 0.52, 0.58 at round 3 (round 2 is NaN: the final evaluated round is 3)
    assert hyp["client_accuracy (deepest exit, local test)"] == f"0.5500 ± {sd(0.52, 0.58):.4f}" == "0.5500 ± 0.0424"
    assert hyp["test_accuracy"] == "0.5000 ± 0.0424"          # make_rounds: client_accuracy − 0.05
    assert hyp["exit 1"] == "0.4500 ± 0.0707"
    assert hyp["exit 2"] == "0.6000 ± 0.1414"
    assert hyp["exit 3"] == "0.7000 ± 0.1414"
    assert hyp["tier 1"] == "0.3500 ± 0.0707"
    assert hyp["tier 2"] == "0.6000 ± 0.0707"
    assert hyp["tier 3"] == "0.8000 ± 0.0707"
    # upload per client: 3 rounds × 2 (4) MiB / 10 clients = 0.6 (1.2) MiB; time 3 × 2 (3) s
    assert hyp["upload per client (MiB)"] == f"0.900 ± {sd(0.6, 1.2):.3f}" == "0.900 ± 0.424"
    assert hyp["modelled time (s)"] == "7.5 ± 2.1"
    depth = rows["depth-wise averaging"]      # one seed: no std
    assert depth["seeds"] == "1" and depth["exit 3"] == "0.5000" and depth["tier 1"] == "0.3500"
    assert depth["client_accuracy (deepest exit, local test)"] == "0.4500"
    assert depth["upload per client (MiB)"] == "0.300" and depth["modelled time (s)"] == "3.0"
    fedavg = rows["FedAvg (full depth)"]
    assert fedavg["client_accuracy (deepest exit, local test)"] == "0.6100 ± 0.0141"
    assert all(fedavg[k] == "—" for k in ("exit 1", "exit 2", "exit 3", "tier 1", "tier 2", "tier 3"))


def test_members_in_numeric_order(tmp_path):
    extra = {f"tier_accuracy[{t}]": ("float64", [0.5]) for t in (10, 2, 1)}
    write_run_with_writer(tmp_path / "a.h5", make_config(algorithm="depthfl", rounds=1), make_rounds([0.5], MIB),
                          extra_rounds=extra)
    groups = group_runs(read_runs(tmp_path))
    assert members(groups, "tier_accuracy") == ["tier_accuracy[1]", "tier_accuracy[2]", "tier_accuracy[10]"]
    assert members(groups, "exit_accuracy") == []
    assert np.isfinite(groups[0].runs[0].final("tier_accuracy[10]"))


def test_last_quarter_and_its_change_by_hand(tmp_path):
    """8 rounds, evaluated at rounds 2, 4, 5, 6, 7, 8: the quarter before the last is rounds 5-6,
    the last 7-8 (round 4's value lies in the first half and must not count)."""
    from fedmpi.figures.heterogeneous import heterogeneous_table, quarter_means

    accuracy = [NAN, 0.30, NAN, 0.50, 0.60, 0.62, 0.70, 0.66]
    for seed, shift in ((0, 0.0), (1, 0.02)):
        extra = {"tier_accuracy[1]": ("float64", [0.5] * 8)}
        write_run_with_writer(tmp_path / f"h{seed}.h5",
                              make_config(algorithm="hypemefed", seed=seed, experiment="q", rounds=8),
                              make_rounds([a + shift for a in accuracy], MIB), extra_rounds=extra)
    groups = group_runs(read_runs(tmp_path))
    run = [r for r in groups[0].runs if r.seed == 0][0]
    assert quarter_means(run) == pytest.approx(((0.60 + 0.62) / 2, (0.70 + 0.66) / 2))
    lines = [l for l in heterogeneous_table(groups).splitlines() if l.startswith("| ")]
    cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
    row = dict(zip(cells[0], cells[1]))
    # seed 0: 0.68, before it 0.61; seed 1: each 0.02 higher
    assert row["last quarter"] == "0.6900 ± 0.0141"
    assert row["change from the quarter before"] == "0.0700 ± 0.0000"
