"""Progress on rank 0: a tqdm bar on a terminal, plain lines elsewhere (batch logs: SLURM's output
file, ``nohup``, a redirect), nothing when asked for quiet."""
from __future__ import annotations

import math
import os
import sys

from tqdm import tqdm

# launchers that forward a rank's stderr to their own (MPICH/Hydra, Open MPI/PRRTE)
MPI_LAUNCHERS = {"mpiexec", "mpiexec.hydra", "mpirun", "hydra_pmi_proxy", "orterun", "orted", "prterun", "prted"}
# a run of more rounds than this gets a line per tenth of its rounds in batch logs, not per round
LINE_EVERY_ROUND = 50


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _has_terminal() -> bool:
    """True when stderr is a terminal, or when it is a pipe to an MPI launcher (mpiexec) that
    writes to one: under mpiexec rank 0's stderr is forwarded to the user's terminal. Only
    launchers are looked through: a process whose stderr is a file or a pipe to anything else
    (``nohup``, ``2> log``, ``| tee``, a test harness) has no terminal, whatever its parent's is.
    Batch jobs (SLURM) get no bar."""
    if sys.stderr.isatty():
        return True
    if "SLURM_JOB_ID" in os.environ or not _fd2_target(os.getpid()).startswith("pipe:"):
        return False
    pid = os.getppid()
    for _ in range(4):  # rank → hydra proxy → mpiexec
        if pid is None or pid <= 1 or _command_name(pid) not in MPI_LAUNCHERS:
            return False
        target = _fd2_target(pid)
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return True
        if not target.startswith("pipe:"):
            return False
        pid = _parent_pid(pid)
    return False


def _fd2_target(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return ""


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def printed_rounds(rounds: int, start: int = 0) -> set[int]:
    """The rounds a batch log gets a line for: every round of a run of up to ``LINE_EVERY_ROUND``
    rounds; of a longer one the first and last and each round that completes another tenth."""
    if rounds <= LINE_EVERY_ROUND:
        return set(range(start + 1, rounds + 1))
    tenths = {r for r in range(start + 1, rounds + 1) if 10 * r // rounds > 10 * (r - 1) // rounds}
    return tenths | {min(start + 1, rounds), rounds}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}MiB"


class Progress:
    def __init__(self, rounds: int, mode: bool | str | None, start: int = 0):
        """``mode``: True = a line per round; False = silent; "auto"/None = a bar on a terminal,
        else lines for ``printed_rounds``."""
        self.bar = None
        self.lines: set[int] | None = set(range(start + 1, rounds + 1)) if mode is True else None
        if mode in (None, "auto"):
            if _has_terminal():
                self.bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True, file=sys.stderr)
            else:
                self.lines = printed_rounds(rounds, start)
        self.rounds = rounds
        self.best = float("nan")

    def update(self, row: dict) -> None:
        acc = row["client_accuracy"]
        if not math.isnan(acc):
            self.best = acc if math.isnan(self.best) else max(self.best, acc)
        text = (f"acc={acc:.4f} test={row['test_accuracy']:.4f} up={_mib(row['cum_upload_bytes'])} "
                f"density={row['density']:.3f}")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.lines is not None and row["round"] in self.lines:
            sys.stderr.write(f"round {row['round']}/{self.rounds} {text} "
                             f"elapsed={row['cum_wall_seconds']:.1f}s\n")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        (self.bar.write if self.bar is not None else lambda t: sys.stderr.write(t + "\n"))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
