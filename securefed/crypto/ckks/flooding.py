"""Noise flooding for CKKS decryption: what the key holder adds before it releases a sum.

CKKS decryption is approximate: the decrypted value is the message plus an error that is a
linear function of the secret key. Releasing it lets anyone who knows the ciphertext solve for
the key (Li and Micciancio, "On the Security of Homomorphic Encryption on Approximate Numbers",
Eurocrypt 2021: the IND-CPA^D attack; ``tests/crypto/test_ckks_key_recovery.py`` runs it
against TenSEAL in a fraction of a second). The published countermeasure is to flood the error
with Gaussian noise before releasing (Li, Micciancio, Schultz, Sorrell, "Securing Approximate
Homomorphic Encryption Using Differential Privacy", CRYPTO 2022, Theorem 1 and section 5):
with a per-coordinate error bound ``t`` and ``alpha`` decryption queries under one key, noise of
standard deviation

    sigma = sqrt(24 * N * alpha) * 2**(s / 2) * t

gives ``s`` bits of statistical security against key recovery.

Where the noise goes. It is added *exactly*, to the integer plaintext polynomial: the key holder
encodes ``N/2`` real Gaussian slot values at the ciphertext's scale (SEAL rounds them to an
integer polynomial) and adds that plaintext to the ciphertext (``add_plain``, exact modular
arithmetic) before decrypting. Because the plaintext has integer coefficients, the result is
``round(pt + G)`` for a continuous Gaussian ``G`` in the released (real-slot) subspace; SEAL's
float64 decoding and the final rounding to a grid below ``sigma`` are post-processing. Adding
the noise to the float64 output instead would not do: the float decoding error depends on the
secret error in ways no ``t`` bounds. LMSS analyse a discrete Gaussian; with ``sigma`` around
2^60 and more in coefficient units at the defaults, a rounded Gaussian is as good.

The bound ``t`` (value units, i.e. divided by the scale) is the CKKS paper's fresh-encryption
bound (Cheon, Kim, Kim, Song 2017, Lemma 1, ``B_clean``) adapted to SEAL's uniform ternary
secret and ephemeral key (Hamming weight up to ``N``, density 2/3), plus the encoding rounding
(at most ``N/2`` in the canonical embedding), times the number of summed encryptions.
``tests/crypto/test_ckks.py`` checks measured errors against it.
"""

from __future__ import annotations

import math
import os

import numpy as np

from securefed.crypto.prg import KeystreamPRG
from securefed.errors import ConfigError

__all__ = [
    "DECRYPTION_BUDGET",
    "ERROR_STDDEV",
    "PRECISION_BOUND",
    "SECURITY_BITS",
    "error_bound",
    "flooding_sigma",
    "fresh_error_bound",
    "gaussian",
    "precision",
    "quantum",
]

#: Statistical security (bits) of the flooding against key recovery (LMSS's ``s``).
SECURITY_BITS = 40
#: Ciphertext decryptions one key set serves (LMSS's ``alpha``), over all key holders. Each
#: decrypting site counts its own decryptions and refuses more than its share
#: (``DECRYPTION_BUDGET // n_sites``). At one decryption per 4096-value chunk per round, a
#: 1e6-parameter model (245 chunks) would need 17 million rounds to spend it.
DECRYPTION_BUDGET = 2**32
#: SEAL's standard deviation of the encryption error (``noise_standard_deviation``).
ERROR_STDDEV = 3.2
#: Documented worst absolute error per coordinate of a decrypted sum (value units) that the
#: flooding may cause; parameters for which :func:`precision` exceeds it are refused.
PRECISION_BOUND = 1e-6
#: Flooding draws beyond this many standard deviations have probability below 2^-49 each.
_TAIL = 8.0


