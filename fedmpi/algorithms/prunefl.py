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
  ``adaptive`` on, in every round an upload round follows (``gathers_importance``), every client
  accumulates for every parameter, active or not, the importance (Σ_steps g)² · samples
  processed (``SummedGradientSquared``, device state), and on every ΔR-th FL round but the last
  uploads it as the extra float32 tensor ``prunefl.importance``, then resets it: by default only
  the pruned positions' values, the server deriving the others from the rounds' updates
  (``importance_upload``, ``prunefl_importance.py``). The server sums it
  (float64) and, once the round was evaluated, reconfigures (``prepare_next_round``): the next
  round downloads the new mask.
- **Reconfiguration** (``reconfigure``): per layer the top (1 − d_r) of the active weights by |w|
  are kept, d_r = max_drop · 0.5^(r_FL / half_life); every other position is a candidate.
  Starting from num = Σ G over the kept weights and the dense tensors and den = c₀ + Σ_l t_l ·
  kept_l, candidates are added in decreasing G_j / t_l(j) order while G_j / t_l(j) > num / den:
  the exact maximiser of Γ over the candidate sets (tested against brute force). Optional
  density cap (``max_density``, falling linearly to ``target_density``). A weight active before
  and after keeps its value; a newly activated position starts at 0 (``regrow_value: last``:
  its last value, see below); a dropped weight becomes 0.

