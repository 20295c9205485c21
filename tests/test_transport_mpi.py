"""fedmpi.comm.transport.Communicator collectives on MPI.COMM_WORLD (run under mpiexec -n 2 / -n 4).

Every test runs all its collectives before asserting anything, so a failing check on one rank
cannot leave the others waiting in a collective.
"""
import numpy as np
import pytest

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.parametrize("wait", ["sleep", "spin"])]


def make_comm(wait):
    from mpi4py import MPI

    from fedmpi.comm.transport import Communicator

    comm = Communicator(MPI.COMM_WORLD, wait=wait)
    assert comm.size == MPI.COMM_WORLD.Get_size() >= 2
    return comm


def pattern(tag: int, n: int) -> np.ndarray:
    """A byte pattern that differs per tag, so misrouted buffers are caught."""
    return ((np.arange(n, dtype=np.int64) * 7 + tag * 31 + 1) % 251).astype(np.uint8)


def test_roles(wait):
    comm = make_comm(wait)
    assert comm.is_server == (comm.rank == 0)
    assert comm.worker_ranks == list(range(1, comm.size))


@pytest.mark.parametrize("n", [0, 1, 1000, 3_000_001])
def test_bcast_buffer(wait, n):
    comm = make_comm(wait)
    sent = pattern(5, n)
    got = comm.bcast_buffer(sent if comm.is_server else None)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, sent)
    if comm.is_server:
        assert comm.traffic.payload_bytes == n * (comm.size - 1)
        assert comm.traffic.control_bytes == 0


def scatter_lengths(size: int, case: str) -> list[int]:
    if case == "varied":        # rank 0 keeps nothing, rank 1 gets 0 bytes too, others differ
        return [0, 0] + [1000 * r + 3 for r in range(2, size)] if size > 2 else [0, 0]
    if case == "one_empty":     # the last rank alone gets nothing
        return [4] + [17 * r + 1 for r in range(1, size - 1)] + [0]
    if case == "all_empty":
        return [0] * size
    if case == "large":
        return [r * 1_000_003 for r in range(size)]
    raise ValueError(case)


@pytest.mark.parametrize("case", ["varied", "one_empty", "all_empty", "large"])
def test_scatter_buffers_with_lengths_per_rank(wait, case):
    comm = make_comm(wait)
    lengths = scatter_lengths(comm.size, case)
    per_rank = [pattern(r, n) for r, n in enumerate(lengths)] if comm.is_server else None
    got = comm.scatter_buffers(per_rank)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, pattern(comm.rank, lengths[comm.rank]))
    if comm.is_server:
        assert comm.traffic.payload_bytes == sum(lengths[1:])   # what left rank 0
    else:
        assert comm.traffic.payload_bytes == 0


@pytest.mark.parametrize("case", ["varied", "root_and_one_empty", "all_empty", "large"])
def test_gather_buffers_variable_length(wait, case):
    comm = make_comm(wait)
    if case == "varied":
        lengths = [(r * 5) % 7 + r for r in range(comm.size)]
    elif case == "root_and_one_empty":
        lengths = [0] + [0 if r == 1 else 100 * r for r in range(1, comm.size)]
    elif case == "all_empty":
        lengths = [0] * comm.size
    else:
        lengths = [2_000_003 - r for r in range(comm.size)]
    got = comm.gather_buffers(pattern(100 + comm.rank, lengths[comm.rank]))
    if comm.is_server:
        assert isinstance(got, list) and len(got) == comm.size
        for r, buf in enumerate(got):
            np.testing.assert_array_equal(buf, pattern(100 + r, lengths[r]), err_msg=f"rank {r}")
        assert comm.traffic.payload_bytes == sum(lengths[1:])   # what reached rank 0
    else:
        assert got is None


