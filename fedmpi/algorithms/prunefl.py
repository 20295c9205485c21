"""PruneFL (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices",
IEEE TNNLS 2022). Doc: docs/methods/prunefl.md.

The model size adapts during FL to maximise Γ = (approximate empirical-risk reduction) / (round
time), with the round time T(m) = c₀ + Σ_l t_l · nnz_l(m) of the per-layer time model
(``RoundTimeModel``; t_l and c₀ come from fedmpi.timing, see ``round_time_model``).

Code: this module holds the algorithm (schedule, server side, the clients' importance uploads);
``prunefl_reconfiguration.py`` the time model and the reconfiguration (pure functions);
``prunefl_initial_pruning.py`` the initial-pruning round; ``masked_fedavg.py`` the masked-FedAvg
base shared with the SNIP and IMP baselines (``pruning_baselines.py``).

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
  clients with a fixed number of steps; ``samples_per_round``) instead of the sample count.

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
from typing import Mapping

import numpy as np
import torch

from ..errors import require
from ..training.hooks import SummedGradientSquared
from ..update import ModelUpdate
from .base import ClientResult, ClientTask
from .masked_fedavg import MaskedFedAvg
from .prunefl_initial_pruning import run_initial_pruning
from .prunefl_reconfiguration import RoundTimeModel, apply_new_masks, reconfigure, round_time_model

IMPORTANCE = "prunefl.importance"


# --------------------------------------------------------------------------- importance vector

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


# --------------------------------------------------------------------------- PruneFL

class PruneFL(MaskedFedAvg):
    name = "prunefl"
    label = "PruneFL"
    doc = "docs/methods/prunefl.md"
    figures = ("prunefl",)
    section = "prunefl"
    # initial pruning at one client (round 1), then masked FedAvg with dense importance uploads and
    # a reconfiguration every ΔR FL rounds. The paper's scale: reconfigure_every 50, ip_interval
    # 500, ip_max_iterations 10000.
    defaults = {
        "local_steps": 5,            # local iterations per round (0: local.epochs)
        "initial_pruning": True,     # false: the public code's --no-init-pruning
        "adaptive": True,            # false: --no-adaptive (initial pruning only)
        "reconfigure_every": 5,      # ΔR, in FL rounds
        "max_drop": 0.3,             # d_0: at most this fraction of the active weights is dropped
        "half_life": -1,             # d_r = d_0 · 0.5^(r / half_life), in FL rounds; -1: rounds
        "max_density": 1.0,          # density cap (--max-density); 1: none
        "target_density": -1.0,      # cap falls linearly to this over the run (--target-density); -1: off
        "ip_interval": 50,           # initial pruning: local iterations between reconfigurations
        "ip_threshold": 0.1,         # ... stable when the density changed by at most this (relative)
        "ip_patience": 5,            # ... stop after this many stable reconfigurations in a row
        "ip_max_iterations": 1000,   # ... or after this many iterations
        "time_constant": -1.0,       # c_0 in seconds; -1: from the device profile's time model
        # deviations of the public code (jiangyuang/PruneFL), off by default; public_code: true
        # sets every one of them (module docstring)
        "public_code": False,
        "ip_accuracy_factor": 0.0,   # public 1.5: reconfigure once train accuracy >= factor / classes
        "ip_data_batches": 0,        # public 10: initial pruning on a fixed subset of this many batches
        "regrow_value": "zero",      # zero | last (public: a re-activated weight resumes its last value)
        "aggregation_weight": "samples",   # samples | processed (public: samples processed in the round)
    }

    @classmethod
    def check_config(cls, cfg):
        pf = cfg["prunefl"]
        if pf["public_code"]:   # every deviation of the public code at once, written out key by key
            pf.update({"ip_accuracy_factor": 1.5, "ip_data_batches": 10, "regrow_value": "last",
                       "aggregation_weight": "processed"})
        for key in ("local_steps", "ip_data_batches"):
            require(pf[key] >= 0, f"prunefl.{key}", "must be >= 0")
        for key in ("reconfigure_every", "ip_interval", "ip_patience", "ip_max_iterations"):
            require(pf[key] >= 1, f"prunefl.{key}", "must be at least 1")
        require(0 <= pf["max_drop"] <= 1, "prunefl.max_drop", "must be in [0, 1]")
        require(pf["half_life"] == -1 or pf["half_life"] >= 1, "prunefl.half_life", "must be -1 (rounds) or >= 1")
        require(0 < pf["max_density"] <= 1, "prunefl.max_density", "must be in (0, 1] (1: no cap)")
        require(pf["target_density"] == -1 or 0 < pf["target_density"] <= pf["max_density"],
                "prunefl.target_density", "must be -1 (off) or in (0, prunefl.max_density]")
        require(pf["ip_threshold"] >= 0, "prunefl.ip_threshold", "must be >= 0")
        require(pf["ip_accuracy_factor"] >= 0, "prunefl.ip_accuracy_factor", "must be >= 0 (0: off)")
        require(pf["time_constant"] == -1 or pf["time_constant"] >= 0, "prunefl.time_constant",
                "must be -1 (the device profile's) or >= 0 seconds")
        require(pf["regrow_value"] in ("zero", "last"), "prunefl.regrow_value", "must be 'zero' or 'last'")
        require(pf["aggregation_weight"] in ("samples", "processed"), "prunefl.aggregation_weight",
                "must be 'samples' or 'processed' (the public code: samples processed in the round)")
        if cfg["algorithm"] == cls.name and pf["adaptive"]:
            fl_rounds = cfg["rounds"] - (1 if pf["initial_pruning"] else 0)
            require(fl_rounds >= pf["reconfigure_every"], "prunefl.reconfigure_every",
                    f"no FL round reconfigures: {fl_rounds} FL rounds"
                    f"{' after the initial-pruning round 1' if pf['initial_pruning'] else ''} and "
                    f"ΔR = {pf['reconfigure_every']}; lower it or set prunefl.adaptive: false")

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

    def partial_sum_weight(self, client_id, num_samples):
        if self.settings["aggregation_weight"] == "processed":   # public code: samples processed
            return self.samples_per_round(num_samples)
        return num_samples

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
        """Round 1 at client k₀ (``run_initial_pruning``; see the module doc)."""
        return run_initial_pruning(task, trainer, cfg=self.cfg, settings=self.settings, info=self.info,
                                   param_names=self.param_names, local_steps=self.local_steps())
