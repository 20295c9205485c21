"""Campaign files: expansion into runs, run names, statuses, skipping finished runs, and the
SLURM job files (the real scheduler is in test_slurm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from fedmpi.campaigns import MAX_NAME_LENGTH, load_campaign, render_sbatch, run_name, yaml_value
from fedmpi.cli import main as fedmpi_main
from fedmpi.errors import ConfigError, PreemptedError
from fedmpi.results import run_status

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = {"data": {"name": "synthetic", "partition": "natural"}, "model": "mlp",
               "algorithm": "fedavg", "clients": {"total": 8, "per_round": 4}, "rounds": 2,
               "local": {"epochs": 1, "batch_size": 16, "lr": 0.05}}


def write_campaign(directory: Path, **spec) -> Path:
    """A campaign file with the tiny inline config; a key given as None is left out."""
    spec = {"name": "demo", "config": TINY_CONFIG, "results_dir": "results", **spec}
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None},
                                   sort_keys=False))
    return path


def write_result(path: Path, finished: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["started"] = "now"
        if finished:
            f.attrs["finished"] = "later"


def sweep(*args: str) -> int:
    """``fedmpi sweep ARGS``, in this process."""
    return fedmpi_main(["sweep", *args])


def names(campaign) -> list[str]:
    return [run.name for run in campaign.runs]


# -- expansion and names -----------------------------------------------------------------------

def test_grid_times_seeds_plus_explicit_runs(tmp_path):
    campaign = load_campaign(write_campaign(
        tmp_path, seeds=[0, 1], grid={"algorithm": ["fedavg", "fedavgm"], "data.alpha": [0.1, 1.0]},
        runs=[{"algorithm": "feddst", "sparsity": 0.8}]))
    assert len(campaign.runs) == (2 * 2 + 1) * 2
    assert "algorithm=fedavgm_data.alpha=0.1_seed=1" in names(campaign)
    assert "algorithm=feddst_sparsity=0.8_seed=0" in names(campaign)
    run = campaign.runs[0]
    assert run.overrides == {"algorithm": "fedavg", "data.alpha": 0.1, "seed": 0}
    assert run.result == tmp_path / "results" / f"{run.name}.h5"


def test_names_do_not_depend_on_key_order_and_seed_comes_last(tmp_path):
    one = load_campaign(write_campaign(tmp_path, seeds=[3],
                                       grid={"sparsity": [0.5], "algorithm": ["feddst"]}))
    other = load_campaign(write_campaign(tmp_path, seeds=[3],
                                         runs=[{"algorithm": "feddst", "sparsity": 0.5}]))
    assert names(one) == names(other) == ["algorithm=feddst_sparsity=0.5_seed=3"]


def test_nested_mappings_become_dotted_keys(tmp_path):
    campaign = load_campaign(write_campaign(tmp_path, grid={"data": {"alpha": [0.1, 1]}},
                                            runs=[{"feddst": {"alpha": 0.05}}], set={"local": {"lr": 0.1}}))
    assert names(campaign) == ["data.alpha=0.1", "data.alpha=1", "feddst.alpha=0.05"]
    assert campaign.common == {"local.lr": 0.1}
    assert campaign.set_args(campaign.runs[2]) == ["local.lr=0.1", "feddst.alpha=0.05"]


def test_seed_count_and_no_overrides(tmp_path):
    assert names(load_campaign(write_campaign(tmp_path, seeds=3))) == ["seed=0", "seed=1", "seed=2"]
    assert names(load_campaign(write_campaign(tmp_path))) == ["base"]


def test_duplicate_runs_are_run_once(tmp_path):
    campaign = load_campaign(write_campaign(tmp_path, grid={"algorithm": ["fedavg"]},
                                            runs=[{"algorithm": "fedavg"}]))
    assert names(campaign) == ["algorithm=fedavg"]


def test_names_are_file_system_safe_and_long_ones_stay_unique():
    assert run_name({"data.root": "/data/my set", "flag": True, "x": None}) == \
        "data.root=-data-my-set_flag=true_x=null"
    long_a = run_name({"note": "a" * 300})
    long_b = run_name({"note": "a" * 299 + "b"})
    assert len(long_a) == len(long_b) == MAX_NAME_LENGTH and long_a != long_b


@pytest.mark.parametrize("value", ["fedavg", "1.0", "yes", "a b: c", 0.1, 1e-05, 3, True, None,
                                   [1, 2]])
def test_set_values_read_back_as_the_campaign_wrote_them(value):
    assert yaml.safe_load(yaml_value(value)) == value


@pytest.mark.parametrize("spec, key", [
    ({"seeds": [0], "grid": {"seed": [1, 2]}}, "seeds"),
    ({"seeds": "many"}, "seeds"),
    ({"grid": {"algorithm": "fedavg"}}, "grid.algorithm"),
    ({"runs": ["algorithm=fedavg"]}, "runs"),
    ({"runs": [{"x": "a/b"}, {"x": "a b"}]}, "runs"),          # both named x=a-b
    ({"gird": {}}, "gird"),
    ({"base": "missing.yaml", "config": None}, "base"),
    ({"ranks": 0}, "ranks"),
    ({"slurm": {"mpi": "aprun"}}, "slurm.mpi"),
    ({"slurm": {"partiton": "debug"}}, "slurm.partiton"),
])
def test_campaign_mistakes_name_the_key(tmp_path, spec, key):
    with pytest.raises(ConfigError) as error:
        load_campaign(write_campaign(tmp_path, **spec))
    assert error.value.key == key


def test_paths_base_relative_to_campaign_results_default_under_cwd(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "base.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    (tmp_path / "campaigns").mkdir()
    path = tmp_path / "campaigns" / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "base": "../bench/base.yaml"}))
    monkeypatch.chdir(tmp_path)
    campaign = load_campaign(path)
    assert campaign.config_path() == tmp_path / "bench" / "base.yaml"
    assert campaign.results_dir == tmp_path / "results" / "c"
    assert load_campaign(path, "elsewhere").results_dir == tmp_path / "elsewhere"


# -- statuses and skipping ---------------------------------------------------------------------

def test_status_finished_partial_missing(tmp_path):
    write_result(tmp_path / "done.h5", finished=True)
    write_result(tmp_path / "half.h5", finished=False)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    (tmp_path / "only-checkpoint.ckpt").write_bytes(b"")
    assert run_status(tmp_path / "done.h5") == "finished"
    assert run_status(tmp_path / "half.h5") == "partial"
    assert run_status(tmp_path / "broken.h5") == "partial"
    assert run_status(tmp_path / "only-checkpoint.h5") == "partial"
    assert run_status(tmp_path / "none.h5") == "missing"


def test_list_shows_name_status_and_overrides(tmp_path, capsys):
    path = write_campaign(tmp_path, seeds=[0, 1, 2])
    write_result(tmp_path / "results" / "seed=0.h5", finished=True)
    write_result(tmp_path / "results" / "seed=1.h5", finished=False)
    assert sweep(str(path), "--list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seed=0", "finished", "seed=0"]
    assert lines[1].split() == ["seed=1", "partial", "seed=1"]
    assert lines[2].split() == ["seed=2", "missing", "seed=2"]
    assert "1 finished, 1 partial, 1 missing" in lines[3]


def test_slurm_dry_run_writes_table_of_unfinished_runs_and_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_campaign(tmp_path, seeds=[0, 1, 2], ranks=3, grid={"data.root": ["/d/with space"]},
                          slurm={"partition": "debug", "account": "proj", "modules": ["gcc", "openmpi"],
                                 "gpus_per_task": 1, "extra_sbatch": ["--qos=long"]})
    write_result(tmp_path / "results" / "data.root=-d-with-space_seed=0.h5", finished=True)
    assert sweep(str(path), "--slurm", "--dry-run", "--partition", "gpu", "--time", "0:30:00") == 0
    assert "dry run" in capsys.readouterr().out

    (table,) = (tmp_path / "results" / "slurm").glob("*.tasks")
    rows = [line.split("\t") for line in table.read_text().splitlines() if not line.startswith("#")]
    assert rows == [[f"data.root=-d-with-space_seed={s}",
                     str(tmp_path / "results" / f"data.root=-d-with-space_seed={s}.h5"),
                     "data.root=/d/with space", f"seed={s}"] for s in (1, 2)]

    script = table.with_suffix(".sbatch").read_text()
    directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ["--array=0-1", "--ntasks=3", "--partition=gpu", "--account=proj",
                     "--time=0:30:00", "--gpus-per-task=1", "--qos=long", "--requeue",
                     "--job-name=fedmpi-demo"]:
        assert expected in directives
    assert sum(d.startswith("--ntasks") for d in directives) == 1   # the template's is replaced
    assert "FEDMPI_MODULES='gcc openmpi'" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_nothing_missing_submits_nothing(tmp_path, capsys):
    path = write_campaign(tmp_path, seeds=[0, 1])
    for seed in (0, 1):
        write_result(tmp_path / "results" / f"seed={seed}.h5", finished=True)
    assert sweep(str(path), "--slurm") == 0   # would fail without sbatch if it tried to submit
    assert "nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "results" / "slurm").exists()


def test_render_keeps_hand_added_directives_and_needs_the_settings_markers():
    template = ("#!/bin/bash\n#SBATCH --time=9:00:00\n#SBATCH --mail-type=END\n"
                "# >>> fedmpi settings\nA=${A:-1}\n# <<< fedmpi settings\necho $A\n")
    script = render_sbatch(template, ["--time=1:00:00"], {"A": "two words"})
    assert script.splitlines() == ["#!/bin/bash", "#SBATCH --time=1:00:00", "#SBATCH --mail-type=END",
                                   "# >>> fedmpi settings", "A='two words'", "# <<< fedmpi settings",
                                   "echo $A"]
    with pytest.raises(ConfigError):
        render_sbatch("#!/bin/bash\necho\n", [], {})


def test_array_task_runs_its_line_and_passes_exit_status_75_on(tmp_path, monkeypatch):
    """The rendered job script, outside SLURM, with mpiexec replaced by a recorder of its argv."""
    recorder = tmp_path / "mpiexec"
    recorder.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/argv\n'
                        'echo "$OMP_NUM_THREADS $PYTHONPATH" > ' f'{tmp_path}/env\nexit 75\n')
    recorder.chmod(0o755)
    monkeypatch.setenv("MPIEXEC", str(recorder))
    monkeypatch.chdir(tmp_path)
    path = write_campaign(tmp_path, ranks=2, seeds=[0, 1], set={"rounds": 1},
                          grid={"data.root": ["/d/with space"]})
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    (script,) = (tmp_path / "results" / "slurm").glob("*.sbatch")

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_NTASKS="2")
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 75, job.stderr
    result = tmp_path / "results" / "data.root=-d-with-space_seed=1.h5"
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-n", "2", sys.executable, "-m", "fedmpi", "run",
        str(tmp_path / "results" / "campaign-config.yaml"), "--out", str(result), "--resume",
        "--set", "rounds=1", "--set", "data.root=/d/with space", "--set", "seed=1"]
    threads, pythonpath = (tmp_path / "env").read_text().split()
    assert threads == "1" and pythonpath.split(":")[0] == str(REPO)


# -- running locally ---------------------------------------------------------------------------

def test_local_stops_at_a_preempted_run_with_its_exit_status(tmp_path, monkeypatch, capsys):
    recorder = tmp_path / "mpiexec"
    recorder.write_text(f'#!/bin/bash\necho run >> {tmp_path}/started\nexit 75\n')
    recorder.chmod(0o755)
    monkeypatch.setenv("MPIEXEC", str(recorder))
    path = write_campaign(tmp_path, seeds=[0, 1])
    assert sweep(str(path), "--local") == PreemptedError.exit_code == 75
    assert (tmp_path / "started").read_text() == "run\n"   # the second run was not started
    assert "seed=0: pre-empted" in capsys.readouterr().err


@pytest.mark.slow
def test_local_runs_missing_runs_then_nothing(tmp_path, capsys):
    path = write_campaign(tmp_path, ranks=2, seeds=[0])
    assert sweep(str(path), "--local") == 0
    (run,) = load_campaign(path).runs
    assert run_status(run.result) == "finished"
    with h5py.File(run.result, "r") as f:
        assert f.attrs["mpi_size"] == 2
    capsys.readouterr()
    assert sweep(str(path), "--local") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_local_jobs_run_concurrently_and_all_finish(tmp_path, monkeypatch, capsys):
    """--jobs 2: two runs overlap in time (each recorder run waits until the other started)."""
    recorder = tmp_path / "mpiexec"
    recorder.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo start >> {tmp_path}/log
        for i in $(seq 100); do [ $(grep -c start {tmp_path}/log) -ge 2 ] && break; sleep 0.05; done
        [ $(grep -c start {tmp_path}/log) -ge 2 ] || exit 9
        exit 0
    """))
    recorder.chmod(0o755)
    monkeypatch.setenv("MPIEXEC", str(recorder))
    path = write_campaign(tmp_path, seeds=[0, 1, 2, 3])
    assert sweep(str(path), "--local", "--jobs", "2") == 0
    assert (tmp_path / "log").read_text().count("start") == 4
    assert "4 runs finished" in capsys.readouterr().out
    assert sweep(str(path), "--local", "--jobs", "0") == 2     # bad input


