"""Tests for SecAgg message byte layouts: round trips, and rejection of damaged messages."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest

from securefed.crypto.messages import (
    HEADER_BYTES,
    SEALED_SHARES_BYTES,
    SERVER_ID,
    AdvertiseKeys,
    EncryptedShares,
    KeyEntry,
    MaskedInput,
    MessageType,
    PublicKeys,
    RelayedShares,
    UnmaskRequest,
    UnmaskShares,
    message_type,
)
from securefed.crypto.shamir import SHARE_BYTES
from securefed.errors import IntegrityError, ProtocolError


def _frame(kind: int, round_index: int, sender: int, body: bytes) -> bytes:
    """Independent re-implementation of the documented frame layout."""
    header = b"SFSA" + struct.pack("<BBQIQ", 1, kind, round_index, sender, len(body))
    return header + body + hashlib.sha256(header + body).digest()


def _examples() -> list:
    return [
        AdvertiseKeys(
            round_index=3, sender=2, encryption_public=os.urandom(32), mask_public=os.urandom(32)
        ),
        PublicKeys(
            round_index=3,
            graph_seed=os.urandom(32),
            entries=tuple(
                KeyEntry(site=s, encryption_public=os.urandom(32), mask_public=os.urandom(32))
                for s in (0, 2, 5)
            ),
        ),
        EncryptedShares(
            round_index=3,
            sender=2,
            sealed=((0, os.urandom(SEALED_SHARES_BYTES)), (5, os.urandom(SEALED_SHARES_BYTES))),
        ),
        RelayedShares(round_index=3, recipient=2, sealed=((0, os.urandom(SEALED_SHARES_BYTES)),)),
        UnmaskRequest(round_index=3, survivors=(0, 2), dropped=(5,)),
        UnmaskShares(
            round_index=3,
            sender=2,
            seed_shares=((0, os.urandom(SHARE_BYTES)), (2, os.urandom(SHARE_BYTES))),
            key_shares=((5, os.urandom(SHARE_BYTES)),),
        ),
    ]


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_round_trip(message):
    # Execute
    data = message.to_bytes()

    # Assert
    assert type(message).from_bytes(data) == message
    assert (
        message_type(data).name
        == {
            "AdvertiseKeys": "ADVERTISE_KEYS",
            "PublicKeys": "PUBLIC_KEYS",
            "EncryptedShares": "ENCRYPTED_SHARES",
            "RelayedShares": "RELAYED_SHARES",
            "UnmaskRequest": "UNMASK_REQUEST",
            "UnmaskShares": "UNMASK_SHARES",
        }[type(message).__name__]
    )


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_masked_input_round_trip_and_layout(ring_bits):
    # Prepare
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    words = np.frombuffer(os.urandom(40 * ring_bits // 8), dtype=dtype)
    message = MaskedInput(round_index=9, sender=4, ring_bits=ring_bits, words=words)

    # Execute
    data = message.to_bytes()
    parsed = MaskedInput.from_bytes(data)

    # Assert
    body = struct.pack("<BQ", ring_bits, 40) + words.astype(f"<u{ring_bits // 8}").tobytes()
    assert data == _frame(MessageType.MASKED_INPUT, 9, 4, body)
    assert (parsed.round_index, parsed.sender, parsed.ring_bits) == (9, 4, ring_bits)
    np.testing.assert_array_equal(parsed.words, words)


def test_advertise_keys_layout_matches_documentation():
    # Prepare
    enc, mask = os.urandom(32), os.urandom(32)

    # Execute
    data = AdvertiseKeys(
        round_index=258, sender=7, encryption_public=enc, mask_public=mask
    ).to_bytes()

    # Assert
    assert data == _frame(MessageType.ADVERTISE_KEYS, 258, 7, enc + mask)
    assert len(data) == HEADER_BYTES + 64 + 32


def test_every_flipped_byte_is_rejected():
    # Prepare
    data = _examples()[0].to_bytes()

    # Execute / Assert
    for position in range(len(data)):
        tampered = bytearray(data)
        tampered[position] ^= 0x40
        with pytest.raises(IntegrityError):
            AdvertiseKeys.from_bytes(bytes(tampered))


def test_tampered_masked_vector_is_rejected():
    # Prepare
    words = np.arange(1000, dtype=np.uint64)
    data = bytearray(MaskedInput(round_index=0, sender=1, ring_bits=64, words=words).to_bytes())
    data[HEADER_BYTES + 9 + 800] ^= 0x01

    # Execute / Assert
    with pytest.raises(IntegrityError, match="digest mismatch"):
        MaskedInput.from_bytes(bytes(data))


@pytest.mark.parametrize("message", _examples(), ids=lambda m: type(m).__name__)
def test_every_truncation_and_padding_is_rejected(message):
    # Prepare
    data = message.to_bytes()

    # Execute / Assert
    for length in range(len(data)):
        with pytest.raises(IntegrityError, match="truncated"):
            type(message).from_bytes(data[:length])
    with pytest.raises(IntegrityError, match="truncated or padded"):
        type(message).from_bytes(data + b"\x00")


def test_wrong_message_type_is_a_protocol_error():
    # Prepare
    data = _examples()[0].to_bytes()

    # Execute / Assert
    with pytest.raises(ProtocolError, match="expected a MASKED_INPUT message, got ADVERTISE_KEYS"):
        MaskedInput.from_bytes(data)


def test_site_message_claiming_server_sender_is_rejected():
    # Prepare
    data = _frame(MessageType.ADVERTISE_KEYS, 0, SERVER_ID, os.urandom(64))

    # Execute / Assert
    with pytest.raises(ProtocolError, match="must come from a site"):
        AdvertiseKeys.from_bytes(data)


@pytest.mark.parametrize(
    ("kind", "body", "match"),
    [
        (MessageType.PUBLIC_KEYS, os.urandom(32) + struct.pack("<I", 5) + bytes(68), "declares 5"),
        (MessageType.PUBLIC_KEYS, os.urandom(32) + struct.pack("<I", 0) + b"x", "trailing"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 64, 10) + bytes(72), "declares 10 values"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 30, 10) + bytes(37), "declares 10 values"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 30, 10) + bytes(39), "declares 10 values"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 30, 3) + bytes(14) + b"\x40", "padding"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 200, 1) + bytes(25), "200-bit ring"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 30, 2**60) + bytes(8), "declares"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 7, 1) + bytes(1), "7-bit ring"),
        (MessageType.MASKED_INPUT, struct.pack("<BQ", 65, 1) + bytes(9), "65-bit ring"),
        (MessageType.ADVERTISE_KEYS, bytes(63), "needs 32 more"),
        (
            MessageType.UNMASK_REQUEST,
            struct.pack("<IIII", 2, 3, 3, 0),
            "strictly increasing",
        ),
        (
            MessageType.UNMASK_SHARES,
            struct.pack("<II", 1, 4)
            + bytes(SHARE_BYTES)
            + struct.pack("<II", 1, 4)
            # Both the seed and the mask key of site 4 in one message.
            + bytes(SHARE_BYTES),
            "both a seed share and a key share",
        ),
        (
            MessageType.ENCRYPTED_SHARES,
            struct.pack("<II", 1, 3) + bytes(SEALED_SHARES_BYTES),
            "addressed a sealed share to itself",
        ),
    ],
    # Random bodies get ids by length: ids must not change between collections (pytest-xdist's
    # workers each collect the suite and must agree).
    ids=lambda v: f"{len(v)}B" if isinstance(v, bytes) else None,
)
def test_inconsistent_bodies_with_valid_digest_are_rejected(kind, body, match):
    # Prepare
    from_server = kind in (MessageType.PUBLIC_KEYS, MessageType.UNMASK_REQUEST)
    data = _frame(kind, 1, SERVER_ID if from_server else 3, body)
    parser = {
        MessageType.PUBLIC_KEYS: PublicKeys,
        MessageType.MASKED_INPUT: MaskedInput,
        MessageType.ADVERTISE_KEYS: AdvertiseKeys,
        MessageType.UNMASK_REQUEST: UnmaskRequest,
        MessageType.UNMASK_SHARES: UnmaskShares,
        MessageType.ENCRYPTED_SHARES: EncryptedShares,
    }[kind]

    # Execute / Assert
    with pytest.raises(IntegrityError, match=match):
        parser.from_bytes(data)


def test_unknown_version_and_magic_are_rejected():
    # Prepare
    good = _examples()[0].to_bytes()
    body = good[HEADER_BYTES:-32]
    header_v2 = b"SFSA" + struct.pack("<BBQIQ", 2, 1, 3, 2, len(body))
    v2 = header_v2 + body + hashlib.sha256(header_v2 + body).digest()
    header_magic = b"XXXX" + good[4:HEADER_BYTES]
    bad_magic = header_magic + body + hashlib.sha256(header_magic + body).digest()

    # Execute / Assert
    with pytest.raises(IntegrityError, match="version is 2"):
        AdvertiseKeys.from_bytes(v2)
    with pytest.raises(IntegrityError, match="magic"):
        AdvertiseKeys.from_bytes(bad_magic)


# -- the active variant's blocks ----------------------------------------------------------------


def _signed_examples() -> list:
    from securefed.crypto.messages import ConsistencyRequest, ConsistencySignature

    def sig() -> bytes:
        return os.urandom(64)

    def commitments(n: int) -> tuple:
        return tuple((os.urandom(32), os.urandom(32), sig()) for _ in range(n))

    return [
        AdvertiseKeys(
            round_index=3,
            sender=2,
            encryption_public=os.urandom(32),
            mask_public=os.urandom(32),
            signature=sig(),
        ),
        PublicKeys(
            round_index=3,
            graph_seed=os.urandom(32),
            entries=tuple(KeyEntry(s, os.urandom(32), os.urandom(32), sig()) for s in (0, 2, 5)),
        ),
        EncryptedShares(
            round_index=3,
            sender=2,
            sealed=((0, os.urandom(SEALED_SHARES_BYTES)), (5, os.urandom(SEALED_SHARES_BYTES))),
            commitments=commitments(2),
        ),
        RelayedShares(
            round_index=3,
            recipient=2,
            sealed=((0, os.urandom(SEALED_SHARES_BYTES)),),
            commitments=commitments(1),
        ),
        ConsistencyRequest(round_index=3, survivors=(0, 2, 5)),
        ConsistencySignature(round_index=3, sender=2, signature=sig()),
        UnmaskRequest(round_index=3, survivors=(0, 2), dropped=(5,), signatures=((0, sig()),)),
        UnmaskShares(
            round_index=3,
            sender=2,
            seed_shares=((0, os.urandom(SHARE_BYTES)),),
            key_shares=((5, os.urandom(SHARE_BYTES)),),
            salts=(os.urandom(32), os.urandom(32)),
        ),
    ]


@pytest.mark.parametrize("message", _signed_examples(), ids=lambda m: type(m).__name__)
def test_signed_messages_round_trip_and_refuse_a_partial_block(message):
    # Execute
    data = message.to_bytes()

    # Assert: the round trip, and a frame whose trailing block lost its last byte (digest
    # recomputed) is refused by the body parser.
    assert type(message).from_bytes(data) == message
    header = bytearray(data[:HEADER_BYTES])
    body = data[HEADER_BYTES:-32][:-1]
    header[18:26] = struct.pack("<Q", len(body))
    cut = bytes(header) + body
    with pytest.raises(IntegrityError):
        type(message).from_bytes(cut + hashlib.sha256(cut).digest())


def test_an_unsigned_message_keeps_the_honest_but_curious_layout():
    # Prepare
    enc, mask = os.urandom(32), os.urandom(32)

    # Execute
    signed = AdvertiseKeys(
        round_index=1, sender=0, encryption_public=enc, mask_public=mask, signature=bytes(64)
    ).to_bytes()

    # Assert: the signature is a trailing block of exactly 64 bytes, absent when unsigned.
    assert len(signed) == HEADER_BYTES + 64 + 64 + 32
    with pytest.raises(IntegrityError, match="either every key entry is signed or none"):
        PublicKeys(
            round_index=1,
            graph_seed=os.urandom(32),
            entries=(KeyEntry(0, enc, mask, bytes(64)), KeyEntry(1, mask, enc)),
        )
