"""Fixed-point codec of float vectors into the ring Z_(2^k) with unbiased stochastic rounding."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securefed.crypto.prg import (
    RING_BITS_MAX,
    RING_BITS_MIN,
    KeystreamPRG,
    MaskStreams,
    chunk_bytes,
    scratch_buffer,
    word_dtype,
)
from securefed.errors import ConfigError, DataError

__all__ = [
    "AUTO_RING_TOLERANCE",
    "FLOAT_EXACT_BITS",
    "RING_CHOICES",
    "RING_RULE",
    "RING_RULE_CHOICES",
    "FixedPointCodec",
    "choose_ring_bits",
]

FLOAT_EXACT_BITS = 53
"""float64 represents every integer of magnitude <= 2^53 exactly."""

_TWO_MINUS_53 = math.ldexp(1.0, -53)

#: The rings ``--secagg-ring-bits auto`` considers, smallest first, by its rule
#: (``RunConfig.ring_auto_rule``): it picks the first that meets the tolerance. Rule 1 (runs
#: recorded before schema 3.12) had the 32- and 64-bit rings only; rule 2 has every ring from
#: 8 to 64 bits, packed k bits a value on the wire (:mod:`securefed.crypto.packing`).
RING_RULE_CHOICES = {1: (32, 64), 2: tuple(range(RING_BITS_MIN, RING_BITS_MAX + 1))}

#: The rule a new run's ``auto`` follows.
RING_RULE = 2

#: Rule 1's rings (before schema 3.12).
RING_CHOICES = RING_RULE_CHOICES[1]

#: ``--secagg-ring-bits auto``: the largest worst-case error per coordinate the ring's rounding
#: may add to the FedAvg average (the quantum, see :meth:`FixedPointCodec.error_bound`).
AUTO_RING_TOLERANCE = 1e-3


@dataclass(frozen=True)
class FixedPointCodec:
    """Encode floats in [-clip_range, clip_range] as integers mod 2^k, k = ``ring_bits``.

    Words are uint32 for k <= 32 and uint64 above (:func:`~securefed.crypto.prg.word_dtype`);
    an encoding is its integer's residue in the word, and only its low k bits matter: masks
    may be added in the word, and :meth:`decode` reduces mod 2^k before reading the sign.

    A value x is clipped to [-C, C] (C = ``clip_range``), scaled by 2^f (f = ``frac_bits``)
    and rounded stochastically to floor(x 2^f) or floor(x 2^f) + 1 with probabilities that
    make the encoding unbiased: E[enc(x)] = x 2^f (the up-probability is compared at 53-bit
    resolution, so the bias is below 2^-53 quantum). The rounding coins are AES-CTR keystream
    under a fresh ``os.urandom`` key, never a simulation seed.

    Overflow bound: one encoding has magnitude at most M = ceil(C 2^f). The codec guarantees
    ``n_summands * M <= 2^(k-1) - 1``, so the sum of up to ``n_summands`` encodings never wraps
    and its two's-complement reading is the true integer sum. When f is derived (``frac_bits``
    None) it is the largest f with ``n_summands * M <= min(2^(k-1) - 1, 2^53)``: the sum is then
    also exact in float64, so decoding a sum of n encodings is within n * quantum of the true
    sum with no further rounding.

    Attributes:
        ring_bits: k, from 8 to 64.
        clip_range: C > 0, the largest accepted magnitude per coordinate.
        n_summands: n, the most encodings that will be added together (the number of sites).
        frac_bits: f, fractional bits; None derives the largest safe value (resolved on init).

    """

    ring_bits: int = 64
    clip_range: float = 1e6
    n_summands: int = 2
    frac_bits: int | None = None
    _max_encoded: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        word_dtype(self.ring_bits)
        if isinstance(self.n_summands, bool) or not isinstance(self.n_summands, int):
            raise ConfigError(f"`n_summands` must be an integer (got {self.n_summands!r}).")
        if self.n_summands < 1:
            raise ConfigError(f"`n_summands` must be at least 1 (got {self.n_summands}).")
        clip = float(self.clip_range)
        if not math.isfinite(clip) or clip <= 0:
            raise ConfigError(f"`clip_range` must be a positive finite number (got {clip}).")
        object.__setattr__(self, "clip_range", clip)
        signed_max = (1 << (self.ring_bits - 1)) - 1
        n = self.n_summands
        if n * math.ceil(clip) > signed_max:
            raise ConfigError(
                f"`clip_range`={clip:g} summed over {n} sites does not fit a {self.ring_bits}-bit "
                f"ring even with 0 fractional bits (needs n * ceil(clip) <= 2^{self.ring_bits - 1}"
                " - 1); use a larger ring or a smaller clip range."
            )
        if self.frac_bits is None:
            bound = min(signed_max, 1 << FLOAT_EXACT_BITS)
            frac = next(
                (
                    f
                    for f in range(self.ring_bits - 2, -1, -1)
                    if n * _ceil_scaled(clip, f) <= bound
                ),
                None,
            )
            if frac is None:
                raise ConfigError(
                    f"`clip_range`={clip:g} summed over {n} sites exceeds 2^53, beyond exact "
                    "float64 decoding; pass `frac_bits`=0 explicitly or lower the clip range."
                )
            object.__setattr__(self, "frac_bits", frac)
        else:
            f = self.frac_bits
            if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= self.ring_bits - 2:
                raise ConfigError(
                    f"`frac_bits` must be an integer in [0, {self.ring_bits - 2}] (got {f!r})."
                )
            if n * _ceil_scaled(clip, f) > signed_max:
                best = max(g for g in range(f) if n * _ceil_scaled(clip, g) <= signed_max)
                raise ConfigError(
                    f"`frac_bits`={f} leaves no head-room for the sum of {n} values clipped to "
                    f"{clip:g} in a {self.ring_bits}-bit ring (at most {best})."
                )
        object.__setattr__(self, "_max_encoded", _ceil_scaled(clip, self.frac_bits))

    @property
    def quantum(self) -> float:
        """Value of one unit in the last fixed-point place, 2^-frac_bits."""
        return math.ldexp(1.0, -self.frac_bits)

    @property
    def dtype(self) -> np.dtype:
        """Word type of the ring (``<u4`` or ``<u8``)."""
        return word_dtype(self.ring_bits)

    @property
    def max_encoded(self) -> int:
        """Largest magnitude of one encoding, ceil(clip_range 2^frac_bits)."""
        return self._max_encoded

    @property
    def headroom_bits(self) -> int:
        """floor(log2((2^(k-1) - 1) / max_encoded)); at least floor(log2(n_summands))."""
        return (((1 << (self.ring_bits - 1)) - 1) // self._max_encoded).bit_length() - 1

    def encode(
        self, values: np.ndarray, *, masks: MaskStreams | None = None
    ) -> tuple[np.ndarray, int]:
        """Clip, scale and stochastically round ``values`` into ring words.

        Args:
            values: 1-D real vector.
            masks: Optional masks added to each encoded piece while it is still in cache;
                the result then equals masking the plain encoding afterwards.

        Returns:
            ``(words, clipped)``: a uint32/uint64 vector (two's complement mod 2^k) and the
            number of coordinates whose magnitude exceeded ``clip_range`` and were clipped.

        Raises:
            DataError: If ``values`` is not a 1-D real vector or holds NaN or infinity.

        """
        x = _as_real_vector(values)
        scale = math.ldexp(1.0, self.frac_bits)
        limit = self.clip_range * scale
        out = np.empty(x.size, dtype=self.dtype.newbyteorder("="))
        signed_out = out.view(np.int64) if out.itemsize == 8 else None
        coins = KeystreamPRG(os.urandom(32))
        coin_buf = scratch_buffer()
        chunk = chunk_bytes() // 8
        scaled_buf = np.empty(chunk)
        floor_buf = np.empty(chunk)
        uniform_buf = np.empty(chunk)
        flag_buf = np.empty(chunk, dtype=bool)
        int_buf = np.empty(chunk, dtype=np.int64)
        clipped = 0
        for start in range(0, x.size, chunk):
            stop = min(start + chunk, x.size)
            m = stop - start
            scaled = np.multiply(x[start:stop], scale, out=scaled_buf[:m])
            # NaN fails both comparisons, so non-finite values always take the slow path.
            if not (scaled.max() <= limit and scaled.min() >= -limit):
                finite = np.isfinite(scaled)
                if not finite.all():
                    bad = start + int(np.argmin(finite))
                    raise DataError(
                        f"`values` holds a non-finite number ({x[bad]}) at index {bad}; "
                        "refusing to encode it."
                    )
                clipped += int(np.count_nonzero(np.abs(scaled) > limit))
                np.clip(scaled, -limit, limit, out=scaled)
            low = np.floor(scaled, out=floor_buf[:m])
            scaled -= low
            # Coins u = j 2^-53 with j uniform on [0, 2^53) (exact in float64): round up iff
            # u < frac, which happens with probability frac up to 2^-53 (E[enc(x)] = x 2^f).
            raw = coins.read_into(coin_buf, 8 * m).view("<u8")
            np.right_shift(raw, 11, out=raw)
            uniform = np.multiply(raw, _TWO_MINUS_53, out=uniform_buf[:m])
            up = np.less(uniform, scaled, out=flag_buf[:m])
            if signed_out is not None:
                np.add(low, up, out=signed_out[start:stop], casting="unsafe")
            else:
                q = np.add(low, up, out=int_buf[:m], casting="unsafe")
                np.copyto(out[start:stop], q, casting="unsafe")
            if masks is not None:
                masks.apply(out[start:stop])
        return out, clipped

    def decode(self, words: np.ndarray) -> np.ndarray:
        """Read ring words (one encoding or a sum of up to n) back as floats.

        Args:
            words: 1-D vector of the ring's words (uint32 for k <= 32, else uint64); only
                their low k bits are read.

        Returns:
            float64 vector; for a sum of n encodings it is within n * quantum of the sum of
            the clipped inputs.

        Raises:
            DataError: If ``words`` has the wrong shape or word size.

        """
        if not isinstance(words, np.ndarray) or words.ndim != 1:
            raise DataError("`words` must be a 1-D numpy array of ring words.")
        size = self.dtype.itemsize
        if words.dtype.kind != "u" or words.dtype.itemsize != size:
            raise DataError(
                f"`words` must be uint{8 * size} for a {self.ring_bits}-bit ring "
                f"(got {words.dtype})."
            )
        native = words.astype(words.dtype.newbyteorder("="), copy=False)
        if self.ring_bits == 8 * size:
            signed = native.view(f"i{size}").astype(np.float64)
        else:
            # Two's complement in k bits: the residue r mod 2^k, minus 2^k when its sign bit
            # (2^(k-1)) is set; (r ^ 2^(k-1)) - 2^(k-1) is both at once. k <= 63 here, so
            # every step fits int64.
            sign = 1 << (self.ring_bits - 1)
            low = np.bitwise_and(native, (1 << self.ring_bits) - 1).astype(np.int64)
            np.bitwise_xor(low, sign, out=low)
            np.subtract(low, sign, out=low)
            signed = low.astype(np.float64)
        return np.ldexp(signed, -self.frac_bits)

    def error_bound(self, n_summands: int | None = None) -> dict[str, float]:
        """The error the stochastic rounding adds, per coordinate, to a sum and to FedAvg.

        Each encoding is within one quantum q of its (clipped) input and unbiased, with
        variance at most q^2/4 (a Bernoulli step of size q), independently across sites. So a
        sum of k encodings is off by at most k q (worst case) with standard deviation at most
        sqrt(k) q / 2. The FedAvg average divides the sum of ``n_i u_i`` by the sum of the
        weights ``n_i``, which every site encodes exactly (an integer below the clip range), and
        every ``n_i >= 1``: its error is at most k q / sum(n_i) <= q, standard deviation at most
        q / (2 sqrt(k)), both shrinking as the sites' sizes grow.

        Args:
            n_summands: k, the encodings summed (default: the codec's ``n_summands``).

        Returns:
            ``sum_max``, ``sum_sd``, ``mean_max`` and ``mean_sd`` (the average's, for weights of
            1; divide by the mean weight for larger ones).

        """
        k = self.n_summands if n_summands is None else max(int(n_summands), 1)
        q = self.quantum
        return {
            "sum_max": k * q,
            "sum_sd": math.sqrt(k) * q / 2,
            "mean_max": q,
            "mean_sd": q / (2 * math.sqrt(k)),
        }

    def describe(self) -> dict[str, Any]:
        """JSON-ready parameters for the privacy report."""
        bound = self.error_bound()
        return {
            "ring_bits": self.ring_bits,
            "frac_bits": self.frac_bits,
            "quantum": self.quantum,
            "clip_range": self.clip_range,
            "headroom_bits": self.headroom_bits,
            "max_summands": self.n_summands,
            "rounding": "stochastic (unbiased), AES-256-CTR coins under an os.urandom key",
            # The quantization error, per coordinate (error_bound): of the sum of max_summands
            # encodings, worst case and standard deviation; of the FedAvg average, worst case
            # (every n_i = 1; it is k q / sum(n_i) in general).
            "sum_error_max": bound["sum_max"],
            "sum_error_sd": bound["sum_sd"],
            "mean_error_max": bound["mean_max"],
            # Bytes a value takes on the wire (k bits packed; 4 or 8 for the 32- and 64-bit
            # rings, the only ones before schema 3.12).
            "word_bytes": self.ring_bits // 8 if self.ring_bits % 8 == 0 else self.ring_bits / 8,
        }


def choose_ring_bits(
    *,
    clip_range: float,
    n_summands: int,
    tolerance: float = AUTO_RING_TOLERANCE,
    rule: int = RING_RULE,
) -> int:
    """The smallest ring of ``rule``'s choices (:data:`RING_RULE_CHOICES`) meeting ``tolerance``.

    A ring qualifies when it can hold the sum of ``n_summands`` values clipped to
    ``clip_range`` without wrapping and its quantum, the worst-case error per coordinate of the
    FedAvg average (:meth:`FixedPointCodec.error_bound`), is at most ``tolerance``. The weights
    ``n_i`` are multiplied in before encoding, so ``clip_range`` bounds ``n_i u_i`` (and the
    weight ``n_i`` itself). Rule 2 thus takes the fewest bits that hold the sum at a quantum
    within the tolerance: about log2(n_summands * clip_range / tolerance) + 2.

    Raises:
        ConfigError: If no ring meets ``tolerance`` (a smaller clip range or fewer sites would),
            or ``rule`` is unknown.

    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"`tolerance` must be a positive number (got {tolerance!r}).")
    if isinstance(rule, bool) or rule not in RING_RULE_CHOICES:
        raise ConfigError(f"`rule` must be one of {tuple(RING_RULE_CHOICES)} (got {rule!r}).")
    best = None
    for bits in RING_RULE_CHOICES[rule]:
        try:
            codec = FixedPointCodec(ring_bits=bits, clip_range=clip_range, n_summands=n_summands)
        except ConfigError:
            continue
        best = codec
        if codec.quantum <= tolerance:
            return bits
    got = f"the 64-bit ring's quantum is {best.quantum:.3g}" if best else "no ring holds the sum"
    raise ConfigError(
        f"no fixed-point ring keeps the FedAvg rounding error within {tolerance:g} for "
        f"{n_summands} sites at clip range {clip_range:g} ({got}); lower `--secagg-clip`."
    )


def _ceil_scaled(clip: float, frac_bits: int) -> int:
    return math.ceil(math.ldexp(clip, frac_bits))


def _as_real_vector(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values)
    if x.ndim != 1:
        raise DataError(f"`values` must be a 1-D vector (got shape {x.shape}).")
    if x.dtype.kind not in "fiu":
        raise DataError(f"`values` must be a real-valued vector (got dtype {x.dtype}).")
    return np.ascontiguousarray(x, dtype=np.float64)
