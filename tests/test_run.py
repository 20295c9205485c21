"""End-to-end runs of ``python -m fedmpi`` in subprocesses (P = 1 and under mpiexec).

Covers docs/interface.md (running one experiment, the results file): rank-count independence, the
results schema, exit statuses for bad configs, failures on one rank (divergence, an exception),
``fedmpi info``, and kill / SIGTERM followed by ``--resume``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time

import h5py
import numpy as np
import pytest

from fedmpi.engine.checkpoint import read_checkpoint_file
from fedmpi.engine.state_file import write_state
from helpers import (BATCH_SCRIPT, TINY, Streaming, assert_same_metrics, fedmpi, mlp_parameter_count,
                     needs_mpiexec, read_results, same_bits, selected_clients, write_config)

CONTRACT_ROUNDS = ["round", "test_accuracy", "client_accuracy", "test_loss", "upload_bytes", "download_bytes",
                   "cum_upload_bytes", "density", "wall_seconds", "sim_seconds"]
EXTRA_ROUNDS = ["cum_download_bytes", "header_bytes", "compute_seconds", "cum_wall_seconds", "cum_sim_seconds",
                "train_flops", "cum_train_flops", "mpi_payload_bytes", "mpi_control_bytes", "server_peak_rss_bytes"]
CONTRACT_CLIENTS = ["round", "client_id", "rank", "num_samples", "upload_bytes", "download_bytes", "train_loss",
                    "compute_seconds"]
CONTRACT_ATTRS = ["config", "fedmpi_version", "git_commit", "mpi_size", "started"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def tiny_cfg(work):
    return write_config(work / "tiny.yaml")


@pytest.fixture(scope="module")
def runs(tiny_runs):
    """``runs(algorithm, ranks)``: the tiny config's (results path, results, process), from the
    session's shared runs (conftest.py)."""
    return lambda algorithm, ranks: tiny_runs(f"algorithm={algorithm}", ranks=ranks, timeout=180)


# ------------------------------------------------------------------------------ rank-count independence
@needs_mpiexec
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.slow
def test_mpi_payload_bytes_count_what_crossed_between_ranks(runs, ranks):
    """Dense FedAvg: rank 0 broadcasts one download to P−1 ranks and gathers every upload (no
    client runs on rank 0 when P > 1); with P = 1 nothing crosses MPI."""
    _, res, _ = runs("fedavg", ranks)
    rounds, clients = res["rounds"], res["clients"]
    for r, payload, control in zip(rounds["round"], rounds["mpi_payload_bytes"], rounds["mpi_control_bytes"]):
        this = clients["round"] == r
        download = int(clients["download_bytes"][this][0])
        assert np.all(clients["download_bytes"][this] == download)     # one broadcast payload
        expected = 0 if ranks == 1 else int(clients["upload_bytes"][this].sum()) + download * (ranks - 1)
        assert payload == expected, (ranks, r, payload, expected)
        assert (control > 0) == (ranks > 1)


@needs_mpiexec
@pytest.mark.parametrize("algorithm, ranks", [("fedavg", [1, 2, 4]), ("fedavgm", [1, 4]), ("fedprox", [1, 4])])
@pytest.mark.slow
def test_same_metrics_whatever_the_rank_count(runs, algorithm, ranks):
    base_path, base, _ = runs(algorithm, ranks[0])
    assert int(base["attrs"]["mpi_size"]) == ranks[0]
    assert np.all(base["clients"]["rank"] == 0)                    # P = 1: rank 0 trains everyone
    for p in ranks[1:]:
        _, other, _ = runs(algorithm, p)
        assert int(other["attrs"]["mpi_size"]) == p
        assert_same_metrics(base, other, what=f"{algorithm} P=1 vs P={p}: ")
        worker = other["clients"]["rank"]
        assert set(worker.tolist()) == set(range(1, p))     # every worker rank trained someone
    # the accuracies are real numbers, not NaN placeholders that would compare equal trivially
    assert np.all(np.isfinite(base["rounds"]["test_accuracy"]))
    assert np.all(np.isfinite(base["clients"]["train_loss"]))


