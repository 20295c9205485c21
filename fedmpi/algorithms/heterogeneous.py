"""Heterogeneous clients on one multi-exit model family (``model: multiexit_vgg``): each client
belongs to a tier (``tiers.mix``), and a tier trains a submodel — fewer blocks and exits
(``tiers.levels``) or fewer channels (``tiers.widths``). The server averages every element over
the clients that trained it and keeps its value where nobody did.

- ``depthwise_avg`` : depth-wise averaging (FedAvg over holders, no weight generation, no
                 distillation); a level-e client trains blocks 0..e with the joint loss over exits
                 1..e. ``depthfl`` (depthfl.py) adds DepthFL's mutual self-distillation to it.
- ``fedavg_s`` : FedAvg-S, every client at the smallest depth (level 1).
- ``heterofl`` (heterofl.py): HeteroFL (Diao et al., ICLR 2021), width scaling: a client at rate p
                 trains the first ⌈p·C⌉ channels of every hidden layer at full depth.

Time: a client reports ``densities`` = for every maskable layer of the full model, its submodel's
weights in that layer / the full layer's (0 for layers it does not hold). For convolutions and
linear layers at the full model's spatial sizes that is the fraction of the layer's FLOPs the client
runs (width p scales in·out channels, a shallow client skips the deeper blocks and exits), so
``train_flops`` and ``sim_seconds`` (under ``device.tier_profiles``, its tier's device) are the
submodel's.

Evaluation protocol (docs/methods/hypemefed.md, "Evaluation protocol"), one code path for every
tiered method: a client is scored on the submodel it runs — its tier's blocks and exits at its
tier's width, the model it downloads — at that submodel's deepest exit, on its local test set
(``client_accuracy``, the mean over clients; ``tier_accuracy[t]``, over tier t's). A depth-l
submodel's exits are the first l exits of the full-depth model at the same width, so the evaluator
runs one model per distinct tier width (the full model for width 1), not one per tier or client.
``exit_accuracy[e]``: exit e on the global test set, at the narrowest width among the tiers that
hold exit e (the full model where no tier does). ``test_accuracy``/``test_loss``: the full model's
deepest exit on the global test set.
"""
from __future__ import annotations

import math

import numpy as np

from ..aggregation import average_over_holders
from ..models import build_model
from ..tiers import tier_of_clients
from ..update import ModelUpdate
from .base import Algorithm, ClientResult, ClientTask
from .evaluation import EvalModel, mean_client_accuracy


