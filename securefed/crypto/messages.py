"""SecAgg protocol messages with explicit little-endian byte layouts (never pickles).

Every message is one frame::

    offset  size  field
    0       4     magic  b"SFSA"
    4       1     version (1)
    5       1     type (MessageType)
    6       8     round index (u64)
    14      4     sender id (u32; the server is 0xFFFFFFFF)
    18      8     body length L (u64)
    26      L     body (layout per type, below)
    26+L    32    SHA-256 of bytes [0, 26+L)

Parsing checks magic, version, type, the exact total length and the digest, then the body's own
counts and lengths; any mismatch raises :class:`~securefed.errors.IntegrityError`. The digest
catches truncation and corruption; it is not a MAC. Authenticity of the site-server channel is
the transport's job (TLS), as in Bonawitz et al.'s model; the Shamir shares inside are
additionally sealed end-to-end with AES-GCM between the two sites, and in the active variant
what a site says that peers rely on (round keys, share commitments, the survivor list) is
signed with its identity key, so a server that relays it cannot change it.

Bodies (u32/u64 little-endian; id lists strictly increasing). A block marked *[active]* is
present exactly when the round runs the active-security variant (Bonawitz et al. 2017, Fig. 4
with signatures and the consistency round); it is absent in the honest-but-curious variant,
and a parser accepts the body only if what follows the base fields is exactly nothing or
exactly that block:

* ADVERTISE_KEYS (site): encryption public key (32) | mask public key (32) | [active] Ed25519
  signature (64) over :func:`round_keys_payload`.
* PUBLIC_KEYS (server): graph seed (32) | count (u32) | count x [site (u32) | enc pk (32) |
  mask pk (32)] | [active] count x signature (64), in entry order.
* ENCRYPTED_SHARES (site): count (u32) | count x [recipient (u32) | sealed share pair (224)] |
  [active] count x [seed-share commitment (32) | key-share commitment (32) | signature (64)
  over :func:`commitments_payload`], in entry order.
* RELAYED_SHARES (server): recipient (u32) | count (u32) | count x [sender (u32) | sealed
  (224)] | [active] count x [commitments (64) | signature (64)], in entry order.
* MASKED_INPUT (site): ring bits k (u8, 8 to 64) | dimension d (u64) | the d values in k bits
  each (:mod:`securefed.crypto.packing`: d words of 4 or 8 bytes for k = 32 or 64; otherwise
  byte planes then bit planes, d floor(k / 8) + (k mod 8) ceil(d / 8) bytes).
* CONSISTENCY_REQUEST (server, active only): count (u32) | U3 ids (u32 each).
* CONSISTENCY_SIGNATURE (site, active only): signature (64) over :func:`consistency_payload`.
* UNMASK_REQUEST (server): survivors count (u32) | ids (u32 each) | dropped count (u32) | ids |
  [active] count (u32) | count x [signer (u32) | consistency signature (64)], signers
  strictly increasing.
* UNMASK_SHARES (site): count (u32) | count x [owner (u32) | self-mask seed share (66)] |
  count (u32) | count x [owner (u32) | mask-key share (66)] | [active] one salt (32) per share,
  seed shares first, in list order.

A sealed share pair is AES-GCM(nonce 12 | ciphertext of [b-share (66) | b-salt (32) | s_sk-share
(66) | s_sk-salt (32)] | tag 16) with associated data :func:`share_associated_data`. A share's
commitment is :func:`share_commitment` (SHA-256 over its salt and bytes); the owner signs the
pair of commitments it deals to each holder, so a holder checks the share it opens and the
server checks each revealed share before reconstruction.

Signed payloads (:func:`round_keys_payload`, :func:`commitments_payload`,
:func:`consistency_payload`) start with their own domain string and bind the roster digest,
the 32-byte session id and the round, so no signature can be replayed into another purpose,
federation, session or round.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from securefed.crypto.aead import sealed_length
from securefed.crypto.framing import DIGEST_BYTES, FrameReader, check_digest, seal_frame
from securefed.crypto.packing import pack_words, packed_size, unpack_words
from securefed.crypto.prg import RING_BITS_MAX, RING_BITS_MIN, word_dtype
from securefed.crypto.shamir import SHARE_BYTES
from securefed.errors import ConfigError, IntegrityError, ProtocolError

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "SEALED_SHARES_BYTES",
    "SERVER_ID",
    "VERSION",
    "SALT_BYTES",
    "SESSION_BYTES",
    "SIGNATURE_BYTES",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShares",
    "KeyEntry",
    "MaskedInput",
    "MessageType",
    "PublicKeys",
    "RelayedShares",
    "UnmaskRequest",
    "UnmaskShares",
    "claimed_sender",
    "commitments_payload",
    "consistency_payload",
    "message_type",
    "round_keys_payload",
    "share_associated_data",
    "share_commitment",
    "share_pair_plaintext",
    "split_share_pair",
]

MAGIC = b"SFSA"
VERSION = 1
SERVER_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<4sBBQIQ")
HEADER_BYTES = _HEADER.size
_KEY_BYTES = 32
#: Salt of a share commitment (inside the sealed pair; revealed with the share).
SALT_BYTES = 32
#: Ed25519 signature length.
SIGNATURE_BYTES = 64
#: Session id length (SHA-256 of what identifies the run; see secagg.active).
SESSION_BYTES = 32
_DIGEST_BYTES = 32
_COMMIT_BYTES = 32
_PAIR_PLAINTEXT_BYTES = 2 * (SHARE_BYTES + SALT_BYTES)
SEALED_SHARES_BYTES = sealed_length(_PAIR_PLAINTEXT_BYTES)
_U32 = struct.Struct("<I")
_MAX_ROUND = (1 << 64) - 1


class MessageType(enum.IntEnum):
    """Frame type byte; one per protocol message (Bonawitz et al. 2017, Fig. 4 rounds 0-4)."""

    ADVERTISE_KEYS = 1
    PUBLIC_KEYS = 2
    ENCRYPTED_SHARES = 3
    RELAYED_SHARES = 4
    MASKED_INPUT = 5
    UNMASK_REQUEST = 6
    UNMASK_SHARES = 7
    CONSISTENCY_REQUEST = 8
    CONSISTENCY_SIGNATURE = 9


#: Seed share / key share, as bound into a share commitment.
SEED_SHARE, KEY_SHARE = 0, 1


def _check_binding(roster_digest: bytes, session: bytes) -> None:
    _check_bytes(roster_digest, _DIGEST_BYTES, "roster digest")
    _check_bytes(session, SESSION_BYTES, "session id")


def round_keys_payload(
    *,
    roster_digest: bytes,
    session: bytes,
    round_index: int,
    site: int,
    encryption_public: bytes,
    mask_public: bytes,
) -> bytes:
    """What a site signs over its round keys (c_pk, s_pk) with its identity key.

    Layout: ``"securefed/secagg/v1/round-keys" + NUL`` | roster digest (32) | session (32) |
    round (u64) | site (u32) | c_pk (32) | s_pk (32).
    """
    _check_binding(roster_digest, session)
    _check_round(round_index)
    _check_site(site, "`site`")
    _check_bytes(encryption_public, _KEY_BYTES, "`encryption_public`")
    _check_bytes(mask_public, _KEY_BYTES, "`mask_public`")
    return (
        b"securefed/secagg/v1/round-keys\x00"
        + roster_digest
        + session
        + struct.pack("<QI", round_index, site)
        + encryption_public
        + mask_public
    )


def share_commitment(
    *,
    session: bytes,
    round_index: int,
    owner: int,
    holder: int,
    kind: int,
    salt: bytes,
    share: bytes,
) -> bytes:
    """SHA-256 commitment to one Shamir share (hiding: the 32-byte salt stays secret).

    Layout hashed: ``"securefed/secagg/v1/share-commit" + NUL`` | session (32) | round (u64) |
    owner (u32) | holder (u32) | kind (u8: 0 seed, 1 key) | salt (32) | share (66).
    """
    import hashlib

    _check_bytes(session, SESSION_BYTES, "session id")
    _check_bytes(salt, SALT_BYTES, "share salt")
    _check_bytes(share, SHARE_BYTES, "Shamir share")
    if kind not in (SEED_SHARE, KEY_SHARE):
        raise IntegrityError(f"share kind must be 0 or 1 (got {kind!r}).")
    return hashlib.sha256(
        b"securefed/secagg/v1/share-commit\x00"
        + session
        + struct.pack("<QIIB", round_index, owner, holder, kind)
        + salt
        + share
    ).digest()


def commitments_payload(
    *,
    roster_digest: bytes,
    session: bytes,
    round_index: int,
    owner: int,
    holder: int,
    seed_commitment: bytes,
    key_commitment: bytes,
) -> bytes:
    """What an owner signs over the two share commitments it deals to one holder.

    Layout: ``"securefed/secagg/v1/share-commitments" + NUL`` | roster digest (32) |
    session (32) | round (u64) | owner (u32) | holder (u32) | seed commitment (32) |
    key commitment (32).
    """
    _check_binding(roster_digest, session)
    _check_round(round_index)
    _check_site(owner, "`owner`")
    _check_site(holder, "`holder`")
    _check_bytes(seed_commitment, _COMMIT_BYTES, "seed commitment")
    _check_bytes(key_commitment, _COMMIT_BYTES, "key commitment")
    return (
        b"securefed/secagg/v1/share-commitments\x00"
        + roster_digest
        + session
        + struct.pack("<QII", round_index, owner, holder)
        + seed_commitment
        + key_commitment
    )


def consistency_payload(
    *,
    roster_digest: bytes,
    session: bytes,
    round_index: int,
    transcript: bytes,
    survivors: Sequence[int],
) -> bytes:
    """What a surviving site signs in the consistency round: the U3 it was shown.

    Layout: ``"securefed/secagg/v1/consistency" + NUL`` | roster digest (32) | session (32) |
    round (u64) | transcript (32: SHA-256 of the PUBLIC_KEYS message the site received) |
    count (u32) | U3 ids (u32 each, strictly increasing).
    """
    _check_binding(roster_digest, session)
    _check_round(round_index)
    _check_bytes(transcript, _DIGEST_BYTES, "key-list transcript")
    ids = tuple(survivors)
    _check_increasing(ids, "survivor")
    return (
        b"securefed/secagg/v1/consistency\x00"
        + roster_digest
        + session
        + struct.pack("<Q", round_index)
        + transcript
        + _U32.pack(len(ids))
        + b"".join(_U32.pack(i) for i in ids)
    )


def share_associated_data(*, round_index: int, sender: int, recipient: int) -> bytes:
    """AES-GCM associated data binding a sealed share pair to its round and direction."""
    return b"securefed/secagg/v1/share-pair\x00" + struct.pack(
        "<QII", round_index, sender, recipient
    )


def share_pair_plaintext(
    *, seed_share: bytes, key_share: bytes, seed_salt: bytes, key_salt: bytes
) -> bytes:
    """Plaintext sealed to a neighbour: b-share (66) | b-salt (32) | s_sk-share (66) | salt (32)."""
    if len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
        raise IntegrityError(f"each share must be {SHARE_BYTES} bytes.")
    if len(seed_salt) != SALT_BYTES or len(key_salt) != SALT_BYTES:
        raise IntegrityError(f"each share salt must be {SALT_BYTES} bytes.")
    return seed_share + seed_salt + key_share + key_salt


def split_share_pair(plaintext: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Inverse of :func:`share_pair_plaintext`: (b-share, b-salt, s_sk-share, s_sk-salt).

    Raises:
        IntegrityError: On a wrong length.

    """
    if len(plaintext) != _PAIR_PLAINTEXT_BYTES:
        raise IntegrityError(
            f"decrypted share pair is {len(plaintext)} bytes, expected {_PAIR_PLAINTEXT_BYTES}."
        )
    a = SHARE_BYTES
    b = a + SALT_BYTES
    c = b + SHARE_BYTES
    return plaintext[:a], plaintext[a:b], plaintext[b:c], plaintext[c:]


