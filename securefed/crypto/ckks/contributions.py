"""Signed CKKS contributions: what a key holder sums and decrypts, and their byte layout.

A key holder never decrypts a ciphertext the server composed: an active server could send
``2**72`` times the real aggregate (ciphertext doubling changes no scale), so the flooding
sized for k fresh encryptions would hide nothing and the released value, divided by
``2**72``, would be the raw decryption that gives away the key (Li and Micciancio 2021). So
each site signs its update frame with its Ed25519 identity key at fit, the server forwards
the signed frames (:func:`encode_contributions`), and the key holder checks every signature
against its roster, adds the ciphertexts itself and decrypts that sum.

Signed message (:func:`contribution_message`, big-endian)::

    CONTEXT (31 bytes: b"securefed/ckks/v1/contribution" + NUL)
    roster digest (32) | session (32) | round u64 | site id u32 | SHA-256 of the frame (32)

Contribution list (:func:`encode_contributions`, big-endian, then the SHA-256 of all before
it as every securefed frame)::

    magic b"SFCKCL" | version u8 | round u64 | count u32
    count times: site id u32 | signature (64) | frame length u64 | frame

At most :data:`MAX_CONTRIBUTIONS` entries, each frame at most :data:`MAX_FRAME_BYTES`; site
ids strictly increasing (so distinct).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from securefed.crypto.framing import FrameReader, check_digest, seal_frame
from securefed.errors import IntegrityError, ProtocolError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.crypto.roster import Roster

__all__ = [
    "CONTEXT",
    "MAX_CONTRIBUTIONS",
    "MAX_FRAME_BYTES",
    "SIGNATURE_BYTES",
    "Contribution",
    "contribution_message",
    "decode_contributions",
    "encode_contributions",
    "frame_digest",
    "sign_contribution",
    "verify_contribution",
]

#: Domain separation: a contribution signature is no other securefed signature.
CONTEXT = b"securefed/ckks/v1/contribution\x00"
#: Most entries a contribution list may hold (a roster is far smaller).
MAX_CONTRIBUTIONS = 4096
#: Largest update frame an entry may carry (4 GiB: a 1e8-parameter update at n = 8192).
MAX_FRAME_BYTES = 1 << 32
#: Bytes of an Ed25519 signature.
SIGNATURE_BYTES = 64

_MAGIC = b"SFCKCL"
_VERSION = 1
_HEAD = struct.Struct(">6sBQI")
_ENTRY = struct.Struct(">I64sQ")
_MESSAGE_TAIL = struct.Struct(">QI")


@dataclass(frozen=True)
class Contribution:
    """One site's signed update, as the key holder receives it.

    Attributes:
        site_id: The site that signed it.
        frame: Its CKKS update frame (:mod:`.framing`, kind update).
        signature: Its Ed25519 signature over :func:`contribution_message`.

    """

    site_id: int
    frame: bytes
    signature: bytes


def frame_digest(frame: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of an update frame (what the signature binds, and what a site remembers)."""
    return hashlib.sha256(frame).digest()


def contribution_message(
    *, roster: Roster, session: bytes, round_index: int, site_id: int, digest: bytes
) -> bytes:
    """The bytes a site signs for its update frame of ``round_index`` (layout above).

    Raises:
        ProtocolError: A session or digest that is not 32 bytes, or an id out of range.

    """
    if len(session) != 32 or len(digest) != 32:
        raise ProtocolError("a contribution binds a 32-byte session and a 32-byte frame digest")
    if not (0 <= int(round_index) < 1 << 64 and 0 <= int(site_id) < 1 << 32):
        raise ProtocolError(f"round {round_index} or site {site_id} out of range")
    return b"".join(
        [
            CONTEXT,
            roster.digest(),
            bytes(session),
            _MESSAGE_TAIL.pack(int(round_index), int(site_id)),
            bytes(digest),
        ]
    )


