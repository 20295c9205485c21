"""LotteryFL (Li et al., arXiv 2008.03371, 2020; SEC 2021): personalised sparse sub-networks.
Doc: docs/methods/lotteryfl.md.

Each client k keeps its own mask M_k and nominal density d_k as device state (``ClientResult.state``,
handed back as ``ClientTask.state``; the mask travels packed, n/8 bytes, and is not network
traffic). The server learns each mask from the uploads (the mask part of the upload encoding)
and keeps a copy for the downloads and for evaluation. One round, for a sampled client k:

1. download θ ⊙ M_k: the values under M_k only (dense while M_k is full), the mask itself only
   when the client's copy differs (never, here: the client is the source of its mask);
2. acc ← accuracy of θ ⊙ M_k on k's validation split: ``validation_fraction`` of k's training
   data, drawn from (seed, client) (``data.partition.validation_split``) and not trained on, so the
   decision never sees the samples that are reported (``validation_fraction: 0``: the reported
   local test set, the public code's choice);
3. if acc > ``acc_threshold`` and d_k > ``target_density``: per layer drop the
   ⌊p·a_l + 0.5⌋ smallest-|θ| of the a_l weights active in M_k, with p = ``prune_step``, lowered
   so d_k · (1 − p) does not go below the target (``overshoot: true``: the full step, the public
   code); d_k ← d_k · (1 − p); then rewind the surviving weights to the initial global weights
   θ₀ (biases keep the received values; ``rewind_biases: true``: θ₀'s biases too, the public
   code);
4. local training from there on the rest of k's training data (``local_steps`` iterations, 0:
   ``local.epochs``), masked;
5. post-training accuracy of θ_k ⊙ M_k on k's reported local test set (the evaluator's: the
   global test images of k's labels, or its held-out split with ``data.local_test_fraction``),
   for the best-so-far below;
6. upload θ_k ⊙ M_k (the mask on the round it changed, as a bitmap or index list).

Server: per maskable element the sample-weighted mean over the clients of the round that hold it
(``average_over_holders``, ``missing="keep"``: an element no client holds keeps its value); dense
tensors the mean over all of them (``aggregation: uniform``: unweighted, the public code).

θ₀ is the run's initial global model, the one the server starts from: every client keeps its own
copy (it starts from the same shared init), so it is no download. The engine hands it to the
client as ``ClientTask.initial_weights`` (``needs_initial_weights``) from what every rank built
before round 1; it never crosses MPI and counts as no traffic.

Evaluation (every evaluation round): ``test_accuracy`` / ``test_loss`` / ``client_accuracy`` of
the global model θ as for every method, and the personalised accuracy ``personal_accuracy``:
mean over clients (with a local test set) of θ ⊙ M_k on k's local test set, one ``EvalModel``
per client whose mask is not full (a full-mask client's personalised model is the global model).
``personal_accuracy_best`` is the mean over clients of each client's best personalised accuracy
so far, the public code's reported "test accuracy": like the public code's ``best_acc`` it takes
in both the evaluations and each trained client's post-training accuracy (step 5, folded in by
``aggregate`` every round).

The reported local test set is the client's own data: the engine hands it over as
``ClientTask.local_test`` (``needs_local_test``), the evaluator's samples of that client from the
partition every rank holds. ``check_samples`` > 0 uses a fixed subset of that many decision
samples per client (drawn from (seed, client)), a cost knob; the public code checks at most 80
shuffled samples.

Not copied from the public code (charleslipku/LotteryFL): deciding on the reported test set
(its 90/10 train/validation split is cut but the validation part never used; here it is the
decision's), the value-based freeze of weights with |w| < 1e-6, the fixed momentum 0.5, the
unseeded sampling (see docs/methods/lotteryfl.md).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import rng
from ..aggregation import average_over_holders
from ..data.partition import validation_split
from ..errors import require
from ..sparsity import apply_masks_torch, magnitude_masks
from ..update import ModelUpdate
from .base import Algorithm, ClientResult, ClientTask
from .evaluation import EvalModel


def pack(masks: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {n: (tuple(m.shape), np.packbits(np.asarray(m, bool).reshape(-1))) for n, m in masks.items()}


def unpack(packed: dict[str, tuple]) -> dict[str, np.ndarray]:
    return {n: np.unpackbits(bits, count=math.prod(shape)).astype(bool).reshape(shape)
            for n, (shape, bits) in packed.items()}


# --------------------------------------------------------------------------- the algorithm

class LotteryFL(Algorithm):
    name = "lotteryfl"
    label = "LotteryFL"
    doc = "docs/methods/lotteryfl.md"
    figures = ("prunefl", "lotteryfl")   # lotteryfl: personalised accuracy and upload to a target
    needs_local_test = True        # the post-training accuracy (and the decision with validation_fraction 0)
    needs_initial_weights = True   # θ₀, the rewind target
    section = "lotteryfl"
    defaults = {
        "prune_step": 0.2,           # fraction of a client's remaining weights pruned per layer
        "acc_threshold": 0.5,        # prune when the personalised accuracy before training exceeds this
        "target_density": 0.1,       # ... and the client's density is above this
        "local_steps": 0,            # local iterations per round (0: local.epochs)
        "check_samples": 0,          # >0: the pre-training check uses a fixed subset of this many samples
        # share of a client's training data held out, untrained, for the prune decision (the public
        # code's 90/10 split); 0: decide on the reported local test set (the public code's decision)
        "validation_fraction": 0.1,
        # deviations of the public code (charleslipku/LotteryFL); public_code: true sets them all
        "public_code": False,
        "overshoot": False,          # the last prune step may go below the target density
        "aggregation": "samples",    # samples | uniform (public)
        "rewind_biases": False,      # rewinding also resets the biases to their initial values
    }

    @classmethod
    def check_config(cls, cfg):
        lf = cfg["lotteryfl"]
        if lf["public_code"]:   # every deviation of the public code at once, written out key by key
            lf.update({"overshoot": True, "aggregation": "uniform", "rewind_biases": True})
        require(0 < lf["prune_step"] < 1, "lotteryfl.prune_step", "must be in (0, 1)")
        require(0 <= lf["acc_threshold"] <= 1, "lotteryfl.acc_threshold", "must be in [0, 1]")
        require(0 < lf["target_density"] <= 1, "lotteryfl.target_density", "must be in (0, 1]")
        require(lf["local_steps"] >= 0, "lotteryfl.local_steps", "must be >= 0")
        require(lf["check_samples"] >= 0, "lotteryfl.check_samples", "must be >= 0 (0: every decision sample)")
        require(0 <= lf["validation_fraction"] < 1, "lotteryfl.validation_fraction",
                "must be in [0, 1) (0: the prune decision uses the reported local test set)")
        require(lf["aggregation"] in ("samples", "uniform"), "lotteryfl.aggregation",
                "must be 'samples' or 'uniform'")

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.settings = cfg["lotteryfl"]
        self.client_masks: dict[int, dict] = {}     # server's copy, packed; absent = full mask
        self.best: dict[int, float] = {}            # best personalised accuracy so far
        self.dense_size = sum(math.prod(s) for n, s in info.shapes.items() if n not in info.maskable)
        self.maskable_size = sum(math.prod(info.shapes[n]) for n in info.maskable)
        self._round: dict[str, float] = {}
        self._dense_download: tuple[int, ModelUpdate] | None = None

    # ---- helpers -------------------------------------------------------------------------
    def masks_of(self, client: int) -> dict[str, np.ndarray] | None:
        packed = self.client_masks.get(client)
        return unpack(packed) if packed is not None else None

    def client_density(self, client: int) -> float:
        packed = self.client_masks.get(client)
        if packed is None:
            return 1.0
        return sum(int(np.count_nonzero(m)) for m in unpack(packed).values()) / self.maskable_size

    def local_steps(self) -> int | None:
        steps = int(self.settings["local_steps"])
        return steps if steps > 0 else None

    def density(self) -> float:
        """Mean over all clients of their mask density (a client never sampled: 1)."""
        total = self.info.num_clients or self.cfg["clients"]["total"]
        masked = sum(self.client_density(c) for c in self.client_masks)
        return (masked + (total - len(self.client_masks))) / total

    # ---- results columns -----------------------------------------------------------------
    def round_columns(self):
        return {"personal_accuracy": np.float64, "personal_accuracy_best": np.float64,
                "active_params": np.float64, "pruned_clients": np.int64}

    def client_columns(self):
        return {"pre_accuracy": np.float64, "post_accuracy": np.float64, "pruned": np.int64,
                "client_density": np.float64}

    def round_metrics(self, round_):
        metrics = {"active_params": self.density() * self.maskable_size + self.dense_size,
                   "pruned_clients": int(self._round.get("pruned_clients", 0))}
        self._round = {}
        return metrics

    # ---- server --------------------------------------------------------------------------
    def init_server(self, weights, rng_) -> None:
        self.weights = dict(weights)

    def download(self, round_, client_id):
        masks = self.masks_of(client_id)
        if masks is None:
            # one shared payload per round for every full-mask client
            if self._dense_download is None or self._dense_download[0] != round_:
                self._dense_download = (round_, ModelUpdate(self.weights))
            return self._dense_download[1]
        return ModelUpdate(self.weights, masks)

    def aggregate(self, round_, results):
        uniform = self.settings["aggregation"] == "uniform"
        weights = [1.0 if uniform else float(r.num_samples) for r in results]
        self.weights, _ = average_over_holders([r.update for r in results], weights, self.weights, missing="keep")
        for r in results:
            if r.update.masks:
                self.client_masks[r.client_id] = pack(r.update.masks)
            else:
                self.client_masks.pop(r.client_id, None)
        self._round["pruned_clients"] = sum(int(r.metrics.get("pruned", 0)) for r in results)
        for r in results:   # the public code's best_acc also takes each client's post-training accuracy
            post = float(r.metrics.get("post_accuracy", math.nan))
            if math.isfinite(post):
                self.best[r.client_id] = max(self.best.get(r.client_id, 0.0), post)

    def evaluation_models(self, round_):
        models = [EvalModel("global", self.weights)]
        for c in sorted(self.client_masks):
            models.append(EvalModel(f"client{c}", self.weights, masks=self.masks_of(c), global_test=False,
                                    local_clients=[c]))
        return models

    def evaluation_metrics(self, round_, outcomes):
        metrics = super().evaluation_metrics(round_, outcomes)
        glob = outcomes["global"]
        accuracies = []
        for c in sorted(glob.local_correct):
            outcome = outcomes.get(f"client{c}", glob)
            correct = outcome.local_correct[c][-1]
            if len(correct) == 0:
                continue
            accuracy = float(correct.mean())
            accuracies.append(accuracy)
            self.best[c] = max(self.best.get(c, 0.0), accuracy)
        metrics["personal_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
        # in client order, whatever order the clients were first seen in (aggregate or evaluation)
        best = [self.best[c] for c in sorted(self.best)]
        metrics["personal_accuracy_best"] = float(np.mean(best)) if best else float("nan")
        return metrics

    def state_dict(self):
        return {"weights": self.weights, "client_masks": self.client_masks, "best": self.best}

    def load_state_dict(self, state):
        self.weights, self.client_masks, self.best = state["weights"], state["client_masks"], state["best"]
        self.masks = {}

    # ---- client --------------------------------------------------------------------------
    def split(self, task: ClientTask):
        """((x, y) to train on, (x, y) the prune decision uses). The decision's: the client's
        validation split (``validation_fraction`` of its training data, from (seed, client)), or
        with ``validation_fraction`` 0 its reported local test set (``task.local_test``); with
        ``check_samples`` a fixed subset of them. Every part keeps partition order."""
        fraction = float(self.settings["validation_fraction"])
        if fraction == 0:
            return (task.x, task.y), self._check_subset(task, *task.local_test)
        train, held = (torch.from_numpy(i) for i in validation_split(len(task.y), fraction, self.cfg["seed"],
                                                                     task.client_id))
        return (task.x[train], task.y[train]), self._check_subset(task, task.x[held], task.y[held])

    def _check_subset(self, task: ClientTask, x, y):
        samples = int(self.settings["check_samples"])
        if 0 < samples < len(y):
            order = rng.generator(self.cfg["seed"], rng.EVAL, 0, task.client_id).permutation(len(y))
            index = torch.from_numpy(np.sort(order[:samples]))
            x, y = x[index], y[index]
        return x, y

    @torch.no_grad()
    def _accuracy(self, trainer, weights, masks, x, y) -> float:
        if len(y) == 0:
            return 0.0
        network = trainer.load(weights)
        if masks:
            apply_masks_torch(dict(network.named_parameters()), masks)
        network.eval()
        chunk = self.cfg["eval"]["batch_size"]
        correct = 0
        for start in range(0, len(y), chunk):
            xb = x[start:start + chunk].to(trainer.device)
            yb = y[start:start + chunk].to(trainer.device)
            correct += int((network(xb).argmax(dim=1) == yb).sum())
        return correct / len(y)

    def local_update(self, task: ClientTask, trainer) -> ClientResult:
        s = self.settings
        state = task.state or {}
        masks = unpack(state["mask"]) if state.get("mask") else {
            n: np.ones(self.info.shapes[n], bool) for n in self.info.maskable}
        density = float(state.get("density", 1.0))
        received = task.received
        for name, mask in received.masks.items():   # the server's copy is the client's mask
            if not np.array_equal(mask, masks[name]):
                raise RuntimeError(f"lotteryfl: client {task.client_id} holds a different mask for {name}")
        weights = {n: np.asarray(v) for n, v in received.values.items()}
        (x_train, y_train), (x_check, y_check) = self.split(task)
        accuracy = self._accuracy(trainer, weights, masks, x_check, y_check)
        pruned = accuracy > s["acc_threshold"] and density > s["target_density"]
        if pruned:
            step = s["prune_step"]
            if not s["overshoot"]:
                step = min(step, 1.0 - s["target_density"] / density)
            counts = {}
            for name, mask in masks.items():
                active = int(np.count_nonzero(mask))
                counts[name] = active - int(math.floor(step * active + 0.5))
            masks = magnitude_masks({n: weights[n] for n in masks}, counts, within=masks)
            density *= 1.0 - step
            init = task.initial_weights
            for name in weights:
                if name in masks:
                    weights[name] = np.where(masks[name], init[name], np.zeros_like(init[name]))
                elif s["rewind_biases"]:
                    weights[name] = init[name].copy()
        full = all(m.all() for m in masks.values())
        trained, loss, processed = trainer.train(
            weights, x_train, y_train, seed=task.seed, round_=task.round, client_id=task.client_id,
            masks=None if full else masks, steps=self.local_steps())
        x_test, y_test = task.local_test
        post = self._accuracy(trainer, trained, None if full else masks, x_test, y_test) if len(y_test) else math.nan
        update = ModelUpdate(trained, {} if full else masks)
        densities = None if full else {n: float(m.mean()) for n, m in masks.items()}
        actual = sum(int(np.count_nonzero(m)) for m in masks.values()) / sum(m.size for m in masks.values())
        return ClientResult(task.client_id, len(y_train), update, loss, processed,
                            state={"mask": None if full else pack(masks), "density": density},
                            densities=densities,
                            metrics={"pre_accuracy": accuracy, "post_accuracy": post, "pruned": int(pruned),
                                     "client_density": actual})
