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
additionally sealed end-to-end with AES-GCM between the two sites.

Bodies (u32/u64 little-endian; id lists strictly increasing):

* ADVERTISE_KEYS (site): encryption public key (32) | mask public key (32).
* PUBLIC_KEYS (server): graph seed (32) | count (u32) | count x [site (u32) | enc pk (32) |
  mask pk (32)].
* ENCRYPTED_SHARES (site): count (u32) | count x [recipient (u32) | sealed share pair (160)].
* RELAYED_SHARES (server): recipient (u32) | count (u32) | count x [sender (u32) | sealed (160)].
* MASKED_INPUT (site): ring bits (u8) | dimension (u64) | dimension x word (4 or 8 bytes).
* UNMASK_REQUEST (server): survivors count (u32) | ids (u32 each) | dropped count (u32) | ids.
* UNMASK_SHARES (site): count (u32) | count x [owner (u32) | self-mask seed share (66)] |
  count (u32) | count x [owner (u32) | mask-key share (66)].

A sealed share pair is AES-GCM(nonce 12 | ciphertext of [b-share (66) | s_sk-share (66)] | tag
16) with associated data :func:`share_associated_data`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from securefed.crypto.aead import sealed_length
from securefed.crypto.framing import DIGEST_BYTES, FrameReader, check_digest, seal_frame
from securefed.crypto.prg import word_dtype
from securefed.crypto.shamir import SHARE_BYTES
from securefed.errors import ConfigError, IntegrityError, ProtocolError

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "SEALED_SHARES_BYTES",
    "SERVER_ID",
    "VERSION",
    "AdvertiseKeys",
    "EncryptedShares",
    "KeyEntry",
    "MaskedInput",
    "MessageType",
    "PublicKeys",
    "RelayedShares",
    "UnmaskRequest",
    "UnmaskShares",
    "claimed_sender",
    "message_type",
    "share_associated_data",
    "share_pair_plaintext",
    "split_share_pair",
]

MAGIC = b"SFSA"
VERSION = 1
SERVER_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<4sBBQIQ")
HEADER_BYTES = _HEADER.size
_KEY_BYTES = 32
SEALED_SHARES_BYTES = sealed_length(2 * SHARE_BYTES)
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


def share_associated_data(*, round_index: int, sender: int, recipient: int) -> bytes:
    """AES-GCM associated data binding a sealed share pair to its round and direction."""
    return b"securefed/secagg/v1/share-pair\x00" + struct.pack(
        "<QII", round_index, sender, recipient
    )


def share_pair_plaintext(*, seed_share: bytes, key_share: bytes) -> bytes:
    """Plaintext sealed from a site to a neighbour: b-share (66) | s_sk-share (66)."""
    if len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
        raise IntegrityError(f"each share must be {SHARE_BYTES} bytes.")
    return seed_share + key_share