def claimed_sender(data: bytes) -> int:
    """The sender id a frame's header claims, read without checking the rest of the frame.

    A transport that knows who answered compares it before the message is accepted (the full
    checks still run when the message is parsed).

    Raises:
        IntegrityError: Not a frame of this protocol.

    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < HEADER_BYTES:
        raise IntegrityError("not a secure-aggregation message (no complete header).")
    magic, _, _, _, sender, _ = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"message magic is {magic!r}, expected {MAGIC!r}.")
    return int(sender)


def message_type(data: bytes) -> MessageType:
    """Type of a framed message, after checking the frame (length, magic, digest)."""
    kind, _, _, _ = _unframe(data)
    return kind


def _check_round(round_index: int) -> None:
    if isinstance(round_index, bool) or not isinstance(round_index, int):
        raise IntegrityError(f"`round_index` must be an integer (got {round_index!r}).")
    if not 0 <= round_index <= _MAX_ROUND:
        raise IntegrityError(f"`round_index` must be in [0, 2^64) (got {round_index}).")


def _check_site(site: int, what: str) -> None:
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < SERVER_ID:
        raise IntegrityError(f"{what} must be a site id in [0, 2^32 - 1) (got {site!r}).")


def _check_increasing(ids: Sequence[int], what: str) -> None:
    for site in ids:
        _check_site(site, what)
    if any(a >= b for a, b in zip(ids[:-1], ids[1:], strict=True)):
        raise IntegrityError(f"{what} list must be strictly increasing (no duplicates).")


def _check_bytes(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise IntegrityError(f"{what} must be {size} bytes (got {got}).")


def _check_signature(signature: bytes, what: str = "signature") -> None:
    if not isinstance(signature, bytes) or len(signature) not in (0, SIGNATURE_BYTES):
        got = len(signature) if isinstance(signature, (bytes, bytearray)) else signature
        raise IntegrityError(f"{what} must be empty or {SIGNATURE_BYTES} bytes (got {got!r}).")


def _read_optional_block(reader: FrameReader, size: int) -> bytes:
    """The active variant's trailing block: exactly nothing or exactly ``size`` bytes."""
    if reader.remaining == 0:
        return b""
    if reader.remaining != size:
        raise IntegrityError(
            f"trailing block is {reader.remaining} bytes; expected none or exactly {size}."
        )
    return bytes(reader.take(size))


