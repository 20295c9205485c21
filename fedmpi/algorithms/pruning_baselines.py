"""The PruneFL paper's pruning baselines (Jiang et al., TNNLS 2022, section VI), each a masked
FedAvg with one global mask and ``<section>.local_steps`` local iterations, like PruneFL's:

- ``snip``: SNIP (Lee et al., ICLR 2019) at the start of FL, to a given density. As in the PruneFL
  public code (``bases/fl/simulation/snip.py``), round 1 is a dense FedAvg round and the server
  takes the round's averaged update θ₀ − θ₁ as the gradient estimate at the init θ₀ (the server
  holds no data): connection sensitivity |θ₀ ⊙ (θ₀ − θ₁)| (the code divides by the learning
  rate, which does not change the ranking), one global ranking over all maskable layers, the top
  ⌊density·N + 0.5⌋ kept (the code keeps every score ≥ the threshold, ties included). The mask
  is applied to θ₁ and stays fixed from round 2 on.
- ``imp``: iterative magnitude pruning (the code's ``iterative.py``): every ``imp.every`` rounds
  (−1: rounds / (2 · prunes), the code's ``MAX_ROUND / 2 / NUM_ITERATIVE_PRUNING``), for
  ``imp.prunes`` times, each layer drops ⌊q · active⌋ of its active weights by |w|, q = 1 −
  density^(1/prunes), so the model reaches ``density`` after the last prune, halfway through
  the run. No rewinding. The code counts rounds from 0 and prunes after round idx > 0 with
  idx % interval == 0; fedmpi prunes after round r with r % every == 0.

The target density is ``<section>.density`` or, with ``<section>.density_from`` (a results file
path; ``{seed}`` is replaced by the run's seed), the final ``density`` of that finished run:
"SNIP / IMP to the density PruneFL ends with", as the paper (and the code, which reads PruneFL's
saved model) compares them. The path is read on every rank when the run starts; a missing or
unfinished file is a config error (exit 2).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from ..sparsity import magnitude_masks
from .masked_fedavg import MaskedFedAvg


def target_density(cfg: dict, section: str) -> float:
    settings = cfg[section]
    source = settings.get("density_from")
    if not source:
        return float(settings["density"])
    from pathlib import Path

    from ..results import read_run

    path = Path(str(source).replace("{seed}", str(cfg["seed"])))
    key = f"{section}.density_from"
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist (run the method whose final density it names first)")
    try:
        run = read_run(path)
    except Exception as exc:   # noqa: BLE001 - any unreadable file is the same config problem
        raise ConfigError(key, f"cannot read {path}: {exc}") from None
    if not run.finished:
        raise ConfigError(key, f"{path} is not a finished run; its final density is not known yet")
    density = run.final("density")
    if not 0 < density <= 1:
        raise ConfigError(key, f"{path} ends at density {density}, expected a value in (0, 1]")
    return float(density)


class SNIP(MaskedFedAvg):
    name = "snip"
    section = "snip"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.target = target_density(cfg, self.section)

    def aggregate(self, round_, results):
        before = self.weights
        super().aggregate(round_, results)
        if round_ == 1 and self.target < 1.0:
            scores = {n: np.abs(before[n].astype(np.float64) * (before[n].astype(np.float64)
                                                                  - self.weights[n].astype(np.float64)))
                      for n in self.info.maskable}
            self.set_masks(global_top(scores, int(math.floor(self.target * self.maskable_size + 0.5))))


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
    section = "imp"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.target = target_density(cfg, self.section)
        self.prunes = int(self.settings["prunes"])
        every = int(self.settings["every"])
        self.every = every if every > 0 else max(1, cfg["rounds"] // (2 * self.prunes))
        self.fraction = 1.0 - self.target ** (1.0 / self.prunes)

    def is_prune_round(self, round_: int) -> bool:
        return round_ % self.every == 0 and round_ // self.every <= self.prunes and self.fraction > 0

    def aggregate(self, round_, results):
        super().aggregate(round_, results)
        if not self.is_prune_round(round_):
            return
        masks = self.masks or {n: np.ones(self.info.shapes[n], bool) for n in self.info.maskable}
        counts = {}
        for name, mask in masks.items():
            active = int(np.count_nonzero(mask))
            counts[name] = active - int(self.fraction * active)
        self.set_masks(magnitude_masks({n: self.weights[n] for n in masks}, counts, within=masks))
