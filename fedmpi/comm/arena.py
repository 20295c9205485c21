"""Memory for one round's encoded uploads, reused round after round (``UploadArena``)."""
from __future__ import annotations

import numpy as np

ALIGN = 64   # each upload starts on a cache line: its float tensors decode as aligned views


class UploadArena:
    """Hands out the uint8 buffers ``codec.encode`` fills with a round's uploads, from one block
    kept between rounds. A worker rank keeps its clients' encoded uploads until the round's sum or
    gather: fresh buffers for them (tens of MB a round on the overhead workload) come from new
    pages every round, since the allocator returns the freed ones to the system, and touching new
    pages costs (a few ms a round there: bench/perf/phases.py). The first round, and any round that
    needs more, takes fresh buffers for what does not fit and the block grows to that round's
    total at the next ``reset``.

    ``reset()`` starts a round and invalidates every buffer handed out before: only for uploads
    whose bytes nobody reads after their round (a worker rank's, summed or gathered in the round)."""

    def __init__(self):
        self._block = np.empty(0, dtype=np.uint8)
        self._used = 0
        self._needed = 0      # this round's bytes with their alignment: the block's size next round

    def reset(self) -> None:
        if self._needed > self._block.size:
            self._block = np.empty(self._needed, dtype=np.uint8)
        self._used = self._needed = 0

    def take(self, nbytes: int) -> np.ndarray:
        self._needed += nbytes + ALIGN
        start = self._used + (-(self._block.ctypes.data + self._used) % ALIGN)
        if start + nbytes > self._block.size:
            return np.empty(nbytes, dtype=np.uint8)
        self._used = start + nbytes
        return self._block[start:self._used]
