"""The AVX-512 CSR products of ``csr_simd.c`` for Linear layers (a batch of at most 64 rows), and
whether they can run here.

They replace MKL's (``torch.sparse.mm``) forward and input-gradient products and the active
weight gradient's sampled product where ``usable`` says so: the extension was built (setup.py
builds it where a C compiler is; a failed build leaves the MKL paths), the CPU has AVX-512F,
torch runs one thread (the kernels are serial; with more threads MKL's parallel ones run), the
indices are int32 and the values float32 on the CPU, and the batch is at most ``MAX_BATCH``.
``FEDMPI_SPARSE_SIMD=0`` (or ``FEDMPI_NATIVE=0``, every compiled part) in the environment turns
them off (to compare paths). Dense operands are passed padded to ``ld`` columns, a multiple of
16, with zeros (``padded``).
"""
from __future__ import annotations

import ctypes

import torch

from .. import native

MAX_BATCH = 64
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


LIBRARY = native.Library("fedmpi.sparse_kernels._csr_simd", {
    "fedmpi_simd_available": ([], ctypes.c_int),
    "fedmpi_csr_mm": ([_I64, _I64, _P, _P, _P, _P, _P], ctypes.c_int),
    "fedmpi_csr_t_mm": ([_I64, _I64, _I64, _P, _P, _P, _P, _P], ctypes.c_int),
    "fedmpi_sddmm": ([_I64, _I64, _P, _P, _P, _P, _P], ctypes.c_int),
}, disable="FEDMPI_SPARSE_SIMD",
    usable=lambda lib: None if lib.fedmpi_simd_available() else "this CPU has no AVX-512F")


def available() -> bool:
    return LIBRARY.get() is not None


def unavailable_because() -> str | None:
    """Why the products do not run here (None where they do)."""
    LIBRARY.get()
    return LIBRARY.why


def usable(structure, batch: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the products of ``structure``'s CSR matrix with a dense side of ``batch`` columns
    run here (module doc)."""
    return (available() and 0 < batch <= MAX_BATCH and torch.get_num_threads() == 1
            and dtype == torch.float32 and device.type == "cpu" and structure.crow.dtype == torch.int32)


def padded(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix``ᵀ (n × k from k × n) as a new row-major n × ld array, columns k..ld-1 zero."""
    k, n = matrix.shape
    ld = 16 * -(-k // 16)
    out = matrix.new_empty(n, ld)
    out[:, :k] = matrix.t()
    out[:, k:] = 0
    return out


def _check(code: int) -> None:
    if code != 0:
        raise RuntimeError("csr_simd: unsupported row stride (a multiple of 16, at most 64)")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def csr_mm(structure, values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W · B (rows × ld) for B padded (cols × ld, ``padded``)."""
    c = b.new_empty(structure.rows, b.shape[1])
    _check(LIBRARY.get().fedmpi_csr_mm(structure.rows, b.shape[1], _ptr(structure.crow), _ptr(structure.col),
                              _ptr(values.contiguous()), _ptr(b), _ptr(c)))
    return c


def csr_t_mm(structure, values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Wᵀ · A (cols × ld) for A padded (rows × ld): no permuted copy of W's values."""
    c = a.new_empty(structure.cols, a.shape[1])
    _check(LIBRARY.get().fedmpi_csr_t_mm(structure.rows, structure.cols, a.shape[1], _ptr(structure.crow),
                                _ptr(structure.col), _ptr(values.contiguous()), _ptr(a), _ptr(c)))
    return c


def sddmm(structure, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A Bᵀ) at the active positions, CSR order, for A (rows × ld) and B (cols × ld) padded."""
    out = a.new_empty(structure.nnz)
    _check(LIBRARY.get().fedmpi_sddmm(structure.rows, a.shape[1], _ptr(structure.crow), _ptr(structure.col),
                             _ptr(a), _ptr(b), _ptr(out)))
    return out
