"""Results files: writing algorithm-declared columns, reading, summaries, the upload-budget
table and the figures."""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from fake_results import MIB, make_config, make_rounds, write_fake_run, write_run_with_writer
from fedmpi.errors import DataError
from fedmpi.figures import draw_all
from fedmpi.results import (
    ROUND_FIELDS,
    ResultsWriter,
    budget_summary,
    budget_table,
    config_identity,
    group_key,
    group_runs,
    info_text,
    read_run,
    read_runs,
    summarize_table,
)

NAN = math.nan
# Accuracies per round; NaN = round not evaluated. Dense uploads 1 MiB per client per round,
# the sparse run a quarter of that, so after 8 rounds it has uploaded 2 MiB per client (= B).
FEDAVGM_SEED0 = [0.10, 0.20, NAN, 0.35, 0.40, NAN, 0.50, 0.55]
FEDAVGM_SEED1 = [0.12, 0.18, NAN, 0.33, 0.45, NAN, 0.52, 0.60]
FEDDST_SEED0 = [0.15, 0.30, NAN, 0.45, 0.50, NAN, 0.58, 0.62]
CLIENTS = 10
DENSE_UPLOAD_PER_ROUND = CLIENTS * MIB
SPARSE_UPLOAD_PER_ROUND = CLIENTS * MIB // 4


@pytest.fixture
def results(tmp_path):
    """Two seeds of dense FedAvgM and one sparse FedDST run, in tmp_path/results."""
    directory = tmp_path / "results"
    directory.mkdir()
    arrays = {
        "fedavgm_s0": make_rounds(FEDAVGM_SEED0, DENSE_UPLOAD_PER_ROUND),
        "fedavgm_s1": make_rounds(FEDAVGM_SEED1, DENSE_UPLOAD_PER_ROUND),
        "feddst_s0": make_rounds(FEDDST_SEED0, SPARSE_UPLOAD_PER_ROUND, density=0.2,
                                 sim_seconds_per_round=1.0),
    }
    configs = {
        "fedavgm_s0": make_config("fedavgm", seed=0),
        # a different data root is output-only: still the same group
        "fedavgm_s1": make_config("fedavgm", seed=1, data={**make_config()["data"], "root": "/x"}),
        "feddst_s0": make_config("feddst", seed=0, sparsity=0.8),
    }
    for name in arrays:
        write_fake_run(directory / f"{name}.h5", configs[name], arrays[name])
    return directory, arrays


def test_read_run_returns_config_attributes_and_rounds(results):
    directory, arrays = results
    run = read_run(directory / "feddst_s0.h5")
    assert run.config["algorithm"] == "feddst" and run.config["sparsity"] == 0.8
    assert run.finished
    assert run.attrs["mpi_size"] == 3 and run.attrs["git_commit"] == "abc1234"
    assert run.rounds_done == 8 and run.rounds_total == 8
    for name, values in arrays["feddst_s0"].items():
        np.testing.assert_array_equal(run.rounds[name], values)
    assert run.rounds["cum_upload_bytes"].dtype == np.int64
    assert run.final("client_accuracy") == 0.62 and run.best("test_accuracy") == pytest.approx(0.57)
    np.testing.assert_allclose(run.upload_mib_per_client(), 0.25 * np.arange(1, 9))
    assert len(run.clients["client_id"]) == 8 * 5


def test_missing_optional_datasets_are_rebuilt_or_tolerated(tmp_path):
    rounds = make_rounds([0.1, 0.2, 0.3], DENSE_UPLOAD_PER_ROUND)
    path = write_fake_run(tmp_path / "old.h5", make_config(rounds=3), rounds, versions=False,
                          omit=("cum_download_bytes", "cum_wall_seconds", "cum_sim_seconds",
                                "train_flops", "cum_train_flops"))
    run = read_run(path)
    np.testing.assert_array_equal(run.rounds["cum_sim_seconds"], np.cumsum(rounds["sim_seconds"]))
    np.testing.assert_array_equal(run.rounds["cum_download_bytes"],
                                  np.cumsum(rounds["download_bytes"]))
    assert "cum_train_flops" not in run.rounds and np.isnan(run.final("cum_train_flops"))
    text = info_text(path)
    assert "not recorded" in text.split("versions:")[1].splitlines()[0]


