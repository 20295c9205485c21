"""fedmpi's optional compiled parts: plain C libraries that setup.py builds as extensions where a C
compiler is (``fedmpi/sparse_kernels/csr_simd.c``, ``fedmpi/aggregation/grid_pass.c``) and that
fedmpi loads with ctypes (they hold no Python API). Each has a pure torch/numpy path beside it with
the same results, so a failed build costs speed only."""
from __future__ import annotations

import ctypes
import importlib.util
import os

DISABLE = "FEDMPI_NATIVE"   # FEDMPI_NATIVE=0: load none of them (to compare paths)


def load(module: str, disable: str | None = None):
    """(the library of extension ``module`` as a ctypes.CDLL, None) or (None, why not). ``disable``:
    another environment variable that turns this one off when it is 0."""
    for variable in (DISABLE, disable):
        if variable and os.environ.get(variable, "1") == "0":
            return None, f"{variable}=0"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None, (f"the extension {module} is not built (pip install builds it where a C compiler is; "
                      f"its output says why it did not)")
    return ctypes.CDLL(spec.origin), None
