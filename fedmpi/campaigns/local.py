"""Running a campaign's runs here, one after another under ``mpiexec``, and listing their status."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmpi.campaigns.campaign import PACKAGE_ROOT, Campaign, Run
from fedmpi.errors import PreemptedError
from fedmpi.results import run_status


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


def run_local(campaign: Campaign, runs: list[Run], jobs: int = 1) -> int:
    """Run ``runs`` under mpiexec, ``jobs`` at a time (each with ``campaign.ranks`` ranks), in
    campaign order; stop launching at a pre-emption (exit 75, ``PreemptedError.exit_code``).
    Several jobs fill the cores when runs are small (e.g. ``--ranks 1 --jobs 2`` on 2 cores)."""
    campaign.results_dir.mkdir(parents=True, exist_ok=True)
    env = run_env()
    config = campaign.config_path()
    failed, running, preempted = [], {}, False
    pending = list(enumerate(runs, 1))

    def forward_sigterm(*_):   # each run checkpoints and exits 75 instead of being orphaned
        for child in running:
            child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        while pending or running:
            while pending and len(running) < jobs and not preempted:
                index, run = pending.pop(0)
                command = [mpiexec_path(), "-n", str(campaign.ranks), sys.executable, "-m", "fedmpi",
                           *campaign.run_args(run, config)]
                print(f"[{index}/{len(runs)}] {run.name}: {shlex.join(command)}", flush=True)
                running[subprocess.Popen(command, env=env)] = run
            if not running:
                break
            child = _wait_any(running)
            run, status = running.pop(child), child.returncode
            if status == PreemptedError.exit_code:
                preempted = True
                print(f"{run.name}: pre-empted, checkpoint written; run the sweep again to resume",
                      file=sys.stderr)
            elif status != 0:
                print(f"{run.name}: failed with exit status {status}", file=sys.stderr)
                failed.append(run.name)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if preempted:
        return PreemptedError.exit_code
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"{len(runs)} runs finished")
    return 0


def _wait_any(children: dict) -> subprocess.Popen:
    """The first child to end (polling: children are few and runs last minutes)."""
    while True:
        for child in children:
            if child.poll() is not None:
                return child
        time.sleep(0.2)
