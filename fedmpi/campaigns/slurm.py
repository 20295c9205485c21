"""Submitting a campaign's runs as SLURM array jobs: the task table, the sbatch script rendered
from a template, and waiting for the jobs to leave the queue.

One array job holds every run that can start now. Runs that take a value from a run still to do
(``from_run``, :mod:`.depends`) go into a later array job, submitted with
``--dependency=afterok:`` on the producers' array tasks (and ``--kill-on-invalid-dep=yes``, so a
failed producer cancels it instead of leaving it pending); chains give one more job per step."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedmpi.campaigns.campaign import PACKAGE_ROOT, Campaign, Run
from fedmpi.campaigns.checks import CONTROL, sbatch_value, shown, text
from fedmpi.campaigns.depends import levels
from fedmpi.campaigns.local import missing_runs, mpiexec_path
from fedmpi.errors import ConfigError

SETTINGS_BEGIN = "# >>> fedmpi settings"
SETTINGS_END = "# <<< fedmpi settings"
# The template's step that fills in a value from another run (python -m fedmpi.campaigns.resolve)
RESOLVE_STEP = "fedmpi.campaigns.resolve"


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
    """Write the task tables and sbatch scripts for ``runs`` and submit them as array jobs: one
    for the runs that can start now, then one per step of ``from_run`` dependencies."""
    settings = campaign.slurm
    job_name = f"fedmpi-{campaign.name}"
    _check_job_values()
    if not dry_run and not force:
        queued = _queued_jobs(job_name)
        if queued:
            print(f"job(s) {', '.join(queued)} of this campaign are still queued or running; "
                  "submitting now would start their runs twice. Wait for them, or pass --force.",
                  file=sys.stderr)
            return 1
    try:
        template = settings.template.read_text()
    except OSError as err:
        raise ConfigError("slurm.template", f"cannot read {settings.template}: "
                                            f"{err.strerror}") from err
    if any(run.inputs for run in runs) and RESOLVE_STEP not in template:
        raise ConfigError("slurm.template", f"{settings.template} cannot start a run that takes a "
                                            f"value from another run (from_run): it lacks the "
                                            f"step of fedmpi/jobs/fedmpi-array.sbatch calling "
                                            f"python -m {RESOLVE_STEP}")
    render_sbatch(template, [], {})   # a template it cannot fill in fails before anything is written
    if "\\" in str(campaign.results_dir):
        # sbatch fills in no %A/%a at all in an --output path holding a backslash: every task
        # would write one file
        raise ConfigError("results_dir", f"{campaign.results_dir} holds a backslash, which stops SLURM from "
                                         "naming each task's log (%A_%a.out); choose a path without one")

    level = levels(runs)
    groups = [[run for run in runs if level[run.name] == k] for k in range(max(level.values()) + 1)]
    where = {run.name: (k, i) for k, group in enumerate(groups) for i, run in enumerate(group)}
    job_dir = campaign.results_dir / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = _unused_stem(job_dir)
    jobs = []      # (runs, script, producer tasks as (job, task))
    for k, group in enumerate(groups):
        name = stem if k == 0 else f"{stem}-dep{k}"
        table, script = job_dir / f"{name}.tasks", job_dir / f"{name}.sbatch"
        _write_table(campaign, group, table)
        _write_script(campaign, template, script, table, len(group), job_name, job_dir)
        after = sorted({where[i.run] for run in group for i in run.inputs if i.run in where})
        jobs.append((group, script, after))

    tables = ", ".join(str(script.with_suffix(".tasks")) for _, script, _ in jobs)
    print(f"{len(runs)} runs to submit" + (f" as {len(jobs)} array jobs (runs taking a value "
                                            f"from another run wait for it)" if len(jobs) > 1
                                            else "") + f"; task table{'s' * (len(jobs) > 1)} "
          f"{tables}")
    if dry_run:
        if len(jobs) == 1:
            print(f"dry run, not submitted: {shlex.join(_sbatch_command(jobs[0][1], []))}")
            return 0
        print("dry run, not submitted; in a shell it would be:")
        for k, (_, script, after) in enumerate(jobs):
            ids = [f"${{job{j}}}" for j in range(k)]
            command = " ".join(shlex.quote(arg) if not arg.startswith("--dependency=") else arg
                               for arg in _sbatch_command(script, after, ids))
            print(f"  job{k}=$({command})")
        return 0
    if not shutil.which("sbatch"):
        print("sbatch not found: is SLURM installed here? (--dry-run writes the job without it)",
              file=sys.stderr)
        return 1
    job_ids: list[str] = []
    for group, script, after in jobs:
        sbatch = subprocess.run(_sbatch_command(script, after, job_ids), stdout=subprocess.PIPE,
                                text=True)
        job_id = sbatch.stdout.strip().split(";")[0]
        if sbatch.returncode != 0 or not job_id:
            print(f"sbatch failed with exit status {sbatch.returncode}" + (
                f" (array job(s) {', '.join(job_ids)} submitted before it)" if job_ids else ""),
                file=sys.stderr)
            return sbatch.returncode or 1
        job_ids.append(job_id)
        waits = f", after {len(after)} producer task(s) succeed" if after else ""
        print(f"submitted array job {job_id} ({len(group)} tasks{waits}); logs in {job_dir}",
              flush=True)
    if not wait:
        return 0
    if not all(wait_for_job(job_id) for job_id in job_ids):
        return 1
    left = missing_runs(campaign)
    print(f"job(s) {', '.join(job_ids)} ended; {len(campaign.runs) - len(left)} of "
          f"{len(campaign.runs)} runs finished")
    return 0 if not left else 1


def _check_job_values() -> None:
    """The job's values that come from here, not from the campaign (whose values are checked
    when it is loaded): none may hold a control character (:mod:`.checks`)."""
    cwd = str(Path.cwd())
    if CONTROL.search(cwd):
        raise ConfigError("--chdir", f"the directory the sweep runs in, '{shown(cwd)}', holds a "
                                     f"control character; it is the job's working directory "
                                     f"(#SBATCH --chdir): run the sweep from a directory "
                                     f"without one")
    text(mpiexec_path(), "MPIEXEC")
    text(sys.executable, "FEDMPI_PYTHON")
    text(str(PACKAGE_ROOT), "FEDMPI_ROOT")


def _write_table(campaign: Campaign, runs: list[Run], table: Path) -> None:
    with table.open("w") as out:
        out.write("# run name\tresults file\toverrides (key=value, one per field; "
                  "key=<final COLUMN of FILE>: filled in when the task starts); "
                  "array task i runs line i (counting from 0, comments skipped)\n")
        for run in runs:
            out.write("\t".join([run.name, str(run.result), *campaign.set_args(run)]) + "\n")


def _write_script(campaign: Campaign, template: str, script: Path, table: Path, tasks: int,
                  job_name: str, job_dir: Path) -> None:
    settings = campaign.slurm
    throttle = f"%{settings.max_parallel}" if settings.max_parallel else ""
    # values that may hold spaces, quotes or # are quoted for sbatch; extra_sbatch is the
    # user's own directives, written as given
    directives = [f"--job-name={job_name}", f"--array=0-{tasks - 1}{throttle}",
                  *_layout(settings, campaign.ranks), f"--cpus-per-task={settings.cpus_per_task}",
                  f"--time={sbatch_value(settings.time)}",
                  # %% is sbatch's literal %: a % of the path itself must not become a pattern
                  f"--output={sbatch_value(str(job_dir).replace('%', '%%') + '/%A_%a.out')}",
                  f"--chdir={sbatch_value(str(Path.cwd()))}"]
    if settings.partition:
        directives.append(f"--partition={sbatch_value(settings.partition)}")
    if settings.account:
        directives.append(f"--account={sbatch_value(settings.account)}")
    if settings.gpus_per_task:
        directives.append(f"--gpus-per-task={settings.gpus_per_task}")
    directives += settings.extra_sbatch
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


def _layout(settings, ranks: int) -> list[str]:
    """The directives placing a run's ranks: ``--ntasks``, and across nodes ``--nodes`` (with
    ``--ntasks-per-node`` when the campaign fixes it; otherwise SLURM fills the nodes in order)."""
    directives = [f"--ntasks={ranks}"]
    if settings.nodes is not None:
        directives.append(f"--nodes={settings.nodes}")
    if settings.tasks_per_node is not None:
        directives.append(f"--ntasks-per-node={settings.tasks_per_node}")
    return directives


def _sbatch_command(script: Path, after: list[tuple[int, int]], job_ids=()) -> list[str]:
    """``sbatch --parsable SCRIPT``, after the array tasks ``(job, task)`` (job: an index into
    ``job_ids``) have succeeded."""
    command = ["sbatch", "--parsable"]
    if after:
        tasks = ":".join(f"{job_ids[job]}_{task}" for job, task in after)
        command += [f"--dependency=afterok:{tasks}", "--kill-on-invalid-dep=yes"]
    return [*command, str(script)]


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
