"""The server's side (rank 0): the round loop, downloads, aggregation, metric rows.

One round: select clients from (seed, round) → assign them to worker ranks (balanced by samples)
→ build each client's download (algorithm hook) and encode it against the masks the client
already holds (clients whose encodings coincide share one payload) → bcast (one payload) or
scatterv (several) → workers train → gather reports and uploads → decode in client-id order →
``algorithm.aggregate`` (the round's model) → its columns (``round_metrics``, ``density``) →
evaluate when due (every rank takes part) → ``algorithm.prepare_next_round`` (a change for the
next round's download, such as PruneFL's reconfiguration; never after the last round) → append
the round to the results file, flush → checkpoint when due. So the evaluation and every column
that describes the model see the model the round's clients trained.

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
from ..progress import Progress
from ..results import ResultsWriter, run_attrs
from .checkpoint import ServerState, restored, write_checkpoint
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
        if resume:   # rank 0 read and checked a checkpoint of this config beside a file of it (engine.out_decision)
            state, algorithm_state = restored(run.checkpoint)
            algorithm.load_state_dict(algorithm_state)
            writer = ResultsWriter(run.out_path, {}, resume_rounds=state.round, **extra)
        else:
            # a checkpoint left here belongs to the run being replaced: resuming it later would mix runs
            run.checkpoint_path.unlink(missing_ok=True)
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
        """One round; returns (its results row, its clients' rows, whether a rank was asked to stop).
        The evaluation and the model's columns come before ``_prepare_next_round``: they describe
        the model the round's clients trained, not the one the next round will download."""
        started = time.perf_counter()
        traffic_before = (self.comm.traffic.payload_bytes, self.comm.traffic.control_bytes)
        clients, assignment = self._select_and_assign(round_)
        evaluate = evaluation_due(self.ctx.cfg, round_)
        tasks, payloads, sent_masks = self._prepare_downloads(round_, clients, assignment, state)
        own_task, buffer = self._send(round_, tasks, payloads, evaluate)
        own_reports, own_uploads = self._train_own_clients(round_, own_task, buffer)
        rank_reports = self._gather_reports(own_reports)
        sums, uploads = self._collect_uploads(own_task, own_uploads, rank_reports)
        results, client_rows = self._client_results(round_, rank_reports, assignment, sent_masks, sums, uploads, state)
        metrics = self._merge(round_, results, sums)
        if evaluate:
            metrics.update(self._evaluate(round_))
        metrics.update(self._prepare_next_round(round_))
        round_row = self._round_row(round_, state, client_rows, metrics, time.perf_counter() - started, traffic_before)
        return round_row, client_rows, any(r.terminate_requested for r in rank_reports)

    # -- the round's steps, in order ------------------------------------------------------------
    def _select_and_assign(self, round_: int) -> tuple[list[int], dict[int, list[int]]]:
        """The round's clients (the algorithm's choice from (seed, round)) and the worker rank of
        each, balanced by samples."""
        cfg = self.ctx.cfg
        clients = self.algorithm.select_clients(round_, rng.generator(cfg["seed"], rng.SAMPLING, round_))
        return clients, assign_clients(clients, self.ctx.sizes, self.comm.worker_ranks, cfg["local"]["client_batch"])

    def _prepare_downloads(self, round_: int, clients: list[int], assignment: dict[int, list[int]],
                           state: ServerState):
        """Per rank its task, the distinct payloads and the masks each client is sent
        (``_encode_downloads``). With the sums on the workers the tasks carry each client's weight
        in the round's sum: it is known before training, and the worker ranks apply it."""
        weights = self.algorithm.partial_sum_weights({c: self.ctx.sizes[c] for c in clients}) \
            if self.sums_on_workers else None
        prepared = self._encode_downloads(round_, clients, assignment, state, weights)
        PHASES.mark("prepare")
        return prepared

    def _send(self, round_: int, tasks: list[RankTask], payloads: list[Encoded], evaluate: bool):
        """The round's plan to every rank, each rank its task, and the payloads: one broadcast when
        every client gets the same one, else each rank the payloads of its clients back to back.
        Returns rank 0's own task and payload buffer."""
        comm = self.comm
        broadcast = len(payloads) == 1
        comm.bcast_object(RoundPlan(stop=False, round=round_, broadcast=broadcast, evaluate=evaluate))
        task = comm.scatter_objects(tasks)
        if broadcast:
            buffer = comm.bcast_buffer(payloads[0].data)
        else:
            buffer = comm.scatter_buffers([
                np.concatenate([payloads[i].data for i in t.layouts]) if t.layouts else np.zeros(0, np.uint8)
                for t in tasks])
        PHASES.mark("send")
        return task, buffer

    def _train_own_clients(self, round_: int, own_task: RankTask, buffer: np.ndarray):
        """Rank 0's share of the clients (P = 1: every client), trained as a worker trains its own."""
        own = train_clients(self.ctx, round_, own_task, buffer)
        PHASES.mark("train")
        return own

    def _gather_reports(self, own_reports) -> list[RankReport]:
        """Every rank's report on its clients (and whether it was asked to stop), in rank order."""
        rank_reports = self.comm.gather_objects(RankReport(own_reports, self.run.terminate_requested))
        PHASES.mark("wait for reports")
        return rank_reports

    def _collect_uploads(self, own_task: RankTask, own_uploads, rank_reports: list[RankReport]):
        """(sums, uploads): with the sums on the workers, every rank's share of the round's
        fixed-point sums (``worker.sum_uploads``) and no uploads; else no sums and each client's
        upload bytes (client → bytes), gathered from the ranks in the order of their reports."""
        comm = self.comm
        if self.sums_on_workers:
            return sum_uploads(self.ctx, comm, own_uploads, own_task.sum_weights), {}
        if comm.size == 1:   # nothing crosses MPI: the uploads as encoded, not copied into one buffer
            return None, {u.client_id: u.encoded.data for u in own_uploads}
        buffers = comm.gather_buffers(concatenated(own_uploads))
        PHASES.mark("receive uploads")
        uploads = {}
        for rank, rank_report in enumerate(rank_reports):
            offset = 0
            for client in rank_report.clients:
                uploads[client.client_id] = buffers[rank][offset:offset + client.upload_bytes]
                offset += client.upload_bytes
        return None, uploads

    def _client_results(self, round_: int, rank_reports: list[RankReport], assignment: dict[int, list[int]],
                        sent_masks: dict[int, dict], sums, uploads: dict[int, np.ndarray], state: ServerState):
        """Each client's ``ClientResult`` (its upload decoded, unless the ranks summed them) and
        results row, in merge order (client id); remembers what each client now holds."""
        rank_of = {c: r for r, cs in assignment.items() for c in cs}
        reports = sorted((c for r in rank_reports for c in r.clients), key=lambda c: c.client_id)  # merge order
        results, client_rows = [], []
        positions = MaskPositions()   # each mask sent this round, scanned once for all its uploads
        for report in reports:
            c = report.client_id
            update, changed = self._client_update(report, sent_masks[c], sums, uploads, positions)
            results.append(ClientResult(c, report.num_samples, update, report.train_loss, report.samples_processed,
                                        report.state, report.densities, report.metrics))
            self._remember_client(state, report, {**sent_masks[c], **changed})
            client_rows.append(self._client_row(round_, report, rank_of[c]))
        return results, client_rows

    def _client_update(self, report, sent: dict, sums, uploads: dict[int, np.ndarray], positions: MaskPositions):
        """(the client's decoded upload, the masks it changed); with the sums on the workers (no
        upload here) (None, the changed masks its report carries)."""
        c = report.client_id
        if sums is None:
            update = decode(Encoded(report.layout, uploads.pop(c)), sent, densify=False, positions_cache=positions)
            return update, update.masks
        if report.num_samples != self.ctx.sizes[c]:
            raise RuntimeError(f"{self.algorithm.name}: client {c} trained on {report.num_samples} samples, but its "
                               f"weight in the workers' sum assumed its {self.ctx.sizes[c]} training samples")
        return None, unpack_masks(report.changed_masks or {})

    @staticmethod
    def _remember_client(state: ServerState, report, held: dict) -> None:
        """What the client holds after the round, for its next task: its device state and masks."""
        if report.state:
            state.client_states[report.client_id] = report.state
        if held:
            state.known_masks[report.client_id] = pack_masks(held)

    def _merge(self, round_: int, results: list[ClientResult], sums) -> dict:
        """``algorithm.aggregate`` (with the ranks' sums when they summed): the round's model; the
        columns that describe it (``round_metrics`` and ``density``), taken before anything changes
        it for the next round."""
        if sums is None:
            self.algorithm.aggregate(round_, results)
        else:
            self.algorithm.aggregate(round_, results, sums)
        metrics = {**self.algorithm.round_metrics(round_), "density": self.algorithm.density()}
        PHASES.mark("merge")
        return metrics

    def _evaluate(self, round_: int) -> dict:
        """The algorithm's models evaluated by every rank; their metrics."""
        outcomes = self.evaluator.run(self.algorithm.evaluation_models(round_))
        metrics = self.algorithm.evaluation_metrics(round_, outcomes)
        PHASES.mark("evaluate")
        return metrics

    def _prepare_next_round(self, round_: int) -> dict:
        """``algorithm.prepare_next_round`` after every round but the last (no round would train
        what it changes): the server's change for the next round's download, made once this
        round's model was described and evaluated; the columns it reports."""
        if round_ >= self.ctx.cfg["rounds"]:
            return {}
        metrics = self.algorithm.prepare_next_round(round_)
        PHASES.mark("prepare next round")
        return metrics

    # -- results rows ---------------------------------------------------------------------------
    def _client_row(self, round_: int, report, rank: int) -> dict:
        ctx = self.ctx
        dense_grads = self.algorithm.dense_weight_gradients(round_)   # what the client computed
        flops = ctx.profile.train_flops(report.samples_processed, report.densities, dense_grads)
        sim = ctx.profile.client_seconds(report.client_id, report.samples_processed, report.densities,
                                         report.upload_bytes, report.download_bytes,
                                         dense_weight_gradients=dense_grads)
        if not self.algorithm.charges_round_time(round_):
            sim = 0.0
        return {
            "round": round_, "client_id": report.client_id, "rank": rank, "num_samples": report.num_samples,
            "upload_bytes": report.upload_bytes, "download_bytes": report.download_bytes,
            "header_bytes": report.header_bytes, "train_loss": report.train_loss,
            "compute_seconds": report.compute_seconds, "train_flops": float(flops), "sim_seconds": sim,
            **report.metrics,
        }

    def _round_row(self, round_: int, state: ServerState, client_rows: list[dict], metrics: dict, wall: float,
                   traffic_before: tuple[int, int]) -> dict:
        """The round's row (its totals added to the run's) from its clients' rows and metrics."""
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
            **metrics,   # density among them: of the round's model (_merge)
            "round": round_,
            "upload_bytes": upload, "download_bytes": download,
            "cum_upload_bytes": totals.upload_bytes, "cum_download_bytes": totals.download_bytes,
            "header_bytes": sum(r["header_bytes"] for r in client_rows),
            "wall_seconds": wall, "cum_wall_seconds": totals.wall_seconds,
            "compute_seconds": sum(r["compute_seconds"] for r in client_rows),
            "sim_seconds": sim, "cum_sim_seconds": totals.sim_seconds,
            "train_flops": flops, "cum_train_flops": totals.train_flops,
            "mpi_payload_bytes": self.comm.traffic.payload_bytes - traffic_before[0],
            "mpi_control_bytes": self.comm.traffic.control_bytes - traffic_before[1],
            # machine state, not a result: what rank 0 needed, gather or reductions, decoding, evaluation
            "server_peak_rss_bytes": peak_rss_bytes(),
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