# -- runs that take a value from another run (from_run) ------------------------------------------

FROM_PRUNEFL = {"from_run": "algorithm=prunefl", "column": "density"}

FAKE_MPIEXEC = '''#!{python}
"""Stands in for mpiexec: logs the run's start (with its --set values) and end, then writes a
finished results file whose per-round density ends at 0.1234567891 + seed / 7, or exits 1 for
the run named in $FAKE_FAIL."""
import json, os, sys, time
from pathlib import Path

import h5py

argv = sys.argv
out = Path(argv[argv.index("--out") + 1])
sets = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
log = Path(os.environ["FAKE_LOG"])

def note(event):
    with log.open("a") as f:
        f.write(json.dumps([event, out.stem, sets]) + "\\n")

note("start")
time.sleep(0.6 if "algorithm=prunefl" in sets else 0.1)
if out.stem == os.environ.get("FAKE_FAIL"):
    note("failed")
    sys.exit(1)
seed = int(next(s for s in sets if s.startswith("seed=")).split("=")[1])
with h5py.File(out, "w") as f:
    f.attrs["config"] = json.dumps({{"seed": seed}})
    f.create_dataset("rounds/density", data=[1.0, 0.5, 0.1234567891 + seed / 7])
    f.attrs["finished"] = "now"
note("end")
'''


