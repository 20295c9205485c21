"""HeteroFL (Diao, Ding, Tarokh, "HeteroFL: Computation and Communication Efficient Federated
Learning for Heterogeneous Clients", ICLR 2021) on the multi-exit family, full depth, width scaled.

    tier t trains the rate-p submodel, p = tiers.widths[t]: the first ⌈p·C⌉ channels of every hidden
      layer, inputs and class outputs full, and one classifier (the deepest exit)
    for r = 1 .. R
      C ← K clients, drawn evenly per tier
      each c ∈ C: download its submodel (leading blocks of the global tensors; no BN statistics),
        E local epochs, every BN on the batch's own statistics (static BN), a scaler after every
        convolution dividing by p, on CE(z with the logits of the classes absent from c's
        training labels set to 0, y); upload what it trained: the submodel, and of the classifier
        only the rows of c's classes
      server: every element averaged over the clients that sent it, each client weight 1
    evaluation: per evaluated width w, the BN statistics of the global model's rate-w slice,
      queried over the clients' training data (BN in training mode, cumulative average over the
      batches); the scalers are the identity at evaluation

As in the authors' code (diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-
Learning-for-Heterogeneous-Clients, src/): ``nn.BatchNorm2d(momentum=None,
track_running_stats=False)`` in training (models/conv.py); ``Scaler(rate)`` before each norm,
``input / rate`` in training only (modules/modules.py); ``out.masked_fill(label_mask == 0, 0)``
over the classes of the client's ``label_split`` (models/conv.py, ``Conv.forward``); the classifier
rows of absent classes left out of the average and every other element averaged over the clients
holding it, with count weights (fed.py, ``Federation.combine``); ``stats()`` (train_classifier_fed.py)
builds the global model with ``track=True`` and forwards the whole training set, shuffled, in
training mode before each test, so its BN statistics are the cumulative average over the batches.
Each of those is an option of section ``heterofl``; docs/methods/hypemefed.md ("HeteroFL") lists
them and where fedmpi differs from the code.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..aggregation import average_over_holders
from ..errors import require
from ..models import build_model, variant_options
from ..training import StepHook, exit_outputs
from ..update import ModelUpdate
from .base import ClientResult, TrainData
from .heterogeneous import TieredAlgorithm

# the query's batch order: a stream of its own (fedmpi.rng)
QUERY_STREAM = rng.method_stream("heterofl.sbn_query")
# the model options HeteroFL's clients train with (fedmpi/models/multiexit.py)
MODEL_OPTIONS = ("track_running_stats", "scaler", "exits")


def last_exit_cross_entropy(outputs, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(exit_outputs(outputs)[-1], y)


def masked_cross_entropy(classes, num_classes: int):
    """Cross-entropy at the deepest exit with the logits of every class outside ``classes`` (the
    client's training labels) set to 0 (not −inf: they stay in the softmax as exp(0) = 1), as the
    authors' ``Conv.forward`` masks its output with the client's ``label_split``."""
    absent = torch.ones(num_classes, dtype=torch.bool)
    absent[torch.as_tensor(classes, dtype=torch.long)] = False

    def objective(outputs, y):
        logits = exit_outputs(outputs)[-1]
        return F.cross_entropy(logits.masked_fill(absent.to(logits.device), 0.0), y)

    return objective


class GradientNormClip(StepHook):
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` between backward and step, as the
    authors' ``Local.train`` does with max_norm 1."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def after_backward(self, params, batch_size):
        torch.nn.utils.clip_grad_norm_(list(params.values()), self.max_norm)


def query_batches(data: TrainData, batch_size: int, mode: str, seed: int, round_: int) -> list[np.ndarray]:
    """The rows of each batch of the BN query. ``pooled`` (the authors' ``stats()``): every client's
    training rows together in one order drawn from (seed, round), as their shuffled loader over the
    training set; ``clients`` (the paper: "the server sequentially queries local clients"): client by
    client in id order, each client's rows in an order of its own from (seed, round, client). Every
    batch has ``batch_size`` rows but the last (of each client), as a loader that keeps it."""
    if mode == "pooled":
        groups = [rng.generator(seed, QUERY_STREAM, round_).permutation(np.concatenate(data.client_indices))]
    else:
        groups = [rng.generator(seed, QUERY_STREAM, round_, c).permutation(rows)
                  for c, rows in enumerate(data.client_indices)]
    return [rows[i:i + batch_size] for rows in groups for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def query_bn_statistics(model: nn.Module, weights: dict[str, np.ndarray], data: TrainData,
                        batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``running_mean``/``running_var`` of every BN of ``model`` (a module with running statistics
    and no scaler) loaded with ``weights``: BN with ``momentum=None`` in training mode forwarded over
    ``batches``, so each is the cumulative average over the batches of the batch mean and the
    unbiased batch variance (torch's own update, the authors' arithmetic). Dropout is off, so the
    query draws nothing from torch's generators."""
    state = {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in weights.items()}
    model.load_state_dict(state, strict=False)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
        elif isinstance(module, nn.Dropout):
            module.eval()
    device = next(model.parameters()).device
    for rows in batches:
        model(data.x[torch.from_numpy(rows)].to(device))
    return {n: t.detach().to("cpu", copy=True).numpy() for n, t in model.state_dict().items()
            if n.endswith((".running_mean", ".running_var"))}


class HeteroFL(TieredAlgorithm):
    name = "heterofl"
    label = "HeteroFL"
    doc = "docs/methods/hypemefed.md"
    figures = ("heterogeneous",)
    section = "heterofl"
    own_loss = "cross-entropy at the classifier, over the client's own classes (heterofl.masked_ce)"
    needs_train_data = True   # the server's query of the BN statistics
    # the authors' code, each switch its part of the method (static_bn, scaler, masked_ce are the
    # authors' control flags norm=bn, scale=1, mask=1); clip_grad_norm 0: off (their loop clips at 1)
    defaults = {"static_bn": True, "scaler": True, "masked_ce": True, "head_rows": "own_classes",
                "aggregation": "uniform", "sbn_query": "pooled", "clip_grad_norm": 0.0}

    @classmethod
    def check_config(cls, cfg):
        settings = cfg["heterofl"]
        require(settings["head_rows"] in ("own_classes", "all"), "heterofl.head_rows",
                f"must be 'own_classes' or 'all', got {settings['head_rows']!r}")
        require(settings["aggregation"] in ("uniform", "samples"), "heterofl.aggregation",
                f"must be 'uniform' or 'samples', got {settings['aggregation']!r}")
        require(settings["sbn_query"] in ("pooled", "clients"), "heterofl.sbn_query",
                f"must be 'pooled' or 'clients', got {settings['sbn_query']!r}")
        require(settings["clip_grad_norm"] >= 0, "heterofl.clip_grad_norm", "must be >= 0 (0: no clipping)")
        if cfg["algorithm"] == cls.name:
            missing = [o for o in MODEL_OPTIONS if o not in variant_options(cfg["model"])]
            require(not missing, "model", f"heterofl trains with the model options {', '.join(MODEL_OPTIONS)}; "
                                          f"{cfg['model']} lacks {', '.join(missing)}: use multiexit_vgg or "
                                          f"multiexit_vgg_small")

    def __init__(self, cfg, info):
        self.settings = cfg["heterofl"]
        super().__init__(cfg, info)
        self._query_models: dict[float, nn.Module] = {}
        self._queried_samples = -1

    def variant(self, tier):
        variant = {"width": float(self.cfg["tiers"]["widths"][tier]), "exits": "last"}
        if self.settings["static_bn"]:
            variant["track_running_stats"] = False
        if self.settings["scaler"]:
            variant["scaler"] = True
        return variant

    # ---- client --------------------------------------------------------------------------
    def local_update(self, task, trainer):
        tier = int(self.tier[task.client_id])
        # the classes of the client's training labels: the authors' label_split of the client
        classes = torch.unique(torch.as_tensor(task.y)).cpu().numpy().astype(np.int64)
        objective = masked_cross_entropy(classes, self.info.num_classes) if self.settings["masked_ce"] \
            else last_exit_cross_entropy
        clip = self.settings["clip_grad_norm"]
        weights, loss, processed = trainer.train(
            task.received.values, task.x, task.y, seed=task.seed, round_=task.round, client_id=task.client_id,
            variant=self.variants[tier], objective=objective, hooks=[GradientNormClip(clip)] if clip > 0 else [])
        update = ModelUpdate(weights, masks=self.head_masks(weights, classes), slices=dict(task.received.slices))
        return ClientResult(task.client_id, len(task.y), update, loss, processed, densities=self.densities[tier],
                            metrics={"tier": tier + 1, "label_classes": len(classes)})

    def head_masks(self, weights: dict[str, np.ndarray], classes: np.ndarray) -> dict[str, np.ndarray]:
        """With ``head_rows: own_classes``, the classifier's weight rows and bias entries of the
        client's classes (what the authors' ``combine`` averages in); none when it has every class."""
        if self.settings["head_rows"] == "all" or len(classes) == self.info.num_classes:
            return {}
        masks = {}
        for name in (n for n in weights if n.startswith("exits.")):
            mask = np.zeros(np.shape(weights[name]), dtype=bool)
            mask[classes] = True
            masks[name] = mask
        return masks

    # ---- server --------------------------------------------------------------------------
    def aggregate(self, round_, results):
        weights = [1.0 if self.settings["aggregation"] == "uniform" else r.num_samples for r in results]
        self.weights, _ = average_over_holders([r.update for r in results], weights, self.weights, missing="keep")

    def round_columns(self):
        return {**super().round_columns(), "sbn_query_samples": np.int64}

    def client_columns(self):
        return {**super().client_columns(), "label_classes": np.int64}

    def evaluation_models(self, round_):
        """The tiered protocol's models; with static BN, each one's BN statistics from the query."""
        models = super().evaluation_models(round_)
        self._queried_samples = -1
        if not self.settings["static_bn"]:
            return models
        if self.train_data is None:
            raise RuntimeError("heterofl: the BN query needs the training data (Algorithm.train_data), "
                               "which engine.context.build_context sets")
        batches = query_batches(self.train_data, self.cfg["local"]["batch_size"], self.settings["sbn_query"],
                                self.cfg["seed"], round_)
        for model in models:
            width = 1.0 if model.variant is None else float(model.variant["width"])
            model.weights = {**model.weights, **query_bn_statistics(self._query_model(width), model.weights,
                                                                    self.train_data, batches)}
        self._queried_samples = len(models) * sum(len(rows) for rows in batches)
        return models

    def evaluation_metrics(self, round_, outcomes):
        return {**super().evaluation_metrics(round_, outcomes), "sbn_query_samples": self._queried_samples}

    def _query_model(self, width: float) -> nn.Module:
        """The rate-``width`` model with running statistics (no scaler: as at evaluation), built once."""
        if width not in self._query_models:
            with torch.random.fork_rng(devices=[]):   # building draws initial weights: not from the run's stream
                model = build_model(self.cfg["model"], self.info.input_shape, self.info.num_classes, width=width)
            self._query_models[width] = model.to(self.train_data.device)
        return self._query_models[width]
