"""The only code in fedmpi that calls MPI.

Every exchange is a collective on a flat ``uint8`` buffer (payloads) or a pickled object
(small control messages): broadcast of the global model, scatter of per-rank downloads and device
state, gather of variable-length client payloads; with ``aggregation.where: workers`` an
element-wise maximum of ``int16`` arrays on every rank and an ``int64`` sum onto rank 0 instead of
the gather. Each call counts the bytes it moved.

MPI implementations busy-poll inside blocking calls, so a waiting server or idle worker would burn
a core that training needs when ranks outnumber cores (a laptop, a 2-core CI box). In ``sleep``
mode every collective is started non-blocking and completed by ``Test`` with a short, growing
sleep between polls (10 µs up to 0.5 ms), which frees the core at a latency cost far below one
round's training time. Only the payload phase of a buffer exchange, which begins once every rank
has joined the size exchange before it, is waited for with ``Wait``, and a reduction runs blocking
after a sleeping barrier: by then the ranks only copy and add.
``spin`` mode uses the blocking calls throughout, for comparison (bench/overhead.py).

Before round 1, ``load_once_per_node`` lets one rank per node read the dataset into an MPI-3
shared-memory window that the node's other ranks map read-only (``mpi.share_data``).
"""
from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass

import numpy as np

_MAX_SLEEP = 5e-4


@dataclass
class TrafficCounter:
    # counted on rank 0, which takes part in every exchange
    payload_bytes: int = 0    # model payload buffers (what upload/download metrics come from)
    control_bytes: int = 0    # plans, metadata, evaluation results


