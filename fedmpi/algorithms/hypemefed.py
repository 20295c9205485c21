"""HypeMeFed (Shin et al., "Effective Heterogeneous Federated Learning via Efficient
Hypernetwork-based Weight Generation", ACM SenSys 2024), on the multi-exit family.

    server: global multi-exit network θ; hypernetworks H[i→i+1, k] (hypernetworks.py), persistent
    for r = 1 .. R
      C ← K clients, drawn evenly per tier                                  (TieredAlgorithm)
      each c ∈ C at level e_c: download blocks 0..e_c and exits 1..e_c, train E epochs on
        Σ_{e ≤ e_c} CE(exit_e), upload that sub-model                (depth-wise averaging's local update)
      train H[i→i+1, k] on {(W_c[block i, conv k], W_c[block i+1, conv k]) : e_c ≥ i+1}
      generate: level-2 clients block 3 ← H[2→3](block 2); level-1 clients block 2 ← H[1→2](block 1),
        then block 3 ← H[2→3](generated block 2)
      aggregate: each tensor averaged over the clients that trained it or had it generated,
        weighted by samples (``hypemefed.aggregation: uniform``: equal weights, as the public code);
        BN statistics, biases and heads only from the clients that trained them

Only conv weights are generated (the hypernetworks map weights; biases, BN and heads are not).
A hypernetwork generates only once it has been trained (in this round or an earlier one): before
the first round that has clients of the deeper level, shallow clients add nothing there.
The public code's rank-1 SVD (the round number passed where the rank belongs) is not copied: the
rank is ``hypemefed.rank`` (default 100, the value its server meant to pass; clipped to
min(out·k, in·k); 0 = full rank).

``hypemefed.public_generation: true`` reproduces what the public code (eis-lab/HypeMeFed) computes:
it assigns each generated weight to ``model.state_dict()[name].data``, a detached copy, so the
generated values never reach the models it averages; a shallow client's deeper tensors there are
the global model it was sent. With the option, the hypernetworks are still trained (their time is
still spent) but every tensor a client did not train counts as the current global value in the
average, which damps the deeper layers instead of generating them. Off by default.

Server work (hypernetwork training and generation) runs on rank 0 with one thread, seeded from
(seed, HYPERNET, round, pair): every metric is identical for any rank count. Its measured time
is the round column ``server_seconds``; ``hypernet_loss`` is the mean over this round's trained
hypernetworks of their last-epoch MSE; ``hypernet_params`` / ``hypernet_bytes`` (constant per run)
are the hypernetworks' parameter count and float32 parameter memory (training holds about 4× that:
parameters, gradients and Adam's two moments).
"""
from __future__ import annotations

import time

import numpy as np

from ..aggregation import average_over_holders
from ..update import ModelUpdate
from ..errors import require
from .heterogeneous import DepthwiseAveraging
from .hypernetworks import HyperNetworks, single_thread

AGGREGATIONS = ("samples", "uniform")


