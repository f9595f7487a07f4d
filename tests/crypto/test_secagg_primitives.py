"""Tests for the SecAgg primitives: AES-CTR PRG, X25519 + HKDF keys, AES-GCM, Shamir sharing."""

from __future__ import annotations

import itertools
import os
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.crypto import kdf
from securefed.crypto.aead import open_sealed, seal, sealed_length
from securefed.crypto.prg import apply_masks, chunk_bytes, keystream, mask_words
from securefed.crypto.shamir import (
    PRIME,
    SHARE_BYTES,
    Share,
    combine,
    interpolate_at_zero,
    split,
)
from securefed.errors import ConfigError, IntegrityError

# -- PRG -------------------------------------------------------------------------------------


def test_keystream_is_aes_ctr_and_deterministic_per_key():
    # Prepare
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = os.urandom(32)
    reference = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(1000))

    # Execute
    first, again = keystream(key=key, nbytes=1000), keystream(key=key, nbytes=1000)
    other = keystream(key=os.urandom(32), nbytes=1000)

    # Assert
    assert first == reference == again
    assert first != other


@pytest.mark.parametrize("ring_bits", [32, 64])
@pytest.mark.parametrize("count", [1, 7, chunk_bytes() // 8, chunk_bytes() // 4 + 3])
def test_chunked_masking_equals_one_call_keystream_words(ring_bits, count):
    # Prepare: sizes straddle the chunk boundary of the streamed implementation.
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    plus, minus = os.urandom(32), os.urandom(32)
    acc = np.arange(count, dtype=dtype)

    # Execute
    apply_masks(acc, add=[plus], subtract=[minus])

    # Assert
    expected = np.arange(count, dtype=dtype)
    expected += mask_words(key=plus, count=count, ring_bits=ring_bits)
    expected -= mask_words(key=minus, count=count, ring_bits=ring_bits)
    np.testing.assert_array_equal(acc, expected)


def test_mask_words_are_little_endian_keystream():
    # Prepare
    key = os.urandom(32)

    # Execute
    words = mask_words(key=key, count=4, ring_bits=64)

    # Assert
    raw = keystream(key=key, nbytes=32)
    assert [int(w) for w in words] == [
        int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8)
    ]


def test_added_and_subtracted_masks_cancel():
    # Prepare
    keys = [os.urandom(32) for _ in range(3)]
    acc = np.arange(10, dtype=np.uint64)

    # Execute
    apply_masks(acc, add=keys)
    apply_masks(acc, subtract=keys)

    # Assert
    np.testing.assert_array_equal(acc, np.arange(10, dtype=np.uint64))


def test_prg_rejects_short_keys():
    # Execute / Assert
    with pytest.raises(ConfigError, match="32 bytes"):
        keystream(key=b"short", nbytes=8)


# -- key derivation --------------------------------------------------------------------------


def test_mask_keys_differ_from_share_encryption_keys_for_the_same_pair():
    # Prepare
    u, v = kdf.generate_private_key(), kdf.generate_private_key()
    pu, pv = kdf.public_bytes(u), kdf.public_bytes(v)

    # Execute
    mask_uv = kdf.pairwise_mask_key(
        private_key=u, peer_public=pv, round_index=4, site_a=1, site_b=2
    )
    mask_vu = kdf.pairwise_mask_key(
        private_key=v, peer_public=pu, round_index=4, site_a=2, site_b=1
    )
    share_uv = kdf.share_encryption_key(
        private_key=u, peer_public=pv, round_index=4, sender=1, recipient=2
    )
    share_uv_at_v = kdf.share_encryption_key(
        private_key=v, peer_public=pu, round_index=4, sender=1, recipient=2
    )
    share_vu = kdf.share_encryption_key(
        private_key=v, peer_public=pu, round_index=4, sender=2, recipient=1
    )
    next_round = kdf.pairwise_mask_key(
        private_key=u, peer_public=pv, round_index=5, site_a=1, site_b=2
    )

    # Assert: both ends agree, and purpose, direction and round all change the key.
    assert mask_uv == mask_vu
    assert share_uv == share_uv_at_v
    assert len({mask_uv, share_uv, share_vu, next_round}) == 4


def test_hkdf_info_binds_purpose_round_and_parties():
    # Prepare
    variants = [
        dict(purpose=kdf.KeyPurpose.PAIRWISE_MASK, round_index=1, first=2, second=3),
        dict(purpose=kdf.KeyPurpose.SHARE_ENCRYPTION, round_index=1, first=2, second=3),
        dict(purpose=kdf.KeyPurpose.PAIRWISE_MASK, round_index=2, first=2, second=3),
        dict(purpose=kdf.KeyPurpose.PAIRWISE_MASK, round_index=1, first=3, second=2),
        dict(purpose=kdf.KeyPurpose.SELF_MASK, round_index=1, first=2, second=2),
    ]
    secret = os.urandom(32)

    # Execute
    infos = [kdf.hkdf_info(**v) for v in variants]
    keys = [kdf.derive_key(secret=secret, **v) for v in variants]

    # Assert
    assert all(info.startswith(kdf.KDF_DOMAIN) for info in infos)
    assert len(set(infos)) == len(infos)
    assert len(set(keys)) == len(keys)


def test_low_order_public_key_is_rejected():
    # Prepare
    private = kdf.generate_private_key()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="low-order"):
        kdf.agree(private_key=private, peer_public=bytes(32))