@needs_mpiexec
@pytest.mark.parametrize("algorithm", ["fedavgm", "fedprox"])
@pytest.mark.slow
def test_algorithm_setting_changes_the_metrics(runs, algorithm):
    """Guards the comparison above: the algorithm really is applied (otherwise all runs coincide)."""
    _, fedavg, _ = runs("fedavg", 1)
    _, other, _ = runs(algorithm, 1)
    assert same_bits(fedavg["rounds"]["round"], other["rounds"]["round"])
    assert not same_bits(fedavg["rounds"]["test_loss"], other["rounds"]["test_loss"])


# ------------------------------------------------------------------------------ results file
@pytest.mark.slow
def test_results_file_schema_and_byte_counts(runs, tiny_cfg):
    from fedmpi.config import load_config

    path, res, proc = runs("fedavg", 1)
    attrs, rounds, clients = res["attrs"], res["rounds"], res["clients"]
    for key in CONTRACT_ATTRS + ["finished"]:
        assert key in attrs, key
    assert int(attrs["mpi_size"]) == 1
    for name in CONTRACT_ROUNDS + EXTRA_ROUNDS:
        assert name in rounds, name
        assert rounds[name].shape == (TINY["rounds"],), name
    for name in CONTRACT_CLIENTS:
        assert name in clients, name
        assert clients[name].shape == (TINY["rounds"] * TINY["clients"]["per_round"],), name
    np.testing.assert_array_equal(rounds["round"], np.arange(1, TINY["rounds"] + 1))

    # which clients trained: the server's sampling from (seed, round)
    for r in range(1, TINY["rounds"] + 1):
        rows = clients["round"] == r
        assert clients["client_id"][rows].tolist() == selected_clients(0, r, 8, 4)

    # dense MLP: every client uploads and downloads 4 bytes per parameter
    dense = 4 * mlp_parameter_count()
    assert np.all(clients["upload_bytes"] == dense)
    assert np.all(clients["download_bytes"] == dense)
    per_round = TINY["clients"]["per_round"]
    np.testing.assert_array_equal(rounds["upload_bytes"], np.full(TINY["rounds"], per_round * dense))
    np.testing.assert_array_equal(rounds["download_bytes"], np.full(TINY["rounds"], per_round * dense))
    np.testing.assert_array_equal(rounds["cum_upload_bytes"], np.cumsum(rounds["upload_bytes"]))
    np.testing.assert_array_equal(rounds["cum_download_bytes"], np.cumsum(rounds["download_bytes"]))
    for r in range(1, TINY["rounds"] + 1):
        rows = clients["round"] == r
        assert clients["upload_bytes"][rows].sum() == rounds["upload_bytes"][r - 1]
    np.testing.assert_allclose(rounds["cum_wall_seconds"], np.cumsum(rounds["wall_seconds"]), rtol=1e-9)
    np.testing.assert_allclose(rounds["cum_sim_seconds"], np.cumsum(rounds["sim_seconds"]), rtol=1e-9)
    assert np.all(rounds["wall_seconds"] > 0) and np.all(rounds["sim_seconds"] > 0)
    # rank 0's high-water mark: at least the interpreter with torch loaded, and it never falls
    assert np.all(rounds["server_peak_rss_bytes"] > 50 * 2**20)
    assert np.all(np.diff(rounds["server_peak_rss_bytes"]) >= 0)
    assert np.all(rounds["density"] > 0.999) and np.all(rounds["density"] <= 1.0)
    assert np.all((rounds["test_accuracy"] > 0) & (rounds["test_accuracy"] <= 1))
    assert np.all(np.isfinite(rounds["test_loss"]))

    # config: the fully resolved config, defaults included, as JSON
    stored = json.loads(attrs["config"])
    resolved = load_config(tiny_cfg, ["algorithm=fedavg"])
    resolved["output"]["progress"] = False          # --quiet
    assert stored == resolved
    assert stored["fedavgm"]["momentum"] == 0.9 and stored["fedprox"]["mu"] == 0.01   # the declared defaults
    assert "results in" in proc.stderr


