"""What a user meets around a run (issue #20, point 6): a malformed config file's message, `plots`
and `summarize` given nothing readable, the algorithm-columns figure's axes, and progress lines in
batch logs."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
from fake_results import make_config, make_rounds, write_fake_run, write_run_with_writer
from helpers import BATCH_SCRIPT, PY, REPO, command, env, write_config

from fedmpi.cli import main

# ------------------------------------------------------------------------------ malformed YAML

MALFORMED = {
    # an unclosed flow list: PyYAML finds the problem where the file ends
    "unclosed.yaml": ("rounds: [1, 2\n", "line 2, column 1"),
    # a tab-indented mapping
    "tabs.yaml": ("data:\n\tname: synthetic\n", "line 2, column 1"),
}


@pytest.fixture(scope="module")
def malformed_runs(tmp_path_factory):
    """``fedmpi run`` on each malformed file, in one interpreter: {file name: (rc, stderr)}."""
    work = tmp_path_factory.mktemp("yaml")
    argvs = []
    for name, (text, _) in MALFORMED.items():
        (work / name).write_text(text)
        argvs.append(["run", str(work / name), "--out", str(work / f"{name}.h5")])
    (work / "argv.json").write_text(json.dumps(argvs))
    (work / "batch.py").write_text(BATCH_SCRIPT)
    proc = subprocess.run([PY, str(work / "batch.py"), str(work / "argv.json")], cwd=work, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (r["rc"], r["stderr"], work / name) for name, r in zip(MALFORMED, results)}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_yaml_names_the_file_and_where(malformed_runs, name):
    rc, stderr, path = malformed_runs[name]
    assert rc == 2, stderr
    message = stderr.strip().splitlines()[0]
    assert message.startswith(f"fedmpi: {path}: not valid YAML at {MALFORMED[name][1]}"), stderr
    assert "config key" not in stderr and "<unicode string>" not in stderr, stderr
    assert not path.with_name(f"{name}.h5").exists()


def test_tab_indentation_says_to_use_spaces(malformed_runs):
    assert "indent with spaces" in malformed_runs["tabs.yaml"][1]


# ------------------------------------------------------------------------------ nothing readable

@pytest.fixture
def garbage_only(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "x.h5").write_bytes(b"not an HDF5 file")
    return results


def test_plots_with_only_unreadable_files_exits_2_naming_them(garbage_only, tmp_path, capsys):
    rc = main(["plots", "--results", str(garbage_only), "--plots", str(tmp_path / "plots")])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedmpi: ") and str(garbage_only / "x.h5") in last, err
    assert not (tmp_path / "plots" / "summary.md").exists()


def test_summarize_with_only_unreadable_files_exits_2_naming_them(garbage_only, capsys):
    rc = main(["summarize", str(garbage_only)])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedmpi: ") and str(garbage_only / "x.h5") in last, err


def test_plots_and_summarize_go_on_past_an_unreadable_file_and_name_it(garbage_only, tmp_path, capsys):
    write_fake_run(garbage_only / "good.h5", make_config(rounds=3), make_rounds([0.1, 0.2, 0.3], 1000))
    assert main(["plots", "--results", str(garbage_only), "--plots", str(tmp_path / "plots")]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "plots" / "summary.md").exists() and "wrote" in out
    assert str(garbage_only / "x.h5") in err.strip().splitlines()[-1], err
    assert main(["summarize", str(garbage_only)]) == 0
    out, err = capsys.readouterr()
    assert "fedavgm" in out
    assert str(garbage_only / "x.h5") in err.strip().splitlines()[-1], err


# ------------------------------------------------------------------------------ algorithm columns figure

def test_algorithm_columns_figure_has_plain_values_integer_rounds_and_labels(tmp_path, monkeypatch):
    """A near-constant column (0.2 within 1e-5) drawn over 3 rounds; the figure is caught as it
    is saved."""
    from matplotlib.figure import Figure

    results = tmp_path / "results"
    results.mkdir()
    write_run_with_writer(results / "r.h5", make_config("feddst", rounds=3, per_round=2),
                          make_rounds([0.1, 0.2, 0.3], 1000),
                          extra_rounds={"kept_fraction": (np.float64, [0.199993, 0.200001, 0.200008]),
                                        "moved[fc1.weight]": (np.int64, [3, 5, 4])})
    saved = {}
    original = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        saved[os.path.basename(str(path))] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    from fedmpi.figures import draw_all

    draw_all(results, tmp_path / "plots")
    fig = saved["toy_algorithm_columns.png"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    labels = sorted(ax.get_ylabel() for ax in axes)
    assert labels == ["kept_fraction", "moved[layer]"]
    for ax in axes:
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_ylabel()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_xlabel() == "round"
    kept = next(ax for ax in axes if ax.get_ylabel() == "kept_fraction")
    # each label, read back, is the value at its tick (no offset or multiplier to add)
    low, high = kept.get_ylim()
    shown = [(loc, float(label.get_text().replace("\u2212", "-")))
             for loc, label in zip(kept.get_yticks(), kept.get_yticklabels()) if low <= loc <= high]
    assert len(shown) >= 2 and all(abs(value - loc) < 1e-9 for loc, value in shown), shown
    # an integer column (a count per layer) gets integer y ticks
    moved = next(ax for ax in axes if ax.get_ylabel() == "moved[layer]")
    low, high = moved.get_ylim()
    assert all(float(t).is_integer() for t in moved.get_yticks() if low <= t <= high), moved.get_yticks()


# ------------------------------------------------------------------------------ progress in batch logs

LINE = re.compile(r"^round (\d+)/3 acc=\S+ test=[0-9.]+ up=[0-9.]+MiB density=[0-9.]+ elapsed=[0-9.]+s$")


@pytest.mark.slow
def test_a_run_without_terminal_prints_a_line_per_round(tmp_path):
    """stderr is a pipe to this test, not a terminal or a launcher: plain lines, no bar."""
    config = write_config(tmp_path / "tiny.yaml")
    proc = subprocess.run(command(["run", str(config), "--out", str(tmp_path / "r.h5")]), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [int(m.group(1)) for m in map(LINE.match, proc.stderr.splitlines()) if m]
    assert rounds == [1, 2, 3], proc.stderr
    assert "\r" not in proc.stderr


@pytest.mark.slow
def test_a_redirected_run_gets_lines_even_when_its_parent_has_a_terminal(tmp_path):
    """``nohup`` / ``2> log`` from an interactive shell: the run's stderr is a file while its
    parent's is a terminal. The log gets lines, not a bar."""
    config = write_config(tmp_path / "tiny.yaml")
    log = tmp_path / "run.log"
    parent = ("import subprocess, sys; "
              f"sys.exit(subprocess.run({command(['run', str(config), '--out', str(tmp_path / 'r.h5')])!r}, "
              f"stderr=open({str(log)!r}, 'w')).returncode)")
    leader, follower = os.openpty()      # the parent's stderr: a terminal
    try:
        proc = subprocess.run([PY, "-c", parent], cwd=REPO, env=env(), stderr=follower, stdout=subprocess.DEVNULL,
                              timeout=120)
    finally:
        os.close(follower)
        os.close(leader)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert [int(m.group(1)) for m in map(LINE.match, text.splitlines()) if m] == [1, 2, 3], text
    assert "\r" not in text


