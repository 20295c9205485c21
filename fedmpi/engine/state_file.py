"""A tree of plain data and arrays as a file that cannot run code when read (the checkpoint's format).

The file is an ``.npz`` archive with two ``uint8`` members: ``manifest``, UTF-8 JSON describing
the tree, and ``data``, the bytes of every array back to back. It is read with
``np.load(..., allow_pickle=False)`` and ``json.loads``: nothing in it names code to run.

The tree may hold only the types of ``ALLOWED`` (docs/extending.md, "state_dict"): dict (str or
int keys; an ``OrderedDict`` comes back as one), list, tuple, None, bool, int, float, str, bytes,
numpy arrays and scalars of bool, int, uint or float dtype, and torch tensors of those dtypes
(bfloat16 included; they come back on the CPU, without ``requires_grad``). Anything else is
refused when written, naming its place in the tree. Every value comes back bit for bit and of the
same type; an array or tensor that appears twice comes back as one object, as pickle would have
it, since an algorithm may update it in place through either name.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict

import numpy as np

FORMAT = "fedmpi-state"
FORMAT_VERSION = 1
ARRAY_KINDS = "biuf"     # numpy dtype kinds: bool, signed and unsigned integers, floats
ALLOWED = ("dict (str or int keys), list, tuple, None, bool, int, float, str, bytes, numpy arrays and "
           "scalars of bool/int/uint/float dtype, torch tensors of those dtypes")
PLAIN = (type(None), bool, int, float, str)   # JSON holds these as they are, type included


class StateTypeError(TypeError):
    """A value a state file cannot hold: a programming error in the method that returned it."""


class StateFileError(ValueError):
    """A file that is not a readable state file (truncated, corrupt, another format)."""


class PickleFileError(StateFileError):
    """A pickle (older fedmpi checkpoints were pickles): never loaded, since loading one runs code."""


def _torch():
    import torch   # only when a tensor is met or named: a tree of arrays needs no torch

    return torch


class _Encoder:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.offset = 0
        self.seen: dict[int, int] = {}      # id(array or tensor) -> its index in ``blocks``
        self.blocks: list[dict] = []
        self.keep: list = []                # what ``seen`` refers to stays alive while encoding
        self.open: set[int] = set()         # containers being encoded: a cycle is refused

    def block(self, array: np.ndarray) -> dict:
        data = np.ascontiguousarray(array).tobytes()
        entry = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": self.offset, "nbytes": len(data)}
        self.chunks.append(data)
        self.offset += len(data)
        return entry

    def shared(self, value, make) -> dict:
        index = self.seen.get(id(value))
        if index is None:
            index = self.seen[id(value)] = len(self.blocks)
            self.blocks.append(make())
            self.keep.append(value)
        return {"$": "block", "index": index}

    def encode(self, value, where: str):
        """``value`` as JSON; ``where``: its place in the tree, for the message if it is refused."""
        kind = type(value)
        if kind in PLAIN:
            return value
        if isinstance(value, np.generic):
            if value.dtype.kind not in ARRAY_KINDS:
                raise _refused(where, value)
            return {"$": "scalar", "dtype": value.dtype.str, "hex": value.tobytes().hex()}
        if kind is np.ndarray:
            if value.dtype.kind not in ARRAY_KINDS:
                raise _refused(where, value)
            return self.shared(value, lambda: {"kind": "array", **self.block(value)})
        if kind is bytes:
            return self.shared(value, lambda: {"kind": "bytes", **self.block(np.frombuffer(value, np.uint8))})
        if kind in (dict, OrderedDict, list, tuple):
            if id(value) in self.open:
                raise StateTypeError(f"checkpoint state: {where or 'the state'} contains itself; it must be a tree")
            self.open.add(id(value))
            try:
                return self.container(value, where)
            finally:
                self.open.discard(id(value))
        torch = sys.modules.get("torch")   # a tensor means torch is loaded; never import it here
        if torch is not None and kind in (torch.Tensor, torch.nn.Parameter):
            return self.shared(value, lambda: self.tensor(value, where))
        raise _refused(where, value)

    def container(self, value, where: str) -> dict:
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                if type(key) not in (str, int):
                    raise StateTypeError(f"checkpoint state: {where or 'the state'} has the key {key!r} of type "
                                         f"{type(key).__name__}; dict keys must be str or int (docs/extending.md)")
                items.append([key, self.encode(item, f"{where}[{key!r}]" if where else str(key))])
            return {"$": "odict" if type(value) is OrderedDict else "dict", "items": items}
        items = [self.encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return {"$": type(value).__name__, "items": items}

    def tensor(self, value, where: str) -> dict:
        torch = _torch()
        if value.layout != torch.strided or value.is_complex() or str(value.dtype) not in _tensor_dtypes():
            raise _refused(where, value, f" of dtype {value.dtype} and layout {value.layout}")
        plain = value.detach().cpu()
        if plain.dtype == torch.bfloat16:    # numpy has no bfloat16: its bits travel as int16
            plain = plain.view(torch.int16)
        return {"kind": "tensor", "torch_dtype": str(value.dtype), **self.block(plain.contiguous().numpy())}


def _refused(where: str, value, detail: str = "") -> StateTypeError:
    where, kind = where or "the state", type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, (np.ndarray, np.generic)):
        detail = f" of dtype {value.dtype}"
    return StateTypeError(f"checkpoint state: {where} is of type {name}{detail}, which a checkpoint cannot hold; "
                          f"state may hold only {ALLOWED} (docs/extending.md)")


def _tensor_dtypes() -> dict:
    torch = _torch()
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
              torch.bfloat16, torch.float32, torch.float64]
    dtypes += [getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)]
    return {str(d): d for d in dtypes}


def write_state(file, tree, header: dict) -> None:
    """Write ``tree`` (and ``header``, plain JSON values) to the open binary ``file``."""
    encoder = _Encoder()
    body = encoder.encode(tree, "")   # places in the tree read ``algorithm['weights']['fc1.weight']``
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "header": header, "blocks": encoder.blocks,
                "tree": body}
    text = json.dumps(manifest, allow_nan=True).encode()
    np.savez(file, allow_pickle=False, manifest=np.frombuffer(text, np.uint8),
             data=np.frombuffer(b"".join(encoder.chunks), np.uint8))


def read_state(source) -> tuple[dict, object]:
    """(header, tree) of the state file ``source`` (a path or an open binary file);
    ``StateFileError`` if it is not a whole one."""
    if hasattr(source, "read"):
        start = source.tell()
        magic = source.read(4)
        source.seek(start)
    else:
        with open(source, "rb") as f:
            magic = f.read(4)
    if magic[:1] == b"\x80":
        raise PickleFileError("a pickle")
    if magic != b"PK\x03\x04":
        raise StateFileError("not an npz archive")
    try:
        with np.load(source, allow_pickle=False) as archive:
            manifest = json.loads(bytes(archive["manifest"]).decode())
            data = archive["data"]
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise StateFileError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
        blocks = [None] * len(manifest["blocks"])
        tree = _decode(manifest["tree"], manifest["blocks"], blocks, data)
        return manifest["header"], tree
    except StateFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, npy, JSON and layout errors all mean a damaged file
        raise StateFileError(f"{type(exc).__name__}: {exc}") from None


def _decode(node, entries: list, blocks: list, data: np.ndarray):
    if type(node) in PLAIN:
        return node
    tag = node["$"]
    if tag in ("dict", "odict"):
        pairs = [(_key(key), _decode(item, entries, blocks, data)) for key, item in node["items"]]
        return OrderedDict(pairs) if tag == "odict" else dict(pairs)
    if tag in ("list", "tuple"):
        items = [_decode(item, entries, blocks, data) for item in node["items"]]
        return items if tag == "list" else tuple(items)
    if tag == "scalar":
        raw = bytes.fromhex(node["hex"])
        dtype = _array_dtype(node["dtype"])
        if len(raw) != dtype.itemsize:
            raise ValueError("scalar of the wrong size")
        return np.frombuffer(raw, dtype)[0]
    if tag == "block":
        index = node["index"]
        if blocks[index] is None:
            blocks[index] = _block(entries[index], data)
        return blocks[index]
    raise ValueError(f"unknown node {tag!r}")


def _key(key):
    if type(key) not in (str, int):
        raise ValueError(f"dict key {key!r}")
    return key


def _array_dtype(text: str) -> np.dtype:
    dtype = np.dtype(text)
    if dtype.kind not in ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {text!r}")
    return dtype


def _block(entry: dict, data: np.ndarray):
    dtype = _array_dtype(entry["dtype"])
    shape = tuple(int(n) for n in entry["shape"])
    offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    if min(shape, default=0) < 0 or int(np.prod(shape)) * dtype.itemsize != nbytes or \
            offset < 0 or offset + nbytes > data.size:
        raise ValueError("array outside the data")
    array = np.frombuffer(data, dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape).copy()
    if entry["kind"] == "array":
        return array
    if entry["kind"] == "bytes" and dtype == np.uint8 and array.ndim == 1:
        return array.tobytes()
    if entry["kind"] != "tensor":
        raise ValueError(f"unknown block {entry['kind']!r}")
    torch = _torch()
    dtype = _tensor_dtypes()[entry["torch_dtype"]]
    tensor = torch.from_numpy(array)
    if dtype == torch.bfloat16 and tensor.dtype == torch.int16:
        tensor = tensor.view(torch.bfloat16)
    if tensor.dtype != dtype:
        raise ValueError(f"tensor of {tensor.dtype} recorded as {dtype}")
    return tensor
