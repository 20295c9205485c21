"""Running a campaign's runs here under ``mpiexec`` (several at a time with ``jobs``, a run that
takes a value from another run after that one), and listing their status."""
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
from fedmpi.campaigns.depends import resolve
from fedmpi.errors import DataError, PreemptedError
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
    """Print every run: name, status and overrides (a value from another run as
    ``key=<final COLUMN of RUN>``); then a count per status."""
    counts = {"finished": 0, "partial": 0, "missing": 0}
    width = max(len(run.name) for run in campaign.runs)
    for run in campaign.runs:
        status = run_status(run.result)
        counts[status] += 1
        print(f"{run.name:<{width}}  {status:<8}  {' '.join(run.set_args() + run.input_args())}")
    print(f"{len(campaign.runs)} runs in {campaign.results_dir}: "
          + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 0


def missing_runs(campaign: Campaign) -> list[Run]:
    """Runs without a finished results file, in campaign order."""
    return [run for run in campaign.runs if run_status(run.result) != "finished"]


def run_local(campaign: Campaign, runs: list[Run], jobs: int = 1) -> int:
    """Run ``runs`` under mpiexec, ``jobs`` at a time (each with ``campaign.ranks`` ranks);
    stop launching at a pre-emption (exit 75, ``PreemptedError.exit_code``). Several jobs fill
    the cores when runs are small (e.g. ``--ranks 1 --jobs 2`` on 2 cores).

    Runs that others take a value from (``from_run``) start first, the rest in campaign order.
    A run that takes a value starts once its producers have finished, with the value read from
    their results and passed as ``--set key=value``; if a producer failed (or its value cannot be
    read) the run is not started, and reported with the reason.
    """
    campaign.results_dir.mkdir(parents=True, exist_ok=True)
    env = run_env()
    config = campaign.config_path()
    failed, not_run, running, preempted = [], {}, {}, False
    todo = {run.name for run in runs}
    producers = {i.run for run in runs for i in run.inputs if i.run in todo}
    pending = sorted(runs, key=lambda run: run.name not in producers)   # stable: campaign order
    succeeded, launched = set(), 0

    def waiting(run: Run) -> bool:
        return any(i.run in todo and i.run not in succeeded for i in run.inputs)

    def drop_orphans() -> None:   # runs whose producer failed or was not run, transitively
        lost = True
        while lost:
            lost = False
            for run in list(pending):
                gone = next((i for i in run.inputs if i.run in not_run
                             or i.run in failed), None)
                if gone is not None:
                    pending.remove(run)
                    why = "failed" if gone.run in failed else "was not run"
                    not_run[run.name] = f"it takes {gone.key} from {gone.run}, which {why}"
                    lost = True

    def forward_sigterm(*_):   # each run checkpoints and exits 75 instead of being orphaned
        for child in running:
            child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        while pending or running:
            drop_orphans()
            while len(running) < jobs and not preempted:
                run = next((run for run in pending if not waiting(run)), None)
                if run is None:
                    break
                pending.remove(run)
                try:
                    values = resolve(run.inputs)
                except DataError as err:
                    not_run[run.name] = f"its value from another run cannot be read: {err}"
                    drop_orphans()
                    continue
                launched += 1
                command = [mpiexec_path(), "-n", str(campaign.ranks), sys.executable, "-m", "fedmpi",
                           *campaign.run_args(run, config, values)]
                taken = "".join(f" ({arg}: final {i.column} of {i.run})"
                                for i, arg in zip(run.inputs, run.input_args(values)))
                print(f"[{launched}/{len(runs)}] {run.name}{taken}: {shlex.join(command)}",
                      flush=True)
                running[subprocess.Popen(command, env=env)] = run
            if not running:
                break
            child = _wait_any(running)
            run, status = running.pop(child), child.returncode
            if status == 0:
                succeeded.add(run.name)
            elif status == PreemptedError.exit_code:
                preempted = True
                print(f"{run.name}: pre-empted, checkpoint written; run the sweep again to resume",
                      file=sys.stderr)
            else:
                print(f"{run.name}: failed with exit status {status}", file=sys.stderr)
                failed.append(run.name)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if preempted:
        return PreemptedError.exit_code
    for run in pending:      # cannot happen (producers run first), but never drop a run silently
        not_run.setdefault(run.name, "its producer did not finish")
    for name, why in not_run.items():
        print(f"{name}: not run: {why}", file=sys.stderr)
    if failed or not_run:
        problems = [f"{len(names)} of {len(runs)} runs {what}: {', '.join(names)}"
                    for what, names in (("failed", failed), ("not run", list(not_run))) if names]
        print("; ".join(problems), file=sys.stderr)
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
