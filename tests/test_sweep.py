"""Campaign files: expansion into runs, run names, statuses, skipping finished runs, and the
SLURM job files (the real scheduler is in test_slurm.py)."""

from __future__ import annotations

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
