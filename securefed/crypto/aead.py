"""AES-256-GCM sealing of Shamir shares between two sites (relayed, unreadable, by the server)."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securefed.errors import ConfigError, IntegrityError

__all__ = ["NONCE_BYTES", "TAG_BYTES", "open_sealed", "seal", "sealed_length"]

NONCE_BYTES = 12
TAG_BYTES = 16


def sealed_length(plaintext_length: int) -> int:
    """Return the length of ``seal`` output for a plaintext of ``plaintext_length`` bytes."""
    return NONCE_BYTES + plaintext_length + TAG_BYTES


def _aesgcm(key: bytes) -> AESGCM:
    if len(key) != 32:
        raise ConfigError(f"AES-GCM `key` must be 32 bytes (got {len(key)}).")
    return AESGCM(key)


def seal(*, key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``associated_data`` is authenticated only.

    Each key encrypts one message (it is bound to round, sender and recipient by HKDF), and the
    96-bit nonce is still drawn from ``os.urandom`` so that a reused key would not reuse a nonce.

    Args:
        key: 32-byte AES-256 key.
        plaintext: Bytes to protect.
        associated_data: Context that must match on opening (round, sender, recipient).

    Returns:
        ``nonce || ciphertext || tag``.

    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aesgcm(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(*, key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Verify and decrypt the output of :func:`seal`.

    Args:
        key: 32-byte AES-256 key.
        sealed: ``nonce || ciphertext || tag``.
        associated_data: The context given to :func:`seal`.

    Returns:
        The plaintext.

    Raises:
        IntegrityError: If the input is too short or the tag does not verify (wrong key,
            wrong context, or modified bytes).

    """
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise IntegrityError(
            f"sealed share is {len(sealed)} bytes, shorter than nonce + tag "
            f"({NONCE_BYTES + TAG_BYTES})."
        )
    try:
        return _aesgcm(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag as exc:
        raise IntegrityError(
            "AES-GCM tag check failed: the sealed share was modified, or sealed for another "
            "round, sender or recipient."
        ) from exc