class HypeMeFed(DepthwiseAveraging):
    name = "hypemefed"
    label = "HypeMeFed"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)
    section = "hypemefed"
    defaults = {
        "hypernetwork": "lrf",     # lrf (low-rank, the paper) | naive (flatten → MLP → flatten)
        "rank": 100,               # SVD rank r, clipped to min(out·k, in·k); 0 = full rank
        "hidden": 512,             # hidden width of the two LRF MLPs
        "naive_hidden": 64,        # hidden width of the naive MLP (the public code's NaiveHyperNetwork)
        "epochs": 25,              # server training epochs per round
        "lr": 0.0005,              # server Adam learning rate
        "aggregation": "samples",  # samples | uniform (the public code's equal weights)
        # the public code's effective behaviour: generated weights are discarded and a client's
        # untrained tensors count as the global values it was sent
        "public_generation": False,
    }

    @classmethod
    def check_config(cls, cfg):
        hype = cfg["hypemefed"]
        require(hype["hypernetwork"] in ("lrf", "naive"), "hypemefed.hypernetwork", "must be 'lrf' or 'naive'")
        require(hype["rank"] >= 0, "hypemefed.rank", "must be >= 0 (0: full rank)")
        for key in ("hidden", "naive_hidden", "epochs"):
            require(hype[key] >= 1, f"hypemefed.{key}", "must be at least 1")
        require(hype["lr"] > 0, "hypemefed.lr", "must be > 0")
        require(hype["aggregation"] in ("samples", "uniform"), "hypemefed.aggregation",
                "must be 'samples' (the paper) or 'uniform' (the public code)")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.settings = cfg["hypemefed"]
        self.hypernetworks: HyperNetworks | None = None   # server only: built by init/load
        self._metrics: dict[str, float] = {}

    def _build_hypernetworks(self) -> HyperNetworks:
        s = self.settings
        return HyperNetworks(self.info.shapes, s["hypernetwork"], rank=s["rank"], hidden=s["hidden"],
                             naive_hidden=s["naive_hidden"], seed=self.cfg["seed"])

    def level_of(self, client: int) -> int:
        return int(self.variants[self.tier[client]]["level"])

    # ---- server --------------------------------------------------------------------------
    def init_server(self, weights, generator):
        super().init_server(weights, generator)
        self.hypernetworks = self._build_hypernetworks()

    def aggregate(self, round_, results):
        started = time.perf_counter()
        with single_thread():
            loss = self.train_hypernetworks(round_, results)
            generated = [self.generate(r.update.values, self.level_of(r.client_id)) for r in results]
        seconds = time.perf_counter() - started
        if self.settings["public_generation"]:   # the generated values are discarded (see above)
            generated = [{n: v for n, v in self.weights.items() if n not in r.update.values} for r in results]
        updates = [ModelUpdate({**r.update.values, **extra}, slices=dict(r.update.slices))
                   for r, extra in zip(results, generated)]
        weights = ([float(r.num_samples) for r in results] if self.settings["aggregation"] == "samples"
                   else [1.0] * len(results))
        self.weights, _ = average_over_holders(updates, weights, self.weights, missing="keep")
        self._metrics = {"server_seconds": seconds, "hypernet_loss": loss,
                         "hypernet_params": self.hypernetworks.parameter_count(),
                         "hypernet_bytes": self.hypernetworks.parameter_bytes()}

    def train_hypernetworks(self, round_: int, results) -> float:
        """Train each H[i→i+1, k] on this round's clients that trained block i+1 (client-id order)."""
        losses = []
        for index, (source, target, block) in enumerate(self.hypernetworks.pairs):
            samples = [(r.update.values[source], r.update.values[target]) for r in results
                       if self.level_of(r.client_id) >= block]
            if samples:
                losses.append(self.hypernetworks.fit(index, samples, epochs=self.settings["epochs"],
                                                     lr=self.settings["lr"], round_=round_))
        return float(np.mean(losses)) if losses else float("nan")

    def generate(self, values: dict[str, np.ndarray], level: int) -> dict[str, np.ndarray]:
        """The conv weights of blocks level+1.. generated from the client's own (or, in a cascade,
        generated) weights of the block before."""
        known, generated = dict(values), {}
        for index, (source, target, block) in enumerate(self.hypernetworks.pairs):
            if block > level and source in known and self.hypernetworks.trained[index]:
                generated[target] = known[target] = self.hypernetworks.generate(index, known[source])
        return generated

    # ---- results -------------------------------------------------------------------------
    def round_columns(self):
        return {**super().round_columns(), "server_seconds": np.float64, "hypernet_loss": np.float64,
                "hypernet_params": np.int64, "hypernet_bytes": np.int64}

    def round_metrics(self, round_):
        return dict(self._metrics)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "hypernetworks": self.hypernetworks.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.hypernetworks = self._build_hypernetworks()
        self.hypernetworks.load_state_dict(state["hypernetworks"])
