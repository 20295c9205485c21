"""Where each rank's round time goes, phase by phase: a developer's instrument, off by default.

With ``FEDMPI_PHASE_TIMES=1`` in the environment, the round loop marks the end of each phase on
every rank (waiting for the round's plan, receiving the downloads, training, reporting, each step
of the sums on the workers, the server's merge and results writing), and at the end of the run
each rank writes one line to standard error: ``fedmpi phases rank R: {json}``, the seconds of
every phase in every round. ``bench/perf/phases.py`` runs a workload with it and tabulates the
lines (docs/performance.md). Off, a mark costs one attribute test.
"""
from __future__ import annotations

import json
import os
import sys
import time


class PhaseTimes:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.rounds: list[dict[str, float]] = []
        self._last = 0.0

    @classmethod
    def from_environment(cls) -> "PhaseTimes":
        return cls(os.environ.get("FEDMPI_PHASE_TIMES", "") == "1")

    def next_round(self) -> None:
        """A round starts here; what follows is timed against it."""
        if self.enabled:
            self.rounds.append({})
            self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in ``phase`` (added up if it recurs)."""
        if self.enabled and self.rounds:
            now = time.perf_counter()
            current = self.rounds[-1]
            current[phase] = current.get(phase, 0.0) + now - self._last
            self._last = now

    def discard_round(self) -> None:
        """Drop the round opened last: the loop ended instead (the server said stop)."""
        if self.enabled and self.rounds:
            self.rounds.pop()

    def report(self, rank: int) -> None:
        if self.enabled:
            sys.stderr.write(f"fedmpi phases rank {rank}: {json.dumps(self.rounds)}\n")
            sys.stderr.flush()


PHASES = PhaseTimes.from_environment()
