"""Encoding of model updates into the flat byte buffers that cross MPI.

A ``ModelUpdate`` (``fedmpi.update``) holds tensors by name (any dtype of ``WIRE_DTYPES``; each keeps
its dtype), for masked tensors a boolean mask (values outside the mask are zero), and for tensors that
are a block of a larger registered tensor (HeteroFL width slices) the block's ``(start, end)`` per
dimension.
``encode`` turns it into one contiguous ``uint8`` buffer plus a layout: one self-describing
``LayoutRow`` per tensor (name, dtype, shape, slice, encoding, element count), so ``decode`` needs
nothing but the layout, the buffer and, for ``VALUES`` rows, the receiver's masks. Per tensor the
encoder picks:

- ``DENSE``  : all values (unmasked tensors: biases, norms, anything without a mask);
- ``VALUES`` : only the values under the mask, when the receiver already holds that exact mask;
- ``BITMAP`` : mask as a bitmap of ceil(n/8) bytes, then the values under it;
- ``INDEX``  : mask as a list of flat positions in the narrowest unsigned type that can index the
               tensor (uint8/16/32/64), then the values; chosen when strictly smaller than the bitmap.

Values travel little-endian in their own dtype (a float32 tensor costs 4 bytes per value sent). The
mask part travels only when it changed from what the receiver knows (the ``reference_masks``).
``len(buffer)`` is what gets counted as upload or download bytes.

The layout is metadata; its size is reported separately as ``Encoded.header_bytes`` and never mixed
into the payload bytes. Every row costs ``HEADER_BYTES_PER_TENSOR`` = 9 bytes (tensor id u32,
encoding u8, count u32). A deployment derives the rest of a row from the shared model schema
(name → shape), so a row also pays its description when the receiver cannot know it, i.e. when a
``schema`` is given and the row is not an unsliced schema tensor at its schema shape:

    len(name in utf-8) + 1 (name length) + 1 (dtype code) + 1 (ndim) + 4·ndim (shape, u32 each)
    + 8·ndim if sliced (start and end, u32 each)

Without a schema every row costs 9 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..update import Block, DensifiedOnRead, ModelUpdate

DENSE, VALUES, BITMAP, INDEX = 0, 1, 2, 3
HEADER_BYTES_PER_TENSOR = 9  # tensor id (u32) + encoding (u8) + count (u32)
# dtypes a tensor may have; its position here is the dtype code a row description carries
WIRE_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


class LayoutRow(NamedTuple):
    name: str
    dtype: str                  # one of WIRE_DTYPES
    shape: tuple[int, ...]
    slice: Block | None         # block of the registered tensor, None for a whole tensor
    encoding: int
    count: int                  # values in the payload


@dataclass
class Encoded:
    layout: list[LayoutRow]
    data: np.ndarray                          # uint8, the payload that crosses MPI
    schema: dict[str, tuple] | None = None    # what the receiver knows already; prices the header

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def header_bytes(self) -> int:
        return sum(HEADER_BYTES_PER_TENSOR + self._description_bytes(row) for row in self.layout)

    def _description_bytes(self, row: LayoutRow) -> int:
        if self.schema is None:
            return 0
        if row.slice is None and row.name in self.schema and tuple(self.schema[row.name]) == row.shape:
            return 0
        ndim = len(row.shape)
        return len(row.name.encode("utf-8")) + 1 + 1 + 1 + 4 * ndim + (8 * ndim if row.slice is not None else 0)


def index_dtype(size: int) -> np.dtype:
    """Narrowest unsigned integer type that can hold every flat position of a tensor of ``size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype).newbyteorder("<")
    return np.dtype("<u8")


