"""Progress on rank 0: a tqdm bar on a terminal, one line per round when asked (batch logs),
nothing otherwise."""
from __future__ import annotations

import math
import os
import sys

from tqdm import tqdm


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _has_terminal() -> bool:
    """True when stderr is a terminal, or when it is a pipe to a launcher (mpiexec) that writes
    to one: under mpiexec rank 0's stderr is forwarded to the user's terminal. Batch jobs
    (SLURM) and logs redirected to files get no bar."""
    if sys.stderr.isatty():
        return True
    if "SLURM_JOB_ID" in os.environ:
        return False
    pid = os.getppid()
    for _ in range(4):  # rank → hydra proxy → mpiexec → shell
        if pid is None or pid <= 1:
            return False
        try:
            target = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            return False
        if target.startswith(("/dev/pts/", "/dev/tty")):
            return True
        pid = _parent_pid(pid)
    return False


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}MiB"


class Progress:
    def __init__(self, rounds: int, mode: bool | str | None, start: int = 0):
        """``mode``: True = a line per round; False = silent; "auto"/None = bar on a terminal."""
        self.lines = mode is True
        self.bar = None
        if mode in (None, "auto") and _has_terminal():
            self.bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True, file=sys.stderr)
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
        elif self.lines:
            sys.stderr.write(f"round {row['round']}/{self.rounds} {text} "
                             f"elapsed={row['cum_wall_seconds']:.1f}s\n")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        (self.bar.write if self.bar is not None else lambda t: sys.stderr.write(t + "\n"))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
