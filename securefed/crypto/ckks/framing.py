"""The CKKS byte layouts: key contexts, site updates and aggregates (big-endian).

Every frame is a prefix (magic ``SFCKKS``, version, kind, 16-byte key id), a kind-specific
body, and the SHA-256 of all before it (:func:`securefed.crypto.framing.seal_frame`); bodies
are read with the shared :class:`~securefed.crypto.framing.FrameReader`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from securefed.crypto.framing import DIGEST_BYTES, FrameReader, check_digest, seal_frame
from securefed.errors import ConfigError, IntegrityError, ProtocolError

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    pass

__all__ = [
    "AGGREGATOR_ID",
    "MAGIC",
    "VERSION",
    "FrameHeader",
    "KEY_BODY",
    "KEY_ID_BYTES",
    "KEY_TAIL",
    "KIND_AGGREGATE",
    "KIND_NAMES",
    "KIND_PUBLIC_CONTEXT",
    "KIND_SECRET_CONTEXT",
    "KIND_UPDATE",
    "MAX_SITE_ID",
    "PREFIX",
    "U32",
    "U64",
    "VECTOR_BODY",
    "check_site_id",
    "chunk_sizes",
    "decode_vector_frame",
    "encode_vector_frame",
    "layout_id",
    "open_frame",
    "read_frame_header",
]

# Byte layout (big-endian). Every frame: prefix, kind-specific body, SHA-256 of all before it.
MAGIC = b"SFCKKS"
VERSION = 1
KIND_SECRET_CONTEXT = 1
KIND_PUBLIC_CONTEXT = 2
KIND_UPDATE = 3
KIND_AGGREGATE = 4
KIND_NAMES = {
    KIND_SECRET_CONTEXT: "secret key context",
    KIND_PUBLIC_CONTEXT: "public key context",
    KIND_UPDATE: "site update",
    KIND_AGGREGATE: "aggregate",
}
PREFIX = struct.Struct(">6sBB16s")  # magic, version, kind, key_id
KEY_BODY = struct.Struct(">IB")  # poly_modulus_degree, number of primes (then one byte each)
KEY_TAIL = struct.Struct(">BB")  # global_scale_bits, encryption type
VECTOR_BODY = struct.Struct(">QIQ16sIIB")  # round, sender, n_values, layout, slots, chunks, w
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
KEY_ID_BYTES = 16
AGGREGATOR_ID = 0xFFFFFFFF  # the sender field of an aggregate frame
MAX_SITE_ID = AGGREGATOR_ID - 1


def open_frame(
    frame: bytes | bytearray | memoryview, *, kinds: Collection[int], what: str
) -> tuple[int, bytes, FrameReader]:
    """Check magic, version, kind and digest; return (kind, key_id, reader over the body)."""
    data = memoryview(frame).cast("B")
    if len(data) < PREFIX.size + DIGEST_BYTES:
        raise IntegrityError(
            f"{what} is truncated: {len(data)} bytes, shorter than the "
            f"{PREFIX.size + DIGEST_BYTES}-byte header and digest."
        )
    magic, version, kind, key_id = PREFIX.unpack(data[: PREFIX.size])
    if magic != MAGIC:
        raise IntegrityError(f"{what} is not a securefed CKKS frame (bad magic {bytes(magic)!r}).")
    if version != VERSION:
        raise IntegrityError(f"{what} has format version {version}; this code reads {VERSION}.")
    body = check_digest(data, what)
    if kind not in kinds:
        expected = " or ".join(KIND_NAMES[k] for k in kinds)
        got = KIND_NAMES.get(kind, f"unknown kind {kind}")
        raise ProtocolError(f"{what} is a {got} frame; expected a {expected} frame.")
    reader = FrameReader(body, what)
    reader.take(PREFIX.size)
    return kind, bytes(key_id), reader


def layout_id(n_total: int, indices: np.ndarray | None) -> bytes:
    """Fingerprint of which coordinates a frame carries, so mismatched subsets never add."""
    h = hashlib.sha256(b"securefed-ckks-layout-v1")
    h.update(U64.pack(n_total))
    if indices is not None:
        h.update(np.ascontiguousarray(indices, dtype=">i8").tobytes())
    return h.digest()[:16]


def check_site_id(site_id: int) -> int:
    """A site id that fits a frame's sender field (the aggregator's id excluded)."""
    if isinstance(site_id, bool) or not isinstance(site_id, int | np.integer):
        raise ConfigError(f"`site_id` must be an integer (got {site_id!r}).")
    if not 0 <= site_id <= MAX_SITE_ID:
        raise ConfigError(f"`site_id` must lie in [0, {MAX_SITE_ID}] (got {site_id}).")
    return int(site_id)


@dataclass(frozen=True)
class FrameHeader:
    """The clear-text header of an update or aggregate frame (no ciphertext is decoded).

    Attributes:
        kind: ``"update"`` or ``"aggregate"``.
        key_id: The key set the ciphertexts are under.
        round_index: The round the frame belongs to.
        sender: The site id, or None for an aggregate.
        n_values: Encrypted coordinates carried.
        layout_id: Fingerprint of the vector length and coordinate subset.
        slots: Values per ciphertext.
        n_chunks: Number of ciphertexts.
        weighted: Whether the server multiplied by plaintext weights.
        contributors: For an aggregate, the sites summed (as claimed by the server).
        n_bytes: Size of the whole frame.

    """

    kind: str
    key_id: bytes
    round_index: int
    sender: int | None
    n_values: int
    layout_id: bytes
    slots: int
    n_chunks: int
    weighted: bool
    contributors: tuple[int, ...]
    n_bytes: int


def encode_vector_frame(
    *,
    kind: int,
    key_id: bytes,
    round_index: int,
    sender: int,
    n_values: int,
    layout_id: bytes,
    slots: int,
    weighted: bool,
    contributors: Sequence[int],
    chunks: Sequence[bytes],
) -> bytes:
    """An update or aggregate frame: header, contributor ids, then each serialized chunk."""
    parts = [
        PREFIX.pack(MAGIC, VERSION, kind, key_id),
        VECTOR_BODY.pack(
            round_index, sender, n_values, layout_id, slots, len(chunks), int(weighted)
        ),
        U32.pack(len(contributors)),
        b"".join(U32.pack(c) for c in contributors),
    ]
    for blob in chunks:
        parts.append(U64.pack(len(blob)))
        parts.append(blob)
    return seal_frame(parts)


def decode_vector_frame(
    frame: bytes | bytearray | memoryview, *, kinds: Collection[int], what: str
) -> tuple[FrameHeader, list[memoryview]]:
    """Check a vector frame and return its header and chunk views (nothing is deserialized).

    Raises:
        IntegrityError: The frame is damaged or its counts are inconsistent.
        ProtocolError: A frame of another kind than ``kinds``.

    """
    kind, key_id, r = open_frame(frame, kinds=kinds, what=what)
    round_index, sender, n_values, layout, slots, n_chunks, weighted = r.unpack(VECTOR_BODY)
    (n_contrib,) = r.unpack(U32)
    contributors = tuple(U32.unpack(r.take(4))[0] for _ in range(n_contrib))
    if slots == 0 or n_values == 0 or n_chunks != -(-n_values // slots):
        raise IntegrityError(
            f"{what} is inconsistent: {n_values} values in {n_chunks} chunks of {slots} slots."
        )
    chunks = []
    for _ in range(n_chunks):
        (length,) = r.unpack(U64)
        chunks.append(r.take(length))
    r.finish()
    header = FrameHeader(
        kind="update" if kind == KIND_UPDATE else "aggregate",
        key_id=key_id,
        round_index=round_index,
        sender=None if sender == AGGREGATOR_ID else sender,
        n_values=n_values,
        layout_id=bytes(layout),
        slots=slots,
        n_chunks=n_chunks,
        weighted=bool(weighted),
        contributors=contributors,
        n_bytes=len(memoryview(frame).cast("B")),
    )
    return header, chunks


def read_frame_header(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """Check an update or aggregate frame's integrity and return its clear-text header.

    Raises:
        IntegrityError: The frame is truncated, tampered with, or malformed.

    """
    header, _ = decode_vector_frame(frame, kinds=(KIND_UPDATE, KIND_AGGREGATE), what="CKKS frame")
    return header


def chunk_sizes(n_values: int, slots: int) -> list[tuple[int, int]]:
    """(start, end) of each ciphertext's coordinates, ``slots`` at a time."""
    return [(s, min(s + slots, n_values)) for s in range(0, n_values, slots)]
