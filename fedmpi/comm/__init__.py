"""Communication: payload encoding (codec) and the MPI transport. No other module calls MPI."""
from .codec import (BITMAP, DENSE, INDEX, VALUES, Encoded, ModelUpdate, decode, encode,
                    expected_payload_bytes, index_dtype, mask_bytes)

__all__ = ["BITMAP", "DENSE", "INDEX", "VALUES", "Encoded", "ModelUpdate", "decode", "encode",
           "expected_payload_bytes", "index_dtype", "mask_bytes"]
