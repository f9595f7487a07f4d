"""Plain TenSEAL on the same work: the baseline a benchmark prints beside the protocol's cost."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.ckks.framing import chunk_sizes
from securefed.crypto.ckks.params import CKKSParams, load_tenseal
from securefed.crypto.ckks.roles import as_vector
from securefed.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    pass

__all__ = ["raw_tenseal_reference"]


def raw_tenseal_reference(
    vector: np.ndarray,
    *,
    n_clients: int,
    params: CKKSParams | None = None,
    include_serialization: bool = False,
) -> float:
    """Time plain TenSEAL on the work :func:`he_sum` does, as the baseline for benchmarks.

    Each of ``n_clients`` clients encrypts ``vector`` chunk by chunk with the public
    ``ts.ckks_vector`` (same parameters and encryption type), the chunks are added across
    clients, and the sums decrypted. Key generation is not timed.

    Args:
        vector: Flat float64 vector every client encrypts.
        n_clients: Number of clients.
        params: CKKS parameters; defaults if None.
        include_serialization: Also serialize each client's ciphertexts, load them in a public
            context for the additions, and serialize/load the sum for decryption, i.e. plain
            TenSEAL with the same transport steps but none of this module's framing or checks.

    Returns:
        Wall-clock seconds.

    """
    if n_clients < 1:
        raise ConfigError(f"`n_clients` must be at least 1 (got {n_clients}).")
    params = CKKSParams() if params is None else params
    values = as_vector(vector, "`vector`")
    ts = load_tenseal()
    ctx = params._tenseal_context()
    public = None
    if include_serialization:
        public = ts.context_from(
            ctx.serialize(
                save_public_key=params.encryption == "asymmetric",
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            ),
            n_threads=1,
        )
    bounds = chunk_sizes(values.shape[0], params.slots)
    start = time.perf_counter()
    sums: list[Any] = [None] * len(bounds)
    for _ in range(n_clients):
        for i, (a, b) in enumerate(bounds):
            vec = ts.ckks_vector(ctx, values[a:b])
            if public is not None:
                vec = ts.ckks_vector_from(public, vec.serialize())
            if sums[i] is None:
                sums[i] = vec
            else:
                sums[i].add_(vec)
    out = np.empty(values.shape[0], dtype=np.float64)
    for (a, b), vec in zip(bounds, sums, strict=True):
        if public is not None:
            vec = ts.ckks_vector_from(ctx, vec.serialize())
        out[a:b] = vec.decrypt()
    return time.perf_counter() - start
