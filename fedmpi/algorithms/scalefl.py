"""ScaleFL (Ilhan, Su, Liu, "ScaleFL: Resource-Adaptive Federated Learning with Heterogeneous
Clients", CVPR 2023) on the multi-exit family: width and depth scaled together, with early exits
and self-distillation among them.

    tier t (its complexity level) trains the sub-model (depth tiers.levels[t], width scalefl.widths[t]):
      blocks 0..level with the first ⌈width·C⌉ channels of every hidden layer, exits 1..level
    for r = 1 .. R
      C ← K clients, drawn evenly per tier
      each c ∈ C: download its sub-model (leading blocks of the global tensors), E local epochs on
        L = Σ_j (j+1)·ℓ_j / Σ_j (j+1),  ℓ_last = CE(z_last, y),
        ℓ_j = CE(z_j, y) + γ·T²·KL(softmax(z_last/T) ‖ softmax(z_j/T))   for the earlier exits
        (the deepest exit held is the teacher; γ = 0 for the first kd_after·R rounds)
      server: every element averaged over the clients that hold it, weighted by samples

As in the authors' code (git-disl/scale-fl) and its CIFAR runs: exit weights j+1 (train.py,
``execute_epoch``), temperature 3 (args.py, ``--KD_T`` default 3), distillation from the client's
last exit switched on after the first quarter of the rounds (train.py, ``gamma_active = round >
args.num_rounds * 0.25``), widths per level 0.7/0.75/1 (args.py, ``--vertical_scale_ratios``
default 0.7 0.7 0.75 1: the three largest of four levels), and γ = 0: args.py's ``--KD_gamma``
default is 0 and the README's CIFAR-10 and CIFAR-100 commands do not set it (only its BERT/AgNews
command passes ``--KD_gamma 0.05``), so their CIFAR runs train on the exit-weighted cross-entropy
alone. ``scalefl.kd_gamma: 0.05`` gives the BERT setting.

Batch norm as in the authors' CIFAR runs: they build every BN with ``track_running_stats=False``
unless ``-trs`` is passed (args.py; the README's commands do not pass it; the exit heads' BN is
``track_running_stats=False`` outright, models/resnet.py), and never switch the model to eval
mode, so BN normalises with the current batch's statistics in training and in evaluation and holds
no running statistics to average (fed.py, ``average_weights``, averages ``running_*`` only where
they exist). ``scalefl.track_running_stats: false`` (the default) builds every client's submodel
and every model the server evaluates so (torch's BN without running statistics uses the batch's
statistics in eval mode too); nobody sends or averages BN statistics. At evaluation the batches
are the evaluator's chunks of ``eval.batch_size`` samples (the authors': their loaders' batches,
each client's samples in batches of up to 512 in ``local_validate``, fed.py line 150).
``true``: running statistics tracked in training, sent, averaged over holders and used at
evaluation.

Simplifications, each the plain reading of the paper: the teacher's logits are detached, the KL
divergence is averaged per sample (``batchmean``; the code's ``KLDivLoss()`` also divides by the
classes), channels are the leading ones (HeteroFL's rule) and averages are sample-weighted like
every fedmpi tiered method.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import require
from ..models import variant_options
from ..training import exit_outputs
from .evaluation import EvalModel
from .heterogeneous import TieredAlgorithm

# what a BN tracking running statistics holds beyond its affine parameters (float tensors only:
# num_batches_tracked is an integer and never communicated)
RUNNING_STATS = (".running_mean", ".running_var")


def self_distillation(gamma: float, temperature: float):
    """ScaleFL's local objective over the exits a client holds (shallowest first)."""

    def objective(outputs, y):
        exits = exit_outputs(outputs)
        teacher = F.softmax(exits[-1].detach() / temperature, dim=1)
        total = 0.0
        for j, logits in enumerate(exits):
            term = F.cross_entropy(logits, y)
            if j < len(exits) - 1 and gamma > 0:
                student = F.log_softmax(logits / temperature, dim=1)
                term = term + gamma * temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean")
            total = total + (j + 1) * term
        return total / (len(exits) * (len(exits) + 1) / 2)

    return objective


class ScaleFL(TieredAlgorithm):
    name = "scalefl"
    label = "ScaleFL"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)
    section = "scalefl"
    own_loss = "cross-entropy over the exits, weighted j+1, with self-distillation when scalefl.kd_gamma > 0"
    # tier t trains depth tiers.levels[t] at width widths[t]; kd_gamma 0, temperature 3 and the
    # start after a quarter of the rounds are the authors' CIFAR settings (args.py defaults, which
    # their CIFAR commands keep; see the module docstring), and so is BN without running
    # statistics (their -trs flag, which no README command passes)
    defaults = {"widths": [0.7, 0.75, 1.0], "kd_gamma": 0.0, "kd_temperature": 3.0, "kd_after": 0.25,
                "track_running_stats": False}
    # fedmpi's ScaleFL tracked running statistics before this key: its stored runs read as true
    before_key_existed = {"track_running_stats": True}

    @classmethod
    def check_config(cls, cfg):
        scale, tiers = cfg["scalefl"], cfg["tiers"]
        require(len(scale["widths"]) == len(tiers["mix"]) or cfg["algorithm"] != cls.name, "scalefl.widths",
                f"needs one entry per tier: tiers.mix has {len(tiers['mix'])}")
        require(all(isinstance(v, (int, float)) and 0 < v <= 1 for v in scale["widths"]), "scalefl.widths",
                "entries must be width rates in (0, 1]")
        require(scale["kd_gamma"] >= 0, "scalefl.kd_gamma", "must be >= 0")
        require(scale["kd_temperature"] > 0, "scalefl.kd_temperature", "must be > 0")
        require(0 <= scale["kd_after"] <= 1, "scalefl.kd_after", "must be a fraction of the rounds in [0, 1]")
        if cfg["algorithm"] == cls.name and not scale["track_running_stats"]:
            require("track_running_stats" in variant_options(cfg["model"]), "scalefl.track_running_stats",
                    f"false needs a model with the track_running_stats option; {cfg['model']} lacks it: use "
                    f"multiexit_vgg or multiexit_vgg_small, or set scalefl.track_running_stats: true")

    def __init__(self, cfg, info):
        self.settings = cfg["scalefl"]
        super().__init__(cfg, info)
        self._objectives = {active: self_distillation(self.settings["kd_gamma"] if active else 0.0,
                                                      self.settings["kd_temperature"])
                            for active in (False, True)}

    def variant(self, tier):
        variant = {"level": int(self.cfg["tiers"]["levels"][tier]), "width": float(self.settings["widths"][tier])}
        if not self.settings["track_running_stats"]:
            variant["track_running_stats"] = False
        return variant

    def objective_for(self, round_, tier):
        return self._objectives[round_ > self.settings["kd_after"] * self.cfg["rounds"]]

    def evaluation_models(self, round_):
        """The tiered protocol's models; without running statistics, each built so as well (its BN
        normalises with every evaluated chunk's own statistics) and sent without the global
        model's BN buffers, which no client trains (they keep their initial values)."""
        models = super().evaluation_models(round_)
        if self.settings["track_running_stats"]:
            return models
        static = []
        for model in models:
            weights = {n: v for n, v in model.weights.items() if not n.endswith(RUNNING_STATS)}
            static.append(EvalModel(model.key, weights, {**(model.variant or {}), "track_running_stats": False},
                                    model.masks, model.global_test, model.local_clients))
        return static