def split_share_pair(plaintext: bytes) -> tuple[bytes, bytes]:
    """Inverse of :func:`share_pair_plaintext`; raises IntegrityError on a wrong length."""
    if len(plaintext) != 2 * SHARE_BYTES:
        raise IntegrityError(
            f"decrypted share pair is {len(plaintext)} bytes, expected {2 * SHARE_BYTES}."
        )
    return plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]


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

    """

    round_index: int
    sender: int
    encryption_public: bytes
    mask_public: bytes

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        _check_bytes(self.encryption_public, _KEY_BYTES, "`encryption_public`")
        _check_bytes(self.mask_public, _KEY_BYTES, "`mask_public`")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        return _frame(
            MessageType.ADVERTISE_KEYS,
            self.round_index,
            self.sender,
            self.encryption_public,
            self.mask_public,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AdvertiseKeys:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.ADVERTISE_KEYS
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        enc, mask = bytes(reader.take(_KEY_BYTES)), bytes(reader.take(_KEY_BYTES))
        reader.finish()
        return cls(round_index=round_index, sender=sender, encryption_public=enc, mask_public=mask)


@dataclass(frozen=True)
class KeyEntry:
    """One site's advertised public keys inside :class:`PublicKeys`."""

    site: int
    encryption_public: bytes
    mask_public: bytes

    def __post_init__(self) -> None:
        _check_site(self.site, "`site`")
        _check_bytes(self.encryption_public, _KEY_BYTES, "`encryption_public`")
        _check_bytes(self.mask_public, _KEY_BYTES, "`mask_public`")


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

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = [self.graph_seed, _U32.pack(len(self.entries))]
        for e in self.entries:
            parts += [_U32.pack(e.site), e.encryption_public, e.mask_public]
        return _frame(MessageType.PUBLIC_KEYS, self.round_index, SERVER_ID, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKeys:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.PUBLIC_KEYS
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        seed = bytes(reader.take(32))
        entries = []
        for _ in range(reader.count(_U32, 4 + 2 * _KEY_BYTES)):
            site = reader.unpack(_U32)[0]
            entries.append(
                KeyEntry(
                    site=site,
                    encryption_public=bytes(reader.take(_KEY_BYTES)),
                    mask_public=bytes(reader.take(_KEY_BYTES)),
                )
            )
        reader.finish()
        return cls(round_index=round_index, graph_seed=seed, entries=tuple(entries))


def _check_sealed(pairs: tuple[tuple[int, bytes], ...], what: str) -> None:
    _check_increasing([site for site, _ in pairs], what)
    for _, sealed in pairs:
        _check_bytes(sealed, SEALED_SHARES_BYTES, "sealed share pair")


def _sealed_parts(pairs: tuple[tuple[int, bytes], ...]) -> list[bytes]:
    parts = [_U32.pack(len(pairs))]
    for site, sealed in pairs:
        parts += [_U32.pack(site), sealed]
    return parts


def _read_sealed(reader: FrameReader) -> tuple[tuple[int, bytes], ...]:
    pairs = []
    for _ in range(reader.count(_U32, 4 + SEALED_SHARES_BYTES)):
        site = reader.unpack(_U32)[0]
        pairs.append((site, bytes(reader.take(SEALED_SHARES_BYTES))))
    return tuple(pairs)


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1 (site -> server): the sender's share pairs, each sealed to one neighbour.

    Attributes:
        round_index: Training round.
        sender: Site id.
        sealed: (recipient, sealed share pair) sorted by recipient.

    """

    round_index: int
    sender: int
    sealed: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        object.__setattr__(self, "sealed", tuple((int(s), c) for s, c in self.sealed))
        _check_sealed(self.sealed, "share recipient")
        if any(site == self.sender for site, _ in self.sealed):
            raise IntegrityError(f"site {self.sender} addressed a sealed share to itself.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        body = b"".join(_sealed_parts(self.sealed))
        return _frame(MessageType.ENCRYPTED_SHARES, self.round_index, self.sender, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.ENCRYPTED_SHARES
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        sealed = _read_sealed(reader)
        reader.finish()
        return cls(round_index=round_index, sender=sender, sealed=sealed)


@dataclass(frozen=True)
class RelayedShares:
    """Round 1 (server -> site): sealed share pairs addressed to ``recipient``.

    Attributes:
        round_index: Training round.
        recipient: Site id the shares are sealed to.
        sealed: (sender, sealed share pair) sorted by sender; the senders form U2 within the
            recipient's neighbourhood.

    """

    round_index: int
    recipient: int
    sealed: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.recipient, "`recipient`")
        object.__setattr__(self, "sealed", tuple((int(s), c) for s, c in self.sealed))
        _check_sealed(self.sealed, "share sender")
        if any(site == self.recipient for site, _ in self.sealed):
            raise IntegrityError(f"relayed shares for site {self.recipient} include its own.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        body = b"".join([_U32.pack(self.recipient), *_sealed_parts(self.sealed)])
        return _frame(MessageType.RELAYED_SHARES, self.round_index, SERVER_ID, body)

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayedShares:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.RELAYED_SHARES
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        recipient = reader.unpack(_U32)[0]
        sealed = _read_sealed(reader)
        reader.finish()
        return cls(round_index=round_index, recipient=recipient, sealed=sealed)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2 (site -> server): the masked vector y_u in Z_(2^k)^d.

    Attributes:
        round_index: Training round.
        sender: Site id.
        ring_bits: k, 32 or 64.
        words: 1-D vector of ring words (uint32/uint64).

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
                f"masked input `words` must be uint{self.ring_bits} (got {w.dtype})."
            )

    @property
    def dimension(self) -> int:
        """Number of ring words."""
        return int(self.words.size)

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring); the vector is copied once."""
        words = np.ascontiguousarray(self.words, dtype=word_dtype(self.ring_bits))
        head = struct.pack("<BQ", self.ring_bits, words.size)
        return _frame(
            MessageType.MASKED_INPUT,
            self.round_index,
            self.sender,
            head,
            memoryview(words).cast("B"),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        """Parse (zero-copy, read-only view) and validate; raises IntegrityError/ProtocolError."""
        kind = MessageType.MASKED_INPUT
        round_index, sender, body = _unframe_as(data, kind, from_server=False)
        reader = FrameReader(body, f"{kind.name} body")
        ring_bits, dimension = struct.unpack("<BQ", reader.take(9))
        if ring_bits not in (32, 64):
            raise IntegrityError(f"masked input declares a {ring_bits}-bit ring (32 or 64).")
        dtype = word_dtype(ring_bits)
        if dimension * dtype.itemsize != body.nbytes - 9:
            raise IntegrityError(
                f"masked input declares {dimension} words of {dtype.itemsize} bytes but "
                f"carries {body.nbytes - 9} bytes."
            )
        words = np.frombuffer(reader.take(dimension * dtype.itemsize), dtype=dtype)
        reader.finish()
        return cls(round_index=round_index, sender=sender, ring_bits=ring_bits, words=words)


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4 (server -> sites): who uploaded (U3) and who dropped after sharing (U2 - U3).

    Attributes:
        round_index: Training round.
        survivors: Sites whose masked input arrived; their self-mask seeds are reconstructed.
        dropped: Sites that shared keys but sent no input; their mask keys are reconstructed.

    """

    round_index: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        object.__setattr__(self, "survivors", tuple(self.survivors))
        object.__setattr__(self, "dropped", tuple(self.dropped))
        _check_increasing(self.survivors, "survivor")
        _check_increasing(self.dropped, "dropped site")
        both = set(self.survivors) & set(self.dropped)
        if both:
            raise IntegrityError(f"sites {sorted(both)} are listed as both survivor and dropped.")

    def to_bytes(self) -> bytes:
        """Serialize (see module docstring)."""
        parts = [_U32.pack(len(self.survivors))]
        parts += [_U32.pack(s) for s in self.survivors]
        parts += [_U32.pack(len(self.dropped))]
        parts += [_U32.pack(s) for s in self.dropped]
        return _frame(MessageType.UNMASK_REQUEST, self.round_index, SERVER_ID, b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parse and validate; raises IntegrityError or ProtocolError."""
        kind = MessageType.UNMASK_REQUEST
        round_index, _, body = _unframe_as(data, kind, from_server=True)
        reader = FrameReader(body, f"{kind.name} body")
        survivors = tuple(reader.unpack(_U32)[0] for _ in range(reader.count(_U32, 4)))
        dropped = tuple(reader.unpack(_U32)[0] for _ in range(reader.count(_U32, 4)))
        reader.finish()
        return cls(round_index=round_index, survivors=survivors, dropped=dropped)


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

    """

    round_index: int
    sender: int
    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _check_round(self.round_index)
        _check_site(self.sender, "`sender`")
        object.__setattr__(self, "seed_shares", tuple(self.seed_shares))
        object.__setattr__(self, "key_shares", tuple(self.key_shares))
        _check_share_list(self.seed_shares, "seed-share owner")
        _check_share_list(self.key_shares, "key-share owner")
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
        reader.finish()
        return cls(
            round_index=round_index, sender=sender, seed_shares=lists[0], key_shares=lists[1]
        )
