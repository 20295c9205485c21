"""One run on one rank: setup (every rank, agreeing on the first error before round 1), then the
server loop on rank 0 and the worker loop elsewhere (rank 0 alone when P = 1).

Per-client device state (persistent algorithm state, the masks the client last saw) lives on the
server between rounds and travels with the task to whichever rank trains the client, so no result
depends on the rank count. All MPI goes through ``comm.transport.Communicator``.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import FedmpiError
from ..results import checkpoint_path
from .context import build_context
from .evaluation import Evaluator
from .server import Server
from .worker import work


class Run:
    def __init__(self, cfg: dict, comm, out_path: Path, *, checkpoint: dict | None = None,
                 progress: bool | None = None, versions: dict | None = None, version: str = "",
                 commit: str = ""):
        self.cfg = cfg
        self.comm = comm
        self.out_path = Path(out_path)
        self.checkpoint_path = checkpoint_path(self.out_path)
        # rank 0, resuming: the checkpoint's contents, read once when deciding about --out
        self.checkpoint = checkpoint
        self.resume = checkpoint is not None
        self.progress_flag = progress
        self.attrs_extra = (versions or {}, version, commit)
        self.terminate_requested = False

    def setup(self) -> None:
        """Build the run on every rank; a failure anywhere stops every rank before round 1."""
        error = None
        try:
            share = self.cfg["mpi"]["share_data"] and self.comm.size > 1
            self.ctx = build_context(self.cfg, self.comm.load_once_per_node if share else None)
            self.evaluator = Evaluator(self.comm, self.ctx.trainer, {"test": self.ctx.test, "train": self.ctx.train},
                                       self.ctx.partition, self.cfg["eval"]["batch_size"])
        except FedmpiError as exc:
            error = (exc.exit_code, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported with the rank, then every rank stops
            error = (1, f"{type(exc).__name__}: {exc}")
        # the host too: a job across nodes may fail on one node only (a data root missing there)
        errors = self.comm.gather_objects((self.comm.rank, socket.gethostname(), os.getpid(), error))
        verdict = None
        if self.comm.is_server:
            several_hosts = len({host for _, host, _, _ in errors}) > 1
            failed = [(r, host, e) for r, host, _, e in errors if e is not None]
            if failed:
                rank, host, (code, message) = failed[0]
                where = f"rank {rank} on {host}" if several_hosts else f"rank {rank}"
                verdict = (code, message if self.comm.size == 1 else f"{where}: {message}")
            elif several_hosts:
                print_placement(errors)
        verdict = self.comm.bcast_object(verdict)
        if verdict is not None:
            exc = FedmpiError(verdict[1])
            exc.exit_code = verdict[0]
            raise exc

    def execute(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.comm.is_server:
                return Server(self.ctx, self.comm, self.evaluator, self).serve(self.resume, self.attrs_extra)
            work(self.ctx, self.comm, self.evaluator, lambda: self.terminate_requested)
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)

    def close(self) -> None:
        """After a run every rank finished: free the node's shared data (collective)."""
        self.ctx = self.evaluator = None
        self.comm.release_shared()

    def _on_sigterm(self, signum, frame) -> None:
        # finish the round, checkpoint, exit 75 -- decided by the server once per round
        self.terminate_requested = True


def print_placement(ranks: list[tuple]) -> None:
    """Which host and PID each rank has, when they span hosts: a rank that dies without a word
    (SIGKILL, a node lost) is reported by the process manager by host and PID only."""
    hosts: dict[str, list[str]] = {}
    for rank, host, pid, _ in ranks:
        hosts.setdefault(host, []).append(f"{rank} (pid {pid})")
    where = "; ".join(f"{host}: rank{'s' * (len(r) > 1)} {', '.join(r)}" for host, r in hosts.items())
    sys.stderr.write(f"fedmpi: {len(ranks)} ranks on {len(hosts)} hosts: {where}\n")
    sys.stderr.flush()


def report_failure(rank: int, size: int, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, FedmpiError) else f"{type(exc).__name__}: {exc}"
    prefix = "fedmpi: error" if size == 1 else f"fedmpi: rank {rank}"
    sys.stderr.write(f"{prefix}: {message}\n")
    sys.stderr.flush()
