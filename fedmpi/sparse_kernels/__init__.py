"""Real sparse kernels for masked Linear and Conv2d layers (CPU, torch sparse CSR through MKL;
Linear layers' products in fedmpi's own AVX-512 C where ``simd.py`` finds them usable).

``kernels.py``: the index structure of a mask (``SparseStructure``) and the sparse autograd
kernels (``sparse_linear``, ``sparse_conv2d``, ``sparse_forward``), with their two weight forms,
"dense" and "active". ``swap.py``: ``SparseKernels`` swaps chosen modules' ``forward`` for the
duration of a ``with`` block (the trainer's ``sparse_layers`` option); ``SparseKernelPolicy``
decides which layers run sparse from their density and a profile's measured break-even densities.
Results equal the masked dense layer up to float rounding: the same products summed in another
order.
"""
from . import simd
from .kernels import (WEIGHT_GRAD_MODES, SparseStructure, sparse_conv2d, sparse_forward, sparse_linear,
                      supports)
from .swap import SparseKernelPolicy, SparseKernels, masked_weight_modules

__all__ = ["WEIGHT_GRAD_MODES", "SparseKernelPolicy", "SparseKernels", "SparseStructure", "masked_weight_modules",
           "simd", "sparse_conv2d", "sparse_forward", "sparse_linear", "supports"]