@pytest.mark.slow
def test_info_prints_algorithm_and_accuracy(runs):
    path, res, _ = runs("fedavg", 1)
    proc, _ = fedmpi(["info", str(path)], timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fedavg" in proc.stdout
    final = res["rounds"]["test_accuracy"][-1]
    assert f"{final:.4f}" in proc.stdout
    assert "finished" in proc.stdout and "NOT finished" not in proc.stdout


# ------------------------------------------------------------------------------ bad configs
BAD = [
    # (id, extra args, texts stderr must contain)
    ("unknown_key", ["--set", "data.alhpa=1"], ["data.alhpa", "data.alpha"]),
    ("unknown_section_key", ["--set", "fedavgm.momentom=0.5"], ["fedavgm.momentom", "fedavgm.momentum"]),
    ("wrong_type", ["--set", "rounds=abc"], ["rounds", "abc"]),
    ("per_round_gt_total", ["--set", "clients.per_round=9"], ["clients.per_round"]),
    ("unknown_dataset", ["--set", "data.name=imagenet"], ["data.name", "imagenet"]),
    ("unknown_model", ["--set", "model=resnet9000"], ["model", "resnet9000"]),
    ("unknown_algorithm", ["--set", "algorithm=fedfoo"], ["algorithm", "fedfoo"]),
    ("negative_lr", ["--set", "local.lr=-0.1"], ["local.lr"]),
]


@pytest.fixture(scope="module")
def cli_batch(work, tiny_cfg, runs):
    """Bad configs, a missing dataset, a broken YAML file and an existing --out, in one interpreter."""
    empty = work / "no_fmnist_here"
    empty.mkdir()
    broken = work / "broken.yaml"
    broken.write_text("data: {name: synthetic\nrounds: [")
    finished_path = runs("fedavg", 1)[0]
    cases = {}
    for case, args, needles in BAD:
        cases[case] = (["run", str(tiny_cfg), "--out", str(work / f"bad_{case}.h5"), "--quiet", *args], needles)
    cases["missing_data"] = (["run", str(tiny_cfg), "--out", str(work / "bad_missing_data.h5"), "--quiet",
                              "--set", "data.name=fashion_mnist", "--set", f"data.root={empty}"], [str(empty)])
    cases["broken_yaml"] = (["run", str(broken), "--out", str(work / "bad_broken_yaml.h5"), "--quiet"],
                            [str(broken)])
    cases["existing_out"] = (["run", str(tiny_cfg), "--out", str(finished_path), "--quiet"],
                             [str(finished_path), "--force"])
    cases["resume_finished"] = (["run", str(tiny_cfg), "--out", str(finished_path), "--quiet", "--resume"],
                                ["already finished"])
    # a file where the output directory should be: refused before any data is loaded
    cases["unwritable_out"] = (["run", str(tiny_cfg), "--out", str(tiny_cfg / "x.h5"), "--quiet"],
                               ["--out", str(tiny_cfg / "x.h5"), "writable path"])
    argv_file = work / "batch.json"
    argv_file.write_text(json.dumps([argv for argv, _ in cases.values()]))
    script = work / "cli_batch.py"
    script.write_text(BATCH_SCRIPT)
    before = finished_path.read_bytes()
    proc, _ = fedmpi([str(script), str(argv_file)], timeout=120, module=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: (res, needles) for (case, (_, needles)), res in zip(cases.items(), results)} | {
        "_unchanged": finished_path.read_bytes() == before}


@pytest.mark.parametrize("case", [b[0] for b in BAD] + ["missing_data", "broken_yaml"])
@pytest.mark.slow
def test_bad_config_exits_2_naming_the_key(cli_batch, work, case):
    res, needles = cli_batch[case]
    assert res["rc"] == 2, res["stderr"]
    for needle in needles:
        assert needle in res["stderr"], (needle, res["stderr"])
    assert "Traceback" not in res["stderr"]
    out = work / f"bad_{case}.h5"
    assert not out.exists() and not out.with_suffix(".ckpt").exists()


@pytest.mark.slow
def test_bad_config_exit_status_of_the_real_command(work, tiny_cfg):
    out = work / "bad_real.h5"
    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "data.alhpa=1"], timeout=60)
    assert proc.returncode == 2
    assert "data.alhpa" in proc.stderr and "data.alpha" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_existing_out_without_force_is_refused(cli_batch):
    res, needles = cli_batch["existing_out"]
    assert res["rc"] == 2
    for needle in needles:
        assert needle in res["stderr"]
    assert cli_batch["_unchanged"]


@pytest.mark.slow
def test_unwritable_out_exits_2_before_training(cli_batch):
    res, needles = cli_batch["unwritable_out"]
    assert res["rc"] == 2, res["stderr"]
    for needle in needles:
        assert needle in res["stderr"], (needle, res["stderr"])
    assert "Traceback" not in res["stderr"]


