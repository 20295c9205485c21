"""A worker rank's side of each round: receive its task and payloads, train its clients in id
order (decode → ``algorithm.local_update`` → encode the upload), report back, and either send the
uploads to the server or, with ``aggregation.where: workers``, sum them here (``sum_uploads``).
Rank 0 runs the same ``train_clients`` and ``sum_uploads`` when P = 1."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import rng
from ..aggregation import FixedPointSum, RoundSums
from ..algorithms import ClientTask
from ..comm.arena import UploadArena
from ..comm.codec import BITMAP, INDEX, Encoded, MaskPositions, decode, encode
from ..update import ModelUpdate
from .context import RunContext
from .messages import ClientReport, RankReport, RankTask, pack_masks, unpack_masks
from .phases import PHASES


@dataclass
class Upload:
    """One trained client's upload, encoded as it crosses MPI, and the masks its receiver decodes
    it against (those the client was sent)."""

    client_id: int
    encoded: Encoded
    reference_masks: dict[str, np.ndarray]

    def decoded(self, positions_cache: MaskPositions | None = None) -> ModelUpdate:
        """What the server would decode: the summands of ``sum_uploads`` are exactly those
        (packed, not densified; ``positions_cache`` as ``codec.decode`` takes it)."""
        return decode(self.encoded, self.reference_masks, densify=False, positions_cache=positions_cache)


def make_client_task(ctx: RunContext, round_: int, client: int, received: ModelUpdate, state: dict) -> ClientTask:
    """Client ``client``'s task: its decoded download and device state, its training data and seed,
    and, where the algorithm declares it needs them, its local test set (the evaluator's samples,
    in partition order) and θ₀ (read-only views of the initial model every rank built)."""
    x_train, y_train = ctx.train
    idx = torch.from_numpy(ctx.partition.train_indices[client])
    local_test = initial_weights = None
    if ctx.algorithm.needs_local_test:
        x, y = ctx.train if ctx.partition.local_test_in_train else ctx.test
        test_idx = torch.from_numpy(ctx.partition.test_indices[client])
        local_test = (x[test_idx], y[test_idx])
    if ctx.algorithm.needs_initial_weights:
        initial_weights = {n: w.view() for n, w in ctx.initial_weights.items()}
        for w in initial_weights.values():
            w.flags.writeable = False
    return ClientTask(round_, client, received, state, x_train[idx], y_train[idx],
                      rng.torch_seed(ctx.cfg["seed"], rng.CLIENT, round_, client),
                      local_test=local_test, initial_weights=initial_weights)


def train_clients(ctx: RunContext, round_: int, task: RankTask, buffer: np.ndarray,
                  arena: UploadArena | None = None):
    """Train this rank's clients in id order; returns (reports, uploads), both in that order.
    ``arena``: where the uploads are encoded, reused from the previous round (a worker rank's,
    whose uploads are summed or gathered within the round; rank 0 keeps its own).

    With ``local.client_batch`` = G > 1 and an algorithm that ``trains_together``, the
    clients go in blocks of G (the server's assignment keeps blocks whole, so cutting this rank's
    sorted list into G's gives them back) trained together; a block's compute time is shared among
    its clients by sample count."""
    reports, uploads = [], []
    if arena is not None:
        arena.reset()
    sums_here = ctx.cfg["aggregation"]["where"] == "workers"
    group = ctx.cfg["local"]["client_batch"]
    grouped = group > 1 and ctx.algorithm.trains_together()
    blocks = [task.clients[i:i + group] for i in range(0, len(task.clients), group)] if grouped \
        else [[c] for c in task.clients]
    # downloads are decoded as views of the received buffer, not copied per client: read-only,
    # so that no client can change what the next one is sent
    buffer = buffer.view()
    buffer.flags.writeable = False
    for block in blocks:
        received, client_tasks = {}, []
        for c in block:
            payload = task.payload_of[c]
            start, length = task.offsets[payload]
            known = unpack_masks(task.known_masks.get(c, {}))
            received[c] = (decode(Encoded(task.layouts[payload], buffer[start:start + length]), known,
                                  densify=False), length)
            client_tasks.append(make_client_task(ctx, round_, c, received[c][0], task.states[c]))
        began = time.perf_counter()
        results = ctx.algorithm.local_update_group(client_tasks, ctx.trainer)
        elapsed = time.perf_counter() - began
        samples = sum(len(t.y) for t in client_tasks)
        for client_task, result in zip(client_tasks, results):
            c = client_task.client_id
            compute = elapsed * len(client_task.y) / samples if len(block) > 1 else elapsed
            sent_masks = received[c][0].masks
            upload = encode(result.update, sent_masks, schema=ctx.info.shapes,
                            allocate=arena.take if arena is not None else None)
            changed = None
            if sums_here:   # the server never sees this upload: tell it the masks it changed
                changed = {row.name for row in upload.layout if row.encoding in (BITMAP, INDEX)}
                changed = pack_masks({n: np.asarray(result.update.masks[n], dtype=bool) for n in changed}) \
                    if changed else None
            reports.append(ClientReport(
                client_id=c, num_samples=result.num_samples, train_loss=result.train_loss,
                samples_processed=result.samples_processed, densities=result.densities, state=result.state,
                metrics=result.metrics, layout=upload.layout, upload_bytes=upload.nbytes,
                header_bytes=upload.header_bytes, download_bytes=received[c][1], compute_seconds=compute,
                changed_masks=changed))
            uploads.append(Upload(c, upload, sent_masks))
    return reports, uploads


def concatenated(uploads: list[Upload]) -> np.ndarray:
    """This rank's upload payloads back to back (what ``gather_buffers`` sends the server)."""
    return np.concatenate([u.encoded.data for u in uploads]) if uploads else np.zeros(0, np.uint8)


def sum_uploads(ctx: RunContext, comm, uploads: list[Upload], weights: dict[int, int]) -> RoundSums | None:
    """``aggregation.where: workers``: the fixed-point sum of the round's uploads, each rank its own
    (rank 0 none when P > 1). Phase 1: this rank's per-element maximum exponents, combined over the
    ranks by an element-wise MAX; phase 2: this rank's int64 sums on that shared grid, added up on
    rank 0. Integer addition is exact, so rank 0 gets the bits ``fixed_point_average`` gives for all
    the uploads at once. Returns the round's sums on rank 0, None elsewhere."""
    summer = FixedPointSum(ctx.info.shapes)
    positions = MaskPositions()    # the masks this rank's clients were sent, scanned once per distinct mask
    updates = [u.decoded(positions) for u in uploads]
    labels = [f"from client {u.client_id}" for u in uploads]
    client_weights = [weights[u.client_id] for u in uploads]
    PHASES.mark("sum: decode")
    own = summer.first_pass(updates, client_weights, labels)
    PHASES.mark("sum: scales")
    scales = comm.allreduce_max_int16(own.scales)
    PHASES.mark("sum: max-reduce")
    partial = summer.partial_sums(updates, client_weights, scales, labels, own=own)
    PHASES.mark("sum: partial sums")
    sums = comm.reduce_sum_int64(partial)
    PHASES.mark("sum: reduce")
    return RoundSums(summer, sums, scales) if comm.is_server else None


def work(ctx: RunContext, comm, evaluator, terminate_requested) -> None:
    """The worker loop: one iteration per round until the server says stop."""
    arena = UploadArena()
    while True:
        PHASES.next_round()
        plan = comm.bcast_object()
        PHASES.mark("wait for plan")
        if plan.stop:
            PHASES.discard_round()
            PHASES.report(comm.rank)
            return
        task = comm.scatter_objects(None)
        buffer = comm.bcast_buffer(None) if plan.broadcast else comm.scatter_buffers(None)
        PHASES.mark("receive")
        reports, uploads = train_clients(ctx, plan.round, task, buffer, arena)
        PHASES.mark("train")
        comm.gather_objects(RankReport(reports, terminate_requested()))
        PHASES.mark("report")
        if task.sum_weights is not None:
            sum_uploads(ctx, comm, uploads, task.sum_weights)
        else:
            comm.gather_buffers(concatenated(uploads))
            PHASES.mark("send uploads")
        if plan.evaluate:
            evaluator.run(None)
            PHASES.mark("evaluate")
