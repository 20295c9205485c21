"""``fedmpi sweep`` checks a campaign before it writes or starts anything: no value reaches the
SLURM job script or task table as a line (or shell word) of its own, and every run's config is
validated the way ``fedmpi run`` will validate it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import TINY

from fedmpi.campaigns import yaml_value
from fedmpi.cli import main as fedmpi_main

INJECTED = "echo INJECTED; touch fedmpi-injected"


def write_campaign(directory: Path, **spec) -> Path:
    """A campaign file with the tiny inline config; a key given as None is left out."""
    spec = {"name": "demo", "config": {**TINY, "rounds": 2}, "results_dir": "results", **spec}
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None},
                                   sort_keys=False))
    return path


def sweep(*args: str) -> int:
    """``fedmpi sweep ARGS``, in this process."""
    return fedmpi_main(["sweep", *args])


@pytest.fixture
def recorder(tmp_path, monkeypatch):
    """MPIEXEC replaced by a script that writes its argv (one per line) to ``argv`` and logs each
    start to ``started``: returns the directory holding those files."""
    script = tmp_path / "mpiexec"
    script.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/started\n'
                      f'printf "%s\\n" "$@" > {tmp_path}/argv\n')
    script.chmod(0o755)
    monkeypatch.setenv("MPIEXEC", str(script))
    return tmp_path


def written_job_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in (".sbatch", ".tasks"))


# -- 3. nothing injected ------------------------------------------------------------------------

def _bad_base(tmp_path):
    config = tmp_path / f"cfg\n{INJECTED}.yaml"
    config.write_text(yaml.safe_dump({**TINY, "rounds": 2}))
    return {"config": None, "base": config.name}


FROM_PRUNEFL = {"from_run": "algorithm=prunefl", "column": "density"}
# PruneFL (adaptive) reconfigures every 5 FL rounds by default, and never after the last round:
# a 3-round run (round 1 prunes initially) must reconfigure after every FL round
PRUNEFL_CONFIG = {**TINY, "rounds": 3, "prunefl": {"reconfigure_every": 1}}

# (what the campaign sets, extra command-line arguments, the key the error must name); every value
# here reaches an #SBATCH line, the task table or the job script's shell commands
INJECTIONS = {
    "partition": (lambda t: {"slurm": {"partition": f"debug\n{INJECTED}"}}, [], "slurm.partition"),
    "partition-cr": (lambda t: {"slurm": {"partition": f"debug\r{INJECTED}"}}, [], "slurm.partition"),
    "partition-tab": (lambda t: {"slurm": {"partition": "debug\t--qos=high"}}, [], "slurm.partition"),
    "account": (lambda t: {"slurm": {"account": f"proj\n{INJECTED}"}}, [], "slurm.account"),
    "time": (lambda t: {"slurm": {"time": f"01:00:00\n{INJECTED}"}}, [], "slurm.time"),
    "extra_sbatch": (lambda t: {"slurm": {"extra_sbatch": ["--qos=long", f"--mem=1G\n{INJECTED}"]}},
                     [], "slurm.extra_sbatch"),
    "modules": (lambda t: {"slurm": {"modules": ["gcc", f"mpi\n{INJECTED}"]}}, [], "slurm.modules"),
    "srun_mpi": (lambda t: {"slurm": {"mpi": "srun", "srun_mpi": f"pmi2\n{INJECTED}"}}, [],
                 "slurm.srun_mpi"),
    "results_dir": (lambda t: {"results_dir": f"results\n{INJECTED}"}, [], "results_dir"),
    "--partition": (lambda t: {}, ["--partition", f"debug\n{INJECTED}"], "--partition"),
    "--account": (lambda t: {}, ["--account", f"proj\n{INJECTED}"], "--account"),
    "--time": (lambda t: {}, ["--time", f"1:00:00\n{INJECTED}"], "--time"),
    "--results-dir": (lambda t: {}, ["--results-dir", f"results\n{INJECTED}"],
                      "--results-dir"),
    "set value": (lambda t: {"set": {"experiment": f"x\n{INJECTED}"}}, [], "set.experiment"),
    "grid value": (lambda t: {"grid": {"data.root": ["/d", f"/d\n{INJECTED}"]}}, [],
                   "grid.data.root"),
    "runs value": (lambda t: {"runs": [{"experiment": "ok"}, {"experiment": f"x\n{INJECTED}"}]},
                   [], "runs.experiment"),
    "grid key": (lambda t: {"grid": {f"rounds\n{INJECTED}": [1]}}, [], "grid.rounds\\n"),
    "from_run column": (lambda t: {"runs": [{"algorithm": "prunefl"}, {
        "algorithm": "snip", "snip.density": {**FROM_PRUNEFL, "column": f"density\n{INJECTED}"}}]},
        [], "runs.snip.density.column"),
    "base": (_bad_base, [], "base"),
}


@pytest.mark.parametrize("case", INJECTIONS)
def test_a_control_character_in_any_value_of_the_job_is_exit_2_and_nothing_is_written(
        tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    spec, args, key = INJECTIONS[case]
    path = write_campaign(tmp_path, **spec(tmp_path))
    assert sweep(str(path), "--slurm", "--dry-run", *args) == 2
    err = capsys.readouterr().err
    assert f"'{key}" in err and "control character" in err, err
    assert written_job_files(tmp_path) == []
    assert not (tmp_path / "results").exists()


def test_a_control_character_in_mpiexec_or_the_current_directory_is_exit_2(
        tmp_path, monkeypatch, capsys):
    path = write_campaign(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPIEXEC", f"/usr/bin/mpiexec\n{INJECTED}")
    assert sweep(str(path), "--slurm", "--dry-run") == 2
    assert "'MPIEXEC'" in capsys.readouterr().err
    monkeypatch.delenv("MPIEXEC")

    workdir = tmp_path / f"work\n{INJECTED}"
    workdir.mkdir()
    monkeypatch.chdir(workdir)   # the job's --chdir
    assert sweep(str(path), "--slurm", "--dry-run") == 2
    assert "'--chdir'" in capsys.readouterr().err
    assert written_job_files(tmp_path) == [] and not (tmp_path / "results").exists()


def test_a_template_without_its_settings_block_is_refused_before_anything_is_written(
        tmp_path, capsys):
    template = tmp_path / "mine.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --mail-type=END\necho no settings block\n")
    path = write_campaign(tmp_path, slurm={"template": template.name})
    assert sweep(str(path), "--slurm", "--dry-run") == 2
    assert "'slurm.template'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


AWKWARD = "it's a \"test\" of $HOME; `true` # not a comment \\ end  "


def test_awkward_legitimate_values_reach_the_run_unchanged(tmp_path, monkeypatch, recorder):
    """Spaces, quotes, $, ;, backticks, # and backslashes in an override, the results directory
    and the current directory: the task's argv, as the job script parses its table line, is the
    one fedmpi run needs, and each --set value reads back as the campaign wrote it."""
    workdir = tmp_path / "work dir #1"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    results = tmp_path / "my results #1 'x'"
    path = write_campaign(tmp_path, results_dir=str(results), seeds=[0, 1],
                          set={"experiment": AWKWARD}, grid={"data.root": ["/d/with space"]})
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    (script,) = (results / "slurm").glob("*.sbatch")

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ARRAY_TASK_ID="1", SLURM_NTASKS="2")
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    result = results / "data.root=-d-with-space_seed=1.h5"
    argv = (recorder / "argv").read_text().splitlines()
    assert argv == ["-n", "2", sys.executable, "-m", "fedmpi", "run",
                    str(results / "campaign-config.yaml"), "--out", str(result), "--resume",
                    "--set", f"experiment={yaml_value(AWKWARD)}", "--set", "data.root=/d/with space",
                    "--set", "seed=1"]
    sets = [argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--set"]
    assert {key: yaml.safe_load(value) for key, value in sets} == {
        "experiment": AWKWARD, "data.root": "/d/with space", "seed": 1}


def test_module_names_are_not_globbed(tmp_path, monkeypatch, recorder):
    """``module load`` gets each module name as written, even where a file matches it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gcc").mkdir()
    (tmp_path / "gcc" / "12.x").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "module").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/modules\n')
    (bin_dir / "module").chmod(0o755)
    path = write_campaign(tmp_path, slurm={"modules": ["gcc/12*", "openmpi"]})
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    (script,) = (tmp_path / "results" / "slurm").glob("*.sbatch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert (tmp_path / "modules").read_text().splitlines() == ["load", "gcc/12*", "openmpi"]


def _sbatch_options(script: Path, directory: Path) -> dict[str, str]:
    """The options sbatch itself reads from the script's #SBATCH lines: ``sbatch -vv --test-only``
    prints them before it tries to reach a controller (none here, so it then fails)."""
    conf = directory / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\nMessageTimeout=1\n"
                    "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=localhost\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["SLURM_CONF"] = str(conf)
    run = subprocess.run(["sbatch", "-vv", "--test-only", str(script)], env=env,
                         capture_output=True, text=True, timeout=60)
    lines = run.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if "defined options" in line), None)
    assert start is not None, f"sbatch did not read the script: {run.stderr}"
    options = {}
    for line in lines[start + 2:]:
        if "end of defined options" in line:
            break
        name, _, value = line.removeprefix("sbatch: ").partition(":")
        options[name.strip()] = value.strip()
    return options


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch not installed")
def test_sbatch_reads_each_directive_as_written(tmp_path, monkeypatch):
    """A results directory, a current directory and an account with spaces, quotes and # reach
    sbatch whole, and the template's own directives (--requeue, --signal, --open-mode) are still read."""
    workdir = tmp_path / "work dir #1"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    results = tmp_path / "my results #1 at 100%j"    # % stays itself: sbatch's %% in --output
    path = write_campaign(tmp_path, results_dir=str(results),
                          slurm={"partition": "debug", "account": "proj \"#2\"", "time": "00:30:00"})
    assert sweep(str(path), "--slurm", "--dry-run") == 0
    (script,) = (results / "slurm").glob("*.sbatch")
    options = _sbatch_options(script, tmp_path)
    assert options["output"] == f"{results}/slurm/%A_%a.out".replace("100%j", "100%%j")
    assert options["chdir"] == str(workdir)
    assert (options["partition"], options["account"], options["time"]) == \
        ("debug", 'proj "#2"', "00:30:00")
    assert options["requeue"] == "requeue" and options["signal"] == "B:USR1@120"
    assert options["open-mode"] == "a"