@pytest.mark.slow
def test_resume_of_a_finished_run_does_nothing(cli_batch):
    res, needles = cli_batch["resume_finished"]
    assert res["rc"] == 0 and needles[0] in res["stderr"]
    assert cli_batch["_unchanged"]


@needs_mpiexec
@pytest.mark.parametrize("case, args, needle", [
    ("unknown_key", ["--set", "data.alhpa=1"], "data.alhpa"),          # fails while parsing, every rank
    ("unknown_dataset", ["--set", "data.name=imagenet"], "data.name"),  # fails in setup, gathered
], ids=["unknown_key", "unknown_dataset"])
@pytest.mark.slow
def test_bad_config_under_mpiexec_exits_2_reported_once(work, tiny_cfg, case, args, needle):
    out = work / f"bad_mpi_{case}.h5"
    proc, seconds = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", *args], ranks=2, timeout=90)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if needle in line]
    assert len(lines) == 1, proc.stderr                               # rank 0 prints, once
    assert not out.exists()
    assert seconds < 30, f"took {seconds:.1f}s"


def test_scientific_notation_override_parses_as_float():
    from fedmpi.config import load_config

    assert load_config(None, ["local.lr=1.0e-3"])["local"]["lr"] == 1e-3
    assert load_config(None, ["local.lr=0.001"])["local"]["lr"] == 1e-3


def test_exponent_without_dot_override_parses_as_float():
    from fedmpi.config import load_config

    assert load_config(None, ["local.lr=1e-3"])["local"]["lr"] == 1e-3


# ------------------------------------------------------------------------------ failures on one rank
DIVERGE = re.compile(r"training diverged at round (\d+), client (\d+)")


@needs_mpiexec
@pytest.mark.slow
def test_divergence_under_mpiexec_ends_every_rank_promptly(work, tiny_cfg):
    out = work / "diverge.h5"
    # lr = 20 makes the loss NaN a round or two in (1e30 would do too, written as 1.0e+30)
    proc, seconds = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "local.lr=20.0"],
                           ranks=3, timeout=120)
    assert proc.returncode != 0
    assert seconds < 30, f"took {seconds:.1f}s"
    match = DIVERGE.search(proc.stderr)
    assert match, proc.stderr
    round_, client = int(match.group(1)), int(match.group(2))
    assert client in selected_clients(0, round_, 8, 4)
    assert re.search(r"fedmpi: rank [12]: training diverged", proc.stderr), proc.stderr
    # the results file stays readable and holds every round before the failure, unfinished
    res = read_results(out)
    assert "finished" not in res["attrs"]
    np.testing.assert_array_equal(res["rounds"]["round"], np.arange(1, round_))
    assert len(res["clients"]["round"]) == 4 * (round_ - 1)
    if round_ > 1:
        assert np.all(np.isfinite(res["rounds"]["test_accuracy"]))
    # and fedmpi's own reader copes with it
    info, _ = fedmpi(["info", str(out)], timeout=60)
    assert info.returncode == 0 and "NOT finished" in info.stdout, info.stderr


@needs_mpiexec
@pytest.mark.slow
def test_aborted_run_file_opens_as_swmr_reader(work, tiny_cfg):
    """A killed SWMR writer leaves HDF5's write flag set: the file opens with swmr=True (what
    fedmpi's readers use, documented in the README), every completed round intact."""
    out = work / "diverge.h5"
    if not out.exists():
        proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "local.lr=20.0"],
                         ranks=3, timeout=120)
        assert proc.returncode != 0
    with h5py.File(out, "r", swmr=True) as f:
        rounds = f["rounds/round"][:]
        assert np.array_equal(rounds, np.arange(1, len(rounds) + 1))
        assert all(f["rounds"][k].shape == rounds.shape for k in f["rounds"])


FAILING_SCRIPT = textwrap.dedent("""
    import sys
    from mpi4py import MPI
    from fedmpi.algorithms.fedavg import FedAvg
    from fedmpi.cli import main

    FAIL_CLIENT = int(sys.argv[1])

    class FailingFedAvg(FedAvg):
        name = "failing_fedavg"
        label = "FedAvg failing at one client"
        doc = "tests/test_run.py"

        def local_update(self, task, trainer):
            if task.client_id == FAIL_CLIENT:
                raise RuntimeError(f"injected failure of client {task.client_id} in round {task.round} "
                                   f"on rank {MPI.COMM_WORLD.Get_rank()}")
            return super().local_update(task, trainer)

    sys.exit(main(sys.argv[2:]))
""")


