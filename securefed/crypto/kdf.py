"""X25519 key agreement and HKDF-SHA256 keys bound to purpose, round and the two parties."""

from __future__ import annotations

import enum
import secrets
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.errors import ConfigError, IntegrityError

__all__ = [
    "DERIVED_KEY_BYTES",
    "KDF_DOMAIN",
    "PUBLIC_KEY_BYTES",
    "KeyPurpose",
    "agree",
    "derive_key",
    "generate_private_key",
    "hkdf_info",
    "load_private_key",
    "pairwise_mask_key",
    "public_bytes",
    "self_mask_key",
    "share_encryption_key",
]

KDF_DOMAIN = b"securefed/secagg/v1"
DERIVED_KEY_BYTES = 32
PUBLIC_KEY_BYTES = 32
_MAX_PARTY = 0xFFFFFFFF
_MAX_ROUND = (1 << 64) - 1


class KeyPurpose(enum.Enum):
    """What a derived key is for; part of every HKDF ``info`` so keys never collide."""

    SHARE_ENCRYPTION = "share-encryption"
    PAIRWISE_MASK = "pairwise-mask"
    SELF_MASK = "self-mask"
    NEIGHBOUR_GRAPH = "neighbour-graph"


def hkdf_info(*, purpose: KeyPurpose, round_index: int, first: int, second: int) -> bytes:
    """Return the HKDF ``info`` string: domain, purpose, round and two party ids.

    Layout: ``KDF_DOMAIN || 0x00 || len(purpose) (u8) || purpose || round (u64 LE) ||
    first (u32 LE) || second (u32 LE)``. The length prefix keeps the encoding injective.

    Args:
        purpose: What the key is for.
        round_index: Training round (0 <= round < 2^64).
        first: First party id (0 <= id < 2^32).
        second: Second party id.

    Returns:
        The info bytes.

    Raises:
        ConfigError: If a number is out of range.

    """
    if not 0 <= round_index <= _MAX_ROUND:
        raise ConfigError(f"`round_index` must be in [0, 2^64) (got {round_index}).")
    for name, party in (("first", first), ("second", second)):
        if not 0 <= party <= _MAX_PARTY:
            raise ConfigError(f"party id `{name}` must be in [0, 2^32) (got {party}).")
    label = purpose.value.encode("ascii")
    return (
        KDF_DOMAIN
        + b"\x00"
        + bytes([len(label)])
        + label
        + struct.pack("<QII", round_index, first, second)
    )


def derive_key(
    *, secret: bytes, purpose: KeyPurpose, round_index: int, first: int, second: int
) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` into a 32-byte key bound to its use.

    Args:
        secret: Input keying material (an X25519 shared secret or a random seed).
        purpose: What the key is for.
        round_index: Training round.
        first: First party id.
        second: Second party id.

    Returns:
        32 key bytes.

    """
    info = hkdf_info(purpose=purpose, round_index=round_index, first=first, second=second)
    return HKDF(
        algorithm=hashes.SHA256(), length=DERIVED_KEY_BYTES, salt=KDF_DOMAIN, info=info
    ).derive(secret)


def generate_private_key() -> X25519PrivateKey:
    """Return a fresh X25519 private key whose 32 bytes come from ``secrets`` (os.urandom)."""
    return X25519PrivateKey.from_private_bytes(secrets.token_bytes(32))


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Return the X25519 private key with raw bytes ``raw`` (32 bytes)."""
    if len(raw) != 32:
        raise IntegrityError(f"X25519 private key must be 32 bytes (got {len(raw)}).")
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the 32-byte raw public key of ``private_key``."""
    return private_key.public_key().public_bytes_raw()


def agree(*, private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 Diffie-Hellman with a peer's raw public key.

    Args:
        private_key: Our private key.
        peer_public: The peer's 32-byte public key.

    Returns:
        The 32-byte shared secret (feed it to HKDF, never use it directly).

    Raises:
        IntegrityError: If the public key is malformed or a low-order point (all-zero secret).

    """
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise IntegrityError(
            f"X25519 public key must be {PUBLIC_KEY_BYTES} bytes (got {len(peer_public)})."
        )
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise IntegrityError(
            "X25519 key agreement failed: the peer public key is a low-order point."
        ) from exc


def share_encryption_key(
    *,
    private_key: X25519PrivateKey,
    peer_public: bytes,
    round_index: int,
    sender: int,
    recipient: int,
) -> bytes:
    """AES-GCM key for Shamir shares sent from ``sender`` to ``recipient`` (directional).

    Both ends call this with the same ``sender``/``recipient`` order; a ciphertext from u to v
    cannot be replayed as one from v to u.
    """
    secret = agree(private_key=private_key, peer_public=peer_public)
    return derive_key(
        secret=secret,
        purpose=KeyPurpose.SHARE_ENCRYPTION,
        round_index=round_index,
        first=sender,
        second=recipient,
    )


def pairwise_mask_key(
    *,
    private_key: X25519PrivateKey,
    peer_public: bytes,
    round_index: int,
    site_a: int,
    site_b: int,
) -> bytes:
    """PRG key of the pairwise mask s_uv shared by two sites (symmetric in the two ids)."""
    if site_a == site_b:
        raise ConfigError(f"a pairwise mask needs two distinct sites (got {site_a} twice).")
    secret = agree(private_key=private_key, peer_public=peer_public)
    low, high = sorted((site_a, site_b))
    return derive_key(
        secret=secret,
        purpose=KeyPurpose.PAIRWISE_MASK,
        round_index=round_index,
        first=low,
        second=high,
    )


def self_mask_key(*, seed: bytes, round_index: int, site: int) -> bytes:
    """PRG key of the self mask PRG(b_u) of ``site`` from its 32-byte seed b_u."""
    if len(seed) != 32:
        raise IntegrityError(f"self-mask seed must be 32 bytes (got {len(seed)}).")
    return derive_key(
        secret=seed, purpose=KeyPurpose.SELF_MASK, round_index=round_index, first=site, second=site
    )
