"""The algorithm interface: a few hooks the round loop calls. Algorithms never touch MPI.

Server side (rank 0):   ``init_server`` → each round: ``select_clients`` → ``download`` per client
                        → (clients train) → ``aggregate`` with the results in client-id order
                        (and, with ``aggregation.where: workers``, the sums the ranks reduced)
                        → ``round_metrics``; on evaluation rounds ``evaluation_models`` →
                        (every rank evaluates a share) → ``evaluation_metrics``; then, after
                        every round but the last, ``prepare_next_round`` (a change for the next
                        round's download, made after the round's model was evaluated).
Client side (any rank): ``local_update`` gets a ``ClientTask`` (the decoded download, the client's
                        device-resident state, its data, its RNG seed; where the algorithm
                        declares ``needs_local_test``/``needs_initial_weights``, its local test set
                        and the run's initial model too) and returns a
                        ``ClientResult`` whose ``update`` is what the client uploads. It trains
                        through ``LocalTrainer.train``, choosing optimizer, objective, step hooks
                        and model variant. With ``local.client_batch`` the engine calls
                        ``local_update_group`` for blocks of clients instead (one by one unless
                        the algorithm defines the fast path ``local_update_together``).
Merges that are sums:   an algorithm whose merge is Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k per element
                        sets ``partial_sums``, gives ``partial_sum_weight`` and merges through
                        ``merge_over_holders``; the engine may then sum the uploads on the worker
                        ranks (``aggregation.where: workers``), and the sum may be fixed point.
Results columns:        ``round_columns``/``client_columns`` declare the algorithm's own HDF5
                        columns before round 1; ``round_metrics``, ``evaluation_metrics`` and
                        ``ClientResult.metrics`` fill them.

What crosses MPI is decided by the ``ModelUpdate``s these hooks return: tensors present, and masks
for the masked ones. The communication layer encodes them (dense, values-only, bitmap or index) and
counts the bytes; an algorithm only says *what* to send, never *how*.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..aggregation import RoundSums, average_over_holders
from ..training import LocalTrainer
from ..update import ModelUpdate
from .evaluation import EvalModel, EvalOutcome


@dataclass
class ModelInfo:
    """What an algorithm may know of the model without holding a torch module."""

    shapes: dict[str, tuple]          # communicated tensors (float state_dict entries), in order
    maskable: list[str]               # conv/linear weights
    layer_flops: dict[str, int]       # dense forward FLOPs per sample per maskable weight
    num_clients: int = 0
    model: str = ""                   # config model name, input shape and classes: what an
    input_shape: tuple = ()           # algorithm needs to build a variant's schema itself
    num_classes: int = 0
    local_test_sizes: tuple = ()      # per client, the size of its local test set


@dataclass
class ClientTask:
    round: int
    client_id: int
    received: ModelUpdate             # the decoded download
    state: dict[str, Any]             # device-resident state (persists across this client's rounds)
    x: Any                            # torch tensors of the client's training data
    y: Any
    seed: int                         # derived from (seed, round, client): the only randomness allowed
    # filled by the engine only for an algorithm that declares it needs them (from what every rank
    # built before round 1; neither crosses MPI nor counts as traffic):
    local_test: tuple | None = None   # ``needs_local_test``: (x, y) torch tensors of the client's
                                      # local test set (the evaluator's, in partition order)
    initial_weights: dict[str, np.ndarray] | None = None   # ``needs_initial_weights``: the run's
                                      # initial global model θ₀ (read-only), a client's own copy


@dataclass
class TrainData:
    """Every client's training data, for an algorithm whose server computes from it
    (``needs_train_data``: HeteroFL's query of the BN statistics). Read-only."""

    x: Any                            # torch tensors of the whole training array
    y: Any
    client_indices: list              # per client, its rows of x and y (the partition's train indices)
    device: str                       # the torch device the run trains on


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    update: ModelUpdate | None        # what the client uploads; None on the server when the worker
                                      # ranks summed the uploads (aggregation.where: workers)
    train_loss: float
    samples_processed: int            # for the FLOP and time model
    state: dict[str, Any] = field(default_factory=dict)
    densities: dict[str, float] | None = None   # per maskable layer during training (None = dense)
    metrics: dict[str, float] = field(default_factory=dict)  # values of ``client_columns``


class Algorithm:
    # ---- what a method declares about itself: fedmpi's config, ``fedmpi info``, the figures and
    # the docs' key table read these, and no other list of methods or of their keys exists
    name = ""                 # its ``algorithm:`` value
    label = ""                # its name in tables and figure legends
    doc = ""                  # its page for users (a path in the repository, or a URL for a plug-in)
    section: str | None = None    # the config section it reads (``feddst``: ``feddst.alpha``, ...)
    defaults: dict[str, Any] = {}  # that section's keys and defaults; a default's type is the key's type
    union_types: dict[str, tuple] = {}   # keys of the section that take several types
    # keys of the section whose default is not what runs made before the key existed did, each
    # with that earlier value: a stored config without the key reads as it (results grouping and
    # --resume, ``config.defaults.stored_defaults``); a key added with the old behaviour needs none
    before_key_existed: dict[str, Any] = {}
    tiered = False            # trains submodels of a multi-exit model (the ``tiers`` section)
    figures: tuple[str, ...] = ()   # figure modules beyond the common ones (``fedmpi.figures.<name>``)
    needs_local_test = False  # its clients get their local test set (``ClientTask.local_test``)
    needs_initial_weights = False   # its clients get θ₀, the run's initial model (``ClientTask.initial_weights``)
    needs_train_data = False  # every rank sets ``train_data`` (a ``TrainData``) before round 1
    train_data: TrainData | None = None
    # True: ``aggregate`` merges through ``merge_over_holders`` with ``partial_sum_weight``, so
    # aggregation.sum may be fixed_point and aggregation.where workers (config validation reads it)
    partial_sums = False
    # ``merge_over_holders``: an element no client holds becomes 0 ("zero") or keeps the server's
    # value ("keep")
    missing = "zero"
    # what its clients minimise when it is not ``local.loss`` (it passes its own objective to the
    # trainer); config validation then refuses any local.loss but cross_entropy. None: local.loss
    own_loss: str | None = None

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Check (and complete) the keys of ``section`` in the merged, type-checked ``cfg``; raise
        ``ConfigError`` naming the key. Runs for every registered section whatever the algorithm,
        so a bad value is found even in a section the run does not use."""

    def __init__(self, cfg: dict, info: ModelInfo):
        self.cfg = cfg
        self.info = info
        self.weights: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}

    # ---- server ------------------------------------------------------------------------
    def init_server(self, weights: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        self.weights = weights

    def select_clients(self, round_: int, rng: np.random.Generator) -> list[int]:
        total, k = self.cfg["clients"]["total"], self.cfg["clients"]["per_round"]
        return sorted(int(c) for c in rng.choice(total, size=k, replace=False))

    def download(self, round_: int, client_id: int) -> ModelUpdate:
        return ModelUpdate(self.weights, self.masks)

    def aggregate(self, round_: int, results: list[ClientResult], sums: RoundSums | None = None) -> None:
        """Merge the round's results (client-id order) into the server state: the round's model,
        which the evaluation and the round's columns describe. ``sums``: only for ``partial_sums``
        algorithms under ``aggregation.where: workers``, the ranks' reduced sums (then every
        result's ``update`` is None); pass both on to ``merge_over_holders``. A change that only
        prepares the next round (a mask no client has trained yet) goes in ``prepare_next_round``."""
        raise NotImplementedError

    def prepare_next_round(self, round_: int) -> dict[str, float]:
        """Change the server's model for round ``round_ + 1``'s download: a step that makes weights
        or masks no client has trained yet, such as PruneFL's reconfiguration or SNIP's and IMP's
        pruning. The engine calls it after round ``round_`` was aggregated, its columns taken
        (``round_metrics``, ``density``) and, when due, evaluated, so that all of them describe
        the model the round's clients trained; and never after the last round, whose change no
        round would train. Returns values of ``round_columns`` that describe the change (this
        round's row holds them). Its state reaches checkpoints through ``state_dict``, written
        after it."""
        return {}

    # ---- merges that are sums over holders (config section aggregation) ----------------------
    def partial_sum_weight(self, client_id: int, num_samples: int) -> int | None:
        """The weight w_k of client k's upload in a ``partial_sums`` merge: a non-negative integer
        known before the client trains, from its training-set size (``num_samples``) and what
        ``select_clients`` decided. None: this algorithm's merge is not such a sum."""
        return None

    def partial_sum_weights(self, samples: dict[int, int]) -> dict[int, int]:
        """``partial_sum_weight`` per client (client id → training samples), checked: the
        fixed-point sum and its exact votes need non-negative integers."""
        weights = {}
        for client, num_samples in samples.items():
            weight = self.partial_sum_weight(client, num_samples)
            if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 0:
                raise ValueError(f"{self.name}: partial_sum_weight of client {client} is {weight!r}; a merge "
                                 f"summed over holders needs a non-negative integer weight")
            weights[client] = int(weight)
        return weights

    def sum_reference(self) -> dict[str, np.ndarray]:
        """What ``merge_over_holders`` averages into: every communicated tensor, float32 zeros, or
        with ``missing = "keep"`` the server's weights (whose values the unheld elements keep)."""
        if self.missing == "keep":
            return self.weights
        return {name: np.zeros(shape, np.float32) for name, shape in self.info.shapes.items()}

    def merge_over_holders(self, results: list[ClientResult], sums: RoundSums | None = None,
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per element Σ_k w_k·m_k·θ_k / Σ_k w_k·m_k (w_k = ``partial_sum_weight``; where no client
        holds the element, 0 or the server's value as ``missing`` says) and the votes Σ_k w_k·m_k,
        as ``average_over_holders`` returns them: from ``sums`` when the worker ranks summed the
        uploads, else from the decoded uploads in ``results``, summed as ``aggregation.sum`` says
        (float64 in client order or fixed point)."""
        if sums is not None:
            return sums.average(self.sum_reference(), missing=self.missing)
        weights = self.partial_sum_weights({r.client_id: r.num_samples for r in results})
        return average_over_holders([r.update for r in results], [weights[r.client_id] for r in results],
                                    self.sum_reference(), missing=self.missing,
                                    sum_mode=self.cfg["aggregation"]["sum"])

    def global_weights(self) -> dict[str, np.ndarray]:
        """The model the suite evaluates."""
        return self.weights

    def density(self) -> float:
        """``rounds/density``: the fraction of maskable positions in the global mask for masked
        methods (a grown weight is exactly 0 yet in the mask), else the nonzero fraction."""
        if self.masks:
            return sum(int(np.count_nonzero(m)) for m in self.masks.values()) / sum(m.size for m in self.masks.values())
        weights = self.global_weights()
        kept = sum(int(np.count_nonzero(weights[n])) for n in self.info.maskable)
        return kept / sum(weights[n].size for n in self.info.maskable)

    # ---- the time model (each client row's sim_seconds and train_flops; fedmpi.timing) ----------
    def dense_weight_gradients(self, round_: int) -> bool:
        """True where the round's clients compute the gradient of every weight, pruned or not
        (PruneFL gathering importance): the time model then charges each layer's weight gradient
        dense, its forward and input gradient at the live density. False: live weights only."""
        return False

    def charges_round_time(self, round_: int) -> bool:
        """False where the round's modelled time is booked at 0 s (PruneFL's initial pruning under
        ``prunefl.ip_time: zero``, the authors' accounting); its bytes and FLOPs still count."""
        return True

    # ---- results columns -----------------------------------------------------------------
    def round_columns(self) -> dict[str, Any]:
        """Extra per-round columns {name: numpy dtype}, declared before round 1."""
        return {}

    def client_columns(self) -> dict[str, Any]:
        """Extra per-client columns {name: numpy dtype}, filled from ``ClientResult.metrics``."""
        return {}

    def round_metrics(self, round_: int) -> dict[str, float]:
        """Values of ``round_columns`` known after ``aggregate`` (missing ones are written as NaN)."""
        return {}

    # ---- evaluation ----------------------------------------------------------------------
    def evaluation_models(self, round_: int) -> list[EvalModel]:
        """The models to evaluate this round; every rank evaluates a fixed share of the samples."""
        return [EvalModel("global", self.global_weights())]

    def evaluation_metrics(self, round_: int, outcomes: dict[str, EvalOutcome]) -> dict[str, float]:
        """Round metrics from the evaluation: the contract's three plus any declared columns."""
        outcome = outcomes["global"]
        return {"test_accuracy": outcome.test_accuracy(), "test_loss": outcome.test_loss(),
                "client_accuracy": outcome.mean_client_accuracy()}

    def state_dict(self) -> dict[str, Any]:
        """Server-side state for checkpoints (everything ``aggregate`` carries across rounds)."""
        return {"weights": self.weights, "masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.masks = state["weights"], state["masks"]

    # ---- client ------------------------------------------------------------------------
    def local_update(self, task: ClientTask, trainer: LocalTrainer) -> ClientResult:
        raise NotImplementedError

    def local_update_group(self, tasks: list[ClientTask], trainer: LocalTrainer) -> list[ClientResult]:
        """``local_update`` for each of ``tasks`` (a block of ``local.client_batch`` clients), results
        in their order: together through ``local_update_together`` where ``trains_together``, else
        one by one. The engine calls it for every block; override ``local_update_together``."""
        if len(tasks) > 1 and self.trains_together():
            return self.local_update_together(tasks, trainer)
        return [self.local_update(task, trainer) for task in tasks]

    def local_update_together(self, tasks: list[ClientTask], trainer: LocalTrainer) -> list[ClientResult]:
        """The fast path of ``local_update_group``: several clients trained at once
        (fedmpi/training/multi_client.py), the results of ``local_update`` bit for bit. It stands
        for the ``local_update`` of the class that defines it, and no other (``trains_together``)."""
        raise NotImplementedError

    @classmethod
    def trains_together(cls) -> bool:
        """Whether ``local_update_together`` applies: some class defines it, and no subclass of
        that class has its own ``local_update`` (which then trains one by one)."""
        owner = next(c for c in cls.__mro__ if "local_update_together" in vars(c))
        return owner is not Algorithm and cls.local_update is owner.local_update