def test_a_backslash_in_the_results_directory_is_refused_before_anything_is_written(tmp_path):
    """sbatch fills in no %A/%a in an --output path holding a backslash: every task of the array
    would append to one log."""
    results = tmp_path / "res\\ults"
    path = write_campaign(tmp_path, results_dir=str(results))
    assert sweep(str(path), "--slurm", "--dry-run") == 2
    assert not results.exists()


# -- 4. every run's config checked before anything runs -----------------------------------------

# (campaign, the run the error must name, the key it must name)
BAD_RUNS = {
    "unknown key in grid": ({"grid": {"local.lrr": [0.1]}}, "local.lrr=0.1", "local.lrr"),
    "bad type in grid": ({"grid": {"rounds": [1, "x"]}}, "rounds=x", "rounds"),
    "bad value in one run": ({"runs": [{"local.lr": 0.1}, {"local.lr": -1}]}, "local.lr=-1",
                             "local.lr"),
}
MODES = {"--list": ["--list"], "--slurm": ["--slurm", "--dry-run"], "--local": ["--local"]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BAD_RUNS)
def test_a_bad_run_config_is_exit_2_naming_run_and_key_before_anything(
        tmp_path, monkeypatch, capsys, recorder, case, mode):
    monkeypatch.chdir(tmp_path)
    spec, run, key = BAD_RUNS[case]
    path = write_campaign(tmp_path, seeds=[0], **spec)
    assert sweep(str(path), *MODES[mode]) == 2
    err = capsys.readouterr().err
    assert f"config key '{key}'" in err and f"run {run}_seed=0" in err, err
    assert not (tmp_path / "results").exists()           # no table, script, config or result
    assert not (recorder / "started").exists()            # no run started


