"""The one compiled part of fedmpi: the AVX-512 CSR kernels (fedmpi/sparse_kernels/csr_simd.c),
a plain C library that fedmpi loads with ctypes. Optional: where it cannot be built (no C
compiler), the install goes on and the MKL paths run (fedmpi/sparse_kernels/simd.py)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("fedmpi.sparse_kernels._csr_simd", ["fedmpi/sparse_kernels/csr_simd.c"],
                             extra_compile_args=["-O3"], optional=True)])