# -- AES-GCM ---------------------------------------------------------------------------------


def test_seal_round_trip_and_every_tamper_is_rejected():
    # Prepare
    key, plaintext, ad = os.urandom(32), os.urandom(132), b"round-3|1->2"
    sealed = seal(key=key, plaintext=plaintext, associated_data=ad)
    flipped = bytearray(sealed)
    flipped[20] ^= 0x01

    # Execute / Assert
    assert len(sealed) == sealed_length(132)
    assert open_sealed(key=key, sealed=sealed, associated_data=ad) == plaintext
    for bad_key, bad_sealed, bad_ad in [
        (os.urandom(32), sealed, ad),
        (key, bytes(flipped), ad),
        (key, sealed, b"round-3|2->1"),
        (key, sealed[:-1], ad),
        (key, sealed[:10], ad),
    ]:
        with pytest.raises(IntegrityError):
            open_sealed(key=bad_key, sealed=bad_sealed, associated_data=bad_ad)


# -- Shamir ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (6, 4), (7, 7)])
def test_every_t_subset_reconstructs_and_no_smaller_subset_does(n, t):
    # Prepare
    secret = secrets.token_bytes(32)
    shares = list(split(secret=secret, threshold=t, indices=range(1, n + 1)).values())

    # Execute / Assert
    for subset in itertools.combinations(shares, t):
        assert combine(shares=subset, secret_bytes=32) == secret
    too_few = [interpolate_at_zero(subset) for subset in itertools.combinations(shares, t - 1)]
    assert int.from_bytes(secret, "little") not in too_few
    # Random-looking: far above the 256-bit secret range, and a fresh sharing of the same
    # secret gives the same t-1 holders a different value (it depends on the random coefficients).
    assert all(value.bit_length() > 400 for value in too_few)
    again = list(split(secret=secret, threshold=t, indices=range(1, n + 1)).values())
    assert interpolate_at_zero(again[: t - 1]) != interpolate_at_zero(shares[: t - 1])
    for subset in itertools.combinations(shares, t - 1):
        with pytest.raises(IntegrityError, match="not a 32-byte secret"):
            combine(shares=subset, secret_bytes=32)


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=64),
    n=st.integers(min_value=1, max_value=9),
    data=st.data(),
)
def test_any_threshold_subset_recovers_any_secret(secret, n, data):
    # Prepare
    t = data.draw(st.integers(min_value=1, max_value=n))
    indices = data.draw(
        st.lists(st.integers(min_value=1, max_value=2**32), min_size=n, max_size=n, unique=True)
    )
    shares = split(secret=secret, threshold=t, indices=indices)
    chosen = data.draw(st.permutations(indices))[:t]

    # Execute
    recovered = combine(shares=[shares[i] for i in chosen], secret_bytes=len(secret))

    # Assert
    assert recovered == secret


def test_share_bytes_round_trip_and_validation():
    # Prepare
    share = Share(index=5, value=PRIME - 1)

    # Execute
    data = share.to_bytes()

    # Assert
    assert len(data) == SHARE_BYTES
    assert Share.from_bytes(index=5, data=data) == share
    with pytest.raises(IntegrityError, match="66 bytes"):
        Share.from_bytes(index=5, data=data[:-1])
    with pytest.raises(IntegrityError, match="not a field element"):
        Share.from_bytes(index=5, data=b"\xff" * SHARE_BYTES)
    with pytest.raises(IntegrityError, match="index"):
        Share(index=0, value=1)


def test_split_rejects_bad_parameters():
    # Execute / Assert
    with pytest.raises(ConfigError, match="threshold"):
        split(secret=b"x", threshold=4, indices=[1, 2, 3])
    with pytest.raises(ConfigError, match="distinct"):
        split(secret=b"x", threshold=2, indices=[1, 1, 3])
    with pytest.raises(ConfigError, match="indices"):
        split(secret=b"x", threshold=2, indices=[0, 1, 3])
    with pytest.raises(ConfigError, match="at most 64 bytes"):
        split(secret=bytes(65), threshold=2, indices=[1, 2, 3])
