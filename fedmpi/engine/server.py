"""The server's side (rank 0): the round loop, downloads, aggregation, metric rows.

One round: select clients from (seed, round) → assign them to worker ranks (balanced by samples)
→ build each client's download (algorithm hook) and encode it against the masks the client
already holds (clients whose encodings coincide share one payload) → bcast (one payload) or
scatterv (several) → workers train → gather reports and uploads → decode in client-id order →
``algorithm.aggregate`` → evaluate when due (every rank takes part) → append the round to the
results file, flush → checkpoint when due.

With ``aggregation.where: workers`` the uploads stay on the ranks that trained them: the tasks
carry each client's weight in the round's sum, the reports the masks each upload changed, and
instead of the gather every rank takes part in ``worker.sum_uploads``, which leaves the round's
fixed-point sums (O(model) memory) on rank 0 for ``algorithm.aggregate``.
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np

from .. import rng
from ..algorithms import ClientResult
from ..comm.codec import Encoded, MaskPositions, decode, encode
from ..errors import PreemptedError
from ..models.flops import scale_flops
from ..progress import Progress
from ..results import ResultsWriter, run_attrs
from .checkpoint import ServerState, read_checkpoint, write_checkpoint
from .context import RunContext
from .messages import RankReport, RankTask, RoundPlan, assign_clients, pack_masks, unpack_masks
from .phases import PHASES
from .worker import concatenated, sum_uploads, train_clients


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (a high-water mark, never lowered), in bytes:
    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def evaluation_due(cfg: dict, round_: int) -> bool:
    every = cfg["eval"]["every"]
    return round_ == cfg["rounds"] or (every > 0 and round_ % every == 0)


class Server:
    def __init__(self, ctx: RunContext, comm, evaluator, run):
        self.ctx, self.comm, self.evaluator, self.run = ctx, comm, evaluator, run
        self.algorithm = ctx.algorithm
        self.sums_on_workers = ctx.cfg["aggregation"]["where"] == "workers"

    def serve(self, resume: bool, attrs_extra) -> int:
        ctx, cfg, run = self.ctx, self.ctx.cfg, self.run
        algorithm = self.algorithm
        extra = {"extra_round_fields": algorithm.round_columns(), "extra_client_fields": algorithm.client_columns()}
        if resume and run.checkpoint_path.exists():
            state, algorithm_state = read_checkpoint(run.checkpoint_path, cfg)
            algorithm.load_state_dict(algorithm_state)
            writer = ResultsWriter(run.out_path, {}, resume_rounds=state.round, **extra)
        else:
            state = ServerState()
            algorithm.init_server(ctx.initial_weights, rng.generator(cfg["seed"], rng.SERVER))
            versions, version, commit = attrs_extra
            writer = ResultsWriter(run.out_path, run_attrs(cfg, self.comm.size, versions, version, commit), **extra)
        progress = Progress(cfg["rounds"], run.progress_flag, start=state.round)
        exit_code = 0
        try:
            for round_ in range(state.round + 1, cfg["rounds"] + 1):
                PHASES.next_round()
                round_row, client_rows, stop_requested = self.round(round_, state)
                writer.append_round(round_row, client_rows)
                progress.update(round_row)
                PHASES.mark("write results")
                state.round = round_
                every = cfg["checkpoint"]["every"]
                preempt = stop_requested or run.terminate_requested
                if preempt or (every > 0 and round_ % every == 0 and round_ < cfg["rounds"]):
                    write_checkpoint(run.checkpoint_path, state, algorithm.state_dict(), cfg)
                if preempt and round_ < cfg["rounds"]:
                    exit_code = PreemptedError.exit_code
                    progress.note(f"SIGTERM: checkpoint written after round {round_}; resume with --resume")
                    break
        finally:
            progress.close()
        self.comm.bcast_object(RoundPlan(stop=True))
        PHASES.report(self.comm.rank)
        writer.close(finished=exit_code == 0)
        if exit_code == 0 and run.checkpoint_path.exists():
            run.checkpoint_path.unlink()
        return exit_code

    # -- one round ------------------------------------------------------------------------------
    def round(self, round_: int, state: ServerState):
        ctx, comm, algorithm = self.ctx, self.comm, self.algorithm
        started = time.perf_counter()
        traffic_before = (comm.traffic.payload_bytes, comm.traffic.control_bytes)
        clients = algorithm.select_clients(round_, rng.generator(ctx.cfg["seed"], rng.SAMPLING, round_))
        assignment = assign_clients(clients, ctx.sizes, comm.worker_ranks, ctx.cfg["local"]["client_batch"])
        rank_of = {c: r for r, cs in assignment.items() for c in cs}
        evaluate = evaluation_due(ctx.cfg, round_)

        # the weights come before training: the worker ranks apply them to their own clients
        weights = algorithm.partial_sum_weights({c: ctx.sizes[c] for c in clients}) if self.sums_on_workers else None
        tasks, payloads, sent_masks = self._encode_downloads(round_, clients, assignment, state, weights)
        broadcast = len(payloads) == 1
        PHASES.mark("prepare")
        comm.bcast_object(RoundPlan(stop=False, round=round_, broadcast=broadcast, evaluate=evaluate))
        task = comm.scatter_objects(tasks)
        if broadcast:
            buffer = comm.bcast_buffer(payloads[0].data)
        else:
            buffer = comm.scatter_buffers([
                np.concatenate([payloads[i].data for i in t.layouts]) if t.layouts else np.zeros(0, np.uint8)
                for t in tasks])
        PHASES.mark("send")
        own_reports, own_uploads = train_clients(ctx, round_, task, buffer)   # P = 1: every client
        PHASES.mark("train")
        rank_reports: list[RankReport] = comm.gather_objects(RankReport(own_reports, self.run.terminate_requested))
        PHASES.mark("wait for reports")
        stop_requested = any(r.terminate_requested for r in rank_reports)
        reports = sorted((c for r in rank_reports for c in r.clients), key=lambda c: c.client_id)  # merge order
        sums, uploads = None, {}   # uploads: client → its upload bytes
        if self.sums_on_workers:
            sums = sum_uploads(ctx, comm, own_uploads, task.sum_weights)
        elif comm.size == 1:   # nothing crosses MPI: the uploads as encoded, not copied into one buffer
            uploads = {u.client_id: u.encoded.data for u in own_uploads}
        else:
            buffers = comm.gather_buffers(concatenated(own_uploads))
            PHASES.mark("receive uploads")
            for rank, rank_report in enumerate(rank_reports):
                offset = 0
                for client in rank_report.clients:
                    uploads[client.client_id] = buffers[rank][offset:offset + client.upload_bytes]
                    offset += client.upload_bytes
        results, client_rows = [], []
        positions = MaskPositions()   # each mask sent this round, scanned once for all its uploads
        for report in reports:
            c = report.client_id
            if sums is None:
                update = decode(Encoded(report.layout, uploads.pop(c)), sent_masks[c], densify=False,
                                positions_cache=positions)
                changed = update.masks
            else:
                if report.num_samples != ctx.sizes[c]:
                    raise RuntimeError(f"{algorithm.name}: client {c} trained on {report.num_samples} samples, but its "
                                       f"weight in the workers' sum assumed its {ctx.sizes[c]} training samples")
                update, changed = None, unpack_masks(report.changed_masks or {})
            results.append(ClientResult(c, report.num_samples, update, report.train_loss, report.samples_processed,
                                        report.state, report.densities, report.metrics))
            if report.state:
                state.client_states[c] = report.state
            held = {**sent_masks[c], **changed}
            if held:
                state.known_masks[c] = pack_masks(held)
            client_rows.append(self._client_row(round_, report, rank_of[c]))
        if sums is None:
            algorithm.aggregate(round_, results)
        else:
            algorithm.aggregate(round_, results, sums)
        metrics = algorithm.round_metrics(round_)
        PHASES.mark("merge")
        if evaluate:
            outcomes = self.evaluator.run(algorithm.evaluation_models(round_))
            metrics.update(algorithm.evaluation_metrics(round_, outcomes))
            PHASES.mark("evaluate")
        wall = time.perf_counter() - started
        round_row = self._round_row(round_, state, client_rows, metrics, wall)
        round_row["mpi_payload_bytes"] = comm.traffic.payload_bytes - traffic_before[0]
        round_row["mpi_control_bytes"] = comm.traffic.control_bytes - traffic_before[1]
        # machine state, not a result: what rank 0 needed, gather or reductions, decoding, evaluation
        round_row["server_peak_rss_bytes"] = peak_rss_bytes()
        return round_row, client_rows, stop_requested

    def _client_row(self, round_: int, report, rank: int) -> dict:
        ctx = self.ctx
        flops = report.samples_processed * 3 * scale_flops(ctx.info.layer_flops, report.densities)
        sim = ctx.profile.client_seconds(report.client_id, report.samples_processed, report.densities,
                                         report.upload_bytes, report.download_bytes)
        return {
            "round": round_, "client_id": report.client_id, "rank": rank, "num_samples": report.num_samples,
            "upload_bytes": report.upload_bytes, "download_bytes": report.download_bytes,
            "header_bytes": report.header_bytes, "train_loss": report.train_loss,
            "compute_seconds": report.compute_seconds, "train_flops": float(flops), "sim_seconds": sim,
            **report.metrics,
        }

    def _round_row(self, round_: int, state: ServerState, client_rows: list[dict], metrics: dict, wall: float):
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
        return {
            "test_accuracy": nan, "client_accuracy": nan, "test_loss": nan,   # unless evaluated
            **metrics,
            "round": round_,
            "upload_bytes": upload, "download_bytes": download,
            "cum_upload_bytes": totals.upload_bytes, "cum_download_bytes": totals.download_bytes,
            "header_bytes": sum(r["header_bytes"] for r in client_rows),
            "density": self.algorithm.density(),
            "wall_seconds": wall, "cum_wall_seconds": totals.wall_seconds,
            "compute_seconds": sum(r["compute_seconds"] for r in client_rows),
            "sim_seconds": sim, "cum_sim_seconds": totals.sim_seconds,
            "train_flops": flops, "cum_train_flops": totals.train_flops,
        }

    def _encode_downloads(self, round_: int, clients: list[int], assignment: dict[int, list[int]],
                          state: ServerState, sum_weights: dict[int, int] | None):
        """Encode each client's download against the masks it already holds. Clients whose
        encodings coincide share one payload; returns (per-rank tasks, distinct payloads, the masks
        each client was sent). ``sum_weights``: each client's weight when the ranks sum the uploads."""
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
                payloads.append(encode(update, reference, schema=self.ctx.info.shapes))
            payload_of[c] = index_of_key[key]
        tasks = []
        for r in range(self.comm.size):
            mine = assignment.get(r, [])
            needed = sorted({payload_of[c] for c in mine})
            offsets, position = {}, 0
            for i in needed:
                offsets[i] = (position, payloads[i].nbytes)
                position += payloads[i].nbytes
            tasks.append(RankTask(
                clients=mine, payload_of={c: payload_of[c] for c in mine},
                layouts={i: payloads[i].layout for i in needed}, offsets=offsets,
                states={c: state.client_states.get(c, {}) for c in mine},
                known_masks={c: state.known_masks[c] for c in mine if c in state.known_masks},
                sum_weights=None if sum_weights is None else {c: sum_weights[c] for c in mine}))
        return tasks, payloads, {c: u.masks for c, u in updates.items()}