def _frame(kind: MessageType, round_index: int, sender: int, *body: bytes | memoryview) -> bytes:
    length = sum(memoryview(part).nbytes for part in body)
    header = _HEADER.pack(MAGIC, VERSION, int(kind), round_index, sender, length)
    return seal_frame([header, *body])


def _unframe(data: bytes) -> tuple[MessageType, int, int, memoryview]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise IntegrityError(f"a message must be bytes (got {type(data).__name__}).")
    view = memoryview(data).cast("B")
    if view.nbytes < HEADER_BYTES + DIGEST_BYTES:
        raise IntegrityError(
            f"message is {view.nbytes} bytes, shorter than header + digest "
            f"({HEADER_BYTES + DIGEST_BYTES}): truncated."
        )
    magic, version, kind, round_index, sender, length = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise IntegrityError(f"message magic is {magic!r}, expected {MAGIC!r}.")
    if version != VERSION:
        raise IntegrityError(f"message version is {version}, this code speaks {VERSION}.")
    try:
        kind = MessageType(kind)
    except ValueError:
        raise IntegrityError(f"unknown message type {kind}.") from None
    expected = HEADER_BYTES + length + DIGEST_BYTES
    if view.nbytes != expected:
        raise IntegrityError(
            f"{kind.name} message is {view.nbytes} bytes but its header declares {expected}: "
            "truncated or padded."
        )
    signed = check_digest(view, f"{kind.name} message")
    return kind, round_index, sender, signed[HEADER_BYTES:]


