"""``make bench-scale``'s scale run at test size: 1,000 clients per round on 8 ranks (oversubscribed)
with the fixed-point sums on the workers (``aggregation.where: workers``).

Each client is tiny (3 samples of LEAF Synthetic with 2 features, one local step; the MLP has
42,810 parameters, 171 KB) so that 1,000 of them per round stay cheap, and they train in blocks of
50 (``local.client_batch``, bit-identical to one by one; it also spares every rank the first
``torch.optim`` optimizer's slow lazy import). Four runs, each at most once per module:

- ``reference``: P = 1, ``where: server``, fixed point: rank 0 trains and merges everything;
- ``terminated``: P = 8, ``where: workers``, SIGTERM once round 1 is written (exit 75, checkpoint);
- ``resumed``: the same file, ``--resume`` at P = 8;
- ``baseline``: P = 8, ``where: workers``, one round of only P − 1 = 7 clients (rank 0's memory
  without the 1,000 clients).

The P = 8 run that completes is the preempted and resumed one, compared with the uninterrupted
P = 1 run: equal bits on every result column show both that the scale run equals one rank and that
SIGTERM + ``--resume`` changes nothing (a separate uninterrupted P = 8 run would cost another
start of 8 interpreters with torch: about as long as the rest of this module).
"""
from __future__ import annotations

import re
import signal

import numpy as np
import pytest

from fedmpi.engine.checkpoint import read_checkpoint_file
from helpers import Streaming, fedmpi, needs_mpiexec, read_results, same_bits, write_config

# one module fixture, four runs of 1,000 clients on up to 8 ranks: one xdist worker for both tests,
# or each worker would make its own
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("scale_runs")]

RANKS = 8
CLIENTS = 1000
SCALE = {
    "data": {"name": "synthetic", "partition": "shards", "shard_size": 3, "shards_per_client": 1,
             "synthetic": {"dim": 2}},
    "model": "mlp",
    "clients": {"total": CLIENTS, "per_round": CLIENTS},
    "rounds": 3,
    "local": {"epochs": 1, "batch_size": 4, "lr": 0.05, "client_batch": 50},
    "algorithm": "fedavg",
    "eval": {"every": 1},
    "aggregation": {"sum": "fixed_point", "where": "workers"},
}
# machine state and how the work was spread, not results
NOT_RESULTS = {"wall_seconds", "cum_wall_seconds", "compute_seconds", "mpi_payload_bytes", "mpi_control_bytes",
               "server_peak_rss_bytes", "rank"}
MIB = 2 ** 20


