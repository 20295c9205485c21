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
    """Train this rank's clients in id order; returns (reports, concatenated upload payloads).

    With ``local.client_batch`` = G > 1 and an algorithm that has ``local_update_group``, the
    clients go in blocks of G (the server's assignment keeps blocks whole, so cutting this rank's
    sorted list into G's gives them back) trained together; a block's compute time is shared among
    its clients by sample count."""
    reports, pieces = [], []
    x_train, y_train = ctx.train
    group = ctx.cfg["local"]["client_batch"]
    grouped = group > 1 and hasattr(ctx.algorithm, "local_update_group")
    blocks = [task.clients[i:i + group] for i in range(0, len(task.clients), group)] if grouped \
        else [[c] for c in task.clients]
    for block in blocks:
        received, client_tasks = {}, []
        for c in block:
            payload = task.payload_of[c]
            start, length = task.offsets[payload]
            known = unpack_masks(task.known_masks.get(c, {}))
            received[c] = (decode(Encoded(task.layouts[payload], buffer[start:start + length]), known), length)
            idx = torch.from_numpy(ctx.partition.train_indices[c])
            client_tasks.append(ClientTask(round_, c, received[c][0], task.states[c], x_train[idx], y_train[idx],
                                           rng.torch_seed(ctx.cfg["seed"], rng.CLIENT, round_, c)))
        began = time.perf_counter()
        if len(block) > 1:
            results = ctx.algorithm.local_update_group(client_tasks, ctx.trainer)
        else:
            results = [ctx.algorithm.local_update(client_tasks[0], ctx.trainer)]
        elapsed = time.perf_counter() - began
        samples = sum(len(t.y) for t in client_tasks)
        for client_task, result in zip(client_tasks, results):
            c = client_task.client_id
            compute = elapsed * len(client_task.y) / samples if len(block) > 1 else elapsed
            upload = encode(result.update, received[c][0].masks, schema=ctx.info.shapes)
            reports.append(ClientReport(
                client_id=c, num_samples=result.num_samples, train_loss=result.train_loss,
                samples_processed=result.samples_processed, densities=result.densities, state=result.state,
                metrics=result.metrics, layout=upload.layout, upload_bytes=upload.nbytes,
                header_bytes=upload.header_bytes, download_bytes=received[c][1], compute_seconds=compute))
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
