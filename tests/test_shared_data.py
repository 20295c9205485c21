"""``Communicator.load_once_per_node`` (``mpi.share_data``) under mpiexec -n 2 / -n 4: one rank per
node loads, every rank of the node sees the same values through read-only shared memory, and a
failed load stops every rank with its message and exit status.

Every test runs all its collectives before asserting anything, so a failing check on one rank
cannot leave the others waiting in a collective.
"""
from dataclasses import dataclass

import numpy as np
import pytest

from fedmpi.errors import DataError

pytestmark = pytest.mark.mpi(min_size=2)


@dataclass
class Loaded:
    name: str
    images: np.ndarray
    labels: np.ndarray
    empty: np.ndarray
    shape: tuple


def make_loaded() -> Loaded:
    rng = np.random.default_rng(7)
    return Loaded("toy", rng.standard_normal((33, 1, 5, 5), dtype=np.float32),
                  rng.integers(0, 10, 33).astype(np.int64), np.zeros((0, 3), np.float32), (1, 5, 5))


def node_comm():
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator

    return Communicator(MPI.COMM_WORLD), MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=MPI.COMM_WORLD.rank)


def test_one_rank_per_node_loads_and_every_rank_reads_the_same_values():
    comm, node = node_comm()
    calls = []

    def load():
        calls.append(comm.rank)
        return make_loaded()

    shared = comm.load_once_per_node(load)
    loads_on_node, leader = node.allreduce(len(calls)), node.rank == 0
    node.Free()
    expected = make_loaded()
    arrays = {f: getattr(shared, f) for f in ("images", "labels", "empty")}
    same = {f: (a.dtype == getattr(expected, f).dtype and np.array_equal(a, getattr(expected, f)))
            for f, a in arrays.items()}
    # the non-empty arrays are views of the window, not copies, and cannot be written
    flags = [(arrays[f].flags.owndata, arrays[f].flags.writeable) for f in ("images", "labels")]
    comm.release_shared()
    assert loads_on_node == 1
    assert calls == ([comm.rank] if leader else [])
    assert (shared.name, shared.shape) == ("toy", (1, 5, 5))
    assert same == dict.fromkeys(arrays, True)
    assert flags == [(False, False)] * 2


def test_a_failed_load_stops_every_rank_with_its_message_and_status():
    comm, node = node_comm()

    def load():
        raise DataError("/data/train-images-idx3-ubyte.gz", "truncated or corrupt gzip file")

    try:
        comm.load_once_per_node(load)
        outcome = None
    except Exception as exc:  # noqa: BLE001 - compared below
        outcome = exc
    node.Free()
    assert outcome is not None
    assert getattr(outcome, "exit_code", None) == 2
    assert "train-images-idx3-ubyte.gz" in str(outcome) and "truncated" in str(outcome)
    assert comm._shared == []