def sign_contribution(
    identity: Ed25519PrivateKey,
    *,
    roster: Roster,
    session: bytes,
    round_index: int,
    site_id: int,
    frame: bytes,
    digest: bytes | None = None,
) -> bytes:
    """A site's signature over its update frame (64 bytes); ``digest``: its SHA-256, if known."""
    message = contribution_message(
        roster=roster,
        session=session,
        round_index=round_index,
        site_id=site_id,
        digest=frame_digest(frame) if digest is None else digest,
    )
    return identity.sign(message)


def verify_contribution(
    roster: Roster,
    *,
    session: bytes,
    round_index: int,
    contribution: Contribution,
    digest: bytes | None = None,
) -> None:
    """Check that ``contribution`` was signed by its site's roster key for this session/round.

    ``digest``: the frame's SHA-256 if the caller computed it already (else computed here).

    Raises:
        ProtocolError: Unknown site, or a signature that does not verify (another frame,
            round, session, roster or site, or no signature at all).

    """
    if not isinstance(contribution.signature, bytes | bytearray) or (
        len(contribution.signature) != SIGNATURE_BYTES
    ):
        raise ProtocolError(
            f"site {contribution.site_id}'s contribution carries no {SIGNATURE_BYTES}-byte "
            "signature"
        )
    message = contribution_message(
        roster=roster,
        session=session,
        round_index=round_index,
        site_id=contribution.site_id,
        digest=frame_digest(contribution.frame) if digest is None else digest,
    )
    roster.verify(contribution.site_id, message, bytes(contribution.signature))


def encode_contributions(round_index: int, contributions: Sequence[Contribution]) -> bytes:
    """The contribution list the server sends the key holder (layout in the module doc).

    Raises:
        ProtocolError: Too many entries, repeated or unsorted site ids, a bad signature
            length or an oversized frame.

    """
    items = sorted(contributions, key=lambda c: c.site_id)
    if len(items) > MAX_CONTRIBUTIONS:
        raise ProtocolError(f"{len(items)} contributions; at most {MAX_CONTRIBUTIONS}")
    parts: list[bytes] = [_HEAD.pack(_MAGIC, _VERSION, int(round_index), len(items))]
    last = -1
    for c in items:
        if c.site_id <= last:
            raise ProtocolError(f"site {c.site_id} contributes twice")
        last = c.site_id
        if len(c.signature) != SIGNATURE_BYTES or len(c.frame) > MAX_FRAME_BYTES:
            raise ProtocolError(f"site {c.site_id}'s contribution is malformed")
        parts.append(_ENTRY.pack(c.site_id, bytes(c.signature), len(c.frame)))
        parts.append(bytes(c.frame))
    return seal_frame(parts)


def decode_contributions(data: bytes | bytearray | memoryview) -> tuple[int, list[Contribution]]:
    """Parse a contribution list strictly: (round, entries in increasing site id).

    Raises:
        IntegrityError: A damaged list, a count or length beyond the caps or the body,
            repeated or unsorted site ids, trailing bytes.

    """
    what = "CKKS contribution list"
    body = check_digest(memoryview(data), what)
    r = FrameReader(body, what)
    magic, version, round_index, count = r.unpack(_HEAD)
    if magic != _MAGIC or version != _VERSION:
        raise IntegrityError(f"{what}: unknown magic {bytes(magic)!r} or version {version}")
    if count > MAX_CONTRIBUTIONS or count * _ENTRY.size > r.remaining:
        raise IntegrityError(f"{what} declares {count} entries; the body cannot hold them")
    out: list[Contribution] = []
    last = -1
    for _ in range(count):
        site_id, signature, length = r.unpack(_ENTRY)
        if site_id <= last:
            raise IntegrityError(f"{what}: site ids repeat or are out of order at {site_id}")
        last = site_id
        if length > MAX_FRAME_BYTES:
            raise IntegrityError(f"{what}: site {site_id}'s frame declares {length} bytes")
        out.append(Contribution(int(site_id), bytes(r.take(length)), bytes(signature)))
    r.finish()
    return int(round_index), out