def tier_slots(k: int, tiers: int, leftover: str = "lowest") -> list[int]:
    """Per-round slots of each tier: k // tiers each, plus the k mod tiers left over, one each to
    the lowest tiers ("lowest") or all to tier 2 ("authors": the HypeMeFed authors' main.py,
    ``select_participants``, ``num_parts[1] += num_participants - sum(num_parts)``)."""
    slots = [k // tiers] * tiers
    if leftover == "authors":
        slots[min(1, tiers - 1)] += k % tiers   # one tier: nothing is left over
    else:
        for t in range(k % tiers):
            slots[t] += 1
    return slots


class TieredAlgorithm(Algorithm):
    """Tiers, tier-balanced sampling, per-tier submodels, aggregation over holders, tier metrics."""

    tiered = True

    objective = None   # None: the trainer's default (local.loss, summed over the exits held)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.tier = tier_of_clients(info.num_clients, cfg["tiers"]["mix"], cfg["seed"])
        self.num_tiers = len(cfg["tiers"]["mix"])
        self.variants = [self.variant(t) for t in range(self.num_tiers)]
        self.blocks = [self._blocks(v) for v in self.variants]
        self.densities = [self._densities(b) for b in self.blocks]
        self._downloads: dict[int, ModelUpdate] = {}
        self.widths = [float(v.get("width", 1.0)) for v in self.variants]
        # every width below 1 a tier runs at → its blocks at full depth (evaluated as one model)
        self._width_blocks = {w: self._blocks({"width": w}) for w in sorted(set(self.widths)) if w < 1.0}

    def variant(self, tier: int) -> dict:
        raise NotImplementedError

    def exit_of(self, client: int) -> int:
        """Index of the client's deepest exit in the outputs of the full-depth model at its width."""
        return self.variants[self.tier[client]].get("level", 3) - 1

    def _blocks(self, variant: dict) -> dict[str, tuple]:
        """Each tensor the variant holds → its block of the full tensor ((0, size) per dim)."""
        model = build_model(self.cfg["model"], self.info.input_shape, self.info.num_classes, **variant)
        return {n: tuple((0, d) for d in t.shape) for n, t in model.state_dict().items()
                if t.is_floating_point()}

    def _densities(self, blocks: dict[str, tuple]) -> dict[str, float] | None:
        """Per maskable layer of the full model: the variant's weights in it / the full layer's
        (0 where the variant lacks the layer); None for the full model itself (dense)."""
        densities = {}
        for name in self.info.maskable:
            held = math.prod(b - a for a, b in blocks[name]) if name in blocks else 0
            densities[name] = held / math.prod(self.info.shapes[name])
        return None if all(d == 1.0 for d in densities.values()) else densities

    # ---- server --------------------------------------------------------------------------
    def select_clients(self, round_, generator):
        """Draw evenly per tier, without replacement; the k mod tiers slots left over go by
        ``tiers.leftover``, and a tier with fewer clients than its slots gives all it has."""
        k = self.cfg["clients"]["per_round"]
        chosen = []
        for t, slots in enumerate(tier_slots(k, self.num_tiers, self.cfg["tiers"].get("leftover", "lowest"))):
            members = np.flatnonzero(self.tier == t)
            take = min(len(members), slots)
            chosen.extend(int(c) for c in generator.choice(members, size=take, replace=False))
        return sorted(chosen)

    def download(self, round_, client_id):
        tier = int(self.tier[client_id])
        if round_ not in self._downloads.get(tier, {}):
            # one dict per tier and round, so the clients of a tier share one payload
            blocks = self.blocks[tier]
            values = {n: self.weights[n][tuple(slice(a, b) for a, b in blocks[n])] for n in blocks}
            slices = {n: b for n, b in blocks.items() if tuple(e for _, e in b) != self.weights[n].shape}
            self._downloads[tier] = {round_: ModelUpdate(values, slices=slices)}
        return self._downloads[tier][round_]

    def aggregate(self, round_, results):
        self.weights, _ = average_over_holders([r.update for r in results], [r.num_samples for r in results],
                                               self.weights, missing="keep")

    # ---- client --------------------------------------------------------------------------
    def objective_for(self, round_: int, tier: int):
        """The local objective of a tier's clients this round (None: the trainer's default)."""
        return self.objective

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        tier = int(self.tier[task.client_id])
        objective = self.objective_for(task.round, tier)
        kwargs = {"objective": objective} if objective is not None else {}
        weights, loss, processed = trainer.train(
            task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
            client_id=task.client_id, variant=self.variants[tier], **kwargs)
        update = ModelUpdate(weights, slices=dict(task.received.slices))
        return ClientResult(task.client_id, len(task.y), update, loss, processed,
                            densities=self.densities[tier], metrics={"tier": tier + 1})

    # ---- results -------------------------------------------------------------------------
    def round_columns(self):
        exits = {f"exit_accuracy[{e}]": np.float64 for e in range(1, 4)}
        tiers = {f"tier_accuracy[{t}]": np.float64 for t in range(1, self.num_tiers + 1)}
        return {**exits, **tiers}

    def client_columns(self):
        return {"tier": np.int64}

    # ---- evaluation (one protocol for every tiered method) ---------------------------------
    @staticmethod
    def width_key(width: float) -> str:
        """The outcome key of the full-depth model at ``width`` ("global": the full model)."""
        return "global" if width == 1.0 else f"width{width!r}"

    def exit_width(self, exit_: int) -> float:
        """The width ``exit_accuracy[exit_ + 1]`` is measured at: the narrowest tier holding that
        exit (every tier holding it can run that model); 1 (the full model) where none does."""
        held = [w for v, w in zip(self.variants, self.widths) if v.get("level", 3) > exit_]
        return min(held) if held else 1.0

    def evaluation_models(self, round_):
        """The full model (global test set; local test sets of the width-1 tiers' clients) and, per
        width below 1 that a tier runs at, the full-depth slice at that width (local test sets of
        its tiers' clients; the global test set where an exit is measured at that width)."""
        clients = range(self.info.num_clients)
        at_width = {w: [c for c in clients if self.widths[self.tier[c]] == w] for w in set(self.widths)}
        full_members = at_width.get(1.0, [])
        models = [EvalModel("global", self.weights,
                            local_clients=None if len(full_members) == self.info.num_clients else full_members)]
        exit_widths = {self.exit_width(e) for e in range(3)}
        for width, blocks in self._width_blocks.items():
            values = {n: np.ascontiguousarray(self.weights[n][tuple(slice(a, b) for a, b in blocks[n])])
                      for n in blocks}
            models.append(EvalModel(self.width_key(width), values, variant={"width": width},
                                    global_test=width in exit_widths, local_clients=at_width[width]))
        return models

    def _client_scores(self, outcomes, clients):
        """(outcome, client, exit) for each client: its tier's submodel at its deepest exit."""
        return [(outcomes[self.width_key(self.widths[self.tier[c]])], c, self.exit_of(c)) for c in clients]

    def evaluation_metrics(self, round_, outcomes):
        full = outcomes["global"]
        metrics = {"test_accuracy": full.test_accuracy(), "test_loss": full.test_loss(),
                   "client_accuracy": mean_client_accuracy(self._client_scores(outcomes, range(self.info.num_clients)))}
        for e in range(len(full.test_correct)):
            metrics[f"exit_accuracy[{e + 1}]"] = outcomes[self.width_key(self.exit_width(e))].test_accuracy(e)
        for t in range(self.num_tiers):
            members = [int(c) for c in np.flatnonzero(self.tier == t)]
            metrics[f"tier_accuracy[{t + 1}]"] = mean_client_accuracy(self._client_scores(outcomes, members))
        return metrics


class DepthwiseAveraging(TieredAlgorithm):
    """A level-e client trains blocks 0..e on ``local.loss`` summed over its exits 1..e; every
    tensor averaged over the clients that hold it."""

    name = "depthwise_avg"
    label = "depth-wise averaging"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)

    def variant(self, tier):
        return {"level": int(self.cfg["tiers"]["levels"][tier])}


class FedAvgS(DepthwiseAveraging):
    """Every client at the smallest depth the tiers name (the lower bound)."""

    name = "fedavg_s"
    label = "FedAvg-S"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)

    def variant(self, tier):
        return {"level": int(min(self.cfg["tiers"]["levels"]))}