def test_the_message_says_how_many_runs_fail(tmp_path, capsys):
    path = write_campaign(tmp_path, seeds=[0, 1, 2], grid={"rounds": [1, 0]})
    assert sweep(str(path), "--list") == 2
    err = capsys.readouterr().err
    assert "run rounds=0_seed=0: must be at least 1" in err
    assert "3 of 6 runs" in err and "rounds=0_seed=1" in err and "rounds=1_seed" not in err


@pytest.mark.parametrize("key, problem", [("snip.densty", "unknown key"),
                                          ("rounds", "must be int")])
def test_a_value_from_another_run_is_checked_for_its_key(tmp_path, capsys, key, problem):
    """The value is not known before the producer finished, but it is a number: a key that does
    not exist, or takes no number, fails now."""
    path = write_campaign(tmp_path, config=PRUNEFL_CONFIG, seeds=[0], runs=[
        {"algorithm": "prunefl"}, {"algorithm": "snip", key: FROM_PRUNEFL}])
    assert sweep(str(path), "--list") == 2
    err = capsys.readouterr().err
    assert f"config key '{key}'" in err and "run algorithm=snip_seed=0" in err and problem in err


def test_a_value_from_another_run_passes_where_a_number_fits(tmp_path, capsys):
    path = write_campaign(tmp_path, config=PRUNEFL_CONFIG, seeds=[0, 1], runs=[
        {"algorithm": "prunefl"}, {"algorithm": "snip", "snip.density": FROM_PRUNEFL},
        {"algorithm": "fedavg", "local.lr": -1}])
    assert sweep(str(path), "--list") == 2          # the bad one is the FedAvg run, not SNIP
    err = capsys.readouterr().err
    assert "run algorithm=fedavg_local.lr=-1_seed=0" in err and "snip" not in err


