"""A worker rank's side of each round: receive its task and payloads, train its clients in id
order (decode → ``algorithm.local_update`` → encode the upload), report back. Rank 0 runs the
same ``train_clients`` when P = 1."""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import rng
from ..algorithms import ClientTask
from ..comm.codec import Encoded, decode, encode
from .context import RunContext
from .messages import ClientReport, RankReport, RankTask, unpack_masks


def train_clients(ctx: RunContext, round_: int, task: RankTask, buffer: np.ndarray):
    """Train this rank's clients in id order; returns (reports, concatenated upload payloads)."""
    reports, pieces = [], []
    x_train, y_train = ctx.train
    for c in task.clients:
        payload = task.payload_of[c]
        start, length = task.offsets[payload]
        known = unpack_masks(task.known_masks.get(c, {}))
        received = decode(Encoded(task.layouts[payload], buffer[start:start + length]), known)
        idx = torch.from_numpy(ctx.partition.train_indices[c])
        client_task = ClientTask(round_, c, received, task.states[c], x_train[idx], y_train[idx],
                                 rng.torch_seed(ctx.cfg["seed"], rng.CLIENT, round_, c))
        began = time.perf_counter()
        result = ctx.algorithm.local_update(client_task, ctx.trainer)
        compute = time.perf_counter() - began
        upload = encode(result.update, received.masks, schema=ctx.info.shapes)
        reports.append(ClientReport(
            client_id=c, num_samples=result.num_samples, train_loss=result.train_loss,
            samples_processed=result.samples_processed, densities=result.densities, state=result.state,
            metrics=result.metrics, layout=upload.layout, upload_bytes=upload.nbytes,
            header_bytes=upload.header_bytes, download_bytes=length, compute_seconds=compute))
        pieces.append(upload.data)
    return reports, np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)


def work(ctx: RunContext, comm, evaluator, terminate_requested) -> None:
    """The worker loop: one iteration per round until the server says stop."""
    while True:
        plan = comm.bcast_object()
        if plan.stop:
            return
        task = comm.scatter_objects(None)
        buffer = comm.bcast_buffer(None) if plan.broadcast else comm.scatter_buffers(None)
        reports, upload = train_clients(ctx, plan.round, task, buffer)
        comm.gather_objects(RankReport(reports, terminate_requested()))
        comm.gather_buffers(upload)
        if plan.evaluate:
            evaluator.run(None)
