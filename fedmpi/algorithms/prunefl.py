"""PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices",
IEEE TNNLS 2022). Spec: shared/spec/prunefl.md; doc: docs/methods/prunefl.md.

The model size adapts during FL to maximise Γ = (approximate empirical-risk reduction) / (round
time), with the round time T(m) = c₀ + Σ_l t_l · nnz_l(m) of the per-layer time model
(``RoundTimeModel``; t_l and c₀ come from fedmpi.timing, see ``round_time_model``).

Rounds (``prunefl.initial_pruning: true``, the default):

- **Round 1 is the initial-pruning round.** The server selects one client k₀ (drawn from
  (seed, round 1) by the sampling stream) and sends it the dense random init (counted download).
  k₀ trains alone from it on its own data, reconfiguring the mask every ``ip_interval`` local
  iterations with the importance Σ_steps g²·batch it accumulated since the last reconfiguration
  (``SquaredGradientAccumulator``) and the fixed drop fraction ``max_drop``; it stops once the
  density changed by ≤ ``ip_threshold`` (relative) in ``ip_patience`` consecutive
  reconfigurations, or after ``ip_max_iterations`` iterations. It uploads its weights and mask
  through the normal path, so the upload (values under the mask + the mask as bitmap or index
  list), the download of the init and the modelled time of all its iterations (samples
  processed at its sample-weighted mean layer densities) are counted like any round's. The
  server adopts the upload as the global model. Every FL round after it is round r ≥ 2, with FL
  round index r_FL = r − 1 (the ΔR schedule and the drop-fraction decay count r_FL).
  Without initial pruning r_FL = r and FL starts from the dense init.
- **FL rounds.** Clients train the masked model for ``local_steps`` iterations of plain SGD (the
  configured ``local.*`` optimizer), the mask re-applied after each step; the server averages
  each active weight over the clients (``average_over_holders``, sample-weighted). With
  ``adaptive`` on, every client accumulates for every parameter, active or not, the importance
  (Σ_steps g)² · samples processed of each round (``SummedGradientSquared``) in its device
  state, and on every ΔR-th FL round the clients of that round upload what they accumulated
  since their last upload as one dense float32 vector over all parameters (the extra tensor
  ``prunefl.importance``: exactly 4·n payload bytes, its layout row paying its description in
  ``header_bytes``), then reset it. The server sums the uploads (float64) and reconfigures.
- **Reconfiguration** (``reconfigure``): per layer the top (1 − d_r) of the active weights by |w|
  are kept, d_r = max_drop · 0.5^(r_FL / half_life); every other position is a candidate.
  Starting from num = Σ G over the kept weights and the dense tensors and den = c₀ + Σ_l t_l ·
  kept_l, candidates are added in decreasing G_j / t_l(j) order while G_j / t_l(j) > num / den:
  the exact maximiser of Γ over the candidate sets (tested against brute force). Optional
  density cap (``max_density``, falling linearly to ``target_density``). A weight active before
  and after keeps its value; a newly activated position starts at 0 (``regrow_value: last``:
  its last value, see below); a dropped weight becomes 0.

With client sampling (K < N) a client uploads, on the ΔR-th round, what it accumulated in the
rounds it took part in since its own last upload; the paper's setting (and the public code) has
the same K = N clients every round, where this is exactly the importance of the last ΔR rounds.
The accumulator is device state of n float32 per client that took part since its last upload,
which the server holds between rounds (memory N · 4n bytes at worst).

Deviations of the public code (jiangyuang/PruneFL), each a ``prunefl.`` key, all off by default;
``prunefl.public_code: true`` switches every one of them on:

- ``ip_accuracy_factor: 1.5``: initial pruning reconfigures only once the training accuracy
  reaches factor / classes (``ADJ_THR_ACC``); here the accuracy of the last ``ip_interval``
  iterations' minibatches (before each step), where the code evaluates its fixed batches.
- ``ip_data_batches: 10``: initial pruning trains on a fixed subset of that many batches of the
  client's data (``IP_DATA_BATCH``), reshuffled each pass (the code cycles them in order).
- ``regrow_value: last``: the code masks in the forward pass and never zeroes the server's
  weight tensor, so a re-activated weight resumes its last value (its init value if never
  trained). Default: 0. fedmpi's server knows only its own copy, so a position pruned during
  initial pruning resumes its init value.
- ``aggregation_weight: processed``: weights by samples processed in the round (equal for all
  clients with a fixed number of steps) instead of the client's sample count.

c₀ decides how small the model gets (with c₀ ≈ 0 nothing stops Γ from shrinking it): the built-in
modelled profiles have almost none (no latency, no fixed compute), so ``prunefl.time_constant``
sets it; see docs/methods/prunefl.md, "Time model".

Also options of the code, not deviations: ``adaptive: false`` (``--no-adaptive``: initial pruning
only), ``initial_pruning: false`` (``--no-init-pruning``), ``max_density``/``target_density``
(``--max-density``/``--target-density``). The public code books zero time for initial pruning
(``list_est_time.append(0)``); fedmpi counts it. The code's reconfiguration schedule waits for an
evaluation round (``EVAL_DISP_INTERVAL``) and ΔR rounds after initial pruning; fedmpi
reconfigures on r_FL % ΔR == 0. The code's initial pruning uses server-held data; fedmpi uses
client k₀'s. Where the code keeps ``int(d·a)`` active weights plus magnitude ties, fedmpi keeps
exactly a − ⌊d·a⌋ (ties to the lower flat index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .. import rng
from ..aggregate import average_over_holders
from ..comm.codec import ModelUpdate
from ..sparsity import magnitude_masks
from ..training.hooks import SquaredGradientAccumulator, SummedGradientSquared
from ..training.objectives import cross_entropy
from .base import Algorithm, ClientResult, ClientTask

IMPORTANCE = "prunefl.importance"


# --------------------------------------------------------------------------- time model

@dataclass(frozen=True)
class RoundTimeModel:
    """T(m) = c0 + Σ_l t[l] · nnz_l(m): seconds of one FL round of one client with mask m.

    ``t[l]`` is layer l's cost per active weight (its share of the round's local computation
    plus communicating one value); ``c0`` the fixed part. This is the interface PruneFL's
    reconfiguration needs; ``round_time_model`` builds it from fedmpi.timing."""

    c0: float
    t: Mapping[str, float]

    def __post_init__(self):
        bad = {n: v for n, v in self.t.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"per-parameter times must be positive and finite, got {bad}")
        if not (self.c0 >= 0 and math.isfinite(self.c0)):
            raise ValueError(f"c0 must be >= 0, got {self.c0}")

    def seconds(self, counts: Mapping[str, int]) -> float:
        return float(self.c0 + sum(self.t[n] * float(k) for n, k in counts.items()))


def round_time_model(cfg: dict, info, local_steps: int | None, client_id: int | None = None) -> RoundTimeModel:
    """c₀ and t_l of fedmpi.timing's linear model (``TimeModel.c0`` / ``.t``) for the profile of
    ``client_id`` (None: ``device.profile``) and a round of ``local_steps`` minibatch steps of
    ``local.batch_size`` samples (``local_steps`` None, i.e. epochs: one batch, as the round's
    size is not known here). ``prunefl.time_constant`` ≥ 0 replaces c₀."""
    from ..timing import RunTiming

    model = RunTiming.from_config(cfg, info).time_model(
        client_id, steps_per_round=local_steps or 1, batch_size=cfg["local"]["batch_size"])
    c0, t = model.c0, model.t
    override = cfg.get("prunefl", {}).get("time_constant", -1.0)
    if override is not None and override >= 0:
        c0 = float(override)
    return RoundTimeModel(float(c0), {n: float(v) for n, v in t.items()})


# --------------------------------------------------------------------------- reconfiguration

def greedy_count(numerator: float, denominator: float, values: np.ndarray, costs: np.ndarray,
                 limit: int | None = None) -> int:
    """How many of the candidates (already sorted by values/costs, decreasing) the greedy adds:
    the longest prefix whose every item i satisfies values_i / costs_i > (num + Σ_{j<i} values_j)
    / (den + Σ_{j<i} costs_j). Once an item fails, every later one fails too (its ratio is no
    larger and the running ratio no smaller), so the prefix maximises (num + Σ values) /
    (den + Σ costs) over all subsets. ``limit`` caps the count (density cap)."""
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if values.size == 0:
        return 0
    before_v = numerator + np.concatenate(([0.0], np.cumsum(values[:-1])))
    before_c = denominator + np.concatenate(([0.0], np.cumsum(costs[:-1])))
    ok = values * before_c > costs * before_v
    count = int(values.size) if ok.all() else int(np.argmin(ok))
    return count if limit is None else max(0, min(count, int(limit)))


@dataclass
class Reconfiguration:
    masks: dict[str, np.ndarray]
    kept: dict[str, int]           # per layer: active weights kept by magnitude
    added: dict[str, int]          # per layer: candidates the greedy added
    objective: float               # Γ = Σ G / T of the new mask


def reconfigure(weights: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
                importance: Mapping[str, np.ndarray], drop_fraction: float, time_model: RoundTimeModel,
                *, dense_importance: float = 0.0, max_active: int | None = None) -> Reconfiguration:
    """PruneFL's RECONFIGURE over the layers in ``masks`` (spec step 4).

    Per layer with a active weights, the a − ⌊d·a⌋ largest |w| among them are kept; all other
    positions are candidates. num = ``dense_importance`` + Σ G over the kept weights, den = c₀ +
    Σ_l t_l · kept_l; candidates (all layers together) are added by decreasing G_j / t_l(j)
    while that exceeds num / den (``greedy_count``), at most ``max_active`` active weights in
    all. Ties: equal ratios keep layer order, then decreasing G, then the lower flat index."""
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop fraction {drop_fraction} outside [0, 1]")
    names = list(masks)
    counts = {}
    for name in names:
        active = int(np.count_nonzero(masks[name]))
        counts[name] = active - int(drop_fraction * active)
    kept_masks = magnitude_masks({n: weights[n] for n in names}, counts,
                                 within={n: masks[n] for n in names})
    numerator = float(dense_importance)
    denominator = float(time_model.c0)
    layer_of, positions, values, ratio_parts = [], [], [], []
    t_of = np.array([time_model.t[name] for name in names], dtype=np.float64)
    for i, name in enumerate(names):
        kept = kept_masks[name].reshape(-1)
        g = np.asarray(importance[name], dtype=np.float64).reshape(-1)
        numerator += float(g[kept].sum())
        denominator += time_model.t[name] * counts[name]
        candidates = np.flatnonzero(~kept)          # in (layer, flat index) order
        positions.append(candidates)
        values.append(g[candidates])
        ratio_parts.append(values[-1] / t_of[i])
        layer_of.append(np.full(candidates.size, i, dtype=np.int32))
    positions_all = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    values_all = np.concatenate(values) if values else np.zeros(0)
    ratios = np.concatenate(ratio_parts) if ratio_parts else np.zeros(0)
    layers_all = np.concatenate(layer_of) if layer_of else np.zeros(0, np.int32)
    limit = None if max_active is None else max_active - sum(counts.values())
    # the greedy only walks a prefix of the candidates sorted by ratio: sort the top k (ties at
    # the boundary included, so the prefix is exactly the full sort's), widen k while all are taken
    k = max(4096, 2 * sum(int(np.count_nonzero(masks[n])) - counts[n] for n in names))
    while True:
        order = top_order(ratios, k)
        n_add = greedy_count(numerator, denominator, values_all[order], t_of[layers_all[order]], limit)
        if n_add < order.size or order.size == ratios.size:
            break
        k *= 4
    chosen = order[:n_add]
    new_masks, added = {}, {}
    for i, name in enumerate(names):
        flat = kept_masks[name].reshape(-1).copy()
        mine = chosen[layers_all[chosen] == i]
        flat[positions_all[mine]] = True
        new_masks[name] = flat.reshape(np.shape(masks[name]))
        added[name] = int(mine.size)
    numerator += float(values_all[chosen].sum())
    denominator += float(t_of[layers_all[chosen]].sum())
    return Reconfiguration(new_masks, counts, added, numerator / denominator if denominator > 0 else math.inf)


def top_order(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of every score ≥ the k-th largest, by decreasing score, ties in index order: a
    prefix of ``np.argsort(-scores, kind="stable")`` holding at least min(k, n) items."""
    n = scores.size
    if k >= n:
        return np.argsort(-scores, kind="stable")
    kth = -np.partition(-scores, k - 1)[k - 1]
    selected = np.flatnonzero(scores >= kth)
    return selected[np.argsort(-scores[selected], kind="stable")]


