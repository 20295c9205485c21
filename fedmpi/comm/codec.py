"""Encoding of model updates into the flat byte buffers that cross MPI.

A ``ModelUpdate`` holds float32 tensors by name and, for masked tensors, a boolean mask (values
outside the mask are zero). ``encode`` turns it into one contiguous ``uint8`` buffer plus a
layout (one row per tensor: name, encoding, element count). Per tensor the encoder picks:

- ``DENSE``  : all values (unmasked tensors: biases, norms, anything without a mask);
- ``VALUES`` : only the values under the mask, when the receiver already holds that exact mask;
- ``BITMAP`` : mask as a bitmap of ceil(n/8) bytes, then the values under it;
- ``INDEX``  : mask as a list of flat positions in the narrowest unsigned type that can index the
               tensor (uint8/16/32/64), then the values; chosen when smaller than the bitmap.

The mask part therefore travels only when it changed from what the receiver knows (the
``reference_masks``). ``len(buffer)`` is what gets counted as upload or download bytes. The layout
is metadata that a deployment would derive from the shared model schema; its size is reported
separately (``HEADER_BYTES_PER_TENSOR`` per row) and never mixed into the payload bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DENSE, VALUES, BITMAP, INDEX = 0, 1, 2, 3
HEADER_BYTES_PER_TENSOR = 9  # tensor id (u32) + encoding (u8) + count (u32)
VALUE_DTYPE = np.dtype("<f4")


@dataclass
class ModelUpdate:
    """Tensors a client or the server sends. ``masks`` holds only the masked tensors."""

    values: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Encoded:
    layout: list[tuple[str, int, int]]   # (tensor name, encoding, element count)
    data: np.ndarray                     # uint8, the payload that crosses MPI

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def header_bytes(self) -> int:
        return HEADER_BYTES_PER_TENSOR * len(self.layout)


def index_dtype(size: int) -> np.dtype:
    """Narrowest unsigned integer type that can hold every flat position of a tensor of ``size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype).newbyteorder("<")
    return np.dtype("<u8")


def mask_bytes(size: int, kept: int) -> int:
    """Bytes the encoder spends on a changed mask: the smaller of bitmap and index list."""
    return min((size + 7) // 8, index_dtype(size).itemsize * kept)


def encode(update: ModelUpdate, reference_masks: dict[str, np.ndarray] | None = None) -> Encoded:
    reference_masks = reference_masks or {}
    layout: list[tuple[str, int, int]] = []
    pieces: list[np.ndarray] = []
    for name, tensor in update.values.items():
        flat = np.ascontiguousarray(tensor, dtype=VALUE_DTYPE).reshape(-1)
        mask = update.masks.get(name)
        if mask is None:
            layout.append((name, DENSE, flat.size))
            pieces.append(flat.view(np.uint8))
            continue
        flat_mask = np.asarray(mask, dtype=bool).reshape(-1)
        if flat_mask.size != flat.size:
            raise ValueError(f"mask of {name} has {flat_mask.size} entries, tensor has {flat.size}")
        kept_values = flat[flat_mask]
        reference = reference_masks.get(name)
        if reference is not None and np.array_equal(reference.reshape(-1), flat_mask):
            layout.append((name, VALUES, kept_values.size))
        else:
            positions_dtype = index_dtype(flat.size)
            if (flat.size + 7) // 8 <= positions_dtype.itemsize * kept_values.size:
                layout.append((name, BITMAP, kept_values.size))
                pieces.append(np.packbits(flat_mask))
            else:
                layout.append((name, INDEX, kept_values.size))
                pieces.append(np.flatnonzero(flat_mask).astype(positions_dtype).view(np.uint8))
        pieces.append(kept_values.view(np.uint8))
    data = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return Encoded(layout, data)


def _take(data: np.ndarray, offset: int, dtype: np.dtype, count: int) -> tuple[np.ndarray, int]:
    nbytes = np.dtype(dtype).itemsize * count
    if offset + nbytes > data.size:
        raise ValueError(f"payload truncated: need {offset + nbytes} bytes, have {data.size}")
    # copy so the result is aligned and independent of the receive buffer
    return data[offset:offset + nbytes].copy().view(dtype), offset + nbytes


def decode(encoded: Encoded, shapes: dict[str, tuple], reference_masks: dict[str, np.ndarray] | None = None
           ) -> ModelUpdate:
    """Inverse of ``encode``: dense tensors with zeros outside their masks, masks as bool arrays."""
    reference_masks = reference_masks or {}
    values: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    data, offset = encoded.data, 0
    for name, encoding, count in encoded.layout:
        shape = tuple(shapes[name])
        size = int(np.prod(shape, dtype=np.int64))
        if encoding == DENSE:
            flat, offset = _take(data, offset, VALUE_DTYPE, size)
            values[name] = flat.reshape(shape)
            continue
        if encoding == VALUES:
            if name not in reference_masks:
                raise ValueError(f"{name}: values-only payload but the receiver holds no mask for it")
            flat_mask = reference_masks[name].reshape(-1).astype(bool, copy=True)
        elif encoding == BITMAP:
            packed, offset = _take(data, offset, np.uint8, (size + 7) // 8)
            flat_mask = np.unpackbits(packed, count=size).astype(bool)
        elif encoding == INDEX:
            positions, offset = _take(data, offset, index_dtype(size), count)
            flat_mask = np.zeros(size, dtype=bool)
            flat_mask[positions] = True
        else:
            raise ValueError(f"{name}: unknown encoding {encoding}")
        kept, offset = _take(data, offset, VALUE_DTYPE, count)
        if int(flat_mask.sum()) != count:
            raise ValueError(f"{name}: mask keeps {int(flat_mask.sum())} entries, payload has {count} values")
        flat = np.zeros(size, dtype=VALUE_DTYPE)
        flat[flat_mask] = kept
        values[name] = flat.reshape(shape)
        masks[name] = flat_mask.reshape(shape)
    if offset != data.size:
        raise ValueError(f"payload has {data.size - offset} trailing bytes")
    return ModelUpdate(values, masks)


def expected_payload_bytes(update: ModelUpdate, reference_masks: dict[str, np.ndarray] | None = None) -> int:
    """The formula the encoder must meet: 4·values + mask bytes where the mask changed."""
    reference_masks = reference_masks or {}
    total = 0
    for name, tensor in update.values.items():
        mask = update.masks.get(name)
        if mask is None:
            total += 4 * tensor.size
            continue
        kept = int(np.count_nonzero(mask))
        total += 4 * kept
        reference = reference_masks.get(name)
        if reference is None or not np.array_equal(reference.reshape(-1), mask.reshape(-1)):
            total += mask_bytes(mask.size, kept)
    return total