@pytest.mark.parametrize("rounds, start, expected", [
    (3, 0, {1, 2, 3}),
    (50, 0, set(range(1, 51))),
    (200, 0, {1, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200}),
    (55, 0, {1, 6, 11, 17, 22, 28, 33, 39, 44, 50, 55}),
    (200, 73, {74, 80, 100, 120, 140, 160, 180, 200}),
])
def test_long_runs_print_a_line_per_tenth_of_their_rounds(rounds, start, expected):
    from fedmpi.progress import printed_rounds

    assert printed_rounds(rounds, start) == expected


def test_a_long_run_logs_the_first_and_last_round_and_each_tenth(capsys):
    """60 rounds, resumed after round 20, stderr not a terminal and progress on auto."""
    from fedmpi.progress import Progress

    progress = Progress(60, "auto", start=20)
    for r in range(21, 61):
        progress.update({"round": r, "client_accuracy": 0.5, "test_accuracy": 0.5, "cum_upload_bytes": r * 2**20,
                         "density": 1.0, "cum_wall_seconds": 0.1 * r})
    progress.close()
    logged = [int(m.group(1)) for m in re.finditer(r"^round (\d+)/60 ", capsys.readouterr().err, re.M)]
    assert logged == [21, 24, 30, 36, 42, 48, 54, 60]