@pytest.fixture
def fake_mpiexec(tmp_path, monkeypatch):
    """MPIEXEC replaced by FAKE_MPIEXEC; returns the log's events as (event, run, sets)."""
    script = tmp_path / "fake-mpiexec"
    script.write_text(FAKE_MPIEXEC.format(python=sys.executable))
    script.chmod(0o755)
    log = tmp_path / "log"
    monkeypatch.setenv("MPIEXEC", str(script))
    monkeypatch.setenv("FAKE_LOG", str(log))

    def events():
        return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []
    return events


def dependent_campaign(tmp_path, **spec) -> Path:
    """SNIP (listed first) takes PruneFL's final density; FedAvg is independent."""
    runs = [{"algorithm": "snip", "snip.density": FROM_PRUNEFL}, {"algorithm": "fedavg"},
            {"algorithm": "prunefl"}]
    # the sweep validates every run's config: PruneFL needs a reconfiguration that a later round
    # trains, so 3 rounds (round 1 prunes initially) and one every FL round
    config = {**TINY_CONFIG, "rounds": 3, "prunefl": {"reconfigure_every": 1}}
    return write_campaign(tmp_path, **{"config": config, "seeds": [0, 1], "runs": runs, **spec})


def final_density(path: Path) -> float:
    with h5py.File(path, "r") as f:
        return float(f["rounds/density"][-1])


