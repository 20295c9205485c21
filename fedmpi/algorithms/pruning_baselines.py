"""The PruneFL paper's pruning baselines (Jiang et al., TNNLS 2022, section VI), each a masked
FedAvg with one global mask and ``<section>.local_steps`` local iterations, like PruneFL's:

- ``snip``: SNIP (Lee et al., ICLR 2019) at the start of FL, to a given density. As in the PruneFL
  public code (``bases/fl/simulation/snip.py``), round 1 is a dense FedAvg round and the server
  takes the round's averaged update θ₀ − θ₁ as the gradient estimate at the init θ₀ (the server
  holds no data): connection sensitivity |θ₀ ⊙ (θ₀ − θ₁)| (the code divides by the learning
  rate, which does not change the ranking), one global ranking over all maskable layers, the top
  ⌊density·N + 0.5⌋ kept (the code keeps every score ≥ the threshold, ties included). The mask
  is applied to θ₁ once round 1 was evaluated (``prepare_next_round``), so round 1's row is the
  dense model its clients trained (the code prunes before its round-0 evaluation), and stays
  fixed from round 2's download on.
- ``imp``: iterative magnitude pruning (the code's ``iterative.py``): every ``imp.every`` rounds
  (−1: rounds / (2 · prunes), the code's ``MAX_ROUND / 2 / NUM_ITERATIVE_PRUNING``), for
  ``imp.prunes`` times, each layer drops ⌊q · active⌋ of its active weights by |w|, q = 1 −
  density^(1/prunes), so the model reaches ``density`` after the last prune, halfway through
  the run. No rewinding. The code counts rounds from 0 and prunes after round idx > 0 with
  idx % interval == 0; fedmpi prunes after round r with r % every == 0. Both prune once the
  round was evaluated, for the next round's download; fedmpi never after the last round (no
  round would train it: with ``every · prunes`` ≥ rounds the model stops above ``density``).

The target density is ``<section>.density``. "SNIP / IMP to the density PruneFL ends with", as
the paper (and the code, which reads PruneFL's saved model) compares them, is a campaign's
business: a ``runs:`` entry ``snip.density: {from_run: <the PruneFL run>, column: density}``
makes ``fedmpi sweep`` start the run after that PruneFL run (same seed) has finished, with its
final density as the number (fedmpi/campaigns/depends.py).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import require
from ..sparsity import magnitude_masks
from .masked_fedavg import MaskedFedAvg


def check_density_section(cfg: dict, section: str) -> None:
    """What the snip and imp sections share."""
    sec = cfg[section]
    require(0 < sec["density"] <= 1, f"{section}.density", "must be in (0, 1]")
    require(sec["local_steps"] >= 0, f"{section}.local_steps", "must be >= 0")


class SNIP(MaskedFedAvg):
    name = "snip"
    label = "SNIP"
    doc = "docs/methods/prunefl.md"
    figures = ("prunefl",)
    section = "snip"
    # SNIP after a dense round 1 (PruneFL's final density: a campaign's from_run, not a key here)
    defaults = {"density": 0.1, "local_steps": 5}

    @classmethod
    def check_config(cls, cfg):
        check_density_section(cfg, cls.section)

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.target = float(self.settings["density"])

    def aggregate(self, round_, results):
        self.theta0 = self.weights if round_ == 1 else None   # θ₀, for the scores after round 1
        super().aggregate(round_, results)

    def prepare_next_round(self, round_):
        """After the dense round 1 was evaluated: the mask on θ₁, from round 2's download on."""
        if round_ == 1 and self.target < 1.0:
            before = self.theta0
            scores = {n: np.abs(before[n].astype(np.float64) * (before[n].astype(np.float64)
                                                                  - self.weights[n].astype(np.float64)))
                      for n in self.info.maskable}
            self.set_masks(global_top(scores, int(math.floor(self.target * self.maskable_size + 0.5))))
        return {}


def global_top(scores: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Masks of the k largest scores over all layers together (ties: layer order, flat index)."""
    flat = np.concatenate([s.reshape(-1) for s in scores.values()])
    chosen = np.argsort(-flat, kind="stable")[:max(k, 0)]
    keep = np.zeros(flat.size, dtype=bool)
    keep[chosen] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset:offset + s.size].reshape(s.shape)
        offset += s.size
    return masks


class IterativeMagnitudePruning(MaskedFedAvg):
    name = "imp"
    label = "IMP"
    doc = "docs/methods/prunefl.md"
    figures = ("prunefl",)
    section = "imp"
    defaults = {"density": 0.1, "prunes": 20, "every": -1, "local_steps": 5}

    @classmethod
    def check_config(cls, cfg):
        check_density_section(cfg, cls.section)
        require(cfg["imp"]["prunes"] >= 1, "imp.prunes", "must be at least 1")
        require(cfg["imp"]["every"] == -1 or cfg["imp"]["every"] >= 1, "imp.every",
                "must be -1 (rounds / (2 · prunes)) or at least 1")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.target = float(self.settings["density"])
        self.prunes = int(self.settings["prunes"])
        every = int(self.settings["every"])
        self.every = every if every > 0 else max(1, cfg["rounds"] // (2 * self.prunes))
        self.fraction = 1.0 - self.target ** (1.0 / self.prunes)

    def is_prune_round(self, round_: int) -> bool:
        return round_ % self.every == 0 and round_ // self.every <= self.prunes and self.fraction > 0

    def prepare_next_round(self, round_):
        """After a prune round was evaluated: the pruned mask, from the next round's download on."""
        if not self.is_prune_round(round_):
            return {}
        masks = self.masks or {n: np.ones(self.info.shapes[n], bool) for n in self.info.maskable}
        counts = {}
        for name, mask in masks.items():
            active = int(np.count_nonzero(mask))
            counts[name] = active - int(self.fraction * active)
        self.set_masks(magnitude_masks({n: self.weights[n] for n in masks}, counts, within=masks))
        return {}
