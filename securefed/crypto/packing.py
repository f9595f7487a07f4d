"""Ring words on the wire in k bits a value, for any ring Z_(2^k), 8 <= k <= 64.

Layout of d values, with k = 8 b + r (b whole bytes, r < 8 remaining bits):

* k = 32 or 64 (a ring as wide as its word): the d little-endian words, as every release wrote
  them before other ring sizes existed, so those messages parse unchanged;
* otherwise, planar: b byte planes, plane j holding byte j of every value (d bytes, value 0
  first), then r bit planes, plane i holding bit 8 b + i of every value packed least
  significant bit first (ceil(d / 8) bytes, value 0 in bit 0 of its first byte, the bits after
  value d - 1 zero).

So a vector takes d b + r ceil(d / 8) bytes, at most r bytes more than d k / 8. The planar form
is what numpy can write and read in a few contiguous passes (a plain bit stream of k-bit values
took about four times as long to pack and unpack); the masked values are uniform in Z_(2^k),
so each plane is uniform too.

Packing keeps only the low k bits of each word (its residue mod 2^k); unpacking returns words
below 2^k and refuses non-zero padding bits, so every vector has exactly one encoding.
"""

from __future__ import annotations

import numpy as np

from securefed.crypto.prg import word_dtype
from securefed.errors import IntegrityError

__all__ = ["pack_words", "packed_size", "unpack_words"]


def packed_size(count: int, ring_bits: int) -> int:
    """Bytes that ``count`` values of ``ring_bits`` bits take on the wire."""
    word_dtype(ring_bits)
    whole, rest = divmod(int(ring_bits), 8)
    return int(count) * whole + rest * -(-int(count) // 8)


def _is_word(ring_bits: int) -> bool:
    return ring_bits == 8 * word_dtype(ring_bits).itemsize


def pack_words(words: np.ndarray, ring_bits: int) -> memoryview:
    """The low ``ring_bits`` bits of each word, in the wire layout (module docstring).

    Args:
        words: 1-D vector of the ring's words (:func:`~securefed.crypto.prg.word_dtype`).
        ring_bits: k, from 8 to 64.

    Returns:
        ``packed_size(words.size, ring_bits)`` bytes (a view of the words for k = 32 or 64).

    """
    dtype = word_dtype(ring_bits)
    w = np.ascontiguousarray(words, dtype=dtype)
    if _is_word(ring_bits):
        return memoryview(w).cast("B")
    n = w.size
    planes = w.view(np.uint8).reshape(n, dtype.itemsize)  # little-endian: column j is byte j
    whole, rest = divmod(ring_bits, 8)
    out = np.empty(packed_size(n, ring_bits), dtype=np.uint8)
    for j in range(whole):
        out[j * n : (j + 1) * n] = planes[:, j]
    if rest:
        top = np.ascontiguousarray(planes[:, whole])
        bit = np.empty_like(top)
        step = -(-n // 8)
        for i in range(rest):
            np.bitwise_and(top, 1 << i, out=bit)  # packbits packs any non-zero as a 1
            start = whole * n + i * step
            out[start : start + step] = np.packbits(bit, bitorder="little")
    return memoryview(out)


def unpack_words(data: bytes | memoryview, ring_bits: int, count: int) -> np.ndarray:
    """Read ``count`` values of ``ring_bits`` bits in the wire layout back as ring words.

    Args:
        data: Exactly ``packed_size(count, ring_bits)`` bytes.
        ring_bits: k, from 8 to 64.
        count: Number of values.

    Returns:
        A 1-D vector of :func:`~securefed.crypto.prg.word_dtype` words below 2^k (a read-only
        view of ``data`` for k = 32 or 64).

    Raises:
        IntegrityError: If ``data`` has the wrong length or non-zero padding bits.

    """
    dtype = word_dtype(ring_bits)
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    expected = packed_size(count, ring_bits)
    if buf.size != expected:
        raise IntegrityError(
            f"{count} packed {ring_bits}-bit values take {expected} bytes, not {buf.size}."
        )
    if _is_word(ring_bits):
        return buf.view(dtype)
    n = count
    whole, rest = divmod(ring_bits, 8)
    out = np.zeros((n, dtype.itemsize), dtype=np.uint8)
    for j in range(whole):
        out[:, j] = buf[j * n : (j + 1) * n]
    if rest:
        step = -(-n // 8)
        top = np.zeros(n, dtype=np.uint8)
        for i in range(rest):
            plane = buf[whole * n + i * step : whole * n + (i + 1) * step]
            if n % 8 and plane[-1] >> (n % 8):
                raise IntegrityError(f"packed {ring_bits}-bit values carry non-zero padding bits.")
            bits = np.unpackbits(plane, count=n, bitorder="little")
            np.left_shift(bits, i, out=bits)
            np.bitwise_or(top, bits, out=top)
        out[:, whole] = top
    return out.reshape(-1).view(dtype)
