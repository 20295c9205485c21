"""Submitting a campaign's runs as one SLURM array job: the task table, the sbatch script
rendered from a template, and waiting for the job to leave the queue."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedmpi.campaigns.campaign import PACKAGE_ROOT, Campaign, Run
from fedmpi.campaigns.local import missing_runs, mpiexec_path
from fedmpi.errors import ConfigError

SETTINGS_BEGIN = "# >>> fedmpi settings"
SETTINGS_END = "# <<< fedmpi settings"


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