def test_from_run_links_the_same_seed_and_stays_out_of_the_name(tmp_path, capsys):
    campaign = load_campaign(dependent_campaign(tmp_path))
    snip = {run.name: run for run in campaign.runs}["algorithm=snip_seed=1"]
    assert snip.overrides == {"algorithm": "snip", "seed": 1}
    (source,) = snip.inputs
    assert (source.key, source.run, source.column) == ("snip.density", "algorithm=prunefl_seed=1",
                                                       "density")
    assert source.result == tmp_path / "results" / "algorithm=prunefl_seed=1.h5"
    assert sweep(str(tmp_path / "campaign.yaml"), "--list") == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("algorithm=snip_seed=1"))
    assert line.endswith("  algorithm=snip seed=1 snip.density=<final density of algorithm=prunefl_seed=1>")


def test_local_runs_producers_first_and_passes_their_final_density(tmp_path, fake_mpiexec, capsys):
    path = dependent_campaign(tmp_path)
    assert sweep(str(path), "--local", "--jobs", "2") == 0
    events = fake_mpiexec()
    order = [(event, run) for event, run, _ in events]
    # the producers start first, together (--jobs 2), though SNIP comes first in the file
    assert {run for event, run in order[:2]} == {"algorithm=prunefl_seed=0", "algorithm=prunefl_seed=1"}
    assert all(event == "start" for event, _ in order[:2])
    results = tmp_path / "results"
    for seed in (0, 1):
        # each SNIP run starts only after its PruneFL run has ended ...
        assert order.index(("start", f"algorithm=snip_seed={seed}")) > \
            order.index(("end", f"algorithm=prunefl_seed={seed}"))
        # ... with the final density of that run's results file, read here independently
        sets = next(s for e, run, s in events if e == "start" and run == f"algorithm=snip_seed={seed}")
        density = final_density(results / f"algorithm=prunefl_seed={seed}.h5")
        assert density == pytest.approx(0.1234567891 + seed / 7, abs=0)
        assert sets[-1] == f"snip.density={yaml_value(density)}"
        assert yaml.safe_load(sets[-1].split("=", 1)[1]) == density
    assert "6 runs finished" in capsys.readouterr().out
    # a producer finished earlier: its dependent starts at once, with the same value
    (results / "algorithm=snip_seed=1.h5").unlink()
    assert sweep(str(path), "--local") == 0
    assert fake_mpiexec()[len(events):] == [
        ("start", "algorithm=snip_seed=1", sets), ("end", "algorithm=snip_seed=1", sets)]