def test_info_text_reports_the_run(results):
    directory, _ = results
    text = info_text(directory / "fedavgm_s1.h5")
    assert "fedavgm" in text and "fashion_mnist" in text and "shards" in text and "mnistnet" in text
    assert "10 total, 5 per round" in text
    assert "8/8 done, finished" in text
    assert "final 0.6000 (round 8), best 0.6000 (round 8)" in text  # client_accuracy
    assert "80.00 MiB total (8.00 MiB per client)" in text  # upload: 8 rounds × 10 MiB
    assert "160.00 MiB total" in text  # download
    assert "mpi_size: " in text and "3" in text.split("mpi_size:")[1].splitlines()[0]
    assert "torch 2.3.0" in text


def test_group_key_groups_seeds_and_labels_groups(results, tmp_path):
    directory, _ = results
    runs = {r.path.stem: r for r in read_runs(directory)}
    assert group_key(runs["fedavgm_s0"]) == group_key(runs["fedavgm_s1"])
    assert group_key(runs["fedavgm_s0"]) != group_key(runs["feddst_s0"])

    groups = group_runs(runs.values())
    assert [(g.label, len(g.runs), g.seeds) for g in groups] == [
        ("fedavgm", 2, [0, 1]), ("feddst S=0.8", 1, [0])]

    # a second FedDST setting in the same experiment: the differing setting enters the label
    other = make_config("feddst", seed=0, sparsity=0.8,
                        feddst={"alpha": 0.01, "readjust_every": 2, "r_end": 4})
    path = write_fake_run(tmp_path / "feddst_alpha.h5", other,
                          make_rounds(FEDDST_SEED0, SPARSE_UPLOAD_PER_ROUND, density=0.2))
    labels = [g.label for g in group_runs([*runs.values(), read_run(path)])]
    assert labels == ["fedavgm", "feddst S=0.8 alpha=0.01", "feddst S=0.8 alpha=0.05"]


def _table_row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and label in cells:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_summarize_table_means_over_seeds(results):
    directory, arrays = results
    table = summarize_table(read_runs(directory))
    headers = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    row = dict(zip(headers, _table_row(table, "fedavgm")))

    finals = [arrays[k]["client_accuracy"][-1] for k in ("fedavgm_s0", "fedavgm_s1")]
    test_finals = [arrays[k]["test_accuracy"][-1] for k in ("fedavgm_s0", "fedavgm_s1")]
    uploads = [arrays[k]["cum_upload_bytes"][-1] / MIB for k in ("fedavgm_s0", "fedavgm_s1")]
    sim = [arrays[k]["cum_sim_seconds"][-1] for k in ("fedavgm_s0", "fedavgm_s1")]
    assert row["experiment"] == "toy"
    assert row["seeds (n)"] == "0, 1 (2)"
    assert row["rounds"] == "8/8"
    assert row["final client_accuracy"] == f"{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}"
    assert row["final test_accuracy"] == (
        f"{np.mean(test_finals):.4f} ± {np.std(test_finals, ddof=1):.4f}")
    assert row["best client_accuracy"] == f"{np.mean([np.nanmax(FEDAVGM_SEED0), np.nanmax(FEDAVGM_SEED1)]):.4f}"
    assert row["cum upload (MiB, all clients)"] == f"{np.mean(uploads):.2f}"
    assert row["modelled time (s)"] == f"{np.mean(sim):.1f}"
    assert row["finished"] == "2/2"

    single = dict(zip(headers, _table_row(table, "feddst S=0.8")))
    assert single["final client_accuracy"] == "0.6200"  # one seed: no ± part


def test_budget_table_against_hand_computation(results):
    directory, _ = results
    runs = read_runs(directory)
    [summary] = budget_summary(runs)
    # B = FedDST's final upload per client: 8 rounds × 0.25 MiB.
    assert summary.experiment == "toy"
    assert summary.budget_mib_per_client == pytest.approx(2.0)
    rows = {row.label: row for row in summary.rows}
    # FedAvgM uploads 1 MiB/client/round: rounds 1–2 fit B, rounds 1–4 fit 2B (round 3 not evaluated)
    assert rows["fedavgm"].best_within_budget == pytest.approx(np.mean([0.20, 0.18]))
    assert rows["fedavgm"].best_within_2budget == pytest.approx(np.mean([0.35, 0.33]))
    assert rows["fedavgm"].final == pytest.approx(np.mean([0.55, 0.60]))
    assert rows["fedavgm"].best == pytest.approx(np.mean([0.55, 0.60]))
    assert rows["fedavgm"].final_upload_mib_per_client == pytest.approx(8.0)
    assert rows["feddst S=0.8"].best_within_budget == pytest.approx(0.62)
    assert rows["feddst S=0.8"].best_within_2budget == pytest.approx(0.62)

    table = budget_table(runs)
    assert "B = 2.000 MiB per client" in table and "set by feddst S=0.8" in table
    assert _table_row(table, "fedavgm")[3:5] == ["0.1900", "0.3400"]

    # test_accuracy is client_accuracy − 0.05 in the fixture
    [summary] = budget_summary(runs, metric="test_accuracy")
    assert {r.label: r for r in summary.rows}["fedavgm"].best_within_budget == pytest.approx(0.14)


