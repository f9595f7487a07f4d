"""The randomness of a privacy mechanism: DP-SGD's Gaussian noise and its Poisson sampling.

DP-SGD's guarantee holds only against an adversary who cannot predict the noise. A
``torch.Generator`` seeded from the run's public ``--seed`` fails that: whoever knows the seed
and every record but one can replay a site's training under both hypotheses and read the
answer off the released weights (an infinite effective epsilon). So by default the noise and
the sampling come from :class:`SecretNoise`, a ChaCha20 keystream under a 256-bit key from
``os.urandom`` that never leaves the process and is never derived from anything another party
knows or sends.

:class:`SeededNoise` is the same generator keyed by HKDF-SHA256 of a seed and labels. It exists
only for ``--reproducible-noise`` (research reproducibility): its epsilon does not hold against
anyone who knows the seed.

Floating-point attacks: a Gaussian sampler whose output takes only some floating-point values
leaks its input through which values appear (Mironov 2012; Jin et al. 2021,
arXiv:2112.05307). Like Opacus' ``secure_mode`` (section 5.1 of Holohan & Braghin,
arXiv:2107.10138), :meth:`NoiseSource.gaussian` returns by default the sum of ``draws = 4``
Box-Muller normals divided by 2, built in float64 from 53-bit uniforms; see its docstring for
what this does and does not cover. Measured cost (``benchmarks/noise_bench.py``, results in
``benchmarks/results/noise``): about 30 ms per 1e6 coordinates on one CPU thread, 1.09x the
time of a whole DP-SGD step (1e6 parameters, batch 64) with Opacus' ``torch.normal`` noise;
one draw would cost 1.01x, two 1.03x.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["NoiseSource", "SecretNoise", "SeededNoise", "NOISE_KINDS", "SECURE_DRAWS"]

#: Values of :attr:`NoiseSource.kind`.
NOISE_KINDS = ("secret", "reproducible")

#: Normals summed per output coordinate by default (Opacus' secure_mode uses 4 as well).
SECURE_DRAWS = 4

# ChaCha20's block counter is 32 bits (OpenSSL): one request may use at most 2**32 blocks.
_MAX_REQUEST_BYTES = 64 * 2**32
_TWO_PI = 2.0 * math.pi
_CHUNK = 1 << 16  # output coordinates per keystream request in gaussian()
_SIGN = -(2**63)  # int64 with only the sign bit set
_HKDF_INFO = b"securefed/seeded-noise/v1"


class _Workspace:
    """Buffers for ``size`` uniforms, reused across the chunks of one request."""

    def __init__(self, size: int) -> None:
        self.raw = bytearray(8 * size + 64)  # keystream (+ update_into's slack)
        self.words = (
            torch.frombuffer(self.raw, dtype=torch.int64, count=size)
            if size
            else torch.zeros(0, dtype=torch.int64)
        )
        self.shifted = torch.empty(size, dtype=torch.int64)
        self.u = torch.empty(size, dtype=torch.float64)
        self.z = torch.empty(size, dtype=torch.float64)


class NoiseSource:
    """A keyed ChaCha20 keystream turned into the random variates DP-SGD needs.

    Every request (:meth:`random_bytes`, :meth:`gaussian`, :meth:`bernoulli`) runs the cipher
    under a fresh nonce (a request counter), so no keystream byte is ever used twice and one
    request never wraps ChaCha20's 32-bit block counter.

    Not thread-safe: a site's trainer owns its source.

    Args:
        key: 32-byte ChaCha20 key.

    """

    #: ``secret`` (a key only this process holds) or ``reproducible`` (derived from a seed).
    kind: str = ""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a ChaCha20 key is 32 bytes")
        self.__key = key
        self._requests = 0
        self._zeros = b""  # plaintext of the keystream (all zeros), kept between requests

    def __repr__(self) -> str:  # the key must never show up in logs or tracebacks
        return f"{type(self).__name__}(kind={self.kind!r})"

    def _keystream_into(self, buf: bytearray, n: int) -> None:
        """Write ``n`` fresh keystream bytes to the start of ``buf`` (``len >= n + 64``)."""
        if n < 0 or n > _MAX_REQUEST_BYTES:
            raise ValueError(f"cannot draw {n} bytes in one request")
        # Nonce = 4-byte block counter (starts at 0) || 12-byte request index.
        nonce = b"\x00" * 4 + self._requests.to_bytes(12, "little")
        self._requests += 1
        enc = Cipher(algorithms.ChaCha20(self.__key, nonce), mode=None).encryptor()
        if len(self._zeros) < n:
            self._zeros = bytes(n)
        # update_into asks for up to one block of slack in the output buffer.
        written = enc.update_into(memoryview(self._zeros)[:n], buf)
        if written != n:  # a stream cipher returns exactly its input's length
            raise RuntimeError("short ChaCha20 keystream")

    def _keystream(self, n: int) -> bytearray:
        """``n`` bytes of keystream in a fresh, writable buffer (torch reads it in place)."""
        buf = bytearray(n + 64)
        self._keystream_into(buf, n)
        return buf

    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes of keystream.

        Raises:
            ValueError: If ``n`` is negative or larger than one nonce's keystream (256 GiB).

        """
        return bytes(self._keystream(n)[:n])

    def _int64(self, count: int) -> torch.Tensor:
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(self._keystream(8 * count), dtype=torch.int64, count=count)

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` uniforms on (0, 1], float64, 53 random bits each.

        ``(m + 1) / 2**53`` for a uniform 53-bit integer ``m`` (the top 53 bits of a 64-bit
        word): every value is exact in float64, never 0 (Box-Muller takes a log).
        """
        ws = _Workspace(count)
        return self._uniform_into(ws, count).clone()

    def _uniform_into(self, ws: _Workspace, count: int) -> torch.Tensor:
        """``count`` uniforms in ``ws.u[:count]`` (a view; the next call overwrites it)."""
        self._keystream_into(ws.raw, 8 * count)
        # An arithmetic shift of a signed word gives [-2**52, 2**52); adding 2**52 + 1
        # (exact in float64, as is every sum up to 2**53) maps it onto [1, 2**53].
        shifted, u = ws.shifted[:count], ws.u[:count]
        torch.bitwise_right_shift(ws.words[:count], 11, out=shifted)
        u.copy_(shifted)
        return u.add_(2.0**52 + 1.0).mul_(2.0**-53)

    def gaussian(self, shape: int | Sequence[int], *, draws: int = SECURE_DRAWS) -> torch.Tensor:
        """Standard normals (float64, on CPU) of ``shape``.

        Each coordinate is ``(z_1 + ... + z_draws) / sqrt(draws)`` for independent Box-Muller
        normals ``z_i`` computed in float64 from two 53-bit uniforms per pair, so it is exactly
        N(0, 1) up to float64 rounding and the sampler's truncation at |z| ~ 8.6 per draw.

        What ``draws`` covers. With ``draws = 1`` each value is a deterministic float64
        function of 106 random bits, so the set of values it can take is sparse in places
        (near 0 and in the tails): the floating-point attack of Jin et al. (2021) checks
        whether a released value is reachable from ``x`` or from ``x'``. Summing ``draws >= 2``
        independent normals, as Opacus' ``secure_mode`` does with 4 and Holohan & Braghin
        (2021, section 5.1) analyse, makes every representable value reachable in many ways
        and raises the attack's search to about ``2**(53 * (draws - 1))`` (``2**159`` for
        4). The noise is then scaled by sigma*C and rounded to the gradient's dtype (float32)
        when added, which spreads it over float32 values further.

        What it does not cover: it is not an exact (discrete) Gaussian sampler, so DP here is
        the usual floating-point approximation, as in Opacus; it is not constant-time
        (torch's log/sqrt/cos are data-independent in practice, but nothing guarantees it);
        and the mechanism's privacy still rests on the accountant's analysis of the
        continuous Gaussian.

        Args:
            shape: Output shape (an int for a flat vector).
            draws: Normals summed per coordinate (>= 1).

        """
        if draws < 1:
            raise ValueError("`draws` must be at least 1")
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        count = math.prod(shape)
        out = torch.empty(count, dtype=torch.float64)
        # In chunks through one workspace: a few MiB of keystream and temporaries, reused,
        # stay in cache, where fresh buffers for a whole step page-fault through memory.
        chunk = min(count, _CHUNK)
        ws = _Workspace(2 * ((draws * chunk + 1) // 2))
        for start in range(0, count, _CHUNK):
            stop = min(count, start + _CHUNK)
            z = self._normals_into(ws, draws * (stop - start))
            if draws > 1:
                torch.sum(z.view(draws, stop - start), dim=0, out=out[start:stop])
            else:
                out[start:stop] = z
        if draws > 1:
            out.div_(math.sqrt(draws))
        return out.reshape(shape)

    def _normals_into(self, ws: _Workspace, total: int) -> torch.Tensor:
        """``total`` independent standard normals by Box-Muller, in float64, in ``ws``."""
        pairs = (total + 1) // 2
        u = self._uniform_into(ws, 2 * pairs)
        # In place: two uniforms -> two independent normals.
        r = u[:pairs].log_().mul_(-2.0).sqrt_()
        theta = u[pairs:].mul_(_TWO_PI)
        z = ws.z[: 2 * pairs]
        torch.cos(theta, out=z[:pairs]).mul_(r)
        torch.sin(theta, out=z[pairs:]).mul_(r)
        return z[:total]

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent Bernoulli(p) draws as a bool tensor.

        ``u < round(p * 2**64)`` for a uniform 64-bit ``u``: exact for every ``p`` that is a
        multiple of ``2**-64``, off by at most ``2**-65`` otherwise; ``p = 1`` is always True,
        ``p = 0`` never.

        Raises:
            ValueError: If ``p`` is not in [0, 1].

        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a probability must be in [0, 1] (got {p})")
        threshold = round(p * 2**64)  # exact: p is a double, 2**64 a power of two
        if threshold >= 2**64:
            return torch.ones(n, dtype=torch.bool)
        if n == 0 or threshold == 0:
            return torch.zeros(n, dtype=torch.bool)
        # Compare as unsigned: flip the sign bit of both sides of the signed comparison.
        words = self._int64(n) ^ _SIGN
        return words < (threshold - 2**63)


class SecretNoise(NoiseSource):
    """Noise from a key only this process holds: ``os.urandom(32)``, drawn at construction.

    Nothing about the key depends on the run's seed or on anything another party sends, so
    an adversary who knows the configuration and every record cannot replay the mechanism.
    Create one per site (per trainer call is fine: each instance draws a fresh key).
    """

    kind = "secret"

    def __init__(self) -> None:
        super().__init__(os.urandom(32))


class SeededNoise(NoiseSource):
    """Noise keyed by HKDF-SHA256 of ``seed`` and ``labels``: reproducible, hence not private.

    For ``--reproducible-noise`` only. Anyone who knows the seed can regenerate the noise,
    so the run's epsilon does not hold against them.

    Args:
        seed: The run's seed.
        *labels: Integers that separate streams (e.g. purpose, round, site).

    """

    kind = "reproducible"

    def __init__(self, seed: int, *labels: int) -> None:
        parts = (int(seed), *(int(x) for x in labels))
        # Decimal, comma-separated: distinct integer tuples give distinct key material.
        material = ",".join(str(x) for x in parts).encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
            material
        )
        super().__init__(key)
