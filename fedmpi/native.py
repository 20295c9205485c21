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
    try:
        return ctypes.CDLL(spec.origin), None
    except OSError as exc:    # e.g. built for another machine on a shared file system: the torch/numpy path runs
        return None, f"the extension {module} does not load here: {exc}"


class Library:
    """One compiled part, loaded at its first use (``get``), not at import: a library loaded before
    MPI_Init has made MPICH's PMI-2 start-up under srun fail (tests/test_two_node_slurm.py), and
    ``fedmpi run`` imports the engine before it initialises MPI.

    ``functions``: name → (argtypes, restype) to declare; ``usable(lib)``: None, or why the loaded
    library must not run here. ``why`` says why ``get`` gave None, once it has looked."""

    def __init__(self, module: str, functions: dict, *, disable: str | None = None, usable=None):
        self.module, self.functions, self.disable, self.usable = module, functions, disable, usable
        self.loaded = None      # None: not looked yet; False: not usable; else the CDLL
        self.why: str | None = None

    def get(self):
        """The library, or None where it is not usable."""
        if self.loaded is None:
            lib, self.why = load(self.module, self.disable)
            if lib is not None:
                for name, (argtypes, restype) in self.functions.items():
                    getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
                self.why = self.usable(lib) if self.usable else None
            self.loaded = lib if lib is not None and self.why is None else False
        return self.loaded or None


def pointers(arrays) -> ctypes.Array:
    """A C array of the data pointers of ``arrays`` (numpy arrays the caller keeps alive)."""
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
