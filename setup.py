"""fedmpi's compiled parts: plain C libraries that fedmpi loads with ctypes (fedmpi/native.py): the
AVX-512 CSR kernels (fedmpi/sparse_kernels/csr_simd.c) and the fixed-point sum's pass over the
uploads (fedmpi/aggregation/grid_pass.c). Optional: where they cannot be built (no C compiler),
the install goes on and the torch/numpy paths run, with the same results up to the rounding
docs/timing.md describes for the kernels (the sums are the same bits)."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("fedmpi.sparse_kernels._csr_simd", ["fedmpi/sparse_kernels/csr_simd.c"],
              extra_compile_args=["-O3"], optional=True),
    Extension("fedmpi.aggregation._grid_pass", ["fedmpi/aggregation/grid_pass.c"],
              extra_compile_args=["-O3"], optional=True),
])