def test_a_failed_producer_leaves_its_dependent_not_run(tmp_path, fake_mpiexec, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "algorithm=prunefl_seed=1")
    assert sweep(str(dependent_campaign(tmp_path)), "--local", "--jobs", "2") == 1
    started = [run for event, run, _ in fake_mpiexec() if event == "start"]
    assert "algorithm=snip_seed=0" in started and "algorithm=snip_seed=1" not in started
    assert len(started) == 5
    err = capsys.readouterr().err
    assert "algorithm=snip_seed=1: not run: it takes snip.density from algorithm=prunefl_seed=1, " \
           "which failed" in err
    assert "1 of 6 runs failed: algorithm=prunefl_seed=1; 1 of 6 runs not run: algorithm=snip_seed=1" in err


@pytest.mark.parametrize("spec, key, message", [
    ({"runs": [{"algorithm": "snip", "snip.density": {"from_run": "algorithm=prunefI",
                                                      "column": "density"}}]},
     "snip.density.from_run", "run algorithm=snip_seed=0: 'algorithm=prunefI' is no run"),
    ({"runs": [{"algorithm": "snip", "snip.density": {"from_run": "algorithm=imp", "column": "density"}},
               {"algorithm": "imp", "imp.density": {"from_run": "algorithm=snip", "column": "density"}}]},
     "runs", "algorithm=snip_seed=0 -> algorithm=imp_seed=0 -> algorithm=snip_seed=0"),
    ({"runs": [{"algorithm": "snip", "snip.density": {"from_run": "algorithm=snip", "column": "density"}}]},
     "runs", "run algorithm=snip_seed=0 depends on itself"),
    ({"seeds": None, "runs": [{"algorithm": "prunefl", "seed": 0},
                              {"algorithm": "snip", "seed": 1, "snip.density": FROM_PRUNEFL}]},
     "snip.density.from_run", "run algorithm=snip_seed=1: 'algorithm=prunefl' has no run with seed 1"),
    ({"runs": [{"algorithm": "snip", "snip.density": {"from_run": "algorithm=prunefl"}}]},
     "snip.density.column", "must be a non-empty string"),
    ({"set": {"snip.density": FROM_PRUNEFL}}, "set", "goes in a `runs:` entry"),
    ({"grid": {"snip.density": [FROM_PRUNEFL]}}, "grid", "goes in a `runs:` entry"),
])
def test_from_run_mistakes_exit_2_before_anything_runs(tmp_path, fake_mpiexec, capsys, spec, key,
                                                       message):
    path = write_campaign(tmp_path, **{"seeds": [0], **spec})
    with pytest.raises(ConfigError) as error:
        load_campaign(path)
    assert error.value.key == key and message in error.value.problem
    assert sweep(str(path), "--local") == 2
    assert message in capsys.readouterr().err
    assert fake_mpiexec() == []


