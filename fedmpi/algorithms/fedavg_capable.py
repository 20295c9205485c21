"""FedAvg under the tiers' limits: only the clients that can hold the full-depth model train it.

    capable ← the clients of the tiers at the deepest of tiers.levels (level L; L = 3: the full model)
    for r = 1 .. R
      C ← min(K, |capable|) clients drawn uniformly from capable, without replacement
      each c ∈ C: download blocks 0..L and exits 1..L, E epochs on Σ_{e ≤ L} CE(exit_e), upload them
      server: every tensor averaged over C, weighted by samples (FedAvg: every client holds it all)

The other clients never train (the tiers say they cannot hold that model), but they hold data and
are scored by the tiered evaluation protocol like every tiered method: each client on the model it
can run, the global model's blocks 0..e and exit e for a level-e client, at that exit, on its local
test set. The capable clients' joint loss trains every exit, so a shallow client's exit is a
trained head. This is what HypeMeFed's own metric does for every method: the authors' main.py
scores every client (participant or not) at the deepest exit of the model it holds after each
round (``for client in clients: ... client.test()`` → ``accs_global[-1]``).

Against the other FedAvg runs of a tiered comparison: ``fedavg`` (every client at full depth)
ignores the tiers' limits and is the upper bound; ``fedavg_s`` (every client at the smallest depth)
respects them by shrinking everyone's model; this one respects them by leaving the weaker clients
out of training: DepthFL's "exclusive learning" at its largest model (the DepthFL authors' Flower
baseline, baselines/depthfl/README.md, Table 2: "the global model and every local model are equal
to the largest local model, and only 25% clients participate"). The HypeMeFed authors' code runs
"FedAvg" as one exit level for every client (main.py: ``--exit_levels=[L]`` gives
``scheme = 'fedavg'`` and ``exit_level = EXIT_LEVELS[user_idx % 1]``), i.e. ``fedavg_s`` at L = 1
or the upper bound at L = 3; docs/methods/hypemefed.md ("Which FedAvg") has the evidence.
"""
from __future__ import annotations

import numpy as np

from .heterogeneous import TieredAlgorithm


class FedAvgCapable(TieredAlgorithm):
    name = "fedavg_capable"
    label = "FedAvg, full-depth clients only"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        levels = [v["level"] for v in self.variants]
        # the deepest level any client has (a tier without clients holds nobody)
        self.deepest = max(levels[t] for t in set(int(t) for t in self.tier))
        self.capable = np.flatnonzero([levels[t] == self.deepest for t in self.tier])

    def variant(self, tier):
        # a tier's own depth: the capable clients train at it, the others are scored at it
        return {"level": int(self.cfg["tiers"]["levels"][tier])}

    def select_clients(self, round_, generator):
        """``clients.per_round`` of the capable clients (all of them if fewer), uniformly."""
        take = min(len(self.capable), self.cfg["clients"]["per_round"])
        return sorted(int(c) for c in generator.choice(self.capable, size=take, replace=False))
