"""Evaluation spread over every rank: the algorithm's ``EvalModel``s, their samples cut into
fixed chunks of ``eval.batch_size``, chunk i on rank i mod P. The chunking depends only on the
models and the data, never on P, so every metric is identical for any rank count.

The server broadcasts the models (each distinct weight dict once, as a codec payload), every rank
evaluates its chunks, the server gathers per-sample correctness (per exit) and losses and hands
each model's ``EvalOutcome`` back to the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..algorithms.evaluation import EvalModel, EvalOutcome
from ..comm.codec import Encoded, decode, encode
from ..sparsity import apply_masks_torch
from ..training import exit_outputs
from ..update import ModelUpdate
from .messages import pack_masks, unpack_masks


@dataclass
class SampleSet:
    array: str               # "test" or "train" (held-out local test splits)
    indices: np.ndarray | None   # None: the whole array (sliced contiguously)

    def size(self, lengths: dict[str, int]) -> int:
        return lengths[self.array] if self.indices is None else len(self.indices)


class Evaluator:
    def __init__(self, comm, trainer, data: dict[str, tuple[torch.Tensor, torch.Tensor]], partition,
                 chunk: int):
        self.comm, self.trainer, self.data, self.partition, self.chunk = comm, trainer, data, partition, chunk
        self.lengths = {name: len(y) for name, (_, y) in data.items()}
        self.local_array = "train" if partition.local_test_in_train else "test"

    # -- which samples each model needs ---------------------------------------------------------
    def _local_clients(self, model: EvalModel) -> list[int]:
        if model.local_clients is None:
            return list(range(self.partition.num_clients))
        return sorted(model.local_clients)

    def _sample_sets(self, model: EvalModel) -> list[SampleSet]:
        sets = [SampleSet("test", None)] if model.global_test else []
        clients = self._local_clients(model)
        if clients and not (model.global_test and self.local_array == "test"):
            union = np.unique(np.concatenate([self.partition.test_indices[c] for c in clients]))
            sets.append(SampleSet(self.local_array, union.astype(np.int64)))
        return sets

    def _units(self, sets: list[list[SampleSet]]) -> list[tuple[int, int, int]]:
        """(model index, sample-set index, chunk start) in a fixed order."""
        units = []
        for m, model_sets in enumerate(sets):
            for s, sample_set in enumerate(model_sets):
                units.extend((m, s, start) for start in range(0, sample_set.size(self.lengths), self.chunk))
        return units

    # -- the collective -------------------------------------------------------------------------
    def run(self, models: list[EvalModel] | None) -> dict[str, EvalOutcome] | None:
        """Every rank calls this; the server passes the models and gets the outcomes."""
        comm = self.comm
        models = self._exchange_models(models)
        sets = [self._sample_sets(model) for model in models]
        units = self._units(sets)
        mine, loaded = [], None
        with torch.no_grad():
            for i, (m, s, start) in enumerate(units):
                if i % comm.size != comm.rank:
                    continue
                if loaded != m:
                    network = self._load(models[m])
                    loaded = m
                mine.append((i, *self._evaluate_chunk(network, sets[m][s], start)))
        gathered = comm.gather_objects(mine)
        if not comm.is_server:
            return None
        pieces = {i: (correct, losses) for rank_chunks in gathered for i, correct, losses in rank_chunks}
        chunks_of: dict[tuple[int, int], list] = {}   # (model, sample set) → its chunks in order
        for i, (m, s, _) in enumerate(units):
            chunks_of.setdefault((m, s), []).append(pieces[i])
        return {model.key: self._outcome(m, model, sets[m], chunks_of) for m, model in enumerate(models)}

    def _exchange_models(self, models):
        comm = self.comm
        if comm.is_server:
            distinct: dict[int, int] = {}
            payloads = []
            for model in models:
                if id(model.weights) not in distinct:
                    distinct[id(model.weights)] = len(payloads)
                    payloads.append(encode(ModelUpdate(model.weights)))
            specs = [(model.key, distinct[id(model.weights)], model.variant,
                      pack_masks(model.masks) if model.masks else None, model.global_test, model.local_clients)
                     for model in models]
            layouts = [(p.layout, p.nbytes) for p in payloads]
            data = np.concatenate([p.data for p in payloads]) if payloads else np.zeros(0, np.uint8)
        else:
            specs = layouts = data = None
        specs, layouts = comm.bcast_object((specs, layouts) if comm.is_server else None)
        data = comm.bcast_buffer(data, payload=False)
        if comm.is_server:
            return models
        weights, offset = [], 0
        for layout, size in layouts:
            weights.append(decode(Encoded(layout, data[offset:offset + size])).values)
            offset += size
        return [EvalModel(key, weights[w], variant, unpack_masks(masks) if masks else None, global_test, local)
                for key, w, variant, masks, global_test, local in specs]

    def _load(self, model: EvalModel) -> torch.nn.Module:
        network = self.trainer.load(model.weights, model.variant)
        if model.masks:
            apply_masks_torch(dict(network.named_parameters()), model.masks)
        network.eval()
        return network

    def _evaluate_chunk(self, network, sample_set: SampleSet, start: int):
        x, y = self.data[sample_set.array]
        if sample_set.indices is None:
            xb, yb = x[start:start + self.chunk], y[start:start + self.chunk]
        else:
            idx = torch.from_numpy(sample_set.indices[start:start + self.chunk])
            xb, yb = x[idx], y[idx]
        xb, yb = xb.to(self.trainer.device), yb.to(self.trainer.device)
        exits = exit_outputs(network(xb))
        # copies, not views of torch's buffers: these small results outlive the chunk's large
        # temporaries, and kept views let the heap grow with every model evaluated (LotteryFL
        # evaluates up to 400 personalised models a round)
        correct = [(logits.argmax(dim=1) == yb).cpu().numpy().copy() for logits in exits]
        losses = F.cross_entropy(exits[-1], yb, reduction="none").cpu().numpy().copy()
        return correct, losses

    # -- assembly on the server -----------------------------------------------------------------
    def _outcome(self, m: int, model: EvalModel, sets: list[SampleSet], chunks_of: dict) -> EvalOutcome:
        assembled = []
        for s, sample_set in enumerate(sets):
            chunks = chunks_of.get((m, s), [])
            exits = len(chunks[0][0]) if chunks else 1
            correct = [np.concatenate([c[e] for c, _ in chunks]) if chunks else np.zeros(0, bool)
                       for e in range(exits)]
            losses = np.concatenate([l for _, l in chunks]) if chunks else np.zeros(0, np.float32)
            assembled.append((sample_set, correct, losses))
        outcome = EvalOutcome(None, None)
        if model.global_test:
            _, outcome.test_correct, outcome.test_losses = assembled[0]
        clients = self._local_clients(model)
        if not clients:
            return outcome
        sample_set, correct, _ = assembled[-1]
        for c in clients:
            idx = self.partition.test_indices[c]
            if sample_set.indices is not None:   # positions of the client's samples in the union
                idx = np.searchsorted(sample_set.indices, idx)
            outcome.local_correct[c] = [per_exit[idx] for per_exit in correct]
        return outcome