def test_slurm_submits_dependents_after_their_producers_tasks(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = dependent_campaign(tmp_path)
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    out = capsys.readouterr().out
    slurm, results = tmp_path / "results" / "slurm", tmp_path / "results"
    (first,) = [t for t in slurm.glob("*.tasks") if "-dep" not in t.name]
    second = first.with_name(first.stem + "-dep1.tasks")

    def rows(table):
        return [line.split("\t") for line in table.read_text().splitlines()
                if not line.startswith("#")]
    assert [row[0] for row in rows(first)] == [f"algorithm={a}_seed={s}" for a in ("fedavg", "prunefl")
                                               for s in (0, 1)]
    assert rows(second) == [[f"algorithm=snip_seed={s}", str(results / f"algorithm=snip_seed={s}.h5"),
                             "algorithm=snip", f"seed={s}",
                             f"snip.density=<final density of {results}/algorithm=prunefl_seed={s}.h5>"]
                            for s in (0, 1)]
    # the producers are tasks 2 and 3 of the first array job
    assert f"job0=$(sbatch --parsable {first.with_suffix('.sbatch')})" in out
    assert (f"job1=$(sbatch --parsable --dependency=afterok:${{job0}}_2:${{job0}}_3 "
            f"--kill-on-invalid-dep=yes {second.with_suffix('.sbatch')})") in out
    for script in (first.with_suffix(".sbatch"), second.with_suffix(".sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # a real submission passes the first job's id on (sbatch and squeue stand-ins on PATH)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/sbatch.log\n'
                                    f'echo $((100 + $(wc -l < {tmp_path}/sbatch.log)))\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert sweep(str(path), "--slurm", "--force") == 0
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert len(calls) == 2 and "--dependency" not in calls[0]
    assert calls[1].split()[:4] == ["--parsable", "--dependency=afterok:101_2:101_3",
                                    "--kill-on-invalid-dep=yes", calls[1].split()[-1]]
    assert "submitted array job 102 (2 tasks, after 2 producer task(s) succeed)" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_slurm_task_fills_in_the_producers_final_density(tmp_path, monkeypatch):
    """The dependent job's script, outside SLURM: mpiexec is a recorder of its argv."""
    recorder = tmp_path / "mpiexec"
    recorder.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    recorder.chmod(0o755)
    monkeypatch.setenv("MPIEXEC", str(recorder))
    monkeypatch.chdir(tmp_path)
    assert sweep(str(dependent_campaign(tmp_path)), "--slurm", "--dry-run") == 0
    (script,) = (tmp_path / "results" / "slurm").glob("*-dep1.sbatch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_NTASKS="2")

    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 2 and not (tmp_path / "argv").exists()     # PruneFL seed 1 not run
    assert "cannot start this run" in job.stderr and "no such results file" in job.stderr

    producer = tmp_path / "results" / "algorithm=prunefl_seed=1.h5"
    with h5py.File(producer, "w") as f:
        f.attrs["config"] = json.dumps({"seed": 1})
        f.create_dataset("rounds/density", data=[1.0, 0.3, 0.271828182845])
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 2 and "has not finished" in job.stderr

    with h5py.File(producer, "a") as f:
        f.attrs["finished"] = "now"
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[-2:] == ["--set", f"snip.density={yaml_value(final_density(producer))}"]
    assert yaml.safe_load(argv[-1].split("=", 1)[1]) == final_density(producer) == 0.271828182845


def test_a_finished_producer_puts_its_dependent_in_the_first_job(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = dependent_campaign(tmp_path, seeds=[0])
    write_result(tmp_path / "results" / "algorithm=prunefl_seed=0.h5", finished=True)
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    assert "--dependency" not in capsys.readouterr().out
    (table,) = (tmp_path / "results" / "slurm").glob("*.tasks")
    assert "snip.density=<final density of" in table.read_text()


def test_slurm_template_without_the_resolve_step_is_refused(tmp_path, capsys):
    template = tmp_path / "old.sbatch"
    template.write_text("#!/bin/bash\n# >>> fedmpi settings\n# <<< fedmpi settings\n")
    assert sweep(str(dependent_campaign(tmp_path)), "--slurm", "--dry-run",
                 "--template", str(template)) == 2
    assert "fedmpi.campaigns.resolve" in capsys.readouterr().err


@pytest.mark.slow
def test_real_snip_run_prunes_to_the_density_its_prunefl_run_ended_with(tmp_path):
    """End to end, with fedmpi itself: PruneFL, then SNIP to PruneFL's final density."""
    config = {**TINY_CONFIG, "rounds": 3, "eval": {"every": 3},
              "prunefl": {"local_steps": 5, "reconfigure_every": 1, "ip_interval": 10,
                          "ip_max_iterations": 60, "ip_patience": 3, "time_constant": 0.05}}
    path = write_campaign(tmp_path, config=config, seeds=[0], runs=[
        {"algorithm": "snip", "snip.density": FROM_PRUNEFL}, {"algorithm": "prunefl"}])
    assert sweep(str(path), "--local", "--ranks", "1") == 0
    results = tmp_path / "results"
    density = final_density(results / "algorithm=prunefl_seed=0.h5")
    assert 0 < density < 1
    with h5py.File(results / "algorithm=snip_seed=0.h5", "r") as f:
        assert json.loads(f.attrs["config"])["snip"]["density"] == density
        assert f["rounds/density"][-1] == pytest.approx(density, abs=1e-3)
