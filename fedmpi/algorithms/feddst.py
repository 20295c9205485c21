"""FedDST (Bibikar et al., AAAI 2022) and its RandomMask baseline. Method doc: docs/methods/feddst.md.

Server: random init, ERK layer densities, initial mask = magnitude prune of the init. Each round
clients train their sparse sub-network; on readjustment rounds (r % ΔR == 0 and r < R_end) each
client prunes α_r of its active weights by magnitude and regrows as many by gradient magnitude;
the server merges by sparse weighted average and magnitude-prunes back to the layer densities.
RandomMask keeps the initial mask for ever (α = 0). Which masks cross the network, and how they
are encoded, is left to the communication layer: a mask travels only when the receiver's copy
differs.

Deviations of the public code (bibikar/feddst), each a ``feddst.`` key, all off by default;
``feddst.public_code: true`` switches every one of them on (config.validate writes them out, so
the results file's config lists each key):

- ``distribution: erk_public``: layer sparsity ∝ 1 − ERK score, nearly uniform, no capping
  (models.py ``_weights_by_layer``; see sparsity.layer_densities).
- ``constant_alpha: true``: every readjustment moves the constant α. dst.py's ``Client.train``
  prunes ``args.readjustment_ratio``; the cosine value it is passed only switches readjustment
  off at R_end.
- ``grow_over_all: true``: growth takes the top-|g| over all positions, active ones included
  (models.py ``layer_grow``), so it can reset active weights to 0.
- ``aggregation_weight: batches2``: a client's weight is ``Client.train_size()`` =
  ``sum(len(x) for x in self.train_data)`` over its cached (inputs, labels) batches, i.e.
  2 × its number of local batches ⌈n_k / B⌉, instead of n_k; dense tensors too.
- ``sample_with_replacement: true``: clients are drawn with ``rng.choice(..., size=K)``
  (replace=True). The code caches each client's batches in a fixed order and every draw restarts
  from the global model with a fresh optimizer, so a client drawn twice uploads the same update
  twice. Here it trains once (the round loop assumes distinct clients) and its aggregation weight
  is multiplied by the number of times it was drawn: the same average.
- ``detached_prox: true``: the proximal term is built from ``state_dict()`` tensors, which are
  detached (models.py ``proximal_loss``): it adds to the loss value but contributes no gradient,
  so FedProx has no effect. Clients here train with prox_mu = 0 instead: the same updates (the
  term is never part of fedmpi's reported loss).
- ``readjust_rule: public``: readjustment rounds counted as dst.py does, ``(server_round − 1) %
  ΔR == 0`` on its 0-based counter (fedmpi's round r is its server_round r − 1) while the cosine
  factor is > 0 (server_round < R_end); the cosine schedule also runs on r − 1
  (feddst_readjustment.readjustment_round).
- ``server_reprune: public``: the server re-prunes only when the union of the client masks holds
  more than the target, and then drops the n − c smallest |w| over the whole tensor, zeros
  included, so the mask can fall below the target until clients regrow it
  (feddst_readjustment.reprune_public; clients grow a short layer back to its count).

``regrow_pruned: false`` (default true) is a variant the spec leaves open, not a public-code
behaviour: growth may not pick a weight pruned in the same readjustment. The public code grows
over all positions (``grow_over_all``), which makes the key moot, so ``public_code`` leaves it alone.

Not reproduced: the public code's upload cost is not accumulated (its curves were
post-processed); fedmpi counts the real buffers. Its client readjusts at the local epoch where its
lifetime epoch count satisfies ``(epoch − 9) % 10 == 0``, which is the last local epoch for the
paper's E = 10; fedmpi always readjusts after the last local epoch. Its client prunes down to the
layer count at sparsity S + (1 − S)·α (smallest |w| over the whole tensor) where fedmpi prunes
⌊α·active⌋ active weights; its regrowth gradient is the last training batch's, fedmpi's
``grad_batches`` batches in their own order; its batches are cached once and never reshuffled.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ..errors import require
from ..rng import REGROWTH, torch_seed
from ..sparsity import DISTRIBUTIONS, kept_counts, layer_densities, magnitude_masks
from ..update import ModelUpdate
from .base import ClientResult, ClientTask
from .fedavg import server_momentum_step
from .feddst_readjustment import (READJUST_RULES, cosine_readjust_fraction, prune_and_grow, readjustment_round,
                                  reprune_public, resolve_r_end, schedule_round)
from .masked_fedavg import MaskedFedAvg


class FedDST(MaskedFedAvg):
    """Masked FedAvg whose clients readjust their masks (``after_training``) and whose server
    re-prunes the merge back to the layer densities; an element no client holds becomes 0."""

    name = "feddst"
    label = "FedDST"
    doc = "docs/methods/feddst.md"
    section = "feddst"      # RandomMask reads it too
    defaults = {
        "alpha": 0.05,             # initial readjustment fraction
        "readjust_every": 5,       # ΔR; with the default 20 rounds (R_end 10) round 5 readjusts
        "r_end": -1,               # readjustment only before this round; -1 means rounds // 2
        "distribution": "erk",     # erk | uniform | erk_public
        "prox_mu": 0.0,            # >0: FedDST+FedProx
        "server_momentum": 0.0,    # >0: FedDST with FedAvgM server momentum
        "server_lr": 1.0,
        "grad_batches": 1,         # local batches used for the regrowth gradient
        "regrow_pruned": True,     # false: growth may not pick a weight pruned in the same readjustment
        # deviations of the public code (bibikar/feddst), off by default (module docstring);
        # public_code: true sets every one of them (check_config writes them out, so the resolved
        # config shows each key)
        "public_code": False,
        "constant_alpha": False,             # readjust the constant α until R_end
        "grow_over_all": False,              # grow the top-|g| over all positions
        "aggregation_weight": "samples",     # samples | batches2 (2 × number of local batches)
        "sample_with_replacement": False,    # draw clients with replacement
        "detached_prox": False,              # inert proximal term: prox_mu has no effect
        "readjust_rule": "paper",            # paper: r % ΔR == 0 | public: (s − 1) % ΔR == 0, s = r − 1
        "server_reprune": "paper",           # paper | public: n − c smallest |w| over the whole tensor
    }
    union_types = {"r_end": (int,)}
    readjusts = True
    partial_sums = True
    missing = "zero"

    @classmethod
    def check_config(cls, cfg):
        dst = cfg["feddst"]
        if dst["public_code"]:   # every deviation of the public code at once, written out key by key
            dst.update({"distribution": "erk_public", "constant_alpha": True, "grow_over_all": True,
                        "aggregation_weight": "batches2", "sample_with_replacement": True,
                        "detached_prox": True, "readjust_rule": "public", "server_reprune": "public"})
        require(0 <= dst["alpha"] <= 1, "feddst.alpha", "must be in [0, 1]")
        require(dst["readjust_every"] >= 1, "feddst.readjust_every", "must be at least 1")
        require(dst["r_end"] >= -1, "feddst.r_end", "must be -1 (rounds // 2) or a round number")
        require(dst["grad_batches"] >= 1, "feddst.grad_batches", "must be at least 1")
        require(dst["distribution"] in DISTRIBUTIONS, "feddst.distribution",
                f"unknown distribution '{dst['distribution']}'; choose one of {', '.join(DISTRIBUTIONS)}")
        require(dst["prox_mu"] >= 0, "feddst.prox_mu", "must be >= 0")
        require(0 <= dst["server_momentum"] < 1, "feddst.server_momentum", "must be in [0, 1)")
        require(dst["server_lr"] > 0, "feddst.server_lr", "must be > 0")
        require(dst["aggregation_weight"] in ("samples", "batches2"), "feddst.aggregation_weight",
                "must be 'samples' (the paper) or 'batches2' (the public code: 2 × local batches)")
        for key in ("readjust_rule", "server_reprune"):
            require(dst[key] in READJUST_RULES, f"feddst.{key}", "must be 'paper' or 'public'")
        require(dst["regrow_pruned"] or not dst["grow_over_all"], "feddst.regrow_pruned",
                "false has no effect with feddst.grow_over_all: true (growth ranks every position)")
        if cfg["algorithm"] == cls.name and cfg["sparsity"] > 0:
            # a FedDST run whose masks never move is RandomMask under another name
            r_end = resolve_r_end(dst["r_end"], cfg["rounds"])
            test = ("(r - 2) % ΔR == 0 and r <= R_end" if dst["readjust_rule"] == "public"
                    else "r % ΔR == 0 and r < R_end")
            require(any(readjustment_round(r, dst["readjust_every"], r_end, dst["readjust_rule"])
                        for r in range(1, min(cfg["rounds"], r_end) + 1)),
                    "feddst.r_end" if r_end <= 1 else "feddst.readjust_every",
                    f"no round readjusts the mask: with rounds {cfg['rounds']}, feddst.readjust_every "
                    f"ΔR = {dst['readjust_every']} and feddst.r_end R_end = {r_end}, {test} never holds. "
                    f"Lower feddst.readjust_every or raise feddst.r_end (or use algorithm: randommask "
                    f"for a static mask)")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)   # self.settings: the feddst section
        self.sparsity = cfg["sparsity"]
        # detached_prox: the public code's proximal term has no gradient, so it trains as μ = 0
        self.prox_mu = 0.0 if self.settings["detached_prox"] else self.settings["prox_mu"]
        self.r_end = resolve_r_end(self.settings["r_end"], cfg["rounds"])
        maskable_shapes = {n: info.shapes[n] for n in info.maskable}
        self.densities = layer_densities(maskable_shapes, self.sparsity, self.settings["distribution"])
        self.counts = kept_counts(maskable_shapes, self.densities)
        self.velocity: dict[str, np.ndarray] = {}
        self.mask_changes: dict[str, int] = {}   # this round: positions whose mask membership changed
        self.drawn: Counter = Counter()           # this round's draws per client (with replacement)

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

    def select_clients(self, round_: int, rng) -> list[int]:
        if not self.settings["sample_with_replacement"]:
            self.drawn = Counter()
            return super().select_clients(round_, rng)
        # public code: K draws with replacement; a client drawn m times trains once and counts m
        # times in the average (see the module docstring)
        total, k = self.cfg["clients"]["total"], self.cfg["clients"]["per_round"]
        self.drawn = Counter(int(c) for c in rng.choice(total, size=k, replace=True))
        return sorted(self.drawn)

    def partial_sum_weight(self, client_id: int, num_samples: int) -> int:
        if self.settings["aggregation_weight"] == "batches2":   # public code: 2 × local batches
            weight = 2 * math.ceil(num_samples / self.cfg["local"]["batch_size"])
        else:
            weight = num_samples
        return weight * self.drawn.get(client_id, 1)

    def is_readjustment_round(self, round_: int) -> bool:
        return (self.readjusts and self.sparsity > 0
                and readjustment_round(round_, self.settings["readjust_every"], self.r_end,
                                       self.settings["readjust_rule"]))

    def aggregate(self, round_: int, results: list[ClientResult], sums=None) -> None:
        # per masked element Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k; votes Σ_k w_k·m_k: the data behind it
        averaged, votes = self.merge_over_holders(results, sums)
        if self.settings["server_momentum"] > 0:
            averaged, self.velocity = server_momentum_step(
                self.weights, averaged, self.velocity, self.settings["server_momentum"],
                self.settings["server_lr"])
        if not self.masks:
            self.weights = averaged
            return
        previous = self.masks
        union = {n: votes[n] > 0 for n in self.masks}
        if self.settings["server_reprune"] == "public":
            self.masks = reprune_public({n: averaged[n] for n in self.masks}, union, self.counts)
        else:
            # magnitude-prune each layer back to its density, choosing only among weights some
            # client kept. Grown weights arrive as exact zeros: among equal magnitudes the positions
            # backed by more client data (weighted votes) win, so agreed growth survives the re-prune.
            self.masks = magnitude_masks({n: averaged[n] for n in self.masks}, self.counts,
                                         within=union, tiebreak=votes)
        self.mask_changes = {n: int(np.count_nonzero(previous[n] != m)) for n, m in self.masks.items()}
        for name, mask in self.masks.items():
            averaged[name] = np.where(mask, averaged[name], np.float32(0))
            if name in self.velocity:
                # a pruned position keeps no velocity: stale momentum would otherwise give it a
                # value (and so a magnitude advantage) the round it is grown again
                self.velocity[name] = np.where(mask, self.velocity[name], 0.0)
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
        return cosine_readjust_fraction(alpha, schedule_round(round_, self.settings["readjust_rule"]),
                                        self.r_end)

    def local_update_together(self, tasks: list[ClientTask], trainer) -> list[ClientResult]:
        """``local_update`` for several clients at once (``local.client_batch``): their masked
        training steps together (fedmpi/training/multi_client.py, the same results bit for bit),
        then each client's readjustment on its own."""
        from ..training.multi_client import Member, train_group

        members = [Member(t.client_id, t.received.values, t.x, t.y, t.seed, t.received.masks) for t in tasks]
        trained = train_group(trainer, members, round_=tasks[0].round, prox_mu=self.prox_mu)
        return [self.after_training(t, trainer, *out) for t, out in zip(tasks, trained)]

    def after_training(self, task: ClientTask, trainer, weights, loss, processed) -> ClientResult:
        """After local training: on readjustment rounds prune and regrow the client's mask."""
        masks = task.received.masks
        if self.is_readjustment_round(task.round):
            names = list(masks)
            # dense gradient of the plain task loss (no proximal term) at the trained weights, its
            # batch order drawn from its own stream
            grads = trainer.gradients(weights, task.x, task.y, names,
                                      seed=torch_seed(self.cfg["seed"], REGROWTH, task.round, task.client_id),
                                      batches=self.settings["grad_batches"], masks=masks)
            new_weights, masks = prune_and_grow(
                {n: weights[n] for n in names}, masks, grads, self.readjust_fraction(task.round),
                counts=self.counts, regrow_pruned=self.settings["regrow_pruned"],
                grow_over_all_positions=self.settings["grow_over_all"])
            weights.update(new_weights)
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks), loss, processed,
                            densities=densities)


class RandomMask(FedDST):
    """Static sparse training: FedDST's initial ERK mask, never readjusted (α = 0). It reads the
    same ``feddst.`` keys, so ``public_code`` gives the public code's RandomMask
    (``--readjustment-ratio 0``)."""

    name = "randommask"
    label = "RandomMask"
    doc = "docs/methods/feddst.md"
    readjusts = False