class Communicator:
    def __init__(self, mpi_comm=None, wait: str = "sleep"):
        if mpi_comm is None:
            from mpi4py import MPI

            mpi_comm = MPI.COMM_WORLD
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.wait_mode = wait
        self.traffic = TrafficCounter()
        self._shared = []   # (window, node communicator) of load_once_per_node, freed by release_shared

    @property
    def is_server(self) -> bool:
        return self.rank == 0

    @property
    def worker_ranks(self) -> list[int]:
        """Ranks that train clients: 1..P-1, or rank 0 alone when P = 1."""
        return list(range(1, self.size)) if self.size > 1 else [0]

    # -- waiting ----------------------------------------------------------------------------
    def _complete(self, request, *, transfer: bool = False) -> None:
        """Wait for ``request``. ``transfer``: the payload phase of a buffer exchange, which starts
        only once its size exchange has completed, so every rank is in it and only the copying is
        left. It is completed by ``Wait``: MPI moves a large message in chunks, each needing the
        waiting side to poll, and a sleep between polls would stretch an 80 MB gather from tens of
        milliseconds to a tenth of a second."""
        if self.wait_mode == "spin" or transfer:
            request.Wait()
            return
        delay = 1e-5
        while not request.Test():
            time.sleep(delay)
            delay = min(delay * 2, _MAX_SLEEP)

    def _join(self) -> None:
        """Wait (sleeping) until every rank has reached this point, so that the blocking
        reduction after it only computes and copies. A reduction of megabytes moves in pipelined
        chunks, each needing every rank to poll: completed by sleeping polls, it would stretch
        from a millisecond to tens of them."""
        if self.wait_mode != "spin":
            self._complete(self.comm.Ibarrier())

    # -- buffers ----------------------------------------------------------------------------
    def bcast_buffer(self, data: np.ndarray | None, *, payload: bool = True) -> np.ndarray:
        """Root's uint8 buffer to every rank."""
        length = np.array([0 if data is None else data.size], dtype=np.int64)
        if self.size > 1:
            self._complete(self.comm.Ibcast(length, root=0))
        buf = data if self.is_server else np.empty(int(length[0]), dtype=np.uint8)
        if self.size > 1 and length[0] > 0:
            self._complete(self.comm.Ibcast(buf, root=0), transfer=True)
        if self.is_server:
            self._count(int(length[0]) * (self.size - 1), payload)
        return buf

    def scatter_buffers(self, per_rank: list[np.ndarray] | None, *, payload: bool = True) -> np.ndarray:
        """Root sends ``per_rank[r]`` (uint8) to rank r."""
        if self.size == 1:
            return per_rank[0]
        counts = np.array([b.size for b in per_rank], dtype=np.int64) if self.is_server else None
        my_count = np.zeros(1, dtype=np.int64)
        self._complete(self.comm.Iscatter(counts, my_count, root=0))
        recv = np.empty(int(my_count[0]), dtype=np.uint8)
        if self.is_server:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            send = np.concatenate(per_rank) if counts.sum() else np.zeros(1, np.uint8)
            spec = [send, counts, displs, self._MPI.BYTE]
            self._count(int(counts.sum() - counts[0]), payload)
        else:
            spec = None
        self._complete(self.comm.Iscatterv(spec, recv, root=0), transfer=True)
        return recv

    def gather_buffers(self, data: np.ndarray, *, payload: bool = True) -> list[np.ndarray] | None:
        """Every rank's uint8 buffer to root, as a list indexed by rank."""
        if self.size == 1:
            return [data]
        my_count = np.array([data.size], dtype=np.int64)
        counts = np.zeros(self.size, dtype=np.int64) if self.is_server else None
        self._complete(self.comm.Igather(my_count, counts, root=0))
        if self.is_server:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            recv = np.empty(max(int(counts.sum()), 1), dtype=np.uint8)
            spec = [recv, counts, displs, self._MPI.BYTE]
        else:
            spec = None
        self._complete(self.comm.Igatherv(data, spec, root=0), transfer=True)
        if not self.is_server:
            return None
        self._count(int(counts.sum() - counts[0]), payload)
        return [recv[d:d + c] for d, c in zip(displs, counts)]

    # -- reductions (aggregation.where: workers) ---------------------------------------------
    def allreduce_max_int16(self, local: np.ndarray) -> np.ndarray:
        """The element-wise maximum of every rank's int16 array, on every rank. Counted as a
        reduce onto one rank plus a broadcast back: 2·(P−1)·nbytes."""
        local = np.ascontiguousarray(local, dtype=np.int16)
        if self.size == 1:
            return local.copy()
        result = np.empty_like(local)
        self._join()
        self.comm.Allreduce(local, result, op=self._MPI.MAX)
        if self.is_server:
            self._count(2 * (self.size - 1) * local.nbytes, payload=True)
        return result

    def reduce_sum_int64(self, local: np.ndarray) -> np.ndarray | None:
        """The element-wise sum of every rank's int64 array, on rank 0 (None elsewhere): exact, in
        any order, as long as it does not overflow (the caller bounds the terms). Counted as what
        the other ranks contributed: (P−1)·nbytes."""
        local = np.ascontiguousarray(local, dtype=np.int64)
        if self.size == 1:
            return local.copy()
        result = np.empty_like(local) if self.is_server else None
        self._join()
        self.comm.Reduce(local, result, op=self._MPI.SUM, root=0)
        if not self.is_server:
            return None
        self._count((self.size - 1) * local.nbytes, payload=True)
        return result

    # -- objects (control messages) ---------------------------------------------------------
    def bcast_object(self, obj=None):
        data = _pickle(obj) if self.is_server else None
        return _unpickle(self.bcast_buffer(data, payload=False))

    def scatter_objects(self, per_rank: list | None):
        data = [_pickle(o) for o in per_rank] if self.is_server else None
        return _unpickle(self.scatter_buffers(data, payload=False))

    def gather_objects(self, obj) -> list | None:
        gathered = self.gather_buffers(_pickle(obj), payload=False)
        return None if gathered is None else [_unpickle(b) for b in gathered]

    def _count(self, nbytes: int, payload: bool) -> None:
        if payload:
            self.traffic.payload_bytes += nbytes
        else:
            self.traffic.control_bytes += nbytes

    # -- one copy of the data per node ----------------------------------------------------------
    def load_once_per_node(self, load):
        """``load()`` (returning a dataclass) run by one rank per node; its non-empty numpy array
        fields are copied into an MPI shared-memory window and every rank of the node gets the
        object with read-only views of them. So P ranks on a node read, decompress and normalise
        the data once and hold it once. A failure of ``load`` on the node's first rank is raised
        there and, as a FedmpiError with the same message and exit status, on the others.
        The window lives until ``release_shared``."""
        from ..errors import FedmpiError

        MPI = self._MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        if node.Get_size() == 1:
            node.Free()
            return load()
        leader = node.Get_rank() == 0
        loaded = failure = layout = None
        if leader:
            try:
                loaded = load()
            except FedmpiError as exc:
                failure, raised = (exc.exit_code, str(exc)), exc
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the node has heard of it
                failure, raised = (1, f"{type(exc).__name__}: {exc}"), exc
            if failure is None:
                slots, size = {}, 0
                for f in dataclasses.fields(loaded):
                    value = getattr(loaded, f.name)
                    if isinstance(value, np.ndarray) and value.nbytes:
                        slots[f.name] = (size, value.shape, value.dtype.str)
                        size += -(-value.nbytes // 64) * 64     # 64-byte aligned arrays
                layout = (dataclasses.replace(loaded, **dict.fromkeys(slots)), slots, size)
        failure, layout = node.bcast((failure, layout), root=0)
        if failure is not None:
            node.Free()
            if leader:
                raise raised
            error = FedmpiError(failure[1])
            error.exit_code = failure[0]
            raise error
        shell, slots, size = layout
        window = MPI.Win.Allocate_shared(size if leader else 0, 1, comm=node)
        self._shared.append((window, node))
        buffer, _ = window.Shared_query(0)
        views = {name: np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)
                 for name, (offset, shape, dtype) in slots.items()}
        if leader:
            for name, view in views.items():
                view[...] = getattr(loaded, name)
            del loaded
        node.Barrier()
        for view in views.values():
            view.flags.writeable = False
        return dataclasses.replace(shell, **views)

    def release_shared(self) -> None:
        """Free the windows of ``load_once_per_node`` (collective over each node; call it once
        every rank is done with the arrays, on the path where no rank has failed)."""
        for window, node in self._shared:
            window.Free()
            node.Free()
        self._shared = []

    def abort(self, code: int) -> None:
        """End every rank of the job (used when this rank failed)."""
        self.comm.Abort(code)


def _pickle(obj) -> np.ndarray:
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def _unpickle(buf: np.ndarray):
    return pickle.loads(buf.tobytes())