def test_objects(wait):
    comm = make_comm(wait)
    plan = {"round": 7, "clients": [3, 1, 4], "array": np.arange(5.0), "none": None} if comm.is_server else None
    got_plan = comm.bcast_object(plan)
    per_rank = [{"rank": r, "payload": list(range(r * 3)), "blob": b"x" * (r * 10_000)}
                for r in range(comm.size)] if comm.is_server else None
    mine = comm.scatter_objects(per_rank)
    gathered = comm.gather_objects(("from", comm.rank, np.full(comm.rank, comm.rank)))
    nothing = comm.bcast_object(None)
    counters = (comm.traffic.payload_bytes, comm.traffic.control_bytes)

    assert got_plan["round"] == 7 and got_plan["clients"] == [3, 1, 4] and got_plan["none"] is None
    np.testing.assert_array_equal(got_plan["array"], np.arange(5.0))
    assert mine == {"rank": comm.rank, "payload": list(range(comm.rank * 3)), "blob": b"x" * (comm.rank * 10_000)}
    assert nothing is None
    if comm.is_server:
        assert [g[:2] for g in gathered] == [("from", r) for r in range(comm.size)]
        for r, g in enumerate(gathered):
            np.testing.assert_array_equal(g[2], np.full(r, r))
        # control messages never count as payload, but are counted
        assert counters[0] == 0 and counters[1] > 0
    else:
        assert gathered is None
        assert counters[0] == 0


def test_payload_and_control_counters_accumulate(wait):
    comm = make_comm(wait)
    size = comm.size
    comm.bcast_buffer(pattern(1, 100) if comm.is_server else None)
    comm.bcast_buffer(pattern(2, 50) if comm.is_server else None, payload=False)
    comm.scatter_buffers([pattern(r, 10 * r + 1) for r in range(size)] if comm.is_server else None)
    comm.scatter_buffers([pattern(r, 3) for r in range(size)] if comm.is_server else None, payload=False)
    comm.gather_buffers(pattern(comm.rank, 2 * comm.rank + 5))
    comm.gather_buffers(pattern(comm.rank, 9), payload=False)
    if comm.is_server:
        payload = 100 * (size - 1) + sum(10 * r + 1 for r in range(1, size)) + sum(2 * r + 5 for r in range(1, size))
        control = 50 * (size - 1) + 3 * (size - 1) + 9 * (size - 1)
        assert comm.traffic.payload_bytes == payload
        assert comm.traffic.control_bytes == control


def test_many_small_collectives_in_sequence_stay_matched(wait):
    """A round-loop-like sequence repeated: plan, scatter, gather, with buffers changing size."""
    comm = make_comm(wait)
    seen = []
    for round_ in range(20):
        plan = comm.bcast_object({"round": round_} if comm.is_server else None)
        lengths = [(round_ * (r + 1)) % 13 for r in range(comm.size)]
        mine = comm.scatter_buffers([pattern(round_ + r, n) for r, n in enumerate(lengths)]
                                    if comm.is_server else None)
        back = comm.gather_buffers(mine[::-1].copy())
        seen.append((plan["round"], mine.tobytes(), back))
    for round_, (plan_round, mine, back) in enumerate(seen):
        lengths = [(round_ * (r + 1)) % 13 for r in range(comm.size)]
        assert plan_round == round_
        assert mine == pattern(round_ + comm.rank, lengths[comm.rank]).tobytes()
        if comm.is_server:
            for r, buf in enumerate(back):
                np.testing.assert_array_equal(buf, pattern(round_ + r, lengths[r])[::-1])


def test_shared_file_name_broadcast(wait, tmp_path_factory):
    """Rank 0 makes a temp name and broadcasts it; every rank writes its own file beside it."""
    comm = make_comm(wait)
    base = str(tmp_path_factory.mktemp("shared")) if comm.is_server else None
    base = comm.bcast_object(base)
    import pathlib

    path = pathlib.Path(base) / f"rank{comm.rank}.bin"
    path.write_bytes(pattern(comm.rank, 64).tobytes())
    comm.gather_objects(None)                       # everyone has written
    listing = sorted(p.name for p in pathlib.Path(base).iterdir()) if comm.is_server else None
    contents = [pathlib.Path(base, f"rank{r}.bin").read_bytes() for r in range(comm.size)] if comm.is_server else None
    comm.gather_objects(None)                       # rank 0 has read before anyone leaves
    if comm.is_server:
        assert listing == sorted(f"rank{r}.bin" for r in range(comm.size))
        assert contents == [pattern(r, 64).tobytes() for r in range(comm.size)]
