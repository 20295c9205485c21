"""DepthFL (Kim, Yu, Kim, Moon, "DepthFL: Depthwise Federated Learning for Heterogeneous Clients",
ICLR 2023) on the multi-exit family: depth-wise averaging (``depthwise_avg``) plus mutual
self-distillation among the exits a client holds.

    tier t trains the sub-model of depth tiers.levels[t]: blocks 0..level, exits (classifiers) 1..level
    for r = 1 .. R
      C ← K clients, drawn evenly per tier
      each c ∈ C with n exits z_1..z_n, p_i = softmax(z_i / T): E local epochs on
        L = Σ_i [ CE(z_i, y) + w_r·T²/(n−1) · Σ_{j≠i} KL(p_j ‖ p_i) ]        (n ≥ 2)
        L = CE(z_1, y)                                                      (n = 1: nothing to distil)
        every p_j on the left of a KL is a teacher: detached, no gradient flows through it
      server: every element averaged over the clients that hold it, weighted by samples

The paper writes the loss without a temperature or a weight (T = 1, w = 1: the defaults). The
authors' code (adap/flower ``baselines/depthfl``, written by the first author) differs in two small
ways, each an option off by default: it ramps w up as exp(−5·(1 − min(r−1, 300)/300)²) over the
first 300 rounds (``depthfl.kd_rampup_rounds: 300``) and adds 1e-7 to each teacher probability
before the KL (``depthfl.teacher_epsilon: 1e-7``). Not copied: their FedDyn local regulariser and server (the
paper's DepthFL runs on FedDyn; this is its FedAvg form, the authors' ``feddyn=false``) and their
evaluation of the ensemble of classifiers (fedmpi scores every tiered method by one protocol).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import require
from ..training import exit_outputs
from .heterogeneous import DepthwiseAveraging


def kd_weight_at(round_: int, weight: float, rampup_rounds: int) -> float:
    """w_r: ``weight``, times the authors' ramp-up exp(−5·(1 − min(r−1, R)/R)²) when R > 0."""
    if rampup_rounds <= 0:
        return weight
    phase = 1.0 - min(max(round_ - 1, 0), rampup_rounds) / rampup_rounds
    return weight * math.exp(-5.0 * phase * phase)


def mutual_distillation(weight: float, temperature: float = 1.0, teacher_epsilon: float = 0.0):
    """DepthFL's local objective over the exits a client holds (shallowest first): per exit i,
    CE plus weight·T²/(n−1) times the KL divergences from every other exit's detached softened
    output to exit i's, each summed over the classes and averaged over the batch."""

    def kl_from_teacher(teacher: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
        # xlogy: a teacher probability of exactly 0 adds 0 (teacher_epsilon 0)
        return (torch.xlogy(teacher, teacher) - teacher * log_student).sum(1).mean()

    def objective(outputs, y):
        exits = exit_outputs(outputs)
        n = len(exits)
        if n == 1:
            return F.cross_entropy(exits[0], y)
        log_students = [F.log_softmax(z / temperature, dim=1) for z in exits]
        teachers = [F.softmax(z.detach() / temperature, dim=1) + teacher_epsilon for z in exits]
        total = 0.0
        for i, logits in enumerate(exits):
            distilled = sum(kl_from_teacher(teachers[j], log_students[i]) for j in range(n) if j != i)
            total = total + F.cross_entropy(logits, y) + weight * temperature ** 2 * distilled / (n - 1)
        return total

    return objective


class DepthFL(DepthwiseAveraging):
    name = "depthfl"
    label = "DepthFL"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)
    section = "depthfl"
    own_loss = "cross-entropy over the exits with mutual self-distillation"
    defaults = {"kd": True, "kd_weight": 1.0, "kd_temperature": 1.0, "kd_rampup_rounds": 0,
                "teacher_epsilon": 0.0}

    @classmethod
    def check_config(cls, cfg):
        depth = cfg["depthfl"]
        require(depth["kd_weight"] >= 0, "depthfl.kd_weight", "must be >= 0")
        require(depth["kd_temperature"] > 0, "depthfl.kd_temperature", "must be > 0")
        require(depth["kd_rampup_rounds"] >= 0, "depthfl.kd_rampup_rounds",
                "must be >= 0 (0: no ramp-up; the authors' code uses 300)")
        require(0 <= depth["teacher_epsilon"] < 1, "depthfl.teacher_epsilon",
                "must be in [0, 1) (0: the paper; the authors' code adds 1e-7)")

    def __init__(self, cfg, info):
        self.settings = cfg["depthfl"]
        super().__init__(cfg, info)

    def objective_for(self, round_, tier):
        """None (the trainer's cross-entropy summed over the exits, as ``depthwise_avg``) where
        there is nothing to distil: one exit, ``kd`` off or a zero weight."""
        weight = kd_weight_at(round_, self.settings["kd_weight"], self.settings["kd_rampup_rounds"])
        if not self.settings["kd"] or weight == 0 or self.variants[tier]["level"] < 2:
            return None
        return mutual_distillation(weight, self.settings["kd_temperature"], self.settings["teacher_epsilon"])