def model_parameters() -> dict[str, int]:
    from fedmpi.models import build_model

    model = build_model("mlp", (SCALE["data"]["synthetic"]["dim"],), 10)
    return {name: t.numel() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    config = write_config(work / "scale.yaml", **SCALE)
    runs = {}

    reference = work / "reference_p1.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(reference), "--quiet", "--set", "aggregation.where=server"],
                     timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["reference"] = read_results(reference)

    out = work / "workers_p8.h5"
    run = Streaming(["run", str(config), "--out", str(out), "--progress"], ranks=RANKS)
    run.wait_for_line(r"^round 1/3", timeout=240)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before SIGTERM; make rounds slower")
    run.proc.send_signal(signal.SIGTERM)        # mpiexec passes it on to every rank
    rc, stderr = run.finish(timeout=120)
    checkpoint_round = read_checkpoint_file(out.with_suffix(".ckpt"))["round"]
    runs["terminated"] = {"rc": rc, "stderr": stderr, "checkpoint_round": checkpoint_round,
                          "results": read_results(out)}

    proc, _ = fedmpi(["run", str(config), "--out", str(out), "--quiet", "--resume"], RANKS, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["resumed"] = read_results(out)
    runs["resumed_path"] = out
    runs["checkpoint_left"] = out.with_suffix(".ckpt").exists()

    baseline = work / "baseline_p8.h5"
    proc, _ = fedmpi(["run", str(config), "--out", str(baseline), "--quiet", "--set", f"clients.per_round={RANKS - 1}",
                      "--set", "rounds=1"], RANKS, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs["baseline"] = read_results(baseline)
    return runs


@needs_mpiexec
def test_sigterm_on_8_ranks_checkpoints_after_the_round_and_exits_75(scale):
    terminated = scale["terminated"]
    assert terminated["rc"] == 75, terminated["stderr"][-3000:]
    assert "resume with --resume" in terminated["stderr"]
    done = terminated["checkpoint_round"]
    assert 1 <= done < SCALE["rounds"]      # round 1 written; SIGTERM may land in round 2
    partial = terminated["results"]
    assert "finished" not in partial["attrs"]
    np.testing.assert_array_equal(partial["rounds"]["round"], np.arange(1, done + 1))
    assert len(partial["clients"]["round"]) == done * CLIENTS


@needs_mpiexec
def test_scale_run_resumed_on_8_ranks_has_the_bits_of_the_uninterrupted_run_on_1_rank(scale):
    reference, resumed = scale["reference"], scale["resumed"]
    assert "finished" in resumed["attrs"] and "resumed" in resumed["attrs"] and not scale["checkpoint_left"]
    assert int(resumed["attrs"]["mpi_size"]) == RANKS
    assert np.all(np.isfinite(reference["rounds"]["test_accuracy"]))
    assert np.all(np.isfinite(reference["clients"]["train_loss"]))
    assert len(reference["clients"]["client_id"]) == SCALE["rounds"] * CLIENTS
    for table in ("rounds", "clients"):
        assert set(reference[table]) == set(resumed[table])
        for name in sorted(set(reference[table]) - NOT_RESULTS):
            assert same_bits(reference[table][name], resumed[table][name]), f"{table}/{name}"
    assert set(resumed["clients"]["rank"].tolist()) == set(range(1, RANKS))   # every worker rank trained


@needs_mpiexec
def test_scale_run_moves_the_reductions_not_the_uploads(scale):
    """Per round: the download broadcast to 7 ranks, then per worker rank the int16 exponents (n + one
    flag per tensor; an allreduce counts twice) and the int64 sums (n + one vote count per unmasked
    tensor), about 1/30 of the 1,000 uploads a gather would move."""
    sizes = model_parameters()
    n, tensors = sum(sizes.values()), len(sizes)
    rounds, clients = scale["resumed"]["rounds"], scale["resumed"]["clients"]
    for r, payload in zip(rounds["round"], rounds["mpi_payload_bytes"]):
        this = clients["round"] == r
        download = int(clients["download_bytes"][this][0])
        assert payload == (RANKS - 1) * (download + 2 * 2 * (n + tensors) + 8 * (n + tensors)), r
        assert 30 * payload < int(clients["upload_bytes"][this].sum())


@needs_mpiexec
def test_rank0_peak_memory_grows_with_p_times_the_model_not_with_the_clients(scale):
    """Rank 0's peak resident set (``server_peak_rss_bytes``) with 1,000 clients per round against the
    same P = 8 run with 7: same interpreters, torch, data, model and MPI, so the difference is what
    rank 0 needs for 993 more clients. It must stay below 16 × P × model bytes (the merge holds O(n)
    arrays: exponents, int64 sums, the global model) plus 16 KiB per client (reports, results rows,
    task entries: a few KB each, measured about 10 KiB together here), about 37 MiB. Holding the
    round's uploads once, as the server path's gather buffer does, would add K × model bytes = 163 MiB
    on top. Absolute values are not compared: they depend on the torch build and the MPI library."""
    model_bytes = 4 * sum(model_parameters().values())
    resumed, baseline = scale["resumed"]["rounds"], scale["baseline"]["rounds"]
    rss = resumed["server_peak_rss_bytes"]
    assert np.all(rss > 50 * MIB) and baseline["server_peak_rss_bytes"][0] > 50 * MIB
    # a high-water mark never falls within a process (rounds after checkpoint_round are the resumed one's)
    done = scale["terminated"]["checkpoint_round"]
    assert np.all(np.diff(rss[done:]) >= 0)
    bound = 16 * RANKS * model_bytes + CLIENTS * 16 * 1024
    assert bound < CLIENTS * model_bytes / 4        # the bound would catch even a quarter of the uploads
    growth = int(rss.max()) - int(baseline["server_peak_rss_bytes"][0])
    assert growth < bound, f"rank 0 grew {growth / MIB:.1f} MiB with {CLIENTS} clients, bound {bound / MIB:.1f} MiB"

    from fedmpi.results.info import info_text

    line = re.search(r"rank-0 memory:\s+peak RSS ([0-9.]+) (MiB|GiB)", info_text(scale["resumed_path"]))
    assert line, info_text(scale["resumed_path"])
    unit = MIB if line.group(2) == "MiB" else 1024 * MIB
    assert float(line.group(1)) == pytest.approx(rss.max() / unit, abs=0.01)
