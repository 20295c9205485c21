"""FedDST (Bibikar et al., AAAI 2022) and its RandomMask baseline. Spec: shared/spec/feddst.md.

Server: random init, ERK layer densities, initial mask = magnitude prune of the init. Each round
clients train their sparse sub-network; on readjustment rounds (r % ΔR == 0 and r < R_end) each
client prunes α_r of its active weights by magnitude and regrows as many by gradient magnitude;
the server merges by sparse weighted average and magnitude-prunes back to the layer densities.
RandomMask keeps the initial mask for ever (α = 0). Which masks cross the network, and how they
are encoded, is left to the communication layer: a mask travels only when the receiver's copy
differs.
"""
from __future__ import annotations

import numpy as np

from ..aggregate import sparse_weighted_average
from ..comm.codec import ModelUpdate
from ..sparsity import (cosine_readjust_fraction, kept_counts, layer_densities, magnitude_masks,
                        prune_and_grow)
from .base import Algorithm, ClientResult, ClientTask
from .fedavg import server_momentum_step


class FedDST(Algorithm):
    name = "feddst"
    readjusts = True

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.settings = cfg["feddst"]
        self.sparsity = cfg["sparsity"]
        self.r_end = self.settings["r_end"] if self.settings["r_end"] >= 0 else cfg["rounds"] // 2
        maskable_shapes = {n: info.shapes[n] for n in info.maskable}
        self.densities = layer_densities(maskable_shapes, self.sparsity, self.settings["distribution"])
        self.counts = kept_counts(maskable_shapes, self.densities)
        self.velocity: dict[str, np.ndarray] = {}
        self.mask_changes: dict[str, int] = {}   # this round: positions whose mask membership changed

    # ---- results columns -------------------------------------------------------------------
    def round_columns(self):
        if self.sparsity == 0:
            return {}
        per_layer = {f"mask_changed[{n}]": np.int64 for n in self.info.maskable}
        return {"mask_changed": np.int64, **per_layer, "nonzero_density": np.float64}

    def round_metrics(self, round_):
        if not self.masks:
            return {}
        kept = sum(int(np.count_nonzero(self.weights[n])) for n in self.masks)
        return {"mask_changed": sum(self.mask_changes.values()),
                **{f"mask_changed[{n}]": k for n, k in self.mask_changes.items()},
                "nonzero_density": kept / sum(m.size for m in self.masks.values())}

    # ---- server --------------------------------------------------------------------------
    def init_server(self, weights, rng) -> None:
        self.weights = dict(weights)
        if self.sparsity == 0:
            return   # a full mask is no mask: FedDST at S = 0 is FedAvg, bytes included
        maskable = {n: weights[n] for n in self.info.maskable}
        self.masks = magnitude_masks(maskable, self.counts)
        for name, mask in self.masks.items():
            self.weights[name] = np.where(mask, weights[name], np.float32(0))

    def is_readjustment_round(self, round_: int) -> bool:
        return (self.readjusts and self.sparsity > 0 and round_ % self.settings["readjust_every"] == 0
                and round_ < self.r_end)

    def aggregate(self, round_: int, results: list[ClientResult]) -> None:
        averaged, votes = sparse_weighted_average(
            [r.update.values for r in results], [r.update.masks for r in results],
            [r.num_samples for r in results])
        if self.settings["server_momentum"] > 0:
            averaged, self.velocity = server_momentum_step(
                self.weights, averaged, self.velocity, self.settings["server_momentum"],
                self.settings["server_lr"])
        if not self.masks:
            self.weights = averaged
            return
        # magnitude-prune each layer back to its density, choosing only among weights some client
        # kept. Grown weights arrive as exact zeros: among equal magnitudes the positions backed by
        # more client data (sample-weighted votes) win, so agreed growth survives the re-prune.
        previous = self.masks
        self.masks = magnitude_masks({n: averaged[n] for n in self.masks}, self.counts,
                                     within={n: v > 0 for n, v in votes.items()}, tiebreak=votes)
        self.mask_changes = {n: int(np.count_nonzero(previous[n] != m)) for n, m in self.masks.items()}
        for name, mask in self.masks.items():
            averaged[name] = np.where(mask, averaged[name], np.float32(0))
        self.weights = averaged

    def state_dict(self):
        return {**super().state_dict(), "velocity": self.velocity}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.velocity = state["velocity"]

    # ---- client --------------------------------------------------------------------------
    def readjust_fraction(self, round_: int) -> float:
        alpha = self.settings["alpha"]
        if self.settings["constant_alpha"]:   # public code: constant α until R_end
            return alpha
        return cosine_readjust_fraction(alpha, round_, self.r_end)

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        masks = task.received.masks
        weights, loss, processed = trainer.train(
            task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
            client_id=task.client_id, masks=masks, prox_mu=self.settings["prox_mu"])
        if self.is_readjustment_round(task.round):
            names = list(masks)
            # dense gradient of the plain task loss (no proximal term) at the trained weights
            grads = trainer.gradients(weights, task.x, task.y, names, seed=task.seed + 1,
                                      batches=self.settings["grad_batches"], masks=masks)
            new_weights, masks = prune_and_grow(
                {n: weights[n] for n in names}, masks, grads, self.readjust_fraction(task.round),
                grow_over_all_positions=self.settings["grow_over_all"])
            weights.update(new_weights)
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks), loss, processed,
                            densities=densities)


class RandomMask(FedDST):
    """Static sparse training: FedDST's initial ERK mask, never readjusted (α = 0)."""

    name = "randommask"
    readjusts = False
