"""What an algorithm asks the evaluator for, and what it gets back.

An ``EvalModel`` is one model to evaluate: tensors (a variant's subset for a submodel), an
optional model variant and masks, and which samples — the global test set and/or clients' local
test sets (per client: the global test images of its labels, or its held-out split with
``data.local_test_fraction``). The engine spreads the samples of all models over every rank in
fixed chunks, so outcomes never depend on the rank count. An ``EvalOutcome`` holds per-sample
correctness for every exit of a multi-exit model (exit -1 is the deepest one the variant has);
``mean_client_accuracy`` averages clients scored on different models' outcomes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EvalModel:
    key: str                                   # names the outcome ("global", "tier2", "client17")
    weights: dict[str, np.ndarray]
    variant: dict | None = None                # model family keywords (level, width); None = full model
    masks: dict[str, np.ndarray] | None = None  # entries outside are zeroed (personalised masks)
    global_test: bool = True                   # evaluate on the global test set
    local_clients: list[int] | None = None     # whose local test sets; None = every client, [] = none


@dataclass
class EvalOutcome:
    test_correct: list[np.ndarray] | None            # per exit, bool over the global test set
    test_losses: np.ndarray | None                   # per sample, cross-entropy at the deepest exit
    local_correct: dict[int, list[np.ndarray]] = field(default_factory=dict)  # client → per exit

    def test_accuracy(self, exit: int = -1) -> float:
        return float(self.test_correct[exit].mean())

    def test_loss(self) -> float:
        return float(np.sum(self.test_losses, dtype=np.float64) / len(self.test_losses))

    def client_accuracy(self, client: int, exit: int = -1) -> float:
        return float(self.local_correct[client][exit].mean())

    def mean_client_accuracy(self, exit_of=None, clients=None) -> float:
        """Mean over clients (id order, those with a non-empty local test set) of each client's
        accuracy; ``exit_of(client)`` picks the exit per client (default: the deepest)."""
        chosen = sorted(self.local_correct) if clients is None else clients
        return mean_client_accuracy([(self, c, -1 if exit_of is None else exit_of(c)) for c in chosen])


def mean_client_accuracy(scores: list[tuple[EvalOutcome, int, int]]) -> float:
    """Mean, in the given order, of each (outcome, client, exit)'s accuracy: the client's local
    test set at that exit of the model ``outcome`` is from (tiered methods score each client on its
    own tier's submodel this way); clients with an empty local test set are left out."""
    accuracies = [outcome.local_correct[c][exit].mean() for outcome, c, exit in scores
                  if len(outcome.local_correct[c][0])]
    return float(np.mean(accuracies)) if accuracies else float("nan")