def test_a_hundred_runs_are_checked_without_building_data_or_models(tmp_path, monkeypatch, capsys):
    """Checking loads configs only: data loading and model building fail here if called."""
    import torch

    import fedmpi.data

    def forbidden(*args, **kwargs):
        raise AssertionError("the campaign check built a data set or a model")

    monkeypatch.setattr(fedmpi.data, "load_dataset", forbidden)
    monkeypatch.setattr(torch.nn.Module, "__init__", forbidden)
    path = write_campaign(tmp_path, seeds=10, grid={
        "local.lr": [0.01 * (i + 1) for i in range(5)], "rounds": [1, 2]}, runs=[
        {"local.lr": 0.5, "rounds": 3}, {"local.lr": 0.5, "rounds": 0}])
    assert sweep(str(path), "--list") == 2
    err = capsys.readouterr().err
    assert "run local.lr=0.5_rounds=0_seed=0" in err and "10 of 120 runs" in err


def test_a_malformed_base_config_is_named_once_as_the_file_not_as_each_runs_key(tmp_path, capsys):
    """Every run loads the same broken file: the message is the YAML error with the file's path,
    line and column, not "config key '<file>': run …" for some run."""
    base = tmp_path / "base.yaml"
    base.write_text("rounds: [1, 2\n")
    path = write_campaign(tmp_path, config=None, base=base.name, seeds=[0, 1])
    assert sweep(str(path), "--list") == 2
    err = capsys.readouterr().err
    assert f"{base}: not valid YAML at line 2, column 1" in err
    assert "config key" not in err and "run " not in err


# -- runs across nodes ---------------------------------------------------------------------------

def sbatch_directives(tmp_path: Path) -> list[str]:
    (script,) = (tmp_path / "results" / "slurm").glob("*.sbatch")
    return [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("slurm, args, expected", [
    ({"nodes": 2, "tasks_per_node": 3}, [], ["--ntasks=6", "--nodes=2", "--ntasks-per-node=3"]),
    ({"nodes": 3}, ["--ranks", "4"], ["--ntasks=4", "--nodes=3"]),
    ({}, [], ["--ntasks=6"]),
])
def test_nodes_and_tasks_per_node_become_the_jobs_layout(tmp_path, monkeypatch, slurm, args, expected):
    monkeypatch.chdir(tmp_path)
    path = write_campaign(tmp_path, ranks=6, slurm=slurm)
    assert sweep(str(path), "--slurm", "--dry-run", *args) == 0
    layout = [d for d in sbatch_directives(tmp_path) if d.startswith(("--ntasks", "--nodes"))]
    assert layout == expected


@pytest.mark.parametrize("slurm, args, key", [
    ({"nodes": 2, "tasks_per_node": 2}, [], "slurm.tasks_per_node"),          # 4 is not 6
    ({"nodes": 2, "tasks_per_node": 3}, ["--ranks", "4"], "slurm.tasks_per_node"),
    ({"nodes": 7}, [], "slurm.nodes"),                                        # a node without a rank
    ({"nodes": 0}, [], "slurm.nodes"),
])
def test_a_layout_that_does_not_fit_the_ranks_is_exit_2_naming_the_key(tmp_path, monkeypatch, capsys,
                                                                       slurm, args, key):
    monkeypatch.chdir(tmp_path)
    path = write_campaign(tmp_path, ranks=6, slurm=slurm)
    assert sweep(str(path), "--slurm", "--dry-run", *args) == 2
    assert f"'{key}'" in capsys.readouterr().err
    assert written_job_files(tmp_path) == []
