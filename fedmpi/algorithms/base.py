"""The algorithm interface: a few hooks the round loop calls. Algorithms never touch MPI.

Server side (rank 0):   ``init_server`` → each round: ``select_clients`` → ``download`` per client
                        → (clients train) → ``aggregate`` with the results in client-id order.
Client side (any rank): ``local_update`` gets a ``ClientTask`` (the decoded download, the client's
                        device-resident state, its data, its RNG seed) and returns a
                        ``ClientResult`` whose ``update`` is what the client uploads.

What crosses MPI is decided by the ``ModelUpdate``s these hooks return: tensors present, and masks
for the masked ones. The communication layer encodes them (dense, values-only, bitmap or index) and
counts the bytes; an algorithm only says *what* to send, never *how*.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..comm.codec import ModelUpdate
from ..training import LocalTrainer


@dataclass
class ModelInfo:
    """What an algorithm may know of the model without holding a torch module."""

    shapes: dict[str, tuple]          # communicated tensors (float state_dict entries), in order
    maskable: list[str]               # conv/linear weights
    layer_flops: dict[str, int]       # dense forward FLOPs per sample per maskable weight


@dataclass
class ClientTask:
    round: int
    client_id: int
    received: ModelUpdate             # the decoded download
    state: dict[str, Any]             # device-resident state (persists across this client's rounds)
    x: Any                            # torch tensors of the client's training data
    y: Any
    seed: int                         # derived from (seed, round, client): the only randomness allowed


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    update: ModelUpdate               # what the client uploads
    train_loss: float
    samples_processed: int            # for the FLOP and time model
    state: dict[str, Any] = field(default_factory=dict)
    densities: dict[str, float] | None = None   # per maskable layer during training (None = dense)


class Algorithm:
    name = "base"

    def __init__(self, cfg: dict, info: ModelInfo):
        self.cfg = cfg
        self.info = info
        self.weights: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}

    # ---- server ------------------------------------------------------------------------
    def init_server(self, weights: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        self.weights = weights

    def select_clients(self, round_: int, rng: np.random.Generator) -> list[int]:
        total, k = self.cfg["clients"]["total"], self.cfg["clients"]["per_round"]
        return sorted(int(c) for c in rng.choice(total, size=k, replace=False))

    def download(self, round_: int, client_id: int) -> ModelUpdate:
        return ModelUpdate(self.weights, self.masks)

    def aggregate(self, round_: int, results: list[ClientResult]) -> None:
        raise NotImplementedError

    def global_weights(self) -> dict[str, np.ndarray]:
        """The model the suite evaluates."""
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        """Server-side state for checkpoints (everything ``aggregate`` carries across rounds)."""
        return {"weights": self.weights, "masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.masks = state["weights"], state["masks"]

    # ---- client ------------------------------------------------------------------------
    def local_update(self, task: ClientTask, trainer: LocalTrainer) -> ClientResult:
        raise NotImplementedError
