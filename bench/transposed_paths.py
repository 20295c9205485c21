"""The input gradient of a sparse Linear layer, ``gx = gy · W`` (gy: batch × out, W: out × in at
the layer's mask), by every path torch and its MKL offer on the CPU and by fedmpi's AVX-512
kernel, timed side by side: which path the sparse kernels (fedmpi/sparse_kernels/kernels.py) take.

- ``simd transposed`` (the kernels' path where fedmpi/sparse_kernels/simd.py is usable):
  csr_simd.c's ``Wᵀ · gyᵀ`` straight from W's CSR (no permuted copy), gyᵀ padded to 32 columns
  (the copy included);
- ``permuted`` (the kernels' path elsewhere): the values permuted into Wᵀ's CSR order (``csr_t``,
  one ``index_select`` into a buffer kept between calls), then ``Wᵀ_csr · gyᵀ`` through MKL; also
  each half alone (``permutation``, ``product``);
- ``dense @ csr``: ``torch.mm(gy, W_csr)``;
- ``csc``: ``W_csr.t()``, a CSC tensor, ``@ gyᵀ``;
- ``mkl transposed``: MKL's own transposed product, ``mkl_sparse_s_mm`` with
  ``SPARSE_OPERATION_TRANSPOSE`` on W's CSR, row-major and column-major dense operands, called
  through the MKL symbols libtorch_cpu exports (left out, and said so, where it exports none);
- for scale, the forward product ``W_csr · xᵀ``: MKL's (``forward``) and csr_simd.c's
  (``simd forward``, xᵀ's padded copy included).

fc1 of the FEMNIST CNN (3136 → 2048) at batch 20, random masks of density 0.05, 0.1 and 0.2.
Every path's result is checked against the dense product first. Timing as bench/interleaved.py
(the thread's CPU time, one torch thread, rotated order); median ms over repeats.

    OMP_NUM_THREADS=1 python bench/transposed_paths.py [--repeats 7] [--min-time 0.05] [--json FILE] [--force]
"""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]   # fedmpi; interleaved.py
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fedmpi.sparse_kernels import SparseStructure, simd  # noqa: E402
from interleaved import arguments, time_cases, write_json  # noqa: E402

ROWS, COLS, BATCH = 2048, 3136, 20
DENSITIES = (0.05, 0.1, 0.2)
# mkl_spblas.h: SPARSE_INDEX_BASE_ZERO, SPARSE_OPERATION_TRANSPOSE, SPARSE_MATRIX_TYPE_GENERAL,
# SPARSE_FILL_MODE_LOWER (ignored for general), SPARSE_DIAG_NON_UNIT, the two dense layouts
BASE_ZERO, TRANSPOSE, GENERAL, FILL_LOWER, DIAG_NON_UNIT = 0, 11, 20, 40, 50
ROW_MAJOR, COLUMN_MAJOR = 101, 102


class _Descr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("mode", ctypes.c_int), ("diag", ctypes.c_int)]


