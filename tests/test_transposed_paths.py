"""bench/transposed_paths.py: every input-gradient path it times, MKL's own transposed products
through ctypes and csr_simd.c's (where built) included, computes gy · W (checked against the dense product on an odd shape)."""
from __future__ import annotations


import pytest
import torch

from helpers import load_bench_script

from fedmpi.sparse_kernels import SparseStructure


transposed_paths = load_bench_script("transposed_paths")


def test_every_path_is_the_dense_product():
    g = torch.Generator().manual_seed(3)
    rows, cols, batch = 37, 53, 5          # batch ≠ rows ≠ cols: a wrong leading dimension shows
    s = SparseStructure(torch.rand(rows, cols, generator=g) < 0.3)
    values = torch.randn(s.nnz, generator=g)
    dense = torch.zeros(rows * cols).index_copy_(0, s.flat, values).view(rows, cols)
    gy, x = torch.randn(batch, rows, generator=g), torch.randn(batch, cols, generator=g)
    calls = transposed_paths.paths(s, values, gy, x, transposed_paths.mkl_library())
    for name, call in calls.items():
        if name in ("permutation", "product"):
            continue
        want = x @ dense.t() if name.endswith("forward") else gy @ dense
        torch.testing.assert_close(call(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_the_mkl_rows_run_where_torch_exports_mkl():
    lib = transposed_paths.mkl_library()
    if lib is None:
        pytest.skip("this torch build exports no MKL sparse BLAS (bench/transposed_paths.py leaves the rows out)")
    s = SparseStructure(torch.eye(4, dtype=torch.bool))
    gy = torch.arange(8.0).view(2, 4)
    for layout in (transposed_paths.ROW_MAJOR, transposed_paths.COLUMN_MAJOR):
        assert torch.equal(transposed_paths.mkl_transposed(lib, s, torch.full((4,), 2.0), gy, layout), 2 * gy)
