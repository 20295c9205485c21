"""FedAvg (McMahan et al. 2017), FedAvgM (Hsu et al. 2019) and FedProx (Li et al. 2020)."""
from __future__ import annotations

import numpy as np

from ..errors import require
from ..update import ModelUpdate
from .base import Algorithm, ClientResult, ClientTask


class FedAvg(Algorithm):
    """Clients run local SGD from the global model; the server takes the sample-weighted mean."""

    name = "fedavg"
    label = "FedAvg"
    doc = "docs/methods/fedavg.md"
    prox_mu = 0.0
    partial_sums = True

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        weights, loss, processed = trainer.train(
            task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
            client_id=task.client_id, prox_mu=self.prox_mu)
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights), loss, processed)

    def local_update_together(self, tasks: list[ClientTask], trainer) -> list[ClientResult]:
        """``local_update`` for several clients at once (``local.client_batch``): the same results,
        bit for bit (fedmpi/training/multi_client.py)."""
        from ..training.multi_client import Member, train_group

        trained = train_group(trainer, [Member(t.client_id, t.received.values, t.x, t.y, t.seed) for t in tasks],
                              round_=tasks[0].round, prox_mu=self.prox_mu)
        return [ClientResult(t.client_id, len(t.y), ModelUpdate(weights), loss, processed)
                for t, (weights, loss, processed) in zip(tasks, trained)]

    def partial_sum_weight(self, client_id: int, num_samples: int) -> int:
        return num_samples

    def aggregate(self, round_: int, results: list[ClientResult], sums=None) -> None:
        self.weights, _ = self.merge_over_holders(results, sums)


class FedProx(FedAvg):
    """FedAvg plus μ/2·‖θ − θ_global‖² in every client's local objective."""

    name = "fedprox"
    label = "FedProx"
    doc = "docs/methods/fedavg.md"
    section = "fedprox"
    defaults = {"mu": 0.01}

    @classmethod
    def check_config(cls, cfg):
        require(cfg["fedprox"]["mu"] >= 0, "fedprox.mu", "must be >= 0")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.prox_mu = cfg["fedprox"]["mu"]


def server_momentum_step(weights, averaged, velocity, momentum: float, server_lr: float):
    """FedAvgM: pseudo-gradient Δ = θ − avg, v ← β·v + Δ, θ ← θ − η·v (float64, cast back)."""
    new_weights, new_velocity = {}, {}
    for name, theta in weights.items():
        delta = theta.astype(np.float64) - averaged[name].astype(np.float64)
        v = momentum * velocity.get(name, np.zeros_like(delta)) + delta
        new_velocity[name] = v
        new_weights[name] = (theta.astype(np.float64) - server_lr * v).astype(np.float32)
    return new_weights, new_velocity


class FedAvgM(FedAvg):
    """FedAvg whose server applies momentum to the round's pseudo-gradient."""

    name = "fedavgm"
    label = "FedAvgM"
    doc = "docs/methods/fedavg.md"
    section = "fedavgm"
    defaults = {"momentum": 0.9, "server_lr": 0.1}   # effective step η/(1−β) = 1, as FedAvg

    @classmethod
    def check_config(cls, cfg):
        require(0 <= cfg["fedavgm"]["momentum"] < 1, "fedavgm.momentum", "must be in [0, 1)")
        require(cfg["fedavgm"]["server_lr"] > 0, "fedavgm.server_lr", "must be > 0")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.momentum = cfg["fedavgm"]["momentum"]
        self.server_lr = cfg["fedavgm"]["server_lr"]
        self.velocity: dict[str, np.ndarray] = {}

    def aggregate(self, round_: int, results: list[ClientResult], sums=None) -> None:
        averaged, _ = self.merge_over_holders(results, sums)
        self.weights, self.velocity = server_momentum_step(
            self.weights, averaged, self.velocity, self.momentum, self.server_lr)

    def state_dict(self):
        return {**super().state_dict(), "velocity": self.velocity}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.velocity = state["velocity"]
