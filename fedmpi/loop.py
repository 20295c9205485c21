"""The round loop. Rank 0 is the server; ranks 1..P-1 train clients (rank 0 trains them all
when P = 1). One round:

    server: select clients from (seed, round) → assign them to worker ranks (balanced by samples)
            → build each client's download (algorithm hook) → encode against what the client
            already knows → bcast (one variant) or scatter (several) to the worker ranks
    worker: for each of its clients in id order: decode → algorithm.local_update → encode upload
    all   : gather payloads to rank 0
    server: decode in client-id order → algorithm.aggregate → evaluate (spread over all ranks)
            → append the round to the HDF5 file → checkpoint when due

Per-client device state (persistent algorithm state, the masks the client last saw) lives on the
server between rounds and travels with the task to whichever rank trains the client, so no result
depends on the rank count. All MPI goes through ``comm.transport.Communicator``.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .algorithms import ClientResult, ClientTask, ModelInfo, build_algorithm
from .comm.codec import Encoded, ModelUpdate, decode, encode
from .comm.transport import Communicator
from .errors import ConfigError, FedmpiError, PreemptedError
from .models import build_model, maskable_parameter_names
from .models.flops import layer_flops, scale_flops
from .progress import Progress
from .results import ResultsWriter, checkpoint_path, run_attrs
from .timing import PROFILES, client_seconds
from .training import LocalTrainer


# ----------------------------------------------------------------------------- helpers
def assign_clients(clients: list[int], sizes: dict[int, int], ranks: list[int]) -> dict[int, list[int]]:
    """Largest-first greedy: each client to the least-loaded rank (ties: lowest rank)."""
    load = {r: 0 for r in ranks}
    assignment: dict[int, list[int]] = {r: [] for r in ranks}
    for c in sorted(clients, key=lambda c: (-sizes[c], c)):
        target = min(ranks, key=lambda r: (load[r], r))
        assignment[target].append(c)
        load[target] += sizes[c]
    return {r: sorted(cs) for r, cs in assignment.items()}


def pack_masks(masks: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {n: (m.shape, np.packbits(m.reshape(-1))) for n, m in masks.items()}


def unpack_masks(packed: dict[str, tuple]) -> dict[str, np.ndarray]:
    return {n: np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
            for n, (shape, bits) in packed.items()}


def evaluation_due(cfg: dict, round_: int) -> bool:
    every = cfg["eval"]["every"]
    return round_ == cfg["rounds"] or (every > 0 and round_ % every == 0)


def torch_device(cfg: dict) -> str:
    if cfg["device"]["torch"] == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("device.torch", "is 'cuda' but torch sees no GPU on this node")
    override = os.environ.get("FEDMPI_DEVICE")
    if override:
        return override
    local_rank = next((int(os.environ[v]) for v in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                                    "SLURM_LOCALID") if v in os.environ), 0)
    return f"cuda:{local_rank % torch.cuda.device_count()}"


@dataclass
class RoundTotals:
    """Cumulative counters carried across rounds (and through checkpoints)."""

    upload_bytes: int = 0
    download_bytes: int = 0
    wall_seconds: float = 0.0
    sim_seconds: float = 0.0
    train_flops: float = 0.0


@dataclass
class ServerState:
    round: int = 0
    totals: RoundTotals = field(default_factory=RoundTotals)
    client_states: dict = field(default_factory=dict)    # client → algorithm device state
    known_masks: dict = field(default_factory=dict)      # client → packed masks it last held


# ----------------------------------------------------------------------------- the run
class Run:
    def __init__(self, cfg: dict, comm: Communicator, out_path: Path, *, resume: bool = False,
                 progress: bool | None = None, versions: dict | None = None, version: str = "",
                 commit: str = ""):
        self.cfg = cfg
        self.comm = comm
        self.out_path = Path(out_path)
        self.checkpoint_path = checkpoint_path(self.out_path)
        self.resume = resume
        self.progress_flag = progress
        self.attrs_extra = (versions or {}, version, commit)
        self.terminate_requested = False

    # -- setup on every rank; a failure anywhere stops every rank before round 1 -------------
    def setup(self) -> None:
        error = None
        try:
            self._setup_local()
        except FedmpiError as exc:
            error = (exc.exit_code, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported with the rank, then every rank stops
            error = (1, f"{type(exc).__name__}: {exc}")
        errors = self.comm.gather_objects((self.comm.rank, error))
        verdict = None
        if self.comm.is_server:
            failed = [(r, e) for r, e in errors if e is not None]
            if failed:
                rank, (code, message) = failed[0]
                verdict = (code, message if self.comm.size == 1 else f"rank {rank}: {message}")
        verdict = self.comm.bcast_object(verdict)
        if verdict is not None:
            exc = FedmpiError(verdict[1])
            exc.exit_code = verdict[0]
            raise exc

    def _setup_local(self) -> None:
        from .data import load_dataset, partition_dataset

        cfg = self.cfg
        torch.set_num_threads(1)
        data = cfg["data"]
        self.dataset = load_dataset(data["name"], data["root"], seed=cfg["seed"],
                                    num_clients=cfg["clients"]["total"], synthetic=data["synthetic"])
        self.partition = partition_dataset(
            self.dataset, data["partition"], cfg["clients"]["total"], seed=cfg["seed"],
            alpha=data["alpha"], shard_size=data["shard_size"], shards_per_client=data["shards_per_client"])
        empty = [c for c, idx in enumerate(self.partition.train_indices) if len(idx) == 0]
        if empty:
            raise ConfigError("data.partition", f"clients {empty[:5]} have no training data; "
                              "use fewer clients.total or a larger data.alpha")
        self.sizes = {c: len(idx) for c, idx in enumerate(self.partition.train_indices)}
        self.device = torch_device(cfg)
        model = build_model(cfg["model"], self.dataset.input_shape, self.dataset.num_classes)
        torch.manual_seed(rng.torch_seed(cfg["seed"], rng.INIT))
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        state = model.state_dict()
        shapes = {n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()}
        self.info = ModelInfo(shapes, maskable_parameter_names(model),
                              layer_flops(model, self.dataset.input_shape))
        self.initial_weights = {n: state[n].detach().numpy().copy() for n in shapes}
        self.trainer = LocalTrainer(model, cfg["local"], self.device)
        self.algorithm = build_algorithm(cfg, self.info)
        self.x_train = torch.from_numpy(self.dataset.x_train)
        self.y_train = torch.from_numpy(self.dataset.y_train)
        self.x_test = torch.from_numpy(self.dataset.x_test)
        self.y_test = torch.from_numpy(self.dataset.y_test)
        self.profile = PROFILES[cfg["device"]["profile"]]
        if self.comm.is_server and self.resume and self.checkpoint_path.exists():
            with open(self.checkpoint_path, "rb") as f:
                self.checkpoint = pickle.load(f)
            if self.checkpoint["config_identity"] != _config_identity(cfg):
                raise ConfigError("--resume", f"{self.checkpoint_path} was written by a run with a different "
                                  "config; remove it or resume with the same config")
        else:
            self.checkpoint = None

    # -- entry ---------------------------------------------------------------------------------
    def execute(self) -> int:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            if self.comm.is_server:
                return self._serve()
            self._work()
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        # finish the round, checkpoint, exit 75 -- decided by the server once per round
        self.terminate_requested = True

    # -- server --------------------------------------------------------------------------------
    def _serve(self) -> int:
        cfg, comm = self.cfg, self.comm
        state = ServerState()
        if self.checkpoint is not None:
            ck = self.checkpoint
            state = ServerState(ck["round"], RoundTotals(**ck["totals"]), ck["client_states"], ck["known_masks"])
            self.algorithm.load_state_dict(ck["algorithm"])
            writer = ResultsWriter(self.out_path, {}, resume_rounds=state.round)
        else:
            self.algorithm.init_server(self.initial_weights, rng.generator(cfg["seed"], rng.SERVER))
            versions, version, commit = self.attrs_extra
            writer = ResultsWriter(self.out_path, run_attrs(cfg, comm.size, versions, version, commit))
        progress = Progress(cfg["rounds"], self.progress_flag, start=state.round)
        exit_code = 0
        try:
            for round_ in range(state.round + 1, cfg["rounds"] + 1):
                round_row, client_rows, stop_requested = self._server_round(round_, state)
                writer.append_round(round_row, client_rows)
                progress.update(round_row)
                state.round = round_
                every = cfg["checkpoint"]["every"]
                preempt = stop_requested or self.terminate_requested
                if preempt or (every > 0 and round_ % every == 0 and round_ < cfg["rounds"]):
                    self._write_checkpoint(state)
                if preempt and round_ < cfg["rounds"]:
                    exit_code = PreemptedError.exit_code
                    progress.note(f"SIGTERM: checkpoint written after round {round_}; resume with --resume")
                    break
        finally:
            progress.close()
        comm.bcast_object({"stop": True})
        writer.close(finished=exit_code == 0)
        if exit_code == 0 and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()
        return exit_code

    def _write_checkpoint(self, state: ServerState) -> None:
        payload = {
            "round": state.round,
            "totals": vars(state.totals),
            "client_states": state.client_states,
            "known_masks": state.known_masks,
            "algorithm": self.algorithm.state_dict(),
            "config_identity": _config_identity(self.cfg),
        }
        tmp = self.checkpoint_path.with_suffix(".ckpt.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)  # atomic: a kill leaves the old or the new one

    def _server_round(self, round_: int, state: ServerState):
        cfg, comm, algorithm = self.cfg, self.comm, self.algorithm
        started = time.perf_counter()
        traffic_before = (comm.traffic.payload_bytes, comm.traffic.control_bytes)
        clients = algorithm.select_clients(round_, rng.generator(cfg["seed"], rng.SAMPLING, round_))
        assignment = assign_clients(clients, self.sizes, comm.worker_ranks)
        rank_of = {c: r for r, cs in assignment.items() for c in cs}
        evaluate = evaluation_due(cfg, round_)

        per_rank_tasks, payloads, sent_masks = self._encode_downloads(round_, clients, assignment, state)
        broadcast = len(payloads) == 1
        comm.bcast_object({"stop": False, "round": round_, "broadcast": broadcast, "evaluate": evaluate})
        task = comm.scatter_objects(per_rank_tasks)
        if broadcast:
            buffer = comm.bcast_buffer(payloads[0].data)
        else:
            buffer = comm.scatter_buffers([
                np.concatenate([payloads[i].data for i in t["layouts"]]) if t["layouts"] else np.zeros(0, np.uint8)
                for t in per_rank_tasks])
        metas, upload = self._train_clients(round_, task, buffer)
        reports = comm.gather_objects((metas, self.terminate_requested))
        buffers = comm.gather_buffers(upload)
        metas = [rank_metas for rank_metas, _ in reports]
        stop_requested = any(stop for _, stop in reports)

        # decode and aggregate in client-id order
        entries = []
        for r, rank_metas in enumerate(metas):
            offset = 0
            for meta in rank_metas:
                data = buffers[r][offset:offset + meta["upload_bytes"]]
                offset += meta["upload_bytes"]
                entries.append((meta, data))
        entries.sort(key=lambda e: e[0]["client_id"])
        results, client_rows = [], []
        for meta, data in entries:
            c = meta["client_id"]
            update = decode(Encoded(meta["layout"], data), self.info.shapes, sent_masks[c])
            results.append(ClientResult(c, meta["num_samples"], update, meta["train_loss"],
                                        meta["samples_processed"], meta["state"], meta["densities"]))
            if meta["state"]:
                state.client_states[c] = meta["state"]
            held = {**sent_masks[c], **update.masks}
            if held:
                state.known_masks[c] = pack_masks(held)
            flops = meta["samples_processed"] * 3 * scale_flops(self.info.layer_flops, meta["densities"])
            sim = client_seconds(self.profile, flops, meta["upload_bytes"], meta["download_bytes"])
            client_rows.append({
                "round": round_, "client_id": c, "rank": rank_of[c], "num_samples": meta["num_samples"],
                "upload_bytes": meta["upload_bytes"], "download_bytes": meta["download_bytes"],
                "header_bytes": meta["header_bytes"], "train_loss": meta["train_loss"],
                "compute_seconds": meta["compute_seconds"], "train_flops": float(flops), "sim_seconds": sim,
            })
        algorithm.aggregate(round_, results)

        accuracy = self._evaluate(algorithm.global_weights()) if evaluate else None
        wall = time.perf_counter() - started

        totals = state.totals
        upload = sum(r["upload_bytes"] for r in client_rows)
        download = sum(r["download_bytes"] for r in client_rows)
        flops = sum(r["train_flops"] for r in client_rows)
        sim = max(r["sim_seconds"] for r in client_rows)
        totals.upload_bytes += upload
        totals.download_bytes += download
        totals.wall_seconds += wall
        totals.sim_seconds += sim
        totals.train_flops += flops
        nan = float("nan")
        round_row = {
            "round": round_,
            "test_accuracy": accuracy["test_accuracy"] if accuracy else nan,
            "client_accuracy": accuracy["client_accuracy"] if accuracy else nan,
            "test_loss": accuracy["test_loss"] if accuracy else nan,
            "upload_bytes": upload, "download_bytes": download,
            "cum_upload_bytes": totals.upload_bytes, "cum_download_bytes": totals.download_bytes,
            "header_bytes": sum(r["header_bytes"] for r in client_rows),
            "density": self._density(algorithm.global_weights()),
            "wall_seconds": wall, "cum_wall_seconds": totals.wall_seconds,
            "compute_seconds": sum(r["compute_seconds"] for r in client_rows),
            "sim_seconds": sim, "cum_sim_seconds": totals.sim_seconds,
            "train_flops": flops, "cum_train_flops": totals.train_flops,
            # everything this round moved through MPI, payloads and control/evaluation traffic
            "mpi_payload_bytes": comm.traffic.payload_bytes - traffic_before[0],
            "mpi_control_bytes": comm.traffic.control_bytes - traffic_before[1],
        }
        return round_row, client_rows, stop_requested

    def _encode_downloads(self, round_: int, clients: list[int], assignment: dict[int, list[int]],
                          state: ServerState):
        """Encode each client's download against the masks it already holds. Clients whose
        encodings coincide share one payload; returns (per-rank task messages, distinct payloads,
        the masks each client was sent)."""
        updates = {c: self.algorithm.download(round_, c) for c in clients}  # alive all round: ids stay unique
        payloads: list[Encoded] = []
        payload_of: dict[int, int] = {}
        index_of_key: dict[tuple, int] = {}
        for c in clients:
            update = updates[c]
            reference = unpack_masks(state.known_masks.get(c, {}))
            same = tuple(n in reference and np.array_equal(reference[n], m) for n, m in update.masks.items())
            key = (id(update.values), id(update.masks), same)
            if key not in index_of_key:
                index_of_key[key] = len(payloads)
                payloads.append(encode(update, reference))
            payload_of[c] = index_of_key[key]
        tasks = []
        for r in range(self.comm.size):
            mine = assignment.get(r, [])
            needed = sorted({payload_of[c] for c in mine})
            offsets, position = {}, 0
            for i in needed:
                offsets[i] = (position, payloads[i].nbytes)
                position += payloads[i].nbytes
            tasks.append({
                "clients": mine,
                "variant_of": {c: payload_of[c] for c in mine},
                "layouts": {i: payloads[i].layout for i in needed},
                "offsets": offsets,
                "states": {c: state.client_states.get(c, {}) for c in mine},
                "known_masks": {c: state.known_masks[c] for c in mine if c in state.known_masks},
            })
        return tasks, payloads, {c: u.masks for c, u in updates.items()}

    def _density(self, weights: dict[str, np.ndarray]) -> float:
        kept = sum(int(np.count_nonzero(weights[n])) for n in self.info.maskable)
        total = sum(weights[n].size for n in self.info.maskable)
        return kept / total

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        comm = self.comm
        while True:
            plan = comm.bcast_object()
            if plan["stop"]:
                return
            round_ = plan["round"]
            task = comm.scatter_objects(None)
            if plan["broadcast"]:
                buffer = comm.bcast_buffer(None)
            else:
                buffer = comm.scatter_buffers(None)
            metas, upload = self._train_clients(round_, task, buffer)
            # SIGTERM seen here travels with the metadata; the server decides when to stop
            comm.gather_objects((metas, self.terminate_requested))
            comm.gather_buffers(upload)
            if plan["evaluate"]:
                self._evaluate(None)

    def _train_clients(self, round_: int, task: dict, buffer: np.ndarray):
        """Train this rank's clients in id order; returns (metadata, concatenated upload payloads)."""
        metas, pieces = [], []
        for c in task["clients"]:
            variant = task["variant_of"][c]
            start, length = task["offsets"][variant]
            known = unpack_masks(task["known_masks"].get(c, {}))
            received = decode(Encoded(task["layouts"][variant], buffer[start:start + length]),
                              self.info.shapes, known)
            idx = torch.from_numpy(self.partition.train_indices[c])
            client_task = ClientTask(round_, c, received, task["states"][c], self.x_train[idx],
                                     self.y_train[idx], rng.torch_seed(self.cfg["seed"], rng.CLIENT, round_, c))
            began = time.perf_counter()
            result = self.algorithm.local_update(client_task, self.trainer)
            compute = time.perf_counter() - began
            upload = encode(result.update, received.masks)
            metas.append({
                "client_id": c, "num_samples": result.num_samples, "train_loss": result.train_loss,
                "samples_processed": result.samples_processed, "densities": result.densities,
                "state": result.state, "layout": upload.layout, "upload_bytes": upload.nbytes,
                "header_bytes": upload.header_bytes, "download_bytes": length, "compute_seconds": compute,
            })
            pieces.append(upload.data)
        return metas, np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)

    # -- evaluation, spread over every rank in fixed chunks -----------------------------------------
    def _evaluate(self, weights: dict[str, np.ndarray] | None) -> dict | None:
        comm = self.comm
        packed = encode(ModelUpdate(weights)) if comm.is_server else None
        layout = comm.bcast_object(packed.layout if packed else None)
        data = comm.bcast_buffer(packed.data if packed else None, payload=False)
        weights = decode(Encoded(layout, data), self.info.shapes).values
        self.trainer.load(weights)
        model = self.trainer.model
        model.eval()
        chunk = self.cfg["eval"]["batch_size"]
        n = len(self.y_test)
        mine = []
        with torch.no_grad():
            for i, start in enumerate(range(0, n, chunk)):
                if i % comm.size != comm.rank:
                    continue
                xb = self.x_test[start:start + chunk].to(self.trainer.device)
                yb = self.y_test[start:start + chunk].to(self.trainer.device)
                logits = model(xb)
                losses = F.cross_entropy(logits, yb, reduction="none")
                correct = logits.argmax(dim=1) == yb
                mine.append((start, correct.cpu().numpy(), losses.cpu().numpy()))
        gathered = comm.gather_objects(mine)
        if not comm.is_server:
            return None
        correct = np.zeros(n, dtype=bool)
        losses = np.zeros(n, dtype=np.float32)
        for rank_chunks in gathered:
            for start, c, l in rank_chunks:
                correct[start:start + len(c)] = c
                losses[start:start + len(l)] = l
        local = [correct[idx].mean() for idx in self.partition.test_indices if len(idx)]
        return {
            "test_accuracy": float(correct.mean()),
            "test_loss": float(np.sum(losses, dtype=np.float64) / n),
            "client_accuracy": float(np.mean(local)) if local else float("nan"),
        }


def _config_identity(cfg: dict) -> str:
    """The config minus keys that may change between a run and its resumption."""
    relevant = {k: v for k, v in cfg.items() if k not in ("output", "checkpoint", "mpi")}
    return json.dumps(relevant, sort_keys=True)


def report_failure(rank: int, size: int, exc: BaseException) -> None:
    message = str(exc) if isinstance(exc, FedmpiError) else f"{type(exc).__name__}: {exc}"
    prefix = "fedmpi: error" if size == 1 else f"fedmpi: rank {rank}"
    text = f"{prefix}: {message}"
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
