"""Communication: payload encoding (codec) and the MPI transport. No other module calls MPI."""
from .codec import (BITMAP, DENSE, INDEX, VALUES, WIRE_DTYPES, Encoded, LayoutRow, decode, encode, index_dtype,
                    mask_bytes)

__all__ = ["BITMAP", "DENSE", "INDEX", "VALUES", "WIRE_DTYPES", "Encoded", "LayoutRow", "decode", "encode",
           "index_dtype", "mask_bytes"]
