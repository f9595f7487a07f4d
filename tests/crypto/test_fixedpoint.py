"""Tests for the fixed-point codec in Z_(2^k): round trip, no-wrap bound, clipping, rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.crypto.fixedpoint import FLOAT_EXACT_BITS, FixedPointCodec
from securefed.errors import ConfigError, DataError


def _ring_sum(codec: FixedPointCodec, encodings: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(encodings[0])
    for words in encodings:
        total += words  # uint arithmetic wraps mod 2^k, like the server's sum
    return total


@settings(max_examples=60, deadline=None)
@given(
    ring_bits=st.sampled_from([32, 64]),
    n=st.integers(min_value=1, max_value=12),
    dim=st.integers(min_value=1, max_value=40),
    clip=st.sampled_from([1.0, 7.5, 1000.0, 123456.0]),
    data=st.data(),
)
def test_sum_of_n_encodings_is_within_n_quanta(ring_bits, n, dim, clip, data):
    # Prepare
    codec = FixedPointCodec(ring_bits=ring_bits, clip_range=clip, n_summands=n)
    element = st.floats(min_value=-clip, max_value=clip, allow_nan=False)
    inputs = [np.array(data.draw(st.lists(element, min_size=dim, max_size=dim))) for _ in range(n)]

    # Execute
    encoded = [codec.encode(x) for x in inputs]
    decoded = codec.decode(_ring_sum(codec, [w for w, _ in encoded]))

    # Assert
    exact = np.array([math.fsum(col) for col in zip(*inputs, strict=True)])
    assert np.all(np.abs(decoded - exact) <= n * codec.quantum)
    assert all(clipped == 0 for _, clipped in encoded)


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_values_summed_over_all_sites_do_not_wrap(ring_bits, sign):
    # Prepare
    n, clip = 9, 250.0
    codec = FixedPointCodec(ring_bits=ring_bits, clip_range=clip, n_summands=n)
    x = np.full(5, sign * clip)

    # Execute
    total = codec.decode(_ring_sum(codec, [codec.encode(x)[0] for _ in range(n)]))

    # Assert
    np.testing.assert_allclose(total, sign * n * clip, atol=n * codec.quantum, rtol=0)


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_derived_frac_bits_is_the_largest_that_cannot_wrap(ring_bits):
    # Prepare
    n, clip = 10, 1000.0

    # Execute
    codec = FixedPointCodec(ring_bits=ring_bits, clip_range=clip, n_summands=n)

    # Assert
    bound = min((1 << (ring_bits - 1)) - 1, 1 << FLOAT_EXACT_BITS)
    assert n * math.ceil(clip * 2.0**codec.frac_bits) <= bound
    assert n * math.ceil(clip * 2.0 ** (codec.frac_bits + 1)) > bound
    assert codec.headroom_bits >= math.floor(math.log2(n))
    assert codec.max_encoded == math.ceil(clip * 2.0**codec.frac_bits)


def test_clipped_values_are_counted_and_saturate():
    # Prepare
    codec = FixedPointCodec(clip_range=2.0, n_summands=3)
    x = np.array([0.5, 2.0, 2.5, -7.0, 1e30, -2.0])

    # Execute
    words, clipped = codec.encode(x)

    # Assert
    assert clipped == 3
    np.testing.assert_allclose(
        codec.decode(words), [0.5, 2.0, 2.0, -2.0, 2.0, -2.0], atol=codec.quantum
    )


def test_stochastic_rounding_is_unbiased():
    # Prepare: a value 0.3 quanta above an integer grid point, and one 0.7 below zero.
    codec = FixedPointCodec(clip_range=1.0, n_summands=2, frac_bits=10)
    count = 40_000
    x = np.concatenate([np.full(count, 0.3 * codec.quantum), np.full(count, -0.7 * codec.quantum)])

    # Execute
    words, _ = codec.encode(x)
    units = words.view(np.int64)

    # Assert: each half rounds to {0, 1} resp. {-1, 0} with mean 0.3 resp. -0.7.
    sigma = math.sqrt(0.21 / count)
    assert set(np.unique(units[:count])) == {0, 1}
    assert set(np.unique(units[count:])) == {-1, 0}
    assert abs(units[:count].mean() - 0.3) < 6 * sigma
    assert abs(units[count:].mean() + 0.7) < 6 * sigma


def test_rounding_coins_are_fresh_per_call():
    # Prepare
    codec = FixedPointCodec(clip_range=1.0, n_summands=2, frac_bits=4)
    x = np.full(256, 0.5 * codec.quantum)

    # Execute
    first, _ = codec.encode(x)
    second, _ = codec.encode(x)

    # Assert
    assert not np.array_equal(first, second)


def test_decode_of_one_encoding_is_within_one_quantum_32_bit():
    # Prepare
    codec = FixedPointCodec(ring_bits=32, clip_range=100.0, n_summands=4)
    x = np.linspace(-100, 100, 1001)

    # Execute
    words, clipped = codec.encode(x)

    # Assert
    assert words.dtype == np.uint32
    assert clipped == 0
    assert np.all(np.abs(codec.decode(words) - x) < codec.quantum)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ring_bits": 32, "clip_range": 1e9, "n_summands": 10}, "does not fit a 32-bit ring"),
        ({"ring_bits": 32, "clip_range": 1000.0, "n_summands": 10, "frac_bits": 20}, "at most 17"),
        ({"ring_bits": 7}, "`ring_bits` must be from 8 to 64"),
        ({"ring_bits": 16, "clip_range": 1e5}, "does not fit a 16-bit ring"),
        ({"clip_range": 0.0}, "`clip_range` must be a positive finite"),
        ({"clip_range": float("nan")}, "`clip_range` must be a positive finite"),
        ({"n_summands": 0}, "`n_summands` must be at least 1"),
        ({"frac_bits": 63}, "`frac_bits` must be an integer in [0, 62]"),
        ({"clip_range": 1e15, "n_summands": 100}, "exceeds 2^53"),
    ],
)
def test_impossible_ranges_raise_config_error(kwargs, message):
    # Execute / Assert
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("^", r"\^")):
        FixedPointCodec(**kwargs)


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf]), np.ones((2, 2))])
def test_non_finite_or_non_vector_inputs_raise_data_error(bad):
    # Prepare
    codec = FixedPointCodec(clip_range=10.0, n_summands=2)

    # Execute / Assert
    with pytest.raises(DataError):
        codec.encode(bad)


def test_decode_rejects_wrong_word_size():
    # Prepare
    codec = FixedPointCodec(ring_bits=64, clip_range=10.0, n_summands=2)

    # Execute / Assert
    with pytest.raises(DataError, match="uint64"):
        codec.decode(np.zeros(3, dtype=np.uint32))


def test_encoding_leaves_numpy_global_rng_untouched():
    # Prepare
    np.random.seed(1234)
    before = np.random.get_state()
    codec = FixedPointCodec(clip_range=10.0, n_summands=2, frac_bits=3)

    # Execute
    codec.encode(np.full(1000, 0.01))
    after = np.random.get_state()

    # Assert
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


def test_describe_reports_codec_parameters():
    # Prepare
    codec = FixedPointCodec(ring_bits=32, clip_range=8.0, n_summands=4)

    # Execute
    info = codec.describe()

    # Assert
    assert info["ring_bits"] == 32
    assert info["frac_bits"] == codec.frac_bits
    assert info["quantum"] == 2.0**-codec.frac_bits
    assert info["clip_range"] == 8.0
    assert info["headroom_bits"] >= 2
