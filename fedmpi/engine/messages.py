"""Typed messages between the server (rank 0) and the worker ranks, and the client-to-rank
assignment. They travel pickled through ``Communicator``'s control channel; model payloads travel
separately as byte buffers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoundPlan:
    """Broadcast at the start of every round (``stop`` ends the workers' loop)."""

    stop: bool
    round: int = 0
    broadcast: bool = False     # one payload for every client (bcast) or per-rank payloads (scatterv)
    evaluate: bool = False


@dataclass
class RankTask:
    """One worker rank's share of a round."""

    clients: list[int]                             # in id order
    payload_of: dict[int, int]                     # client → index of its download payload
    layouts: dict[int, list]                       # payload index → codec layout
    offsets: dict[int, tuple[int, int]]            # payload index → (start, length) in this rank's buffer
    states: dict[int, dict]                        # client → device-resident algorithm state
    known_masks: dict[int, dict]                   # client → packed masks it last held
    # aggregation.where: workers: client → its integer weight in the round's sum (None: the rank
    # sends its uploads to the server instead)
    sum_weights: dict[int, int] | None = None


@dataclass
class ClientReport:
    """What a worker tells the server about one trained client (its upload travels as bytes)."""

    client_id: int
    num_samples: int
    train_loss: float
    samples_processed: int
    densities: dict[str, float] | None
    state: dict
    metrics: dict[str, float]
    layout: list
    upload_bytes: int
    header_bytes: int
    download_bytes: int
    compute_seconds: float
    # aggregation.where: workers (the upload stays on the worker): the masks the upload changed,
    # packed, so the server knows what the client now holds; None when it changed none
    changed_masks: dict[str, tuple] | None = None


@dataclass
class RankReport:
    clients: list[ClientReport] = field(default_factory=list)
    terminate_requested: bool = False   # SIGTERM seen on this rank; the server decides when to stop


def client_blocks(clients: list[int], group: int = 1) -> list[list[int]]:
    """The round's clients, sorted, in consecutive blocks of ``group`` (the last may be shorter):
    the units ``local.client_batch`` trains together. They depend on the round's clients only,
    never on the rank count."""
    ordered = sorted(clients)
    return [ordered[i:i + group] for i in range(0, len(ordered), group)]


def assign_clients(clients: list[int], sizes: dict[int, int], ranks: list[int],
                   group: int = 1) -> dict[int, list[int]]:
    """Largest-first greedy over ``client_blocks(clients, group)``: each block (largest total
    samples first; ties: lowest first client) to the least-loaded rank (ties: lowest rank), so a
    block is never split across ranks. ``group`` = 1 is per-client assignment. Each rank's list
    is sorted, and cutting it into blocks of ``group`` gives back its blocks: all but the round's
    last block have exactly ``group`` clients, and the last one comes last on its rank."""
    load = {r: 0 for r in ranks}
    assignment: dict[int, list[int]] = {r: [] for r in ranks}
    blocks = [(sum(sizes[c] for c in block), block) for block in client_blocks(clients, group)]
    for total, block in sorted(blocks, key=lambda b: (-b[0], b[1][0])):
        target = min(ranks, key=lambda r: (load[r], r))
        assignment[target].extend(block)
        load[target] += total
    return {r: sorted(cs) for r, cs in assignment.items()}


def pack_masks(masks: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {n: (m.shape, np.packbits(m.reshape(-1))) for n, m in masks.items()}


def unpack_masks(packed: dict[str, tuple]) -> dict[str, np.ndarray]:
    return {n: np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
            for n, (shape, bits) in packed.items()}
