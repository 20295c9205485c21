"""HypeMeFed's hypernetworks (Shin et al., SenSys 2024): networks on the server that map a client's
weights of conv k in block i to the weights of conv k in block i+1 (i = 1, 2; k = 1, 2).

- ``LRFHyperNetwork`` (the paper's low-rank version). The source weight (out, in, k, k) is read as
  the matrix (out·k, in·k) (1-D convs (out, in, k): (out·k, in)); its SVD truncated to rank r gives
  A = (U_r √S_r)ᵀ (r × out·k) and B = √S_r V_rᵀ (r × in·k). Two MLPs (Linear–ReLU–Linear), each
  shared over the r rows, map A's rows to the target's in·k and B's rows to its out·k; the target
  weight is (mapped B)ᵀ · (mapped A), reshaped. The MLPs' size does not depend on r; r only sets
  how much of the source they see (and the server time).
- ``NaiveHyperNetwork``: flatten the source → Linear–ReLU–Linear → the flattened target.

``HyperNetworks`` holds one per conv pair, trains them on (source, target) pairs with MSE and Adam,
generates, and saves/loads them as numpy arrays (checkpoints). Everything runs on the CPU with one
thread, seeded from (seed, ``HYPERNET``, round, pair): results do not depend on the rank count.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import rng

HYPERNET = 11   # the rng purpose of HypeMeFed's hypernetworks: initialisation and per-round shuffles

HYPERNETWORKS = ("lrf", "naive")
SOURCE_BLOCKS = (1, 2)        # conv k of block i → conv k of block i+1
CONVS = (1, 2)


def conv_pairs(shapes: dict[str, tuple]) -> list[tuple[str, str, int]]:
    """(source weight, target weight, target block) for every pair the model holds, source block
    ascending, so a cascade 1 → 2 → 3 visits its pairs in order."""
    pairs = []
    for block in SOURCE_BLOCKS:
        for k in CONVS:
            source, target = f"blocks.{block}.conv{k}.weight", f"blocks.{block + 1}.conv{k}.weight"
            if source in shapes and target in shapes:
                pairs.append((source, target, block + 1))
    return pairs


def matrix_shape(shape: tuple) -> tuple[int, int]:
    """A conv weight (out, in, k[, k]) as the matrix (out·k, numel / (out·k))."""
    rows = int(shape[0]) * int(shape[2])
    return rows, math.prod(int(d) for d in shape) // rows


def _mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


class LRFHyperNetwork(nn.Module):
    def __init__(self, source_shape: tuple, target_shape: tuple, rank: int, hidden: int):
        super().__init__()
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        rows, cols = matrix_shape(source_shape)
        target_rows, target_cols = matrix_shape(target_shape)
        self.rank = min(rows, cols) if rank <= 0 else min(rank, rows, cols)   # 0: full rank
        self.map_a = _mlp(rows, hidden, target_cols)    # a row of A (out·k) → target in·k
        self.map_b = _mlp(cols, hidden, target_rows)    # a row of B (in·k) → target out·k

    @torch.no_grad()
    def prepare(self, source: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The truncated SVD factors (A, B) of the source (computed in float64)."""
        u, s, vh = torch.linalg.svd(source.reshape(matrix_shape(self.source_shape)).double(),
                                    full_matrices=False)
        root = s[:self.rank].sqrt()
        a = (u[:, :self.rank] * root).T
        b = root[:, None] * vh[:self.rank]
        return a.float().contiguous(), b.float().contiguous()

    def generate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.map_b(b).T @ self.map_a(a)).reshape(self.target_shape)


class NaiveHyperNetwork(nn.Module):
    def __init__(self, source_shape: tuple, target_shape: tuple, hidden: int):
        super().__init__()
        self.source_shape, self.target_shape = tuple(source_shape), tuple(target_shape)
        self.mlp = _mlp(math.prod(source_shape), hidden, math.prod(target_shape))

    @torch.no_grad()
    def prepare(self, source: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (source.reshape(1, -1).float(),)

    def generate(self, flat: torch.Tensor) -> torch.Tensor:
        return self.mlp(flat).reshape(self.target_shape)


def parameter_count(kind: str, source_shape: tuple, target_shape: tuple, hidden: int) -> int:
    """Closed form of the hypernetwork's parameter count (the tests check it against torch)."""
    def mlp(inputs, outputs):
        return inputs * hidden + hidden + hidden * outputs + outputs

    if kind == "naive":
        return mlp(math.prod(source_shape), math.prod(target_shape))
    rows, cols = matrix_shape(source_shape)
    target_rows, target_cols = matrix_shape(target_shape)
    return mlp(rows, target_cols) + mlp(cols, target_rows)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread (same reductions whatever the machine), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HyperNetworks:
    """One hypernetwork per conv pair of the model whose float tensors have ``shapes``."""

    def __init__(self, shapes: dict[str, tuple], kind: str = "lrf", *, rank: int = 100, hidden: int = 512,
                 naive_hidden: int = 64, seed: int = 0):
        if kind not in HYPERNETWORKS:
            raise ValueError(f"hypernetwork {kind!r}; choose one of {', '.join(HYPERNETWORKS)}")
        self.kind, self.seed = kind, seed
        self.pairs = conv_pairs(shapes)
        self.hidden = hidden if kind == "lrf" else naive_hidden
        # seeded initialisation that leaves torch's global generator as it was
        with torch.random.fork_rng(devices=[]), single_thread():
            torch.manual_seed(rng.torch_seed(seed, HYPERNET))
            self.nets = [LRFHyperNetwork(shapes[s], shapes[t], rank, hidden) if kind == "lrf"
                         else NaiveHyperNetwork(shapes[s], shapes[t], naive_hidden)
                         for s, t, _ in self.pairs]
        self.trained = [False] * len(self.pairs)   # trained at least once: only then it generates

    def parameter_count(self) -> int:
        return sum(p.numel() for net in self.nets for p in net.parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for net in self.nets for p in net.parameters())

    def fit(self, index: int, samples: list[tuple[np.ndarray, np.ndarray]], *, epochs: int, lr: float,
            round_: int) -> float:
        """Train pair ``index`` on (source, target) weights: MSE, a fresh Adam, one pair a step in a
        seeded order each epoch. Returns the mean loss of the last epoch."""
        net = self.nets[index]
        inputs = [net.prepare(torch.from_numpy(np.asarray(s, np.float32))) for s, _ in samples]
        targets = [torch.from_numpy(np.asarray(t, np.float32)) for _, t in samples]
        order = torch.Generator().manual_seed(rng.torch_seed(self.seed, HYPERNET, round_, index))
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        net.train()
        mean = float("nan")
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(samples), generator=order).tolist():
                loss = F.mse_loss(net.generate(*inputs[i]), targets[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            mean = total / len(samples)
        self.trained[index] = True
        return mean

    @torch.no_grad()
    def generate(self, index: int, source: np.ndarray) -> np.ndarray:
        net = self.nets[index]
        net.eval()
        out = net.generate(*net.prepare(torch.from_numpy(np.asarray(source, np.float32))))
        return out.numpy().astype(np.float32, copy=True)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "trained": list(self.trained),
                "nets": [{n: t.detach().numpy().copy() for n, t in net.state_dict().items()} for net in self.nets]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or len(state["nets"]) != len(self.nets):
            raise ValueError("hypernetwork checkpoint does not match the configured hypernetworks")
        for net, tensors in zip(self.nets, state["nets"]):
            net.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in tensors.items()})
        self.trained = list(state["trained"])
