"""The parameters of a masking deployment: threshold, neighbourhoods, ring and clip range."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securefed.crypto.fixedpoint import FixedPointCodec
from securefed.crypto.graph import effective_degree
from securefed.crypto.messages import SERVER_ID
from securefed.errors import ConfigError

__all__ = ["SecAggConfig", "default_threshold", "is_int", "masking_keystream_bytes"]

_ROUNDING_BYTES_PER_WORD = 8


def default_threshold(*, neighbourhood_size: int) -> int:
    """min(m, floor(2m/3) + 1) for a closed neighbourhood of m sites."""
    return min(neighbourhood_size, 2 * neighbourhood_size // 3 + 1)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of one secure-aggregation deployment, validated on construction.

    Attributes:
        n_clients: Number of sites invited to a round (>= 2); it bounds the fixed-point
            head-room. A round may run with fewer sites, down to ``threshold``.
        threshold: t, holders of a site's shares that must answer to unmask it; counted within
            its closed neighbourhood (see the module docstring). None: min(m, floor(2m/3) + 1).
            Resolved to an int on construction.
        neighbors: SecAgg+ degree k (>= 2), or None for the complete graph (classic SecAgg).
        ring_bits: k, 8 to 64: the ring Z_(2^k) of masked values (held in uint32 words for
            k <= 32, else uint64; k bits a value on the wire).
        clip_range: Largest magnitude accepted per coordinate; larger values are clipped and
            counted.
        frac_bits: Fixed-point fractional bits; None derives the largest safe value (resolved
            on construction).

    """

    n_clients: int
    threshold: int | None = None
    neighbors: int | None = None
    ring_bits: int = 64
    clip_range: float = 1e6
    frac_bits: int | None = None
    codec: FixedPointCodec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not is_int(self.n_clients) or not 2 <= self.n_clients < SERVER_ID:
            raise ConfigError(
                f"`n_clients` must be an integer of at least 2 (got {self.n_clients!r}); "
                "secure aggregation of one site would reveal its input."
            )
        if self.neighbors is not None and (not is_int(self.neighbors) or self.neighbors < 2):
            raise ConfigError(
                f"`neighbors` must be None (complete graph) or an integer >= 2 "
                f"(got {self.neighbors!r})."
            )
        m = self.neighbourhood_size
        if self.threshold is None:
            object.__setattr__(self, "threshold", default_threshold(neighbourhood_size=m))
        t = self.threshold
        if not is_int(t):
            raise ConfigError(f"`threshold` must be an integer (got {t!r}).")
        if t > m:
            where = "sites" if self.is_complete else f"sites in a neighbourhood ({self.degree}+1)"
            raise ConfigError(f"`threshold` must be at most the number of {where} (got {t} > {m}).")
        if 2 * t <= m:
            raise ConfigError(
                f"`threshold` must be a strict majority of the {m} share holders "
                f"(got {t}, need at least {m // 2 + 1})."
            )
        codec = FixedPointCodec(
            ring_bits=self.ring_bits,
            clip_range=self.clip_range,
            n_summands=self.n_clients,
            frac_bits=self.frac_bits,
        )
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "frac_bits", codec.frac_bits)
        object.__setattr__(self, "clip_range", codec.clip_range)

    @property
    def degree(self) -> int:
        """Neighbours per site when all ``n_clients`` advertise keys."""
        return effective_degree(n_sites=self.n_clients, neighbors=self.neighbors)

    @property
    def neighbourhood_size(self) -> int:
        """Return m = degree + 1, the holders of each site's shares (itself included)."""
        return self.degree + 1

    @property
    def is_complete(self) -> bool:
        """Whether every site masks with every other (classic SecAgg)."""
        return self.degree == self.n_clients - 1

    @property
    def protocol(self) -> str:
        """``"SecAgg"`` (complete graph) or ``"SecAgg+"``."""
        return "SecAgg" if self.is_complete else "SecAgg+"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the privacy report."""
        reference = "Bonawitz et al. 2017, CCS"
        if not self.is_complete:
            reference = "Bell et al. 2020, CCS (on Bonawitz et al. 2017)"
        return {
            "protocol": self.protocol,
            "reference": reference,
            "threat_model": "honest-but-curious server and sites; up to m - t dropouts per "
            "neighbourhood",
            "n_clients": self.n_clients,
            "threshold": self.threshold,
            "neighbors": self.neighbors,
            "degree": self.degree,
            "neighbourhood_size": self.neighbourhood_size,
            "max_dropouts_per_neighbourhood": self.neighbourhood_size - self.threshold,
            **self.codec.describe(),
            "key_agreement": "X25519",
            "kdf": "HKDF-SHA256 (info bound to purpose, round, party ids)",
            "prg": "AES-256-CTR",
            "share_encryption": "AES-256-GCM",
            "secret_sharing": "Shamir over GF(2^521 - 1)",
        }


def masking_keystream_bytes(*, config: SecAggConfig, dim: int) -> int:
    """AES-CTR keystream bytes one site generates to encode and mask a ``dim`` vector.

    That is (1 + degree) masks of ``dim`` words (self mask plus one per neighbour) plus
    8 bytes of stochastic-rounding coins per coordinate. A benchmark can time raw
    :func:`securefed.crypto.prg.keystream` for this many bytes and compare.
    """
    if not is_int(dim) or dim < 0:
        raise ConfigError(f"`dim` must be a non-negative integer (got {dim!r}).")
    # Masks are generated a whole word at a time (uint32 or uint64), whatever k is.
    word_bytes = config.codec.dtype.itemsize
    return (1 + config.degree) * dim * word_bytes + dim * _ROUNDING_BYTES_PER_WORD