def _unframe_as(
    data: bytes, expected: MessageType, *, from_server: bool
) -> tuple[int, int, memoryview]:
    kind, round_index, sender, body = _unframe(data)
    if kind != expected:
        raise ProtocolError(f"expected a {expected.name} message, got {kind.name}.")
    if from_server and sender != SERVER_ID:
        raise ProtocolError(f"{kind.name} must come from the server (sender {sender}).")
    if not from_server and sender == SERVER_ID:
        raise ProtocolError(f"{kind.name} must come from a site, not the server.")
    return round_index, sender, body


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0 (site -> server): the site's two X25519 public keys.

    Attributes:
        round_index: Training round.
        sender: Site id.
        encryption_public: c_pk, for sealing shares between sites.
        mask_public: s_pk, for pairwise mask agreement.
        signature: Active variant: the sender's Ed25519 signature over
            :func:`round_keys_payload`; ``b""`` in the honest-but-curious variant.

    """

    round_index: int
    sender: int
    encryption_public: bytes
    mask_public: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        _check_bytes(self.encryption_public, _KEY_BYTES, "`encryption_public`")
        _check_bytes(self.mask_public, _KEY_BYTES, "`mask_public`")
        _check_signature(self.signature)

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        return _frame(
            MessageType.ADVERTISE_KEYS,
            self.round_index,
            self.sender,
            self.encryption_public,
            self.mask_public,
            self.signature,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.ADVERTISE_KEYS
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        enc, mask = bytes(reader.take(_KEY_BYTES)), bytes(reader.take(_KEY_BYTES))
        signature = _read_optional_block(reader, SIGNATURE_BYTES)
        reader.finish()
        return cls(
            round_index=round_index,
            sender=sender,
            encryption_public=enc,
            mask_public=mask,
            signature=signature,
        )


@dataclass(frozen=True)
class KeyEntry:
    """One site's advertised public keys inside :class:`PublicKeys`."""

    site: int
    encryption_public: bytes
    mask_public: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        _check_site(self.site, "`site`")
        _check_bytes(self.encryption_public, _KEY_BYTES, "`encryption_public`")
        _check_bytes(self.mask_public, _KEY_BYTES, "`mask_public`")
        _check_signature(self.signature)