def fresh_error_bound(poly_modulus_degree: int) -> float:
    """High-probability bound on one fresh encryption's error, in coefficient units.

    CKKS paper, Lemma 1: ``B_clean = 8 sqrt(2) sigma N + 6 sigma sqrt(N) + 16 sigma sqrt(h N)``
    for an ephemeral key of density 1/2 and a secret of Hamming weight ``h``. SEAL draws both
    uniform ternary (density 2/3, so the first term grows by sqrt(4/3)) and ``h`` may reach
    ``N``. The encoding's rounding adds at most ``N/2`` per slot.

    Args:
        poly_modulus_degree: The ring degree ``N``.

    Returns:
        The bound per slot (canonical embedding infinity norm), before dividing by the scale.

    """
    n = float(poly_modulus_degree)
    s = ERROR_STDDEV
    clean = 8.0 * math.sqrt(2.0) * s * n * math.sqrt(4.0 / 3.0) + 6.0 * s * math.sqrt(n)
    clean += 16.0 * s * n
    return clean + n / 2.0


def error_bound(*, poly_modulus_degree: int, scale_bits: int, contributors: int) -> float:
    """``t``: the error bound of a sum of ``contributors`` fresh encryptions, in value units."""
    if contributors < 1:
        raise ConfigError(f"`contributors` must be at least 1 (got {contributors}).")
    return contributors * math.ldexp(fresh_error_bound(poly_modulus_degree), -scale_bits)


def flooding_sigma(
    *,
    poly_modulus_degree: int,
    scale_bits: int,
    contributors: int,
    queries: int = DECRYPTION_BUDGET,
    security_bits: int = SECURITY_BITS,
) -> float:
    """LMSS's ``sigma = sqrt(24 N alpha) 2^(s/2) t`` in value units.

    Args:
        poly_modulus_degree: The ring degree ``N``.
        scale_bits: The encoding scale's bits (``t`` is in units of ``2**-scale_bits``).
        contributors: Fresh encryptions in the decrypted sum (``t`` grows linearly with it).
        queries: Decryptions under the key over its lifetime (``alpha``).
        security_bits: Statistical security ``s``.

    Returns:
        The standard deviation of the flooding noise per released coordinate.

    """
    if queries < 1 or security_bits < 1:
        raise ConfigError(
            f"`queries` and `security_bits` must be positive (got {queries}, {security_bits})."
        )
    t = error_bound(
        poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits, contributors=contributors
    )
    return math.sqrt(24.0 * poly_modulus_degree * queries) * 2.0 ** (security_bits / 2) * t


def quantum(sigma: float) -> float:
    """The grid released values are rounded to: the largest power of two at most ``sigma``."""
    return math.ldexp(1.0, math.floor(math.log2(sigma)))


def precision(*, poly_modulus_degree: int, scale_bits: int, contributors: int) -> float:
    """Worst absolute error per coordinate of a released sum, except with probability 2^-49.

    ``8 sigma`` (the flooding's tail) + ``sigma / 2`` (rounding to :func:`quantum`) + ``t``
    (the CKKS error itself). SEAL's float64 decoding adds a relative error near 1e-15 of the
    sum's magnitude on top.
    """
    sigma = flooding_sigma(
        poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits, contributors=contributors
    )
    t = error_bound(
        poly_modulus_degree=poly_modulus_degree, scale_bits=scale_bits, contributors=contributors
    )
    return (_TAIL + 0.5) * sigma + t


def gaussian(count: int) -> np.ndarray:
    """``count`` standard normal draws from the OS CSPRNG (never from ``--seed``).

    Box-Muller over 53-bit uniforms from an AES-256-CTR keystream under a fresh ``os.urandom``
    key. The released values are rounded to a grid at most ``sigma`` wide afterwards, so the
    floating-point artefacts of the sampler (Mironov 2012) do not survive to the output.
    """
    if count < 0:
        raise ConfigError(f"`count` must be non-negative (got {count}).")
    pairs = (count + 1) // 2
    words = np.frombuffer(KeystreamPRG(os.urandom(32)).read(16 * pairs), dtype="<u8")
    uniform = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1 = 1.0 - uniform[:pairs]  # in (0, 1]: log is finite
    u2 = uniform[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    out = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))
    return out[:count]
