"""Experiment campaigns: expand a campaign file into named runs, then list them, run the missing
ones locally under ``mpiexec``, or submit them as one SLURM array job.

A campaign file (YAML; paths in it are relative to the file)::

    name: tiny-demo            # results go to results/<name>/<run-name>.h5 (or results_dir)
    base: ../bench/some.yaml   # the config every run starts from ... or an inline `config:` mapping
    set: {rounds: 50}          # overrides common to every run (not part of the run names)
    ranks: 2                   # MPI ranks per run
    seeds: [0, 1, 2]           # or a count: `seeds: 3` means 0, 1, 2
    grid:                      # cartesian product of dotted-key overrides
      algorithm: [fedavg, fedavgm]
    runs:                      # and/or an explicit list of override mappings
      - {algorithm: feddst, sparsity: 0.8}
    slurm: {partition: debug, time: "01:00:00", ...}   # see SlurmSettings

Every run is (one grid point or one entry of ``runs``) x (one seed). Its name lists its own
overrides sorted by key, seed last: ``algorithm=fedavgm_seed=1``. A run is finished when its
results file carries the ``finished`` attribute; finished runs are never started again.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmpi.config import flatten
from fedmpi.errors import ConfigError, FedmpiError
from fedmpi.results import run_status

PREEMPTED_EXIT = 75
# The directory holding the fedmpi package: the ranks import it from there (it need not be installed).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = PACKAGE_ROOT / "jobs" / "fedmpi-array.sbatch"
CAMPAIGN_KEYS = {"name", "base", "config", "set", "ranks", "seeds", "grid", "runs", "results_dir",
                 "slurm"}
# Long names are cut and made unique with a hash: file systems limit a name to 255 bytes.
MAX_NAME_LENGTH = 120
SETTINGS_BEGIN = "# >>> fedmpi settings"
SETTINGS_END = "# <<< fedmpi settings"


@dataclass
class SlurmSettings:
    """How the array job asks for resources and starts the ranks (campaign's ``slurm:`` block)."""

    partition: str | None = None
    account: str | None = None
    time: str = "01:00:00"
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    modules: list[str] = field(default_factory=list)
    mpi: str = "mpiexec"            # how ranks start inside the job: "mpiexec" or "srun"
    srun_mpi: str = "pmi2"          # srun --mpi=... when mpi is "srun"
    max_parallel: int | None = None  # at most this many array tasks at once (--array=...%N)
    extra_sbatch: list[str] = field(default_factory=list)  # more directives, e.g. "--qos=long"
    template: Path = DEFAULT_TEMPLATE


@dataclass(frozen=True)
class Run:
    """One experiment of a campaign: its own overrides (seed included) and its results file."""

    name: str
    overrides: dict
    result: Path

    def set_args(self) -> list[str]:
        """The overrides as ``key=value`` strings, values written as YAML scalars."""
        return [f"{key}={yaml_value(value)}" for key, value in self.overrides.items()]


@dataclass
class Campaign:
    """A parsed campaign file."""

    name: str
    base: Path | None       # config file every run starts from, or None with an inline config
    inline_config: dict | None
    common: dict            # overrides for every run (`set:`)
    ranks: int
    results_dir: Path
    runs: list[Run]
    slurm: SlurmSettings

    def config_path(self) -> Path:
        """The config file handed to ``fedmpi run``; an inline config is written out first."""
        if self.base is not None:
            return self.base
        path = self.results_dir / "campaign-config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.inline_config, sort_keys=False))
        return path

    def set_args(self, run: Run) -> list[str]:
        """All ``--set`` values of ``run``: the common ones, then the run's own."""
        return [f"{k}={yaml_value(v)}" for k, v in self.common.items()] + run.set_args()

    def run_args(self, run: Run, config: Path) -> list[str]:
        """Arguments after ``python -m fedmpi``: run the experiment, resuming a checkpoint."""
        sets = [arg for item in self.set_args(run) for arg in ("--set", item)]
        return ["run", str(config), *sets, "--out", str(run.result), "--resume"]


def yaml_value(value) -> str:
    """``value`` written as a one-line YAML value, so ``--set`` reads back exactly ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return text.removesuffix("\n...\n").strip()


def _name_part(value) -> str:
    if isinstance(value, bool) or value is None:
        return yaml_value(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_name_part(v) for v in value)
    return str(value)


def run_name(overrides: dict) -> str:
    """Stable, readable, file-system-safe name: ``key=value`` pairs sorted by key, seed last."""
    keys = sorted(overrides, key=lambda k: (k == "seed", k))
    name = "_".join(f"{k}={_name_part(overrides[k])}" for k in keys) or "base"
    name = re.sub(r"[^A-Za-z0-9.,+=_-]", "-", name)
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode())
        name = f"{name[:MAX_NAME_LENGTH - 11]}_{digest.hexdigest()[:10]}"
    return name


def _seed_list(seeds) -> list[int] | None:
    if seeds is None:
        return None
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0:
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                  for s in seeds):
        return seeds
    raise ConfigError("seeds", f"must be a positive count or a non-empty list of integers, "
                               f"got {seeds!r}")


def expand_overrides(grid: dict | None, runs: list | None, seeds) -> list[dict]:
    """Every run's own overrides: (grid points, then explicit runs) x seeds, duplicates dropped."""
    points = []
    if grid:
        if not isinstance(grid, dict):
            raise ConfigError("grid", "must be a mapping of dotted key -> list of values")
        axes = flatten(grid)
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}", f"must be a non-empty list, got {values!r}")
        points += [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    if runs:
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ConfigError("runs", "must be a list of mappings of dotted key -> value")
        points += [flatten(r) for r in runs]
    if not points:
        points = [{}]

    seed_list = _seed_list(seeds)
    expanded = []
    for point in points:
        if seed_list is None:
            expanded.append(point)
            continue
        if "seed" in point:
            raise ConfigError("seeds", "given both as `seeds` and inside grid/runs; use one")
        expanded += [{**point, "seed": seed} for seed in seed_list]

    unique = []
    for overrides in expanded:
        if overrides not in unique:
            unique.append(overrides)
    return unique


def _positive_int(value, key: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ConfigError(key, f"must be a {'non-negative' if allow_zero else 'positive'} "
                               f"integer, got {value!r}")
    return value


def _slurm_settings(block, campaign_dir: Path) -> SlurmSettings:
    if block is None:
        return SlurmSettings()
    if not isinstance(block, dict):
        raise ConfigError("slurm", "must be a mapping")
    known = set(SlurmSettings.__dataclass_fields__)
    unknown = set(block) - known
    if unknown:
        raise ConfigError(f"slurm.{sorted(unknown)[0]}", f"unknown; known keys: {sorted(known)}")
    settings = SlurmSettings(**{k: v for k, v in block.items() if v is not None})
    if settings.mpi not in ("mpiexec", "srun"):
        raise ConfigError("slurm.mpi", f"must be 'mpiexec' or 'srun', got {settings.mpi!r}")
    _positive_int(settings.cpus_per_task, "slurm.cpus_per_task")
    _positive_int(settings.gpus_per_task, "slurm.gpus_per_task", allow_zero=True)
    if settings.max_parallel is not None:
        _positive_int(settings.max_parallel, "slurm.max_parallel")
    for key in ("modules", "extra_sbatch"):
        if not isinstance(getattr(settings, key), list):
            raise ConfigError(f"slurm.{key}", "must be a list")
    settings.time = str(settings.time)
    settings.template = (campaign_dir / settings.template).resolve()
    return settings


def load_campaign(path, results_dir=None) -> Campaign:
    """Read and check a campaign file; ``results_dir`` (a command-line flag) wins over the file's."""
    source = Path(path).resolve()
    try:
        spec = yaml.safe_load(source.read_text())
    except OSError as err:
        raise ConfigError("campaign", f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError("campaign", f"{path} is not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise ConfigError("campaign", f"{path} must hold a mapping")
    unknown = set(spec) - CAMPAIGN_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown campaign key; known: {sorted(CAMPAIGN_KEYS)}")

    name = spec.get("name", source.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise ConfigError("name", f"must be a non-empty file-system-safe string, got {name!r}")

    here = source.parent
    if ("base" in spec) == ("config" in spec):
        raise ConfigError("base", "give exactly one of `base` (a config file) or `config` "
                                  "(an inline mapping)")
    base = inline = None
    if "base" in spec:
        base = (here / str(spec["base"])).resolve()
        if not base.is_file():
            raise ConfigError("base", f"config file {base} does not exist")
    else:
        inline = spec["config"]
        if not isinstance(inline, dict):
            raise ConfigError("config", "must be a mapping")
    common = spec.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError("set", "must be a mapping of dotted key -> value")

    if results_dir is not None:
        results = Path(results_dir).resolve()
    elif "results_dir" in spec:
        results = (here / str(spec["results_dir"])).resolve()
    else:
        results = (Path.cwd() / "results" / name).resolve()

    runs, overrides_by_name = [], {}
    for overrides in expand_overrides(spec.get("grid"), spec.get("runs"), spec.get("seeds")):
        run_id = run_name(overrides)
        if run_id in overrides_by_name:
            raise ConfigError("runs", f"{overrides_by_name[run_id]} and {overrides} both get the "
                                      f"name {run_id!r}; make them differ in a named value")
        overrides_by_name[run_id] = overrides
        runs.append(Run(run_id, overrides, results / f"{run_id}.h5"))

    return Campaign(name=name, base=base, inline_config=inline,
                    common=flatten(common), ranks=_positive_int(spec.get("ranks", 1), "ranks"),
                    results_dir=results, runs=runs,
                    slurm=_slurm_settings(spec.get("slurm"), here))


def mpiexec_path() -> str:
    """``$MPIEXEC``, else the mpiexec beside this Python (the venv's MPI), else the one on PATH."""
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec") or "mpiexec"


def run_env() -> dict:
    """The environment for the ranks: this fedmpi importable, one OpenMP/BLAS thread per rank
    (the ranks already fill the cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def list_runs(campaign: Campaign) -> int:
    """Print every run: name, status and overrides; then a count per status."""
    counts = {"finished": 0, "partial": 0, "missing": 0}
    width = max(len(run.name) for run in campaign.runs)
    for run in campaign.runs:
        status = run_status(run.result)
        counts[status] += 1
        print(f"{run.name:<{width}}  {status:<8}  {' '.join(run.set_args())}")
    print(f"{len(campaign.runs)} runs in {campaign.results_dir}: "
          + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 0


def missing_runs(campaign: Campaign) -> list[Run]:
    """Runs without a finished results file, in campaign order."""
    return [run for run in campaign.runs if run_status(run.result) != "finished"]


def run_local(campaign: Campaign, runs: list[Run]) -> int:
    """Run ``runs`` one after another under mpiexec; stop at a pre-emption (exit 75)."""
    campaign.results_dir.mkdir(parents=True, exist_ok=True)
    env = run_env()
    config = campaign.config_path()
    failed = []
    for index, run in enumerate(runs, 1):
        command = [mpiexec_path(), "-n", str(campaign.ranks), sys.executable, "-m", "fedmpi",
                   *campaign.run_args(run, config)]
        print(f"[{index}/{len(runs)}] {run.name}: {shlex.join(command)}", flush=True)
        child = subprocess.Popen(command, env=env)
        # Pass a SIGTERM on to the run so it checkpoints and exits 75 instead of being orphaned.
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            status = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        if status == PREEMPTED_EXIT:
            print(f"{run.name}: pre-empted, checkpoint written; run the sweep again to resume",
                  file=sys.stderr)
            return PREEMPTED_EXIT
        if status != 0:
            print(f"{run.name}: failed with exit status {status}", file=sys.stderr)
            failed.append(run.name)
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(runs)} runs finished")
    return 0


def render_sbatch(template: str, directives: list[str], settings: dict) -> str:
    """The template with our ``#SBATCH`` directives and its settings block filled in.

    Template directives for options we set are dropped (ours go first, right after the shebang);
    its other directives, e.g. a hand-added ``--mail-type``, are kept.
    """
    def option(directive: str) -> str:
        return directive.split("=", 1)[0].split()[0] if directive.strip() else ""

    ours = {option(d) for d in directives}
    lines = template.splitlines()
    if not lines or not lines[0].startswith("#!"):
        raise ConfigError("slurm.template", "must start with a #! line")
    try:
        begin, end = lines.index(SETTINGS_BEGIN), lines.index(SETTINGS_END)
    except ValueError:
        raise ConfigError("slurm.template", f"needs the lines '{SETTINGS_BEGIN}' and "
                                            f"'{SETTINGS_END}' around its settings") from None
    body = [line for line in lines[1:begin]
            if not (line.startswith("#SBATCH ") and option(line[len("#SBATCH "):]) in ours)]
    filled = [f"{key}={shlex.quote(str(value))}" for key, value in settings.items()]
    return "\n".join([lines[0], *(f"#SBATCH {d}" for d in directives), *body,
                      lines[begin], *filled, *lines[end:]]) + "\n"


def _unused_stem(directory: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem, n = stamp, 1
    while (directory / f"{stem}.tasks").exists():
        n += 1
        stem = f"{stamp}-{n}"
    return stem


def _queued_jobs(job_name: str) -> list[str]:
    """Ids of this campaign's jobs still pending or running (empty when squeue is unavailable)."""
    if not shutil.which("squeue"):
        return []
    result = subprocess.run(["squeue", "-h", "--name", job_name, "-o", "%A"],
                            capture_output=True, text=True)
    return sorted(set(result.stdout.split())) if result.returncode == 0 else []


def submit_slurm(campaign: Campaign, runs: list[Run], wait: bool, dry_run: bool,
                 force: bool) -> int:
    """Write the task table and sbatch script for ``runs`` and submit them as one array job."""
    settings = campaign.slurm
    job_name = f"fedmpi-{campaign.name}"
    if not dry_run and not force:
        queued = _queued_jobs(job_name)
        if queued:
            print(f"job(s) {', '.join(queued)} of this campaign are still queued or running; "
                  "submitting now would start their runs twice. Wait for them, or pass --force.",
                  file=sys.stderr)
            return 1

    job_dir = campaign.results_dir / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = _unused_stem(job_dir)
    table, script = job_dir / f"{stem}.tasks", job_dir / f"{stem}.sbatch"
    with table.open("w") as out:
        out.write("# run name\tresults file\toverrides (key=value, one per field); "
                  "array task i runs line i (counting from 0, comments skipped)\n")
        for run in runs:
            out.write("\t".join([run.name, str(run.result), *campaign.set_args(run)]) + "\n")

    throttle = f"%{settings.max_parallel}" if settings.max_parallel else ""
    directives = [f"--job-name={job_name}", f"--array=0-{len(runs) - 1}{throttle}",
                  f"--ntasks={campaign.ranks}", f"--cpus-per-task={settings.cpus_per_task}",
                  f"--time={settings.time}", f"--output={job_dir}/%A_%a.out",
                  f"--chdir={Path.cwd()}"]
    if settings.partition:
        directives.append(f"--partition={settings.partition}")
    if settings.account:
        directives.append(f"--account={settings.account}")
    if settings.gpus_per_task:
        directives.append(f"--gpus-per-task={settings.gpus_per_task}")
    directives += settings.extra_sbatch
    try:
        template = settings.template.read_text()
    except OSError as err:
        raise ConfigError("slurm.template", f"cannot read {settings.template}: "
                                            f"{err.strerror}") from err
    script.write_text(render_sbatch(template, directives, {
        "FEDMPI_TASKS": table,
        "FEDMPI_CONFIG": campaign.config_path(),
        "FEDMPI_PYTHON": sys.executable,
        "FEDMPI_ROOT": PACKAGE_ROOT,
        "FEDMPI_LAUNCHER": settings.mpi,
        "FEDMPI_MPIEXEC": mpiexec_path(),
        "FEDMPI_SRUN_MPI": settings.srun_mpi,
        "FEDMPI_MODULES": " ".join(settings.modules),
    }))

    command = ["sbatch", "--parsable", str(script)]
    print(f"{len(runs)} runs to submit; task table {table}")
    if dry_run:
        print(f"dry run, not submitted: {shlex.join(command)}")
        return 0
    if not shutil.which("sbatch"):
        print("sbatch not found: is SLURM installed here? (--dry-run writes the job without it)",
              file=sys.stderr)
        return 1
    sbatch = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    job_id = sbatch.stdout.strip().split(";")[0]
    if sbatch.returncode != 0 or not job_id:
        print(f"sbatch failed with exit status {sbatch.returncode}", file=sys.stderr)
        return sbatch.returncode or 1
    print(f"submitted array job {job_id} ({len(runs)} tasks); logs in {job_dir}", flush=True)
    if not wait:
        return 0
    if not wait_for_job(job_id):
        return 1
    left = missing_runs(campaign)
    print(f"job {job_id} ended; {len(campaign.runs) - len(left)} of {len(campaign.runs)} runs "
          "finished")
    return 0 if not left else 1


def wait_for_job(job_id: str) -> bool:
    """Block until the job (every array task, requeued ones included) has left the queue.

    Polls squeue after a tenth of the time waited so far (1 s at least, 30 s at most), so the
    end is seen at most ~10% late without polling a busy controller often. Not ``sbatch --wait``:
    its poll interval keeps doubling, so it noticed a 12 s job only after 42 s.
    False when squeue keeps failing.
    """
    started, failures = time.monotonic(), 0
    while failures < 10:
        time.sleep(min(max(1.0, 0.1 * (time.monotonic() - started)), 30.0))
        squeue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"],
                                capture_output=True, text=True)
        if squeue.returncode == 0 and not squeue.stdout.strip():
            return True
        if "Invalid job id" in squeue.stderr:  # already purged from the controller's memory
            return True
        failures = 0 if squeue.returncode == 0 else failures + 1
    print(f"squeue failed 10 times in a row, stopped waiting for job {job_id}: "
          f"{squeue.stderr.strip()}", file=sys.stderr)
    return False


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sweep`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "sweep", help="list, run or submit the runs of a campaign file",
        description="Expand a campaign file into runs; list them, run the missing ones here, or "
                    "submit them as one SLURM array job. Finished runs are always skipped.")
    _add_arguments(parser)
    parser.set_defaults(func=sweep_main)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("campaign", help="campaign YAML file")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true",
                        help="show every run's name, status (finished/partial/missing), overrides")
    action.add_argument("--local", action="store_true",
                        help="run the missing runs one after another under mpiexec")
    action.add_argument("--slurm", action="store_true",
                        help="submit the missing runs as one SLURM array job")
    parser.add_argument("--results-dir", help="where result files go (default: the campaign's "
                                              "results_dir, else results/<name>)")
    parser.add_argument("--ranks", type=int, help="MPI ranks per run (overrides the campaign)")
    slurm = parser.add_argument_group("with --slurm (override the campaign's slurm: block)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", help="time limit per run, e.g. 02:00:00")
    slurm.add_argument("--template", help="sbatch template (default jobs/fedmpi-array.sbatch)")
    slurm.add_argument("--wait", action="store_true",
                       help="block until the array job has ended; exit 0 if every run finished")
    slurm.add_argument("--dry-run", action="store_true",
                       help="write the task table and sbatch script but do not submit")
    slurm.add_argument("--force", action="store_true",
                       help="submit even if a job of this campaign is still queued")


def sweep_main(args: argparse.Namespace) -> int:
    """Entry point of ``fedmpi sweep``; returns the exit status."""
    try:
        campaign = load_campaign(args.campaign, args.results_dir)
        if args.ranks is not None:
            campaign.ranks = _positive_int(args.ranks, "--ranks")
        for flag in ("partition", "account", "time"):
            if getattr(args, flag):
                setattr(campaign.slurm, flag, getattr(args, flag))
        if args.template:
            campaign.slurm.template = Path(args.template).resolve()

        if args.list:
            return list_runs(campaign)
        todo = missing_runs(campaign)
        if not todo:
            print(f"all {len(campaign.runs)} runs of {campaign.name} are finished; nothing to do")
            return 0
        if args.local:
            return run_local(campaign, todo)
        return submit_slurm(campaign, todo, args.wait, args.dry_run, args.force)
    except FedmpiError as err:
        print(f"fedmpi sweep: {err}", file=sys.stderr)
        return err.exit_code


def main(argv=None) -> int:
    """``python -m fedmpi.sweep ...``: the same as ``fedmpi sweep ...``."""
    parser = argparse.ArgumentParser(prog="fedmpi sweep")
    _add_arguments(parser)
    return sweep_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