def mask_bytes(size: int, kept: int) -> int:
    """Bytes the encoder spends on a changed mask: the smaller of bitmap and index list."""
    return min((size + 7) // 8, index_dtype(size).itemsize * kept)


def _wire_dtype(name: str) -> np.dtype:
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {name} cannot be sent; supported: {', '.join(WIRE_DTYPES)}")
    return np.dtype(name).newbyteorder("<")


def _checked_block(name: str, block, shape: tuple[int, ...]) -> Block:
    block = tuple((int(start), int(end)) for start, end in block)
    if tuple(end - start for start, end in block) != shape or any(start < 0 for start, _ in block):
        raise ValueError(f"{name}: slice {block} does not describe a tensor of shape {shape}")
    return block


def encode(update: ModelUpdate, reference_masks: dict[str, np.ndarray] | None = None,
           schema: dict[str, tuple] | None = None, *, allocate=None) -> Encoded:
    """``reference_masks``: the masks the receiver holds (compared with each mask as sent, flat);
    ``schema``: registered name → shape the receiver knows, used only to price the header;
    ``allocate(nbytes)``: where the payload goes (a uint8 array of that size; default a new one)."""
    reference_masks = reference_masks or {}
    layout: list[LayoutRow] = []
    pieces: list[np.ndarray] = []
    for name, tensor in update.values.items():
        tensor = np.asarray(tensor)
        dtype = tensor.dtype.name
        flat = np.ascontiguousarray(tensor, dtype=_wire_dtype(dtype)).reshape(-1)
        shape = tuple(tensor.shape)
        block = update.slices.get(name)
        if block is not None:
            block = _checked_block(name, block, shape)
        mask = update.masks.get(name)
        if mask is None:
            layout.append(LayoutRow(name, dtype, shape, block, DENSE, flat.size))
            pieces.append(flat.view(np.uint8))
            continue
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask of {name} has shape {mask.shape}, tensor has {shape}")
        flat_mask = mask.reshape(-1)
        # np.compress walks the mask once; boolean indexing (flat[flat_mask]) is several times
        # slower on a random mask, and the sparse path must not cost more than the dense one
        kept_values = np.compress(flat_mask, flat)
        reference = reference_masks.get(name)
        if reference is not None and np.array_equal(np.asarray(reference).reshape(-1), flat_mask):
            encoding = VALUES
        else:
            positions_dtype = index_dtype(flat.size)
            if (flat.size + 7) // 8 <= positions_dtype.itemsize * kept_values.size:
                encoding = BITMAP
                pieces.append(np.packbits(flat_mask))
            else:
                encoding = INDEX
                pieces.append(np.flatnonzero(flat_mask).astype(positions_dtype).view(np.uint8))
        layout.append(LayoutRow(name, dtype, shape, block, encoding, kept_values.size))
        pieces.append(kept_values.view(np.uint8))
    if not pieces:
        return Encoded(layout, np.zeros(0, np.uint8), schema)
    if allocate is None:
        return Encoded(layout, np.concatenate(pieces), schema)
    data = allocate(sum(piece.size for piece in pieces))
    return Encoded(layout, np.concatenate(pieces, out=data), schema)


def _take(data: np.ndarray, offset: int, dtype: np.dtype, count: int, copy: bool = True) -> tuple[np.ndarray, int]:
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize * count
    if offset + nbytes > data.size:
        raise ValueError(f"payload truncated: need {offset + nbytes} bytes, have {data.size}")
    piece = data[offset:offset + nbytes]
    if not copy and piece.ctypes.data % dtype.alignment == 0:
        return piece.view(dtype), offset + nbytes
    # copy so the result is aligned and independent of the receive buffer
    return piece.copy().view(dtype), offset + nbytes


class MaskPositions:
    """The receiver's masks met while decoding one round's uploads, each with its flat positions.
    A VALUES row against a mask met before (the same array, or an equal one: a worker's clients
    each decode their own copy of the mask they were all sent) reuses the positions and shares the
    mask, read-only, instead of copying and scanning it again; the rows' ``packed`` positions are
    then one and the same array, which lets the merges sum the packed values directly. The masks
    must not change while it is in use (one round)."""

    def __init__(self):
        # id → (the source array, kept so that no other array takes its id; flat mask; positions)
        self._by_id: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._distinct: list[tuple[np.ndarray, np.ndarray]] = []

    def lookup(self, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(read-only flat mask, flat positions) of the bool array ``source``."""
        entry = self._by_id.get(id(source))
        if entry is not None and entry[0] is source:
            return entry[1], entry[2]
        flat = np.asarray(source).reshape(-1)
        for shared, positions in self._distinct:
            if shared.size == flat.size and np.array_equal(shared, flat):
                break
        else:
            shared = flat.view()
            shared.flags.writeable = False
            positions = np.flatnonzero(shared)
            self._distinct.append((shared, positions))
        self._by_id[id(source)] = (source, shared, positions)
        return shared, positions


def decode(encoded: Encoded, reference_masks: dict[str, np.ndarray] | None = None, *,
           densify: bool = True, positions_cache: MaskPositions | None = None) -> ModelUpdate:
    """Inverse of ``encode``: tensors in their dtype with zeros outside their masks, masks as bool
    arrays, slices as sent. ``reference_masks`` are the receiver's masks, needed for VALUES rows.
    Masked tensors also land in ``ModelUpdate.packed`` as (flat positions, values).

    ``densify=False``: ``values`` densifies a masked tensor only when read (``DensifiedOnRead``),
    and dense tensors are views of ``encoded.data`` where it is aligned for their dtype (no copy:
    the caller must not reuse that buffer while it uses the update).
    ``positions_cache``: the round's ``MaskPositions``, for VALUES rows against bool masks."""
    reference_masks = reference_masks or {}
    values: dict[str, np.ndarray] | DensifiedOnRead = {} if densify else DensifiedOnRead()
    masks: dict[str, np.ndarray] = {}
    slices: dict[str, Block] = {}
    packed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    data, offset = encoded.data, 0
    for name, dtype, shape, block, encoding, count in encoded.layout:
        wire = _wire_dtype(dtype)
        shape = tuple(shape)
        size = int(np.prod(shape, dtype=np.int64))
        if block is not None:
            slices[name] = _checked_block(name, block, shape)
        if encoding == DENSE:
            flat, offset = _take(data, offset, wire, size, copy=densify)
            values[name] = flat.reshape(shape)
            continue
        kept_positions = None
        if encoding == VALUES:
            if name not in reference_masks:
                raise ValueError(f"{name}: values-only payload but the receiver holds no mask for it")
            reference = np.asarray(reference_masks[name])
            if reference.size != size:
                raise ValueError(f"{name}: receiver's mask has {reference.size} entries, tensor has {size}")
            if positions_cache is not None and reference.dtype == bool:
                flat_mask, kept_positions = positions_cache.lookup(reference_masks[name])
            else:
                flat_mask = reference.reshape(-1).astype(bool, copy=True)
        elif encoding == BITMAP:
            packed_bits, offset = _take(data, offset, np.uint8, (size + 7) // 8)
            flat_mask = np.unpackbits(packed_bits, count=size).view(bool)   # 0/1 bytes: a valid bool view
        elif encoding == INDEX:
            positions, offset = _take(data, offset, index_dtype(size), count)
            if positions.size and int(positions.max()) >= size:
                raise ValueError(f"{name}: mask position {int(positions.max())} outside {size} entries")
            flat_mask = np.zeros(size, dtype=bool)
            flat_mask[positions] = True
        else:
            raise ValueError(f"{name}: unknown encoding {encoding}")
        kept, offset = _take(data, offset, wire, count, copy=densify)
        if kept_positions is None:
            kept_positions = np.flatnonzero(flat_mask)   # then a plain scatter: faster than flat[flat_mask] = kept
        if kept_positions.size != count:
            raise ValueError(f"{name}: mask keeps {kept_positions.size} entries, payload has {count} values")
        if densify:
            flat = np.zeros(size, dtype=wire)
            flat[kept_positions] = kept
            values[name] = flat.reshape(shape)
        else:
            values.set_packed(name, kept_positions, kept, shape, wire)
        masks[name] = flat_mask.reshape(shape)
        packed[name] = (kept_positions, kept)
    if offset != data.size:
        raise ValueError(f"payload has {data.size - offset} trailing bytes")
    return ModelUpdate(values, masks, slices, packed)
