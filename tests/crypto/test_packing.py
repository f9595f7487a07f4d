"""Ring words packed k bits a value on the wire (securefed.crypto.packing)."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.crypto.packing import pack_words, packed_size, unpack_words
from securefed.crypto.prg import word_dtype
from securefed.errors import ConfigError, IntegrityError


def _reference(words: np.ndarray, bits: int) -> bytes:
    """The layout by definition, value by value: byte planes, then bit planes (LSB first)."""
    values = [int(v) % (1 << bits) for v in words.tolist()]
    if bits in (32, 64):
        return b"".join(v.to_bytes(bits // 8, "little") for v in values)
    whole, rest = divmod(bits, 8)
    out = b"".join(bytes((v >> (8 * j)) & 0xFF for v in values) for j in range(whole))
    for i in range(rest):
        plane = sum(((v >> (8 * whole + i)) & 1) << p for p, v in enumerate(values))
        out += plane.to_bytes(-(-len(values) // 8), "little")
    return out


def _words(rng: np.random.Generator, bits: int, n: int) -> np.ndarray:
    dtype = word_dtype(bits)
    return rng.integers(0, 2 ** (8 * dtype.itemsize), n, dtype=np.uint64).astype(dtype)


@pytest.mark.parametrize("bits", range(8, 65))
def test_every_ring_size_packs_to_the_defined_layout_and_back(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 64, 65, 331):
        words = _words(rng, bits, n)

        packed = bytes(pack_words(words, bits))

        assert packed == _reference(words, bits)
        assert len(packed) == packed_size(n, bits) <= -(-n * bits // 8) + bits % 8
        back = unpack_words(packed, bits, n)
        assert back.dtype == word_dtype(bits)
        # The residues mod 2^k come back; the word's higher bits never left the site.
        assert back.tolist() == [int(v) % (1 << bits) for v in words.tolist()]


@pytest.mark.parametrize("bits", [32, 64])
def test_word_sized_rings_keep_the_layout_of_plain_little_endian_words(bits):
    # Masked inputs written before other ring sizes existed parse unchanged.
    words = _words(np.random.default_rng(0), bits, 100)
    assert bytes(pack_words(words, bits)) == words.astype(word_dtype(bits)).tobytes()


def test_thirty_bits_take_fifteen_sixteenths_of_the_words_and_a_few_bytes():
    words = _words(np.random.default_rng(1), 30, 56_325)
    size = len(pack_words(words, 30))
    assert size == packed_size(56_325, 30) == 3 * 56_325 + 6 * 7041
    assert 56_325 * 30 / 8 <= size <= 56_325 * 30 / 8 + 6 < 4 * 56_325


def test_non_canonical_encodings_are_refused():
    packed = bytearray(pack_words(np.array([1, 2, 3], dtype="<u4"), 30))  # 3 x 3 bytes + 6 x 1
    assert len(packed) == 15 and packed[-1] >> 3 == 0
    packed[-1] |= 0x40  # a padding bit of the last bit plane: a second encoding of the vector
    with pytest.raises(IntegrityError, match="non-zero padding"):
        unpack_words(bytes(packed), 30, 3)
    with pytest.raises(IntegrityError, match="take 15 bytes, not 16"):
        unpack_words(bytes(16), 30, 3)
    with pytest.raises(ConfigError, match="from 8 to 64"):
        unpack_words(b"", 7, 0)