def gamma(masks: Mapping[str, np.ndarray], importance: Mapping[str, np.ndarray], time_model: RoundTimeModel,
          dense_importance: float = 0.0) -> float:
    """Γ(m) = (dense_importance + Σ G over m) / T(m); for tests and diagnostics."""
    num = dense_importance + sum(float(np.asarray(importance[n], np.float64)[np.asarray(m, bool)].sum())
                                 for n, m in masks.items())
    return num / time_model.seconds({n: int(np.count_nonzero(m)) for n, m in masks.items()})


def apply_new_masks(weights: dict[str, np.ndarray], old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                    last: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Weights under the new masks: kept where active before and after, 0 where dropped, and for
    newly active positions 0 (or their value in ``last``, the public code's behaviour)."""
    out = dict(weights)
    for name, mask in new.items():
        w = np.asarray(weights[name])
        fresh = np.zeros_like(w) if last is None else np.asarray(last[name], dtype=w.dtype)
        out[name] = np.where(mask, np.where(old[name], w, fresh), np.zeros_like(w)).astype(w.dtype)
    return out


# --------------------------------------------------------------------------- shared base

def parameter_names(info) -> list[str]:
    """The model's trainable parameters in model order (what importance covers); all float
    tensors when the model cannot be built from ``info``."""
    if not info.model:
        return list(info.shapes)
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):   # building draws from torch's global RNG
        model = build_model(info.model, info.input_shape, info.num_classes)
    names = [n for n, _ in model.named_parameters() if n in info.shapes]
    return names


class MaskedFedAvg(Algorithm):
    """One global mask; clients train the masked model for ``<section>.local_steps`` iterations
    (0: ``local.epochs``); the server averages each active weight over the clients. Shared by
    PruneFL, SNIP and iterative magnitude pruning. Columns: ``active_params`` (active maskable
    weights plus every dense tensor: the model size) and ``layer_density[<layer>]``."""

    section = ""

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.settings = cfg[self.section] if self.section else {}
        self.dense_names = [n for n in info.shapes if n not in info.maskable]
        self.dense_size = sum(math.prod(info.shapes[n]) for n in self.dense_names)
        self.maskable_size = sum(math.prod(info.shapes[n]) for n in info.maskable)

    # ---- helpers ---------------------------------------------------------------------------
    def local_steps(self) -> int | None:
        steps = int(self.settings.get("local_steps", 0))
        return steps if steps > 0 else None

    def active_params(self) -> int:
        if not self.masks:
            return self.maskable_size + self.dense_size
        return sum(int(np.count_nonzero(m)) for m in self.masks.values()) + self.dense_size

    def layer_counts(self) -> dict[str, int]:
        if not self.masks:
            return {n: math.prod(self.info.shapes[n]) for n in self.info.maskable}
        return {n: int(np.count_nonzero(m)) for n, m in self.masks.items()}

    def aggregation_weight(self, result: ClientResult) -> float:
        return result.num_samples

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        """Adopt ``masks`` (weights outside become 0)."""
        self.masks = {n: np.asarray(m, dtype=bool) for n, m in masks.items()}
        for name, mask in self.masks.items():
            self.weights[name] = np.where(mask, self.weights[name], np.zeros_like(self.weights[name]))

    # ---- results columns -------------------------------------------------------------------
    def round_columns(self):
        return {"active_params": np.int64, **{f"layer_density[{n}]": np.float64 for n in self.info.maskable}}

    def round_metrics(self, round_):
        counts = self.layer_counts()
        return {"active_params": self.active_params(),
                **{f"layer_density[{n}]": counts[n] / math.prod(self.info.shapes[n]) for n in counts}}

    # ---- server ----------------------------------------------------------------------------
    def init_server(self, weights, rng_) -> None:
        self.weights = dict(weights)

    def aggregate(self, round_, results):
        updates = [ModelUpdate({n: r.update.values[n] for n in self.info.shapes if n in r.update.values},
                               r.update.masks) for r in results]
        self.weights, _ = average_over_holders(updates, [self.aggregation_weight(r) for r in results],
                                               self.weights, missing="keep")

    # ---- client ----------------------------------------------------------------------------
    def train(self, task: ClientTask, trainer, hooks=()):
        masks = dict(task.received.masks) or None
        return trainer.train(task.received.values, task.x, task.y, seed=task.seed, round_=task.round,
                             client_id=task.client_id, masks=masks, steps=self.local_steps(), hooks=hooks)

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        weights, loss, processed = self.train(task, trainer)
        masks = dict(task.received.masks)
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks), loss, processed,
                            densities=densities)