def test_budget_without_sparse_group_uses_smallest_upload(results):
    directory, _ = results
    runs = [r for r in read_runs(directory) if r.algorithm == "fedavgm"]
    [summary] = budget_summary(runs)
    assert summary.budget_mib_per_client == pytest.approx(8.0)
    assert "no sparse group" in summary.budget_source


def test_draw_all_writes_figures_and_tables(results, tmp_path, capsys):
    directory, _ = results
    plots = tmp_path / "plots"
    written = draw_all(directory, plots)
    expected = {f"toy_{kind}.png" for kind in
                ("accuracy_vs_upload", "accuracy_vs_round", "density_vs_round", "accuracy_vs_time")}
    expected |= {"toy_budget_table.md", "summary.md"}
    assert {p.name for p in written} == expected
    for path in written:
        assert path.parent == plots and path.stat().st_size > 0
    for name in expected:
        if name.endswith(".png"):
            assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fedavgm" in (plots / "toy_budget_table.md").read_text()
    assert "feddst S=0.8" in (plots / "summary.md").read_text()
    out = capsys.readouterr().out
    assert all(f"wrote {plots / name}" in out for name in expected)


def legend_texts(fig) -> set[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes)]
    return {text.get_text() for legend in legends if legend is not None for text in legend.get_texts()}


