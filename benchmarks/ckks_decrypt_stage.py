"""The CKKS key holder's decrypt stage at 3 sites: signed contributions against the former way.

Today the key holder parses the signed contribution list, checks each site's signature, adds
the ciphertexts itself and decrypts the sum (flooded); the former key holder decrypted one
aggregate the server made. Prints, per vector length, the best of two runs of each and the
bytes the key holder downloads.

Usage::

    PYTHONPATH=. python benchmarks/ckks_decrypt_stage.py 56325 1000001
"""

from __future__ import annotations

import sys
import time

import numpy as np

from securefed.crypto.ckks import (
    CKKSAggregator,
    CKKSDecryptor,
    CKKSEncryptor,
    CKKSKeySet,
    CKKSParams,
    generate_keys,
)
from securefed.protocol.harness import he_sum

SITES = 3


def measure(dim: int, keys: CKKSKeySet, repeats: int = 2) -> str:
    """One line of figures for vectors of ``dim`` values at :data:`SITES` sites."""
    rng = np.random.default_rng(0)
    inputs = {s: rng.normal(scale=0.1, size=dim) for s in range(SITES)}
    signed, former = [], []
    for _ in range(repeats):
        result = he_sum(inputs, keys=keys, round_index=1)
        signed.append(result.decrypt_seconds)
        enc = CKKSEncryptor(keys.public_context)
        agg = CKKSAggregator(keys.public_context, round_index=1)
        for s, v in inputs.items():
            agg.add(enc.encrypt(v, site_id=s, round_index=1), site_id=s)
        blob = agg.aggregate()
        start = time.perf_counter()
        CKKSDecryptor(keys.secret_context, min_contributors=2, max_contributors=SITES).decrypt(
            blob, round_index=1
        )
        former.append(time.perf_counter() - start)
    return (
        f"dim {dim}: decrypt stage {min(signed):.3f} s, downloads "
        f"{result.aggregate_bytes / 1e6:.2f} MB ({SITES} frames of "
        f"{result.bytes_per_client[0] / 1e6:.2f} MB); former {min(former):.3f} s, "
        f"{len(blob) / 1e6:.2f} MB"
    )


def main(argv: list[str]) -> None:
    """Measure each vector length given on the command line (default: 56325 and 1000001)."""
    keys = generate_keys(params=CKKSParams())
    for dim in [int(float(a)) for a in argv] or [56325, 1_000_001]:
        print(measure(dim, keys), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