@dataclass(frozen=True)
class PublicKeys:
    """Round 0 (server -> sites): every advertised key pair and the public graph seed.

    Attributes:
        round_index: Training round.
        graph_seed: 32 public random bytes for the SecAgg+ graph.
        entries: One entry per site, sorted by site id.

    """

    round_index: int
    graph_seed: bytes
    entries: tuple[KeyEntry, ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_bytes(self.graph_seed, 32, "`graph_seed`")
        object.__setattr__(self, "entries", tuple(self.entries))
        _check_increasing([e.site for e in self.entries], "key entry site")
        if len({bool(e.signature) for e in self.entries}) > 1:
            raise IntegrityError("either every key entry is signed or none is.")

    @property
    def signed(self) -> bool:
        """Whether the entries carry signatures (the active variant)."""
        return bool(self.entries) and bool(self.entries[0].signature)

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = [self.graph_seed, _U32.pack(len(self.entries))]
        for e in self.entries:
            parts += [_U32.pack(e.site), e.encryption_public, e.mask_public]
        parts += [e.signature for e in self.entries]
        return _frame(MessageType.PUBLIC_KEYS, self.round_index, SERVER_ID, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKeys:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.PUBLIC_KEYS
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        seed = bytes(reader.take(32))
        raw = []
        for _ in range(reader.count(_U32, 4 + 2 * _KEY_BYTES)):
            site = reader.unpack(_U32)[0]
            raw.append((site, bytes(reader.take(_KEY_BYTES)), bytes(reader.take(_KEY_BYTES))))
        block = _read_optional_block(reader, SIGNATURE_BYTES * len(raw)) if raw else b""
        reader.finish()
        entries = []
        for i, (site, enc, mask) in enumerate(raw):
            sig = block[i * SIGNATURE_BYTES : (i + 1) * SIGNATURE_BYTES]
            entries.append(
                KeyEntry(site=site, encryption_public=enc, mask_public=mask, signature=sig)
            )
        return cls(round_index=round_index, graph_seed=seed, entries=tuple(entries))


#: One signed pair of share commitments: (seed commitment, key commitment, owner's signature).
Commitments = tuple[bytes, bytes, bytes]
_COMMITMENTS_BYTES = 2 * _COMMIT_BYTES + SIGNATURE_BYTES


def _check_sealed(
    pairs: tuple[tuple[int, bytes], ...], commitments: tuple[Commitments, ...], what: str
) -> None:
    _check_increasing([site for site, _ in pairs], what)
    for _, sealed in pairs:
        _check_bytes(sealed, SEALED_SHARES_BYTES, "sealed share pair")
    if commitments and len(commitments) != len(pairs):
        raise IntegrityError(
            f"{len(commitments)} commitment entries for {len(pairs)} sealed share pairs."
        )
    for entry in commitments:
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise IntegrityError("a commitment entry is (seed commitment, key commitment, sig).")
        _check_bytes(entry[0], _COMMIT_BYTES, "seed-share commitment")
        _check_bytes(entry[1], _COMMIT_BYTES, "key-share commitment")
        _check_bytes(entry[2], SIGNATURE_BYTES, "commitment signature")


def _sealed_parts(
    pairs: tuple[tuple[int, bytes], ...], commitments: tuple[Commitments, ...]
) -> list[bytes]:
    parts = [_U32.pack(len(pairs))]
    for site, sealed in pairs:
        parts += [_U32.pack(site), sealed]
    for entry in commitments:
        parts += list(entry)
    return parts


def _read_sealed(
    reader: FrameReader,
) -> tuple[tuple[tuple[int, bytes], ...], tuple[Commitments, ...]]:
    pairs = []
    for _ in range(reader.count(_U32, 4 + SEALED_SHARES_BYTES)):
        site = reader.unpack(_U32)[0]
        pairs.append((site, bytes(reader.take(SEALED_SHARES_BYTES))))
    block = _read_optional_block(reader, _COMMITMENTS_BYTES * len(pairs)) if pairs else b""
    commitments = []
    for i in range(len(block) // _COMMITMENTS_BYTES):
        entry = block[i * _COMMITMENTS_BYTES : (i + 1) * _COMMITMENTS_BYTES]
        commitments.append(
            (entry[:_COMMIT_BYTES], entry[_COMMIT_BYTES : 2 * _COMMIT_BYTES], entry[64:])
        )
    return tuple(pairs), tuple(commitments)


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1 (site -> server): the sender's share pairs, each sealed to one neighbour.

    Attributes:
        round_index: Training round.
        sender: Site id.
        sealed: (recipient, sealed share pair) sorted by recipient.
        commitments: Active variant: per entry of ``sealed``, the commitments to the seed and
            key shares sealed in it and the sender's signature over them
            (:func:`commitments_payload`); empty in the honest-but-curious variant.

    """

    round_index: int
    sender: int
    sealed: tuple[tuple[int, bytes], ...]
    commitments: tuple[Commitments, ...] = ()

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        object.__setattr__(self, "sealed", tuple((int(s), c) for s, c in self.sealed))
        object.__setattr__(self, "commitments", tuple(tuple(c) for c in self.commitments))
        _check_sealed(self.sealed, self.commitments, "share recipient")
        if any(site == self.sender for site, _ in self.sealed):
            raise IntegrityError(f"site {self.sender} addressed a sealed share to itself.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        body = b"".join(_sealed_parts(self.sealed, self.commitments))
        return _frame(MessageType.ENCRYPTED_SHARES, self.round_index, self.sender, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.ENCRYPTED_SHARES
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        sealed, commitments = _read_sealed(reader)
        reader.finish()
        return cls(round_index=round_index, sender=sender, sealed=sealed, commitments=commitments)


@dataclass(frozen=True)
class RelayedShares:
    """Round 1 (server -> site): sealed share pairs addressed to ``recipient``.

    Attributes:
        round_index: Training round.
        recipient: Site id the shares are sealed to.
        sealed: (sender, sealed share pair) sorted by sender; the senders form U2 within the
            recipient's neighbourhood.
        commitments: Active variant: per entry, the sender's signed commitments to the shares
            sealed in it (as in :class:`EncryptedShares`); empty otherwise.

    """

    round_index: int
    recipient: int
    sealed: tuple[tuple[int, bytes], ...]
    commitments: tuple[Commitments, ...] = ()

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.recipient, "`recipient`")
        object.__setattr__(self, "sealed", tuple((int(s), c) for s, c in self.sealed))
        object.__setattr__(self, "commitments", tuple(tuple(c) for c in self.commitments))
        _check_sealed(self.sealed, self.commitments, "share sender")
        if any(site == self.recipient for site, _ in self.sealed):
            raise IntegrityError(f"relayed shares for site {self.recipient} include its own.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = _sealed_parts(self.sealed, self.commitments)
        body = b"".join([_U32.pack(self.recipient), *parts])
        return _frame(MessageType.RELAYED_SHARES, self.round_index, SERVER_ID, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayedShares:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.RELAYED_SHARES
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        recipient = reader.unpack(_U32)[0]
        sealed, commitments = _read_sealed(reader)
        reader.finish()
        return cls(
            round_index=round_index, recipient=recipient, sealed=sealed, commitments=commitments
        )


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2 (site -> server): the masked vector y_u in Z_(2^k)^d.

    On the wire each value takes k bits (:mod:`securefed.crypto.packing`; for k = 32 or 64
    that is the little-endian words themselves), so only the residues mod 2^k are sent.

    Attributes:
        round_index: Training round.
        sender: Site id.
        ring_bits: k, from 8 to 64.
        words: 1-D vector of ring words (uint32 for k <= 32, else uint64); a parsed message's
            are below 2^k.

    """

    round_index: int
    sender: int
    ring_bits: int
    words: np.ndarray

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        try:
            dtype = word_dtype(self.ring_bits)
        except ConfigError as exc:
            raise IntegrityError(f"masked input: {exc}") from None
        w = self.words
        if not isinstance(w, np.ndarray) or w.ndim != 1:
            raise IntegrityError("masked input `words` must be a 1-D numpy array.")
        if w.dtype.kind != "u" or w.dtype.itemsize != dtype.itemsize:
            raise IntegrityError(
                f"masked input `words` of a {self.ring_bits}-bit ring must be "
                f"uint{8 * dtype.itemsize} (got {w.dtype})."
            )

    @property
    def dimension(self) -> int:
        """Number of ring words."""
        return int(self.words.size)

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring); the vector is copied once (twice when packed)."""
        head = struct.pack("<BQ", self.ring_bits, self.words.size)
        return _frame(
            MessageType.MASKED_INPUT,
            self.round_index,
            self.sender,
            head,
            pack_words(self.words, self.ring_bits),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, expect: tuple[int, int] | None = None) -> MaskedInput:
        """Parse and validate; raises IntegrityError/ProtocolError.

        For 32- and 64-bit rings the words are a zero-copy, read-only view of ``data``.

        Args:
            data: The message.
            expect: The ``(ring_bits, dimension)`` the receiver accepts, checked against the
                header before any value is unpacked: a site declaring a narrower ring than
                the run's cannot make the server allocate several times its message.

        """
        kind = MessageType.MASKED_INPUT
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        ring_bits, dimension = struct.unpack("<BQ", reader.take(9))
        if expect is not None and ring_bits != expect[0]:
            raise IntegrityError(
                f"masked input from site {sender} uses a {ring_bits}-bit ring, expected "
                f"{expect[0]}."
            )
        if expect is not None and dimension != expect[1]:
            raise IntegrityError(
                f"masked input from site {sender} has {dimension} words, expected {expect[1]}."
            )
        if not RING_BITS_MIN <= ring_bits <= RING_BITS_MAX:
            raise IntegrityError(
                f"masked input declares a {ring_bits}-bit ring ({RING_BITS_MIN} to "
                f"{RING_BITS_MAX})."
            )
        # The length is checked before any allocation: a header declaring 2^60 values in a
        # short frame is refused, not unpacked.
        size = body.nbytes - 9
        if dimension > 8 * size or packed_size(dimension, ring_bits) != size:
            raise IntegrityError(
                f"masked input declares {dimension} values of {ring_bits} bits but carries "
                f"{size} bytes."
            )
        words = unpack_words(reader.take(size), ring_bits, dimension)
        reader.finish()
        return cls(round_index=round_index, sender=sender, ring_bits=ring_bits, words=words)


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4 (server -> sites): who uploaded (U3) and who dropped after sharing (U2 - U3).

    Attributes:
        round_index: Training round.
        survivors: Sites whose masked input arrived; their self-mask seeds are reconstructed.
        dropped: Sites that shared keys but sent no input; their mask keys are reconstructed.
        signatures: Active variant: (signer, consistency signature) of the survivors that
            signed U3, signers strictly increasing; empty in the honest-but-curious variant.

    """

    round_index: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        object.__setattr__(self, "survivors", tuple(self.survivors))
        object.__setattr__(self, "dropped", tuple(self.dropped))
        object.__setattr__(self, "signatures", tuple((int(s), g) for s, g in self.signatures))
        _check_increasing(self.survivors, "survivor")
        _check_increasing(self.dropped, "dropped site")
        _check_increasing([s for s, _ in self.signatures], "consistency signer")
        for _, sig in self.signatures:
            _check_bytes(sig, SIGNATURE_BYTES, "consistency signature")
        both = set(self.survivors) & set(self.dropped)
        if both:
            raise IntegrityError(f"sites {sorted(both)} are listed as both survivor and dropped.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = [_U32.pack(len(self.survivors))]
        parts += [_U32.pack(s) for s in self.survivors]
        parts += [_U32.pack(len(self.dropped))]
        parts += [_U32.pack(s) for s in self.dropped]
        if self.signatures:
            parts += [_U32.pack(len(self.signatures))]
            for signer, sig in self.signatures:
                parts += [_U32.pack(signer), sig]
        return _frame(MessageType.UNMASK_REQUEST, self.round_index, SERVER_ID, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.UNMASK_REQUEST
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        survivors = tuple(reader.unpack(_U32)[0] for _ in range(reader.count(_U32, 4)))
        dropped = tuple(reader.unpack(_U32)[0] for _ in range(reader.count(_U32, 4)))
        signatures = []
        if reader.remaining:
            count = reader.count(_U32, 4 + SIGNATURE_BYTES)
            if count == 0:
                raise IntegrityError("an empty signature block must be left out.")
            for _ in range(count):
                signer = reader.unpack(_U32)[0]
                signatures.append((signer, bytes(reader.take(SIGNATURE_BYTES))))
        reader.finish()
        return cls(
            round_index=round_index,
            survivors=survivors,
            dropped=dropped,
            signatures=tuple(signatures),
        )


@dataclass(frozen=True)
class ConsistencyRequest:
    """Active variant, after the masked inputs (server -> uploaders): U3, to be signed.

    Attributes:
        round_index: Training round.
        survivors: U3, the sites whose masked input the server holds.

    """

    round_index: int
    survivors: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        object.__setattr__(self, "survivors", tuple(self.survivors))
        _check_increasing(self.survivors, "survivor")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = [_U32.pack(len(self.survivors))] + [_U32.pack(s) for s in self.survivors]
        return _frame(MessageType.CONSISTENCY_REQUEST, self.round_index, SERVER_ID, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencyRequest:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.CONSISTENCY_REQUEST
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        survivors = tuple(reader.unpack(_U32)[0] for _ in range(reader.count(_U32, 4)))
        reader.finish()
        return cls(round_index=round_index, survivors=survivors)


@dataclass(frozen=True)
class ConsistencySignature:
    """Active variant (site -> server): the site's signature over the U3 it was shown.

    Attributes:
        round_index: Training round.
        sender: Site id.
        signature: Ed25519 signature over :func:`consistency_payload`.

    """

    round_index: int
    sender: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        _check_bytes(self.signature, SIGNATURE_BYTES, "consistency signature")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        return _frame(
            MessageType.CONSISTENCY_SIGNATURE, self.round_index, self.sender, self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ConsistencySignature:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.CONSISTENCY_SIGNATURE
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        signature = bytes(reader.take(SIGNATURE_BYTES))
        reader.finish()
        return cls(round_index=round_index, sender=sender, signature=signature)


def _check_share_list(pairs: tuple[tuple[int, bytes], ...], what: str) -> None:
    _check_increasing([site for site, _ in pairs], what)
    for _, share in pairs:
        _check_bytes(share, SHARE_BYTES, "Shamir share")


@dataclass(frozen=True)
class UnmaskShares:
    """Round 4 (site -> server): Shamir shares the server needs to remove the masks.

    Attributes:
        round_index: Training round.
        sender: Site id (its share index is ``sender + 1``).
        seed_shares: (owner, share of b_owner) for surviving owners.
        key_shares: (owner, share of s_sk_owner) for owners that dropped after sharing.
        salts: Active variant: the commitment salt of each share, seed shares first, in list
            order (the server checks each share against its owner's signed commitment);
            empty in the honest-but-curious variant.

    """

    round_index: int
    sender: int
    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]
    salts: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        object.__setattr__(self, "seed_shares", tuple(self.seed_shares))
        object.__setattr__(self, "key_shares", tuple(self.key_shares))
        object.__setattr__(self, "salts", tuple(self.salts))
        _check_share_list(self.seed_shares, "seed-share owner")
        _check_share_list(self.key_shares, "key-share owner")
        n = len(self.seed_shares) + len(self.key_shares)
        if self.salts and len(self.salts) != n:
            raise IntegrityError(f"{len(self.salts)} salts for {n} shares.")
        for salt in self.salts:
            _check_bytes(salt, SALT_BYTES, "share salt")
        both = {o for o, _ in self.seed_shares} & {o for o, _ in self.key_shares}
        if both:
            # Revealing both b_u and s_sk_u of one site would unmask its input (Bonawitz 2017).
            raise IntegrityError(
                f"sites {sorted(both)} have both a seed share and a key share in one message."
            )

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = []
        for pairs in (self.seed_shares, self.key_shares):
            parts.append(_U32.pack(len(pairs)))
            for owner, share in pairs:
                parts += [_U32.pack(owner), share]
        parts += list(self.salts)
        return _frame(MessageType.UNMASK_SHARES, self.round_index, self.sender, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskShares:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.UNMASK_SHARES
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        lists = []
        for _ in range(2):
            pairs = []
            for _ in range(reader.count(_U32, 4 + SHARE_BYTES)):
                owner = reader.unpack(_U32)[0]
                pairs.append((owner, bytes(reader.take(SHARE_BYTES))))
            lists.append(tuple(pairs))
        n = len(lists[0]) + len(lists[1])
        block = _read_optional_block(reader, SALT_BYTES * n) if n else b""
        reader.finish()
        salts = tuple(block[i * SALT_BYTES : (i + 1) * SALT_BYTES] for i in range(len(block) // 32))
        return cls(
            round_index=round_index,
            sender=sender,
            seed_shares=lists[0],
            key_shares=lists[1],
            salts=salts,
        )