def mkl_library():
    """libtorch_cpu with MKL's sparse BLAS (32-bit indices), or None where it exports none."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        create, mm, destroy = lib.mkl_sparse_s_create_csr, lib.mkl_sparse_s_mm, lib.mkl_sparse_destroy
    except (OSError, AttributeError):
        return None
    ptr = ctypes.c_void_p
    create.argtypes = [ctypes.POINTER(ptr), ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr]
    mm.argtypes = [ctypes.c_int, ctypes.c_float, ptr, _Descr, ctypes.c_int, ptr, ctypes.c_int, ctypes.c_int,
                   ctypes.c_float, ptr, ctypes.c_int]
    destroy.argtypes = [ptr]
    return lib


def mkl_transposed(lib, s: SparseStructure, values: torch.Tensor, gy: torch.Tensor, layout: int) -> torch.Tensor:
    """gy · W by MKL's transposed product on W's CSR (a handle over the arrays, no copy)."""
    handle = ctypes.c_void_p()
    status = lib.mkl_sparse_s_create_csr(ctypes.byref(handle), BASE_ZERO, s.rows, s.cols, s.crow.data_ptr(),
                                         s.crow.data_ptr() + s.crow.element_size(), s.col.data_ptr(),
                                         values.data_ptr())
    if status:
        raise RuntimeError(f"mkl_sparse_s_create_csr: status {status}")
    descr = _Descr(GENERAL, FILL_LOWER, DIAG_NON_UNIT)
    batch = gy.shape[0]
    try:
        if layout == ROW_MAJOR:     # (Wᵀ · gyᵀ): gyᵀ out × batch row-major, result in × batch
            operand, out = gy.t().contiguous(), torch.empty(s.cols, batch)
            status = lib.mkl_sparse_s_mm(TRANSPOSE, 1.0, handle, descr, ROW_MAJOR, operand.data_ptr(), batch, batch,
                                         0.0, out.data_ptr(), batch)
            out = out.t()
        else:                       # gy row-major is gyᵀ column-major with leading dimension out
            operand, out = gy, torch.empty(batch, s.cols)
            status = lib.mkl_sparse_s_mm(TRANSPOSE, 1.0, handle, descr, COLUMN_MAJOR, operand.data_ptr(), batch,
                                         s.rows, 0.0, out.data_ptr(), s.cols)
    finally:
        lib.mkl_sparse_destroy(handle)
    if status:
        raise RuntimeError(f"mkl_sparse_s_mm: status {status}")
    return out


def paths(s: SparseStructure, values: torch.Tensor, gy: torch.Tensor, x: torch.Tensor, lib) -> dict:
    csr = s.csr(values)
    calls = {
        "permuted": lambda: torch.sparse.mm(s.csr_t(values), gy.t().contiguous()).t(),
        "permutation": lambda out=torch.empty_like(values): torch.index_select(values, 0, s.perm_t, out=out),
        "product": lambda t=s.csr_t(values), g=gy.t().contiguous(): torch.sparse.mm(t, g).t(),
        "dense @ csr": lambda: torch.mm(gy, csr),
        "csc": lambda: (csr.t() @ gy.t().contiguous()).t(),
        "forward": lambda: torch.sparse.mm(csr, x.t().contiguous()).t(),
    }
    if simd.available() and s.crow.dtype == torch.int32:
        calls["simd transposed"] = lambda: simd.csr_t_mm(s, values, simd.padded(gy))[:, :len(gy)].t()
        calls["simd forward"] = lambda: simd.csr_mm(s, values, simd.padded(x))[:, :len(x)].t()
    if lib is not None and s.crow.dtype == torch.int32:
        calls["mkl transposed, row-major"] = lambda: mkl_transposed(lib, s, values, gy, ROW_MAJOR)
        calls["mkl transposed, column-major"] = lambda: mkl_transposed(lib, s, values, gy, COLUMN_MAJOR)
    return calls


def check(calls: dict, dense: torch.Tensor, gy: torch.Tensor, x: torch.Tensor) -> None:
    """Every product path against the dense products (float32 sums of ≤ 3136 terms)."""
    want = {"forward": x @ dense.t(), "simd forward": x @ dense.t()}
    for name, call in calls.items():
        if name in ("permutation", "product"):
            continue
        got, expected = call(), want.get(name, gy @ dense)
        error = float((got - expected).abs().max())
        if error > 1e-3:
            raise AssertionError(f"{name}: max error {error} against the dense product")


def main(argv=None) -> int:
    args = arguments(__doc__, "transposed_paths.py", argv)
    if args == 2:
        return 2
    lib = mkl_library()
    if lib is None:
        print("transposed_paths.py: libtorch_cpu exports no MKL sparse BLAS here; the MKL rows are left out",
              file=sys.stderr)
    if not simd.available():
        print(f"transposed_paths.py: the simd rows are left out ({simd.unavailable_because()})", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    gy, x = torch.randn(BATCH, ROWS, generator=generator), torch.randn(BATCH, COLS, generator=generator)
    steps = {}
    for density in DENSITIES:
        s = SparseStructure(torch.rand(ROWS, COLS, generator=generator) < density)
        values = torch.randn(s.nnz, generator=generator)
        dense = torch.zeros(ROWS * COLS).index_copy_(0, s.flat, values).view(ROWS, COLS)
        calls = paths(s, values, gy, x, lib)
        check(calls, dense, gy, x)
        steps.update({(density, name): call for name, call in calls.items()})
    times = time_cases(steps, args.repeats, args.min_time)
    names = list(dict.fromkeys(name for _, name in steps))
    print(f"fc1 {ROWS} × {COLS}, batch {BATCH}: ms per call, median of {args.repeats}")
    print(f"{'path':>30} " + " ".join(f"{'density ' + str(d):>13}" for d in DENSITIES))
    for name in names:
        print(f"{name:>30} " + " ".join(f"{statistics.median(times[d, name]) * 1e3:13.3f}" for d in DENSITIES))
    write_json(args.json, {"repeats": args.repeats, "rows": ROWS, "cols": COLS, "batch": BATCH,
                           "seconds": {f"{name} @ {d}": times[d, name] for d, name in steps}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
