"""What an update is in memory, whoever made it: a client's upload, the server's download, a
decoded payload. The wire format that carries it across MPI is ``fedmpi.comm.codec``.

A ``ModelUpdate`` holds tensors by name (each keeps its dtype), for masked tensors a boolean mask
(values outside the mask are zero), and for tensors that are a block of a larger registered tensor
(HeteroFL width slices) the block's ``(start, end)`` per dimension.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field

import numpy as np

Block = tuple[tuple[int, int], ...]   # (start, end) per dimension of the registered tensor


@dataclass
class ModelUpdate:
    """Tensors a client or the server sends. ``masks`` holds only the masked tensors, ``slices``
    only the tensors that are a block of a larger registered tensor."""

    values: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    slices: dict[str, Block] = field(default_factory=dict)
    # decoded masked tensors as they crossed MPI: name → (flat positions of the mask, ascending,
    # and the values there); the server's merge sums these without densifying (fedmpi/aggregation).
    # They describe the tensors as decoded: whoever replaces values[name] drops packed[name].
    packed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class DensifiedOnRead(MutableMapping):
    """``ModelUpdate.values`` of a decode with ``densify=False``: a masked tensor becomes its dense
    array (zeros outside the mask) only when something reads it, so a merge that uses
    ``ModelUpdate.packed`` never pays the zero-fill and scatter of a full tensor per upload."""

    def __init__(self):
        self._dense: dict[str, np.ndarray] = {}
        self._pending: dict[str, tuple[np.ndarray, np.ndarray, tuple, np.dtype]] = {}
        self._order: dict[str, None] = {}     # insertion order, as a dict would iterate

    def set_packed(self, name: str, positions: np.ndarray, kept: np.ndarray, shape: tuple, dtype) -> None:
        self._dense.pop(name, None)
        self._pending[name] = (positions, kept, shape, dtype)
        self._order[name] = None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._dense:
            positions, kept, shape, dtype = self._pending.pop(name)   # KeyError: not sent
            flat = np.zeros(math.prod(shape), dtype=dtype)
            flat[positions] = kept
            self._dense[name] = flat.reshape(shape)
        return self._dense[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._pending.pop(name, None)
        self._dense[name] = value
        self._order[name] = None

    def __delitem__(self, name: str) -> None:
        if name not in self._order:
            raise KeyError(name)
        self._pending.pop(name, None)
        self._dense.pop(name, None)
        del self._order[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name) -> bool:
        return name in self._order

    def __repr__(self) -> str:
        return f"DensifiedOnRead({list(self._order)}, pending={list(self._pending)})"


def tensor_view(array: np.ndarray):
    """``torch.from_numpy(array)``, also for a read-only array (a decoded tensor can be a view of
    the received buffer, read-only so that no client changes another's download): torch shares the
    memory either way and only warns that it could write it; fedmpi's callers only read it."""
    import torch

    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
