"""What both wire formats share: a trailing SHA-256 over the frame, and one bounds-checked reader.

The masking messages (:mod:`securefed.crypto.messages`) and the CKKS frames
(:mod:`securefed.crypto.ckks.framing`) each have their own header, but both end in the SHA-256
of every byte before it and are parsed with :class:`FrameReader`, so a length field that does
not fit its body is refused the same way in both.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

from securefed.errors import IntegrityError

__all__ = ["DIGEST_BYTES", "FrameReader", "check_digest", "seal_frame"]

#: Bytes of the trailing SHA-256.
DIGEST_BYTES = 32


class FrameReader:
    """Cursor over a frame (or its body) that refuses to read past its end.

    Args:
        data: The bytes to read.
        what: What they are, for messages (``"CKKS aggregate"``, ``"MASKED_INPUT body"``).

    """

    def __init__(self, data: memoryview, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self._pos

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (a view, not a copy).

        Raises:
            IntegrityError: Fewer than ``n`` bytes are left.

        """
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise IntegrityError(
                f"{self._what} is truncated: a field at offset {self._pos} needs {n} more bytes, "
                f"only {self.remaining} left; length fields do not match the body."
            )
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """The next ``fmt.size`` bytes, unpacked."""
        return fmt.unpack(self.take(fmt.size))

    def count(self, fmt: struct.Struct, item_bytes: int) -> int:
        """A count field, refused if that many ``item_bytes`` entries cannot fit what is left.

        Checked before any entry is read, so a forged count cannot make the parser loop or
        allocate far beyond the frame's size.
        """
        (n,) = self.unpack(fmt)
        if n * item_bytes > self.remaining:
            raise IntegrityError(
                f"{self._what} declares {n} entries of {item_bytes} bytes but only "
                f"{self.remaining} bytes remain."
            )
        return n

    def finish(self) -> None:
        """Refuse trailing bytes after the last field."""
        if self._pos != len(self._data):
            raise IntegrityError(f"{self._what} has {self.remaining} unexpected trailing bytes.")


def seal_frame(parts: list[bytes | memoryview]) -> bytes:
    """Join ``parts`` and append their SHA-256; the frame is copied once, by the final join."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return b"".join([*parts, digest.digest()])


def check_digest(frame: memoryview, what: str) -> memoryview:
    """The frame without its trailing SHA-256, after checking it.

    The digest detects truncation and corruption; it is not a MAC (authenticity is the
    transport's job, e.g. TLS).

    Raises:
        IntegrityError: The frame is too short or its digest does not match.

    """
    if len(frame) < DIGEST_BYTES:
        raise IntegrityError(f"{what} is truncated: {len(frame)} bytes, shorter than its digest.")
    body = frame[:-DIGEST_BYTES]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), frame[-DIGEST_BYTES:]):
        raise IntegrityError(
            f"{what} failed its SHA-256 check ({len(frame)} bytes): digest mismatch; truncated, "
            "tampered with or corrupted in transit."
        )
    return body
