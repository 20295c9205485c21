"""Top-k sparsified FedAvg with error feedback (Stich et al. 2018; Aji & Heafield 2017).

Per round r, each selected client k
  1. trains from the global model θ as FedAvg does, giving θ_k;
  2. adds its residual to the update: u = (θ_k − θ) + e_k (e_k = 0 the first time);
  3. uploads, in every tensor t, the ⌈ratio · n_t⌉ entries of u with the largest |u| (ties: the
     lowest flat position), as a mask and the values under it;
  4. keeps what it did not send as its residual: e_k ← u − sent (with error_feedback: false,
     e_k stays 0: plain top-k).
The server adds the sample-weighted mean of the sparse updates, unsent entries counting as 0:
  θ ← θ + Σ_k n_k · sent_k / Σ_k n_k.
fedmpi counts what crosses MPI: the dense global model down, and per tensor the mask (a bitmap or
a position list, whichever is smaller) plus 4 bytes per sent float32 value up.
"""
from __future__ import annotations

import math

import numpy as np

from fedmpi.algorithms.base import ClientResult, ClientTask
from fedmpi.algorithms.fedavg import FedAvg
from fedmpi.errors import require
from fedmpi.update import ModelUpdate


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """The k entries of largest |value|; ties go to the lower flat position."""
    order = np.argsort(-np.abs(values.reshape(-1)), kind="stable")[:k]
    mask = np.zeros(values.size, dtype=bool)
    mask[order] = True
    return mask.reshape(values.shape)


class TopKFedAvg(FedAvg):
    name = "topk_fedavg"
    label = "top-k FedAvg"
    doc = "examples/topk_fedavg/README.md"
    section = "topk_fedavg"
    defaults = {
        "ratio": 0.1,             # fraction of each tensor's entries uploaded
        "error_feedback": True,   # false: unsent entries are dropped (plain top-k)
    }
    partial_sums = False          # the merge divides by all clients' weight, not by holders'

    @classmethod
    def check_config(cls, cfg):
        require(0 < cfg["topk_fedavg"]["ratio"] <= 1, "topk_fedavg.ratio", "must be in (0, 1]")

    def client_columns(self):
        return {"residual_norm": np.float64}   # ‖e_k‖₂ after the upload

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        start = task.received.values
        trained, loss, processed = trainer.train(start, task.x, task.y, seed=task.seed, round_=task.round,
                                                 client_id=task.client_id)
        settings = self.cfg["topk_fedavg"]
        residual = task.state.get("residual", {})
        sent, masks, kept = {}, {}, {}
        for name, theta in trained.items():
            update = (theta - start[name]) + residual.get(name, 0.0)
            masks[name] = top_k_mask(update, math.ceil(settings["ratio"] * update.size))
            sent[name] = np.where(masks[name], update, np.float32(0)).astype(np.float32)
            if settings["error_feedback"]:
                kept[name] = (update - sent[name]).astype(np.float32)
        norm = math.sqrt(sum(float(np.sum(np.square(e, dtype=np.float64))) for e in kept.values()))
        return ClientResult(task.client_id, len(task.y), ModelUpdate(sent, masks), loss, processed,
                            state={"residual": kept}, metrics={"residual_norm": norm})

    def aggregate(self, round_: int, results: list[ClientResult], sums=None) -> None:
        total = float(sum(r.num_samples for r in results))
        merged = {}
        for name, theta in self.weights.items():
            step = np.zeros(theta.shape, np.float64)
            for r in results:   # client-id order: the same sum for any number of ranks
                step += r.num_samples * r.update.values[name].astype(np.float64)
            merged[name] = (theta.astype(np.float64) + step / total).astype(np.float32)
        self.weights = merged