@needs_mpiexec
@pytest.mark.slow
def test_exception_on_one_worker_ends_every_rank_with_its_message(work, tiny_cfg):
    fail_client = 2
    first = next((r for r in range(1, TINY["rounds"] + 1) if fail_client in selected_clients(0, r, 8, 4)), None)
    assert first is not None, "client 2 is never sampled: pick another client"
    script = work / "failing_worker.py"
    script.write_text(FAILING_SCRIPT)
    out = work / "worker_failure.h5"
    proc, seconds = fedmpi([str(script), str(fail_client), "run", str(tiny_cfg), "--out", str(out), "--quiet",
                            "--set", "algorithm=__main__:FailingFedAvg"], ranks=3, timeout=120, module=False)
    assert proc.returncode != 0
    assert seconds < 30, f"took {seconds:.1f}s"
    match = re.search(r"fedmpi: rank (\d+): RuntimeError: injected failure of client 2 in round (\d+) on rank (\d+)",
                      proc.stderr)
    assert match, proc.stderr
    assert match.group(1) == match.group(3) and int(match.group(1)) in (1, 2)   # the worker's own rank
    assert int(match.group(2)) == first
    res = read_results(out)
    assert "finished" not in res["attrs"]
    np.testing.assert_array_equal(res["rounds"]["round"], np.arange(1, first))


# ------------------------------------------------------------------------------ kill, SIGTERM, resume
RESUME_ARGS = ["--set", "rounds=6", "--set", "local.epochs=4", "--set", "eval.every=2",
               "--set", "checkpoint.every=1"]
NO_CHECKPOINTS = RESUME_ARGS[:-2]


@pytest.fixture(scope="module")
def uninterrupted(work, tiny_cfg):
    out = work / "reference.h5"
    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", *RESUME_ARGS], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not out.with_suffix(".ckpt").exists()           # removed once the run completed
    res = read_results(out)
    assert "finished" in res["attrs"]
    np.testing.assert_array_equal(res["rounds"]["round"], np.arange(1, 7))
    # eval.every = 2: odd rounds are not evaluated and hold NaN
    assert np.all(np.isnan(res["rounds"]["test_accuracy"][0::2]))
    assert np.all(np.isfinite(res["rounds"]["test_accuracy"][1::2]))
    return res


@pytest.fixture(scope="module")
def killed(work, tiny_cfg):
    """A run with a checkpoint every round, SIGKILLed once round 3 is written."""
    out = work / "killed.h5"
    run = Streaming(["run", str(tiny_cfg), "--out", str(out), "--progress", *RESUME_ARGS])
    run.wait_for_line(r"^round 3/6", timeout=120)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make rounds slower")
    os.kill(run.proc.pid, signal.SIGKILL)
    rc, _ = run.finish(timeout=30)
    assert rc == -signal.SIGKILL
    return out