def test_upload_figure_draws_every_algorithm_group_plug_ins_included(tmp_path, monkeypatch):
    """The FedDST paper's figure (accuracy vs cumulative upload) shows every group of the
    experiment: a method that is not installed here (an out-of-tree plug-in's results) beside
    FedDST, in the legend and in its companion budget table."""
    from matplotlib.figure import Figure

    from fedmpi.algorithms import ALGORITHMS
    from fedmpi.figures import figure_modules

    assert "elsewhere_topk" not in ALGORITHMS
    directory = tmp_path / "results"
    directory.mkdir()
    write_fake_run(directory / "topk.h5", make_config("elsewhere_topk", seed=0, experiment="upload"),
                   make_rounds(FEDAVGM_SEED0, DENSE_UPLOAD_PER_ROUND // 2))
    write_fake_run(directory / "feddst.h5", make_config("feddst", seed=0, sparsity=0.8, experiment="upload"),
                   make_rounds(FEDDST_SEED0, SPARSE_UPLOAD_PER_ROUND, density=0.2))
    saved = {}
    savefig = Figure.savefig

    def record(fig, path, *args, **kwargs):
        saved[Path(path).name] = legend_texts(fig)
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    written = draw_all(directory, tmp_path / "plots")
    assert tmp_path / "plots" / "upload_accuracy_vs_upload.png" in written
    legend = saved["upload_accuracy_vs_upload.png"]
    assert {"elsewhere_topk (1 seed)", "feddst S=0.8 (1 seed)"} <= legend, legend
    table = (tmp_path / "plots" / "upload_budget_table.md").read_text()
    assert _table_row(table, "elsewhere_topk") and _table_row(table, "feddst S=0.8")
    # the unregistered method gets the common figures only, and adds no method-specific ones
    groups = group_runs(read_runs(directory))
    assert figure_modules(groups) == []


def test_method_figures_come_from_the_algorithm_classes():
    from types import SimpleNamespace

    from fedmpi.figures import figure_modules

    def groups(*algorithms):
        return [SimpleNamespace(algorithm=a) for a in algorithms]

    assert figure_modules(groups("fedavg", "snip", "topk_fedavg")) == ["prunefl"]
    # LotteryFL lists its own table after PruneFL's figures (its personalised-accuracy figure is there)
    assert figure_modules(groups("fedavg", "snip", "topk_fedavg", "lotteryfl")) == ["prunefl", "lotteryfl"]
    assert figure_modules(groups("fedavg", "hypemefed", "heterofl")) == ["heterogeneous"]
    assert figure_modules(groups("imp", "scalefl")) == ["prunefl", "heterogeneous"]
    assert figure_modules(groups("fedavgm", "feddst", "topk_fedavg")) == []


def test_draw_all_without_results_prints_hint(tmp_path, capsys):
    assert draw_all(tmp_path / "results", tmp_path / "plots") == []
    assert "no results" in capsys.readouterr().out
    assert not (tmp_path / "plots").exists()


def test_file_without_finished_is_unfinished(tmp_path):
    rounds = make_rounds([0.1, 0.2, 0.3], DENSE_UPLOAD_PER_ROUND)
    path = write_fake_run(tmp_path / "killed.h5", make_config(rounds=8), rounds, finished=False)
    run = read_run(path)
    assert not run.finished and run.rounds_done == 3
    assert "3/8 done, NOT finished" in info_text(path)
    row = _table_row(summarize_table([run]), "fedavgm")
    assert row[3] == "3/8" and row[-1] == "0/1"


def test_unreadable_files_are_skipped_with_warning(results, capsys):
    directory, _ = results
    (directory / "garbage.h5").write_bytes(b"not an hdf5 file at all")
    with h5py.File(directory / "foreign.h5", "w") as h5:
        h5["x"] = [1, 2, 3]  # valid HDF5, but no fedmpi config
    runs = read_runs(directory)
    assert sorted(r.path.name for r in runs) == ["fedavgm_s0.h5", "fedavgm_s1.h5", "feddst_s0.h5"]
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "garbage.h5" in err and "foreign.h5" in err
    with pytest.raises(DataError, match="garbage.h5"):
        read_run(directory / "garbage.h5")


SWMR_WRITER = textwrap.dedent("""
    import sys, h5py, numpy as np
    sys.path.insert(0, sys.argv[2])
    from fake_results import make_config, make_rounds, write_root_attrs
    rounds = make_rounds([0.1, 0.2, 0.3, 0.4, 0.5], 1000)
    h5 = h5py.File(sys.argv[1], "w", libver="latest")
    write_root_attrs(h5, make_config(rounds=5), finished=False)
    group = h5.create_group("rounds")
    for name, values in rounds.items():
        group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=values.dtype, chunks=(16,))
    h5.swmr_mode = True

    def append(upto):
        for name, values in rounds.items():
            group[name].resize((upto,))
            group[name][:] = values[:upto]
        h5.flush()

    append(3)
    print("ready", flush=True)
    sys.stdin.readline()
    append(5)
    print("appended", flush=True)
    sys.stdin.readline()
    h5.close()
""")


def test_read_run_while_writer_appends_in_swmr_mode(tmp_path):
    path = tmp_path / "live.h5"
    with subprocess.Popen(
            [sys.executable, "-c", SWMR_WRITER, str(path), str(Path(__file__).parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as writer:
        try:
            assert writer.stdout.readline().strip() == "ready"
            run = read_run(path)
            assert run.rounds_done == 3 and not run.finished
            np.testing.assert_allclose(run.rounds["client_accuracy"], [0.1, 0.2, 0.3])

            writer.stdin.write("\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "appended"
            run = read_run(path)
            assert run.rounds_done == 5
            np.testing.assert_array_equal(run.rounds["cum_upload_bytes"], 1000 * np.arange(1, 6))
        finally:
            writer.stdin.write("\n")
            writer.stdin.close()
            assert writer.wait(timeout=20) == 0


# -- algorithm-declared columns ------------------------------------------------------------------

LAYERS = ("conv1.weight", "fc1.weight")
# FedDST-like columns over 4 rounds: the mask moves on rounds 2 and 4 only (None = no value)
EXTRA_ROUNDS = {
    "readjusted": (np.int64, [0, 1, 0, 1]),
    "mask_moved[conv1.weight]": (np.int32, [None, 3, None, 2]),
    "mask_moved[fc1.weight]": (np.int32, [None, 40, None, 25]),
    "agreement": (np.float32, [None, 0.5, None, 0.25]),
}
EXTRA_CLIENTS = {"local_density": (np.float64, [0.2, 0.3, None, None, 0.4, 0.6, 0.5, 0.5])}


@pytest.fixture
def extra_run(tmp_path):
    """A 4-round FedDST run, 2 clients per round, written by ResultsWriter with extra columns."""
    config = make_config("feddst", sparsity=0.8, rounds=4, per_round=2)
    rounds = make_rounds([0.1, 0.2, 0.3, 0.4], SPARSE_UPLOAD_PER_ROUND, density=0.2)
    return write_run_with_writer(tmp_path / "results" / "extra.h5", config, rounds,
                                 extra_rounds=EXTRA_ROUNDS, extra_clients=EXTRA_CLIENTS,
                                 finished=False)


def test_writer_stores_extra_columns_with_missing_values_and_records_them(extra_run):
    with h5py.File(extra_run, "r") as h5:
        assert json.loads(h5.attrs["extra_round_fields"]) == {
            "readjusted": "int64", "mask_moved[conv1.weight]": "int32",
            "mask_moved[fc1.weight]": "int32", "agreement": "float32"}
        assert json.loads(h5.attrs["extra_client_fields"]) == {"local_density": "float64"}
        moved = h5["rounds"]["mask_moved[fc1.weight]"]
        assert moved.dtype == np.int32 and list(moved[:]) == [-1, 40, -1, 25]
        np.testing.assert_array_equal(h5["rounds"]["agreement"][:], [np.nan, 0.5, np.nan, 0.25])
        np.testing.assert_array_equal(h5["clients"]["local_density"][:],
                                      [0.2, 0.3, np.nan, np.nan, 0.4, 0.6, 0.5, 0.5])
    run = read_run(extra_run)
    np.testing.assert_array_equal(run.rounds["mask_moved[conv1.weight]"], [-1, 3, -1, 2])
    # the reader turns an integer column's missing value (-1) into NaN
    np.testing.assert_array_equal(run.column("mask_moved[conv1.weight]"), [np.nan, 3, np.nan, 2])
    np.testing.assert_array_equal(run.column("readjusted"), [0, 1, 0, 1])
    assert list(run.extra_fields("rounds")) == list(EXTRA_ROUNDS)
    assert run.extra_fields("clients") == {"local_density": np.dtype("float64")}


def test_writer_without_extra_columns_records_none(tmp_path):
    path = write_run_with_writer(tmp_path / "plain.h5", make_config(rounds=2),
                                 make_rounds([0.1, 0.2], DENSE_UPLOAD_PER_ROUND))
    run = read_run(path)
    assert run.extra_fields("rounds") == {} and run.extra_fields("clients") == {}
    assert set(run.rounds) == set(ROUND_FIELDS)
    assert "algorithm columns" not in info_text(path)


def test_resume_keeps_extra_columns_and_adds_newly_declared_ones(extra_run):
    with h5py.File(extra_run, "r") as h5:
        before = {group: {name: ds[:] for name, ds in h5[group].items()}
                  for group in ("rounds", "clients")}
    writer = ResultsWriter(extra_run, {}, resume_rounds=2,
                           extra_round_fields={"regrown": np.float64})
    writer.close(finished=False)
    with h5py.File(extra_run, "r") as h5:
        assert "resumed" in h5.attrs and "config" in h5.attrs
        declared = json.loads(h5.attrs["extra_round_fields"])
        assert declared == {**{name: np.dtype(d).name for name, (d, _) in EXTRA_ROUNDS.items()},
                            "regrown": "float64"}
        assert json.loads(h5.attrs["extra_client_fields"]) == {"local_density": "float64"}
        for group, rows in (("rounds", 2), ("clients", 4)):
            for name, values in before[group].items():
                np.testing.assert_array_equal(h5[group][name][:], values[:rows])
                assert h5[group][name].dtype == values.dtype
        np.testing.assert_array_equal(h5["rounds"]["regrown"][:], [np.nan, np.nan])

    # appending after the resume fills the columns a row leaves out
    writer = ResultsWriter(extra_run, {}, resume_rounds=2)
    row = {name: 0 for name in ROUND_FIELDS}
    writer.append_round({**row, "round": 3, "regrown": 7.5}, [])
    writer.close(finished=True)
    run = read_run(extra_run)
    assert run.finished and list(run.round_numbers()) == [1, 2, 3]
    np.testing.assert_array_equal(run.column("regrown"), [np.nan, np.nan, 7.5])
    np.testing.assert_array_equal(run.rounds["mask_moved[fc1.weight]"], [-1, 40, -1])


@pytest.mark.parametrize("declared, problem", [
    ({"a/b": np.float64}, "no '/'"),
    ({"density": np.float64}, "fixed column"),
    ({"note": np.dtype("S8")}, "float or signed integer"),
    ({"flag": np.bool_}, "float or signed integer"),
])
def test_writer_refuses_unusable_extra_columns(tmp_path, declared, problem):
    with pytest.raises(ValueError, match=problem):
        ResultsWriter(tmp_path / "bad.h5", {}, extra_round_fields=declared)


def test_writer_refuses_rows_with_undeclared_or_without_fixed_columns(tmp_path):
    writer = ResultsWriter(tmp_path / "r.h5", {"config": json.dumps(make_config())},
                           extra_round_fields={"x": np.float64})
    row = {name: 0 for name in ROUND_FIELDS}
    with pytest.raises(ValueError, match=r"undeclared columns \['y'\]"):
        writer.append_round({**row, "y": 1.0}, [])
    with pytest.raises(ValueError, match=r"lacks the columns \['density'\]"):
        writer.append_round({k: v for k, v in row.items() if k != "density"}, [])
    writer.append_round({**row, "x": 2.0}, [])
    writer.close(finished=True)
    assert read_run(tmp_path / "r.h5").rounds_done == 1  # the refused rows left nothing behind


def test_info_lists_the_algorithm_columns(extra_run):
    lines = info_text(extra_run).splitlines()
    start = lines.index("algorithm columns, per round:")
    assert lines[start + 1].split() == ["readjusted", "last", "1", "(round", "4),", "mean", "0.5",
                                        "over", "4", "rounds"]
    assert lines[start + 2].split(None, 1) == [
        "mask_moved[*]", "round 4: conv1.weight=2, fc1.weight=25"]
    assert lines[start + 3].split(None, 1) == ["agreement",
                                               "last 0.25 (round 4), mean 0.375 over 2 rounds"]
    assert lines[start + 4] == "algorithm columns, per client, mean over each round's clients:"
    # round means 0.25, none (round 2's clients have no value), 0.5, 0.5
    assert lines[start + 5].split(None, 1) == ["local_density",
                                               "last 0.5 (round 4), mean 0.4167 over 3 rounds"]


def test_summarize_reads_files_with_extra_columns(extra_run):
    row = _table_row(summarize_table(read_runs(extra_run.parent)), "feddst S=0.8")
    assert row[3] == "4/4" and row[4] == "0.4000" and row[-1] == "0/1"


def test_draw_all_draws_the_algorithm_columns(extra_run, tmp_path):
    written = draw_all(extra_run.parent, tmp_path / "plots")
    figure = tmp_path / "plots" / "toy_algorithm_columns.png"
    assert figure in written and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_identity_ignores_output_only_keys_but_not_the_seed():
    base = make_config("feddst", sparsity=0.8, output={"progress": "auto"}, mpi={"wait": "sleep"})
    renamed = {**base, "experiment": "renamed", "output": {"progress": True},
               "checkpoint": {"every": 5}, "mpi": {"wait": "spin"},
               "data": {**base["data"], "root": "/elsewhere"}}
    assert config_identity(renamed) == config_identity(base)
    for changed in ({**base, "seed": 1}, {**base, "sparsity": 0.5},
                    {**base, "data": {**base["data"], "alpha": 0.1}}):
        assert config_identity(changed) != config_identity(base)


def test_groups_ignore_keys_a_newer_version_added_and_name_only_departures(results, tmp_path):
    """Many FedDST variants: the majority's values go unnamed, each variant names its departure;
    a key that only some files carry, at its default (an older fedmpi did not have it), does not
    split a group."""
    variants = [{}, {}, {"alpha": 0.2}, {"readjust_every": 1}]
    runs = []
    for i, change in enumerate(variants):
        cfg = make_config("feddst", sparsity=0.8, seed=i,
                          feddst={"alpha": 0.05, "readjust_every": 5, "r_end": 25, **change})
        if i == 1:      # written by today's fedmpi: a section the other (older) files lack, at its default
            from fedmpi.config import DEFAULTS

            cfg["tiers"] = dict(DEFAULTS["tiers"])
        runs.append(read_run(write_fake_run(tmp_path / f"v{i}.h5", cfg,
                                            make_rounds(FEDDST_SEED0, SPARSE_UPLOAD_PER_ROUND, density=0.2))))
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("feddst S=0.8", 2), ("feddst S=0.8 alpha=0.2", 1), ("feddst S=0.8 readjust_every=1", 1)]
