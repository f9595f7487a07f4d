"""Secure aggregation of flat numeric vectors: pairwise masking (SecAgg/SecAgg+) primitives.

Imports no torch and no TenSEAL; CKKS lives in ``securefed.crypto.ckks`` and is imported only
where it is used.
"""

from securefed.crypto.fixedpoint import FixedPointCodec
from securefed.crypto.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggResult,
    SecAggServer,
    default_threshold,
    masking_keystream_bytes,
)

__all__ = [
    "FixedPointCodec",
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "default_threshold",
    "masking_keystream_bytes",
]