With client sampling (K < N) a client uploads what it accumulated in its rounds since its own
last upload (with K = N, the paper's setting, the last ΔR rounds); the server holds that device
state between rounds (N · 4n bytes at worst).

Deviations of the public code (jiangyuang/PruneFL), each a ``prunefl.`` key, all off by default;
``prunefl.public_code: true`` switches every one of them on:

- ``ip_accuracy_factor: 1.5``: initial pruning reconfigures only once the training accuracy
  reaches factor / classes (``ADJ_THR_ACC``); here the accuracy of the last ``ip_interval``
  iterations' minibatches (before each step), where the code evaluates its fixed batches.
- ``regrow_value: last``: the code masks in the forward pass and never zeroes the server's
  weight tensor, so a re-activated weight resumes its last value (its init value if never
  trained). Default: 0. fedmpi's server knows only its own copy, so a position pruned during
  initial pruning resumes its init value.
- ``aggregation_weight: processed``: weights by samples processed in the round (equal for all
  clients with a fixed number of steps; ``samples_per_round``) instead of the sample count.

Time (docs/methods/prunefl.md, "Time model"): t_l and c₀ come from ``device.profile`` and
``device.time_constant`` (charged to every method); while its clients gather importance they are
charged every weight's gradient (``dense_weight_gradients``); ``ip_time: zero`` books initial
pruning at 0 s, as the authors' simulation does; ``time_constant`` replaces c₀ in Γ only.

Also options of the code, not deviations: ``adaptive: false`` (``--no-adaptive``: initial pruning
only), ``initial_pruning: false`` (``--no-init-pruning``), ``max_density``/``target_density``
(``--max-density``/``--target-density``), ``ip_data_batches`` (default 10, ``IP_DATA_BATCH``). The code's reconfiguration schedule waits for an
evaluation round (``EVAL_DISP_INTERVAL``) and ΔR rounds after initial pruning; fedmpi reconfigures
after FL rounds r_FL % ΔR == 0 but the last. The code's initial pruning uses server-held data; fedmpi uses
client k₀'s. Where the code keeps ``int(d·a)`` active weights plus magnitude ties, fedmpi keeps
exactly a − ⌊d·a⌋ (ties to the lower flat index).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import require
from ..training.hooks import SummedGradientSquared
from ..update import ModelUpdate
from .base import ClientResult, ClientTask
from .masked_fedavg import MaskedFedAvg
from .prunefl_importance import (add_update_importance, flatten_importance, parameter_names, pruned_positions,
                                 split_importance, summed_importance)
from .prunefl_initial_pruning import IP_COLUMNS, run_initial_pruning
from .prunefl_reconfiguration import RoundTimeModel, reconfigured_model, round_time_model

IMPORTANCE = "prunefl.importance"


# --------------------------------------------------------------------------- PruneFL

class PruneFL(MaskedFedAvg):
    name = "prunefl"
    label = "PruneFL"
    doc = "docs/methods/prunefl.md"
    figures = ("prunefl",)
    section = "prunefl"
    # initial pruning at one client (round 1), then masked FedAvg with importance uploads and
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
        "ip_data_batches": 10,       # ... on a fixed subset of this many batches (authors'); 0: all data
        "time_constant": -1.0,       # c_0 of the objective only (not charged); -1: the time model's
        # pruned: upload the pruned positions' importance, the server derives the rest from the
        # updates (the authors' protocol); dense: all n values (module doc)
        "importance_upload": "pruned",
        "ip_time": "charged",        # charged | zero (the authors' simulation books initial pruning at 0 s)
        # deviations of the public code (jiangyuang/PruneFL), off by default; public_code: true
        # sets every one of them (module docstring)
        "public_code": False,
        "ip_accuracy_factor": 0.0,   # public 1.5: reconfigure once train accuracy >= factor / classes
        "regrow_value": "zero",      # zero | last (public: a re-activated weight resumes its last value)
        "aggregation_weight": "samples",   # samples | processed (public: samples processed in the round)
    }

    @classmethod
    def check_config(cls, cfg):
        pf = cfg["prunefl"]
        if pf["public_code"]:   # every deviation of the public code at once, written out key by key
            pf.update({"ip_accuracy_factor": 1.5, "ip_data_batches": 10, "regrow_value": "last",
                       "aggregation_weight": "processed"})   # ip_data_batches: the default already
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
        require(pf["importance_upload"] in ("pruned", "dense"), "prunefl.importance_upload",
                "must be 'pruned' (the pruned positions; the server derives the rest from the updates) or 'dense'")
        require(pf["ip_time"] in ("charged", "zero"), "prunefl.ip_time",
                "must be 'charged' (initial pruning's modelled time counts) or 'zero' (booked at 0 s)")
        require(pf["aggregation_weight"] in ("samples", "processed"), "prunefl.aggregation_weight",
                "must be 'samples' or 'processed' (the public code: samples processed in the round)")
        if cfg["algorithm"] == cls.name and pf["adaptive"]:
            fl_rounds = cfg["rounds"] - (1 if pf["initial_pruning"] else 0)
            require(fl_rounds > pf["reconfigure_every"], "prunefl.reconfigure_every",   # a later round trains it
                    f"no FL round reconfigures: {fl_rounds} FL rounds"
                    f"{' after the initial-pruning round 1' if pf['initial_pruning'] else ''} and ΔR = "
                    f"{pf['reconfigure_every']}, none after the last; lower it or set prunefl.adaptive: false")

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
        self._importance = None                    # an upload round's summed importance, until reconfigured
        # importance_upload: pruned — Σ ((θ_k − θ)/lr)² · processed since the last reconfiguration
        self.update_importance: np.ndarray | None = None

    # ---- schedule ------------------------------------------------------------------------
    @property
    def time_model(self) -> RoundTimeModel:
        """T(m) of ``device.profile`` for one FL round (the server's reconfigurations)."""
        return self._time_model

    def fl_round(self, round_: int) -> int:
        return round_ - 1 if self.initial else round_

    def is_ip_round(self, round_: int) -> bool:
        return self.initial and round_ == 1

    def is_upload_round(self, round_: int) -> bool:   # never the last round: nothing trains its result
        r = self.fl_round(round_)
        return self.adaptive and r >= 1 and r % self.every == 0 and round_ < self.cfg["rounds"]

    def gathers_importance(self, round_: int) -> bool:
        """Whether the round's clients compute importance, and so every weight's gradient: initial
        pruning, and an FL round whose importance this or a later upload round sends."""
        if self.is_ip_round(round_):
            return True
        r = self.fl_round(round_)
        if not self.adaptive or r < 1:
            return False
        return self.is_upload_round(round_ - r + -(-r // self.every) * self.every)   # its next upload round

    def dense_weight_gradients(self, round_: int) -> bool:
        return self.gathers_importance(round_)

    def charges_round_time(self, round_: int) -> bool:
        return not (self.is_ip_round(round_) and self.settings["ip_time"] == "zero")

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
                "ip_iterations": np.int64, "ip_reconfigurations": np.int64, **IP_COLUMNS}

    def client_columns(self):
        return {"ip_iterations": np.int64, "ip_reconfigurations": np.int64, **IP_COLUMNS}

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
            self._info.update({k: result.metrics[k] for k in ("ip_iterations", "ip_reconfigurations", *IP_COLUMNS)
                               if k in result.metrics})
            return
        if self.gathers_importance(round_) and self.settings["importance_upload"] == "pruned":
            # before the merge: θ is still what the clients were sent
            self.update_importance = add_update_importance(
                self.update_importance, results, self.weights, self.masks, self.param_names, self.info.shapes,
                self.cfg["local"]["lr"])
        super().aggregate(round_, results)
        if self.shadow and self.masks:
            self.shadow = {n: np.where(self.masks[n], self.weights[n], self.shadow[n]) for n in self.shadow}
        if not self.is_upload_round(round_):
            return
        uploads = [r.update.values[IMPORTANCE] for r in results if IMPORTANCE in r.update.values]
        total = summed_importance(uploads, self.update_importance, self.masks, self.param_names, self.info.shapes,
                                  self.settings["importance_upload"])
        self.update_importance = None
        if total is not None:   # for prepare_next_round, after the evaluation
            self._importance = (split_importance(total, self.param_names, self.info.shapes), len(uploads))

    def prepare_next_round(self, round_):
        """After an upload round was evaluated: the reconfigured mask, for the next round's download."""
        if self._importance is None:
            return {}
        (importance, uploads), self._importance = self._importance, None
        self.weights, self.masks, objective = reconfigured_model(
            self.weights, self.masks, importance, self.info.maskable, self.drop_fraction(round_), self.time_model,
            max_active=self.max_active(round_), last=self.shadow or None)
        return {"reconfigured": 1, "importance_uploads": uploads, "objective": objective}

    def state_dict(self):
        return {**super().state_dict(), "shadow": self.shadow, "ip_client": self.ip_client,
                "update_importance": self.update_importance}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.shadow, self.ip_client = state["shadow"], state["ip_client"]
        self.update_importance = state.get("update_importance")

    # ---- client --------------------------------------------------------------------------
    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        if self.is_ip_round(task.round):
            return self.initial_pruning(task, trainer)
        hook = SummedGradientSquared(self.param_names) if self.gathers_importance(task.round) else None
        weights, loss, processed = self.train(task, trainer, hooks=[hook] if hook else ())
        masks = dict(task.received.masks)
        update = ModelUpdate(weights, masks)
        state: dict = {}
        if hook is not None:
            mine = flatten_importance(hook.result(), self.param_names, self.info.shapes)
            previous = task.state.get("importance")
            accumulated = mine if previous is None else previous + mine   # float32, a new array
            if self.is_upload_round(task.round):
                if self.settings["importance_upload"] == "dense":
                    update.values[IMPORTANCE] = accumulated
                elif (pruned := pruned_positions(masks, self.param_names, self.info.shapes)).size:
                    update.values[IMPORTANCE] = accumulated[pruned]   # the rest: from the update
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