# --------------------------------------------------------------------------- PruneFL

class _AccuracyObjective:
    """Cross-entropy that also counts the minibatches' correct predictions (before each step)."""

    def __init__(self):
        self.correct = 0
        self.total = 0

    def __call__(self, outputs, y):
        with torch.no_grad():
            self.correct += int((outputs.argmax(dim=1) == y).sum())
            self.total += int(len(y))
        return cross_entropy(outputs, y)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def flatten_importance(parts: Mapping[str, np.ndarray], names: list[str], shapes: Mapping[str, tuple]) -> np.ndarray:
    """One float32 vector over ``names`` (zeros where a tensor has no importance)."""
    sizes = [math.prod(shapes[n]) for n in names]
    out = np.zeros(sum(sizes), np.float32)
    offset = 0
    for name, size in zip(names, sizes):
        if name in parts:
            out[offset:offset + size] = np.asarray(parts[name]).reshape(-1)
        offset += size
    return out


def split_importance(vector: np.ndarray, names: list[str], shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for n in names:
        size = math.prod(shapes[n])
        out[n] = vector[offset:offset + size].reshape(shapes[n])
        offset += size
    if offset != vector.size:
        raise ValueError(f"importance vector has {vector.size} values, the parameters {offset}")
    return out


class PruneFL(MaskedFedAvg):
    name = "prunefl"
    section = "prunefl"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        s = self.settings
        self.initial = bool(s["initial_pruning"])
        self.adaptive = bool(s["adaptive"])
        self.every = int(s["reconfigure_every"])
        self.half_life = float(s["half_life"]) if s["half_life"] > 0 else float(cfg["rounds"])
        self.fl_rounds = cfg["rounds"] - (1 if self.initial else 0)
        self.param_names = parameter_names(info)
        self.param_size = sum(math.prod(info.shapes[n]) for n in self.param_names)
        # built now, so that a bad profile is a setup error on every rank
        self._time_model: RoundTimeModel = round_time_model(cfg, info, self.local_steps())
        self.shadow: dict[str, np.ndarray] = {}     # regrow_value: last — values of inactive positions
        self.ip_client: int | None = None
        self._info: dict[str, float] = {}          # this round's PruneFL columns

    # ---- schedule ------------------------------------------------------------------------
    @property
    def time_model(self) -> RoundTimeModel:
        """T(m) of ``device.profile`` for one FL round (the server's reconfigurations)."""
        return self._time_model

    def fl_round(self, round_: int) -> int:
        return round_ - 1 if self.initial else round_

    def is_ip_round(self, round_: int) -> bool:
        return self.initial and round_ == 1

    def is_upload_round(self, round_: int) -> bool:
        r = self.fl_round(round_)
        return self.adaptive and r >= 1 and r % self.every == 0

    def drop_fraction(self, round_: int) -> float:
        return self.settings["max_drop"] * 0.5 ** (self.fl_round(round_) / self.half_life)

    def max_active(self, round_: int) -> int | None:
        cap, target = self.settings["max_density"], self.settings["target_density"]
        if target >= 0:
            cap = cap + (target - cap) * self.fl_round(round_) / max(self.fl_rounds, 1)
        if cap >= 1.0:
            return None
        return int(math.floor(cap * self.maskable_size))

    def aggregation_weight(self, result):
        if self.settings["aggregation_weight"] == "processed":
            return result.samples_processed
        return result.num_samples

    # ---- results columns -----------------------------------------------------------------
    def round_columns(self):
        return {**super().round_columns(), "reconfigured": np.int64, "importance_uploads": np.int64,
                "objective": np.float64, "model_round_seconds": np.float64,
                "ip_iterations": np.int64, "ip_reconfigurations": np.int64}

    def client_columns(self):
        return {"ip_iterations": np.int64, "ip_reconfigurations": np.int64}

    def round_metrics(self, round_):
        metrics = {**super().round_metrics(round_), "reconfigured": 0, "importance_uploads": 0,
                   "model_round_seconds": self.time_model.seconds(self.layer_counts())}
        metrics.update(self._info)   # what this round's aggregate recorded
        self._info = {}
        return metrics

    # ---- server --------------------------------------------------------------------------
    def init_server(self, weights, rng_) -> None:
        super().init_server(weights, rng_)
        if self.settings["regrow_value"] == "last":
            self.shadow = {n: weights[n].copy() for n in self.info.maskable}

    def select_clients(self, round_, generator):
        if self.is_ip_round(round_):
            self.ip_client = int(generator.integers(self.cfg["clients"]["total"]))
            return [self.ip_client]
        return super().select_clients(round_, generator)

    def aggregate(self, round_, results):
        if self.is_ip_round(round_):
            (result,) = results
            self.weights = {n: np.asarray(result.update.values[n]) for n in self.info.shapes}
            self.masks = {n: np.asarray(m, bool) for n, m in result.update.masks.items()}
            if self.shadow:
                # a position pruned during initial pruning: the server knows only its init value
                self.shadow = {n: np.where(self.masks[n], self.weights[n], self.shadow[n]) for n in self.shadow}
            self._info.update({k: result.metrics[k] for k in ("ip_iterations", "ip_reconfigurations")
                               if k in result.metrics})
            return
        super().aggregate(round_, results)
        if self.shadow and self.masks:
            self.shadow = {n: np.where(self.masks[n], self.weights[n], self.shadow[n]) for n in self.shadow}
        if not self.is_upload_round(round_):
            return
        uploads = [r.update.values[IMPORTANCE] for r in results if IMPORTANCE in r.update.values]
        if not uploads:
            return
        total = np.zeros(self.param_size, dtype=np.float64)
        for vector in uploads:   # client-id order: the sum is the same for any rank count
            total += np.asarray(vector, dtype=np.float64)
        importance = split_importance(total, self.param_names, self.info.shapes)
        self._reconfigure(round_, importance, len(uploads))

    def _reconfigure(self, round_: int, importance: dict[str, np.ndarray], uploads: int) -> None:
        old = self.masks or {n: np.ones(self.info.shapes[n], bool) for n in self.info.maskable}
        dense = sum(float(importance[n].sum()) for n in importance if n not in self.info.maskable)
        result = reconfigure(self.weights, old, importance, self.drop_fraction(round_), self.time_model,
                             dense_importance=dense, max_active=self.max_active(round_))
        self.weights = apply_new_masks(self.weights, old, result.masks, self.shadow or None)
        self.masks = result.masks
        self._info.update({"reconfigured": 1, "importance_uploads": uploads, "objective": result.objective})

    def state_dict(self):
        return {**super().state_dict(), "shadow": self.shadow, "ip_client": self.ip_client}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.shadow, self.ip_client = state["shadow"], state["ip_client"]

    # ---- client --------------------------------------------------------------------------
    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        if self.is_ip_round(task.round):
            return self.initial_pruning(task, trainer)
        hook = SummedGradientSquared(self.param_names) if self.adaptive else None
        weights, loss, processed = self.train(task, trainer, hooks=[hook] if hook else ())
        masks = dict(task.received.masks)
        update = ModelUpdate(weights, masks)
        state: dict = {}
        if hook is not None:
            mine = flatten_importance(hook.result(), self.param_names, self.info.shapes)
            previous = task.state.get("importance")
            accumulated = mine if previous is None else previous + mine   # float32, a new array
            if self.is_upload_round(task.round):
                update.values[IMPORTANCE] = accumulated
                state = {"importance": None, "uploaded": task.round}
            else:
                state = {"importance": accumulated}
        densities = {n: float(m.mean()) for n, m in masks.items()} or None
        return ClientResult(task.client_id, len(task.y), update, loss, processed, state=state,
                            densities=densities)

    def initial_pruning(self, task: ClientTask, trainer) -> ClientResult:
        """Client k₀ alone: train from the dense init, reconfigure every ``ip_interval``
        iterations with d = ``max_drop``, until the density settles (see the module doc)."""
        s, cfg = self.settings, self.cfg
        maskable = self.info.maskable
        time_model = round_time_model(cfg, self.info, self.local_steps(), task.client_id)   # k₀'s device
        weights = {n: np.asarray(v).copy() for n, v in task.received.values.items()}
        masks = {n: np.ones(self.info.shapes[n], bool) for n in maskable}
        last = {n: weights[n].copy() for n in maskable} if s["regrow_value"] == "last" else None
        x, y = task.x, task.y
        if s["ip_data_batches"] > 0:
            take = min(len(y), s["ip_data_batches"] * cfg["local"]["batch_size"])
            chosen = np.sort(rng.generator(cfg["seed"], rng.CLIENT, task.round, task.client_id)
                             .permutation(len(y))[:take])
            index = torch.from_numpy(chosen)
            x, y = x[index], y[index]
        total = self.maskable_size
        density_time = {n: 0.0 for n in maskable}   # Σ samples · layer density, for the time model
        iterations = processed_total = reconfigurations = chunk = 0
        loss_sum = 0.0
        started = s["ip_accuracy_factor"] <= 0
        previous_density, stable = None, []
        while iterations < s["ip_max_iterations"]:
            steps = min(s["ip_interval"], s["ip_max_iterations"] - iterations)
            hook = SquaredGradientAccumulator(self.param_names, dtype=torch.float32)
            objective = _AccuracyObjective()
            weights, loss, processed = trainer.train(
                weights, x, y, seed=rng.torch_seed(cfg["seed"], rng.CLIENT, task.round, task.client_id, chunk),
                round_=task.round, client_id=task.client_id, masks=masks, steps=steps, hooks=[hook],
                objective=objective)
            chunk += 1
            iterations += steps
            loss_sum += loss * processed
            processed_total += processed
            for n in maskable:
                density_time[n] += processed * float(masks[n].mean())
            if not started:
                started = objective.accuracy >= s["ip_accuracy_factor"] / self.info.num_classes
                if not started:
                    continue
            importance = {n: t.to("cpu").numpy() for n, t in hook.totals.items()}
            dense = sum(float(importance[n].sum()) for n in importance if n not in maskable)
            if last is not None:
                last = {n: np.where(masks[n], weights[n], last[n]) for n in maskable}
            result = reconfigure(weights, masks, {n: importance.get(n, np.zeros(self.info.shapes[n]))
                                                  for n in maskable},
                                 s["max_drop"], time_model, dense_importance=dense)
            weights = apply_new_masks(weights, masks, result.masks, last)
            masks = result.masks
            reconfigurations += 1
            density = sum(int(np.count_nonzero(m)) for m in masks.values()) / total
            if previous_density is not None:
                stable.append(abs(density / previous_density - 1.0) <= s["ip_threshold"])
            previous_density = density
            if len(stable) >= s["ip_patience"] and all(stable[-s["ip_patience"]:]):
                break
        densities = {n: density_time[n] / max(processed_total, 1) for n in maskable}
        return ClientResult(task.client_id, len(task.y), ModelUpdate(weights, masks),
                            loss_sum / max(processed_total, 1), processed_total, densities=densities,
                            metrics={"ip_iterations": iterations, "ip_reconfigurations": reconfigurations})