@pytest.mark.slow
def test_sigkill_leaves_a_readable_partial_file_and_a_checkpoint(killed, uninterrupted):
    ckpt = killed.with_suffix(".ckpt")
    assert ckpt.exists()
    checkpoint_round = read_checkpoint_file(ckpt)["round"]
    assert 2 <= checkpoint_round < 6
    partial = read_results(killed)
    assert "finished" not in partial["attrs"]
    done = len(partial["rounds"]["round"])
    assert 3 <= done < 6 and done >= checkpoint_round
    np.testing.assert_array_equal(partial["rounds"]["round"], np.arange(1, done + 1))
    clients_done = len(partial["clients"]["round"])
    assert clients_done == 4 * done
    assert_same_metrics(partial, {"rounds": uninterrupted["rounds"],
                                  "clients": {k: v[:clients_done] for k, v in uninterrupted["clients"].items()}},
                        rounds=done, what="partial: ")
    info, _ = fedmpi(["info", str(killed)], timeout=60)
    assert info.returncode == 0 and "NOT finished" in info.stdout, info.stderr


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(killed, tiny_cfg, uninterrupted):
    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(killed), "--quiet", "--resume", *RESUME_ARGS],
                     timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(killed)
    assert "finished" in resumed["attrs"]
    assert not killed.with_suffix(".ckpt").exists()
    assert_same_metrics(resumed, uninterrupted, what="resumed after SIGKILL: ")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_matches(work, tiny_cfg, uninterrupted):
    out = work / "terminated.h5"
    ckpt = out.with_suffix(".ckpt")
    args = ["run", str(tiny_cfg), "--out", str(out), "--progress", *NO_CHECKPOINTS]
    run = Streaming(args)
    run.wait_for_line(r"^round 2/6", timeout=120)
    if run.proc.poll() is not None:
        pytest.fail("the run finished before SIGTERM; make rounds slower")
    run.proc.send_signal(signal.SIGTERM)
    rc, stderr = run.finish(timeout=60)
    assert rc == 75, stderr
    assert ckpt.exists()
    assert "resume with --resume" in stderr
    checkpoint_round = read_checkpoint_file(ckpt)["round"]
    partial = read_results(out)
    assert "finished" not in partial["attrs"]
    # the round in progress was finished, written and checkpointed
    assert 2 <= checkpoint_round < 6
    np.testing.assert_array_equal(partial["rounds"]["round"], np.arange(1, checkpoint_round + 1))
    with h5py.File(out, "r") as f:                      # closed cleanly: plain readers work
        assert f["rounds/round"].shape == (checkpoint_round,)

    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--resume", *NO_CHECKPOINTS],
                     timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = read_results(out)
    assert "finished" in resumed["attrs"] and "resumed" in resumed["attrs"]
    assert not ckpt.exists()
    assert_same_metrics(resumed, uninterrupted, what="resumed after SIGTERM: ")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.slow
def test_corrupt_checkpoint_given_to_resume_exits_2_naming_it(work, tiny_cfg, damage):
    out = work / f"corrupt_{damage}.h5"
    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "rounds=2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = out.with_suffix(".ckpt")
    with h5py.File(out, "r+") as f:      # pretend the run was cut short after round 1
        del f.attrs["finished"]
    good = io.BytesIO()
    write_state(good, {"totals": {}, "client_states": {}, "known_masks": {}, "algorithm": {}},
                {"round": 1, "config_identity": ""})
    good = good.getvalue()
    ckpt.write_bytes(good[: len(good) // 2] if damage == "truncated" else b"not a checkpoint at all")
    proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "rounds=2", "--resume"],
                     timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(ckpt) in proc.stderr and "corrupt" in proc.stderr


@needs_mpiexec
@pytest.mark.slow
def test_results_directory_removed_mid_run_ends_every_rank_naming_the_file(work, tiny_cfg):
    """HDF5 would keep writing into the unlinked file: the writer notices and the job ends."""
    directory = work / "doomed"
    directory.mkdir()
    out = directory / "run.h5"
    run = Streaming(["run", str(tiny_cfg), "--out", str(out), "--progress", *RESUME_ARGS[:-2],
                     "--set", "rounds=30"], ranks=3)
    run.wait_for_line(r"^round 2/30", timeout=120)
    shutil.rmtree(directory)
    started = time.monotonic()
    rc, stderr = run.finish(timeout=60)
    assert rc != 0 and time.monotonic() - started < 30
    assert f"{out}: the results file was removed while the run was writing it" in stderr, stderr


@pytest.mark.slow
def test_full_disk_ends_the_run_naming_the_file_and_keeps_the_last_checkpoint(work, tiny_cfg):
    mount = work / "small_disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        # room for the results file (~90 kB) and one checkpoint (4 bytes per MLP parameter), not for
        # the next checkpoint, written beside it before the rename
        free = shutil.disk_usage(mount).free
        (mount / "ballast").write_bytes(b"\0" * (free - 100_000 - 6 * mlp_parameter_count()))
        out = mount / "run.h5"
        proc, _ = fedmpi(["run", str(tiny_cfg), "--out", str(out), "--quiet", "--set", "rounds=40",
                          "--set", "checkpoint.every=1"], timeout=180)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "cannot write" in proc.stderr and str(mount) in proc.stderr, proc.stderr[-2000:]
        failed = int(re.search(r"cannot write (?:the checkpoint of )?round (\d+)", proc.stderr).group(1))
        kept = read_checkpoint_file(out.with_suffix(".ckpt"))["round"]   # the last good checkpoint, whole
        assert 1 <= kept == failed - 1, (kept, proc.stderr[-500:])
        assert not out.with_suffix(".ckpt.tmp").exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
