"""Shamir t-of-n secret sharing over the Mersenne prime field GF(2^521 - 1).

Why this field: 2^521 - 1 is prime (a Mersenne prime), so a whole 32-byte secret (a self-mask
seed or an X25519 private key) is one field element: no chunking, one polynomial per secret.
A share is one field element, 66 bytes little-endian. The x-coordinate of a site's share is
``site_id + 1`` (never 0, where the secret lives). Coefficients are drawn with
``secrets.randbelow``, so any t - 1 shares are uniformly distributed and independent of the
secret (perfect secrecy); interpolating them gives a uniformly random field element, which is
almost never below 2^256, hence :func:`combine` with too few shares fails its range check
rather than returning a wrong secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from securefed.errors import ConfigError, IntegrityError

__all__ = [
    "MAX_SECRET_BYTES",
    "PRIME",
    "SHARE_BYTES",
    "Share",
    "combine",
    "interpolate_at_zero",
    "split",
]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
MAX_SECRET_BYTES = 64


@dataclass(frozen=True)
class Share:
    """One point (index, value) of a sharing polynomial.

    Attributes:
        index: The x-coordinate, 1 <= index < PRIME.
        value: The y-coordinate, 0 <= value < PRIME.

    """

    index: int
    value: int

    def __post_init__(self) -> None:
        if not 0 < self.index < PRIME:
            raise IntegrityError(
                f"Shamir share `index` must be in [1, 2^521 - 1) (got {self.index})."
            )
        if not 0 <= self.value < PRIME:
            raise IntegrityError("Shamir share `value` is not a field element (>= 2^521 - 1).")

    def to_bytes(self) -> bytes:
        """Return the value as ``SHARE_BYTES`` little-endian bytes (the index travels apart)."""
        return self.value.to_bytes(SHARE_BYTES, "little")

    @classmethod
    def from_bytes(cls, *, index: int, data: bytes) -> Share:
        """Parse a share value of exactly ``SHARE_BYTES`` bytes.

        Raises:
            IntegrityError: On a wrong length or a value outside the field.

        """
        if len(data) != SHARE_BYTES:
            raise IntegrityError(f"Shamir share must be {SHARE_BYTES} bytes (got {len(data)}).")
        return cls(index=index, value=int.from_bytes(data, "little"))


def split(*, secret: bytes, threshold: int, indices: Sequence[int]) -> Mapping[int, Share]:
    """Share ``secret`` so that any ``threshold`` of the shares recover it.

    Args:
        secret: At most 64 bytes.
        threshold: t, the number of shares needed (1 <= t <= len(indices)).
        indices: Distinct x-coordinates (>= 1), one per share holder.

    Returns:
        Mapping index -> share.

    Raises:
        ConfigError: On an invalid threshold, index set or secret size.

    """
    if len(secret) > MAX_SECRET_BYTES:
        raise ConfigError(
            f"Shamir `secret` must be at most {MAX_SECRET_BYTES} bytes (got {len(secret)})."
        )
    if len(set(indices)) != len(indices):
        raise ConfigError("Shamir `indices` must be distinct.")
    if any(not 0 < i < PRIME for i in indices):
        raise ConfigError("Shamir `indices` must be in [1, 2^521 - 1).")
    if not 1 <= threshold <= len(indices):
        raise ConfigError(
            f"Shamir `threshold` must be in [1, {len(indices)}] for {len(indices)} shares "
            f"(got {threshold})."
        )
    coefficients = [int.from_bytes(secret, "little")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in indices:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = Share(index=x, value=y)
    return shares


def interpolate_at_zero(shares: Sequence[Share]) -> int:
    """Lagrange-interpolate the polynomial through ``shares`` at x = 0.

    With at least t shares of a degree t - 1 polynomial this is the secret; with fewer it is a
    uniformly random field element.

    Raises:
        IntegrityError: If no shares are given or two shares have the same index.

    """
    if not shares:
        raise IntegrityError("cannot interpolate from zero Shamir shares.")
    xs = [s.index for s in shares]
    if len(set(xs)) != len(xs):
        raise IntegrityError("Shamir shares with duplicate indices cannot be combined.")
    total = 0
    for i, share in enumerate(shares):
        numerator, denominator = 1, 1
        for j, x in enumerate(xs):
            if j != i:
                numerator = numerator * x % PRIME
                denominator = denominator * (x - share.index) % PRIME
        total = (total + share.value * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def combine(*, shares: Sequence[Share], secret_bytes: int) -> bytes:
    """Recover a ``secret_bytes``-byte secret from at least t shares.

    Args:
        shares: At least t distinct shares (all of them are interpolated; pass exactly t to
            save time).
        secret_bytes: Length of the original secret.

    Returns:
        The secret.

    Raises:
        IntegrityError: If the interpolated value does not fit ``secret_bytes`` bytes (too
            few shares, or shares from different polynomials or corrupted).

    """
    value = interpolate_at_zero(shares)
    if value >= 1 << (8 * secret_bytes):
        raise IntegrityError(
            f"Shamir reconstruction from {len(shares)} shares is not a {secret_bytes}-byte "
            "secret: too few shares, or shares corrupted or from different sharings."
        )
    return value.to_bytes(secret_bytes, "little")
