"""The federation's signed roster: who the sites are, their identity keys, and pinned limits.

Secure aggregation against an active server (Bonawitz et al. 2017, the "active" variant)
needs every site to know its peers' long-term identity keys from somewhere the server cannot
rewrite. That is this roster. It lists each site's Ed25519 identity public key (in a
deployment, the key the site registered out of band; in-process, one generated per simulated
site) and the security parameters every site pins for itself:

* ``min_contributors``: the fewest sites any sum that a site helps reveal may hold (masking:
  survivors of a round; CKKS: contributors of an aggregate it decrypts);
* ``threshold``: the least Shamir threshold t a masking site accepts (None: the classic
  default for the roster's size, floor(2n/3) + 1).

The roster is signed by the *federation key*, an Ed25519 key held by whoever admits hospitals
to the federation, not by the aggregation server: a site verifies the signature against the
federation public key pinned in its own configuration, so a server that edits the roster
(adds a site it controls, lowers a limit) is refused. The file is canonical JSON; nothing in
it is unpickled or evaluated.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.crypto.secagg.config import default_threshold
from securefed.errors import ConfigError, IntegrityError, ProtocolError

__all__ = [
    "ROSTER_VERSION",
    "Roster",
    "federation_public_key",
    "load_signed_roster",
    "sign_roster",
]

#: Layout version of the roster and of the signed file.
ROSTER_VERSION = 1
# Domain separation: a roster signature can never be mistaken for any other securefed signature.
_CONTEXT = b"securefed/roster/v1\x00"
_KEY_BYTES = 32
_MAX_FILE_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def federation_public_key(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a federation (or site identity) private key."""
    return _public_bytes(key.public_key())


@dataclass(frozen=True)
class Roster:
    """The federation's members and the limits each of them pins.

    Attributes:
        federation: The federation's name (1-64 characters of ``[A-Za-z0-9._-]``); bound into
            every signature made under this roster.
        sites: Site id -> raw 32-byte Ed25519 identity public key.
        min_contributors: Fewest sites any sum a site helps reveal may hold (>= 2 when the
            roster has two sites or more: one site's "sum" is its update).
        threshold: Least masking threshold t a site accepts; None means
            ``default_threshold(n)`` for the roster's n sites.

    Raises:
        ConfigError: For a bad name, id, key, or limit.

    """

    federation: str
    sites: Mapping[int, bytes] = field(default_factory=dict)
    min_contributors: int = 2
    threshold: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not _NAME.match(self.federation):
            raise ConfigError(
                f"roster: federation name must be 1-64 characters of [A-Za-z0-9._-] "
                f"(got {self.federation!r})"
            )
        if not self.sites:
            raise ConfigError("roster: it lists no site")
        sites: dict[int, bytes] = {}
        for sid, key in self.sites.items():
            if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
                raise ConfigError(f"roster: site ids must be integers >= 0 (got {sid!r})")
            if not isinstance(key, bytes | bytearray) or len(key) != _KEY_BYTES:
                raise ConfigError(f"roster: site {sid}'s key must be {_KEY_BYTES} raw bytes")
            sites[sid] = bytes(key)
        if len(set(sites.values())) != len(sites):
            raise ConfigError("roster: two sites share one identity key")
        object.__setattr__(self, "sites", dict(sorted(sites.items())))
        n = len(sites)
        m = self.min_contributors
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
            raise ConfigError(f"roster: min_contributors must be in 1..{n} (got {m!r})")
        if n >= 2 and m < 2:
            raise ConfigError("roster: min_contributors must be at least 2 (one site is no sum)")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 2 <= t <= n):
            raise ConfigError(f"roster: threshold must be in 2..{n} or null (got {t!r})")

    @property
    def n_sites(self) -> int:
        """Number of sites in the federation."""
        return len(self.sites)

    @property
    def pinned_threshold(self) -> int:
        """The least masking threshold a site accepts."""
        if self.threshold is not None:
            return self.threshold
        return default_threshold(neighbourhood_size=self.n_sites)

    def identity(self, site_id: int) -> Ed25519PublicKey:
        """Site ``site_id``'s identity public key.

        Raises:
            ProtocolError: The id is not in the roster.

        """
        key = self.sites.get(site_id) if isinstance(site_id, int) else None
        if key is None:
            raise ProtocolError(f"site {site_id!r} is not in the federation's roster")
        return Ed25519PublicKey.from_public_bytes(key)

    def verify(self, site_id: int, message: bytes, signature: bytes) -> None:
        """Check that ``signature`` over ``message`` is by site ``site_id``'s identity key.

        Raises:
            ProtocolError: Unknown site, or a signature that does not verify.

        """
        key = self.identity(site_id)
        try:
            key.verify(bytes(signature), bytes(message))
        except (InvalidSignature, TypeError, ValueError) as exc:
            raise ProtocolError(
                f"site {site_id}'s signature does not verify against its roster key"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        """The roster as plain JSON values (the signed form)."""
        return {
            "version": ROSTER_VERSION,
            "federation": self.federation,
            "sites": {str(k): v.hex() for k, v in self.sites.items()},
            "min_contributors": self.min_contributors,
            "threshold": self.threshold,
        }

    def canonical(self) -> bytes:
        """Canonical JSON bytes: what the federation key signs."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """SHA-256 of :meth:`canonical`: binds signatures made under this roster to it."""
        # Checked with every signature of a round: computed once (the roster is frozen).
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = hashlib.sha256(self.canonical()).digest()
            object.__setattr__(self, "_digest", cached)
        return cached

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Roster:
        """Parse :meth:`to_dict` output strictly.

        Raises:
            IntegrityError: Unknown version or fields, or malformed values.

        """
        if not isinstance(data, Mapping):
            raise IntegrityError("roster: not a JSON object")
        expected = {"version", "federation", "sites", "min_contributors", "threshold"}
        if set(data) != expected:
            raise IntegrityError(f"roster: fields {sorted(data)} (expected {sorted(expected)})")
        if data["version"] != ROSTER_VERSION:
            raise IntegrityError(
                f"roster: version {data['version']!r} (this reads {ROSTER_VERSION})"
            )
        sites = data["sites"]
        if not isinstance(sites, Mapping):
            raise IntegrityError("roster: `sites` is not an object")
        try:
            parsed = {}
            for k, v in sites.items():
                if not re.fullmatch(r"0|[1-9][0-9]{0,8}", k) or not isinstance(v, str):
                    raise ValueError(f"bad entry {k!r}")
                parsed[int(k)] = bytes.fromhex(v)
            return cls(
                federation=data["federation"],
                sites=parsed,
                min_contributors=data["min_contributors"],
                threshold=data["threshold"],
            )
        except (ValueError, ConfigError) as exc:
            raise IntegrityError(f"roster: {exc}") from exc

    @classmethod
    def generate(
        cls,
        n_sites: int,
        *,
        federation: str = "in-process",
        min_contributors: int | None = None,
        threshold: int | None = None,
    ) -> tuple[Roster, dict[int, Ed25519PrivateKey]]:
        """A fresh roster of ``n_sites`` sites and their identity keys (in-process runs, tests).

        Keys come from the operating system's CSPRNG (``Ed25519PrivateKey.generate``).
        """
        keys = {i: Ed25519PrivateKey.generate() for i in range(int(n_sites))}
        roster = cls(
            federation=federation,
            sites={i: federation_public_key(k) for i, k in keys.items()},
            min_contributors=min(2, n_sites) if min_contributors is None else min_contributors,
            threshold=threshold,
        )
        return roster, keys


def sign_roster(roster: Roster, federation_key: Ed25519PrivateKey) -> bytes:
    """The signed roster file: JSON with the roster, the signer's public key and a signature."""
    signature = federation_key.sign(_CONTEXT + roster.canonical())
    body = {
        "roster": roster.to_dict(),
        "signer": federation_public_key(federation_key).hex(),
        "signature": signature.hex(),
    }
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode()


def load_signed_roster(data: bytes, *, federation_key: bytes) -> Roster:
    """Verify a signed roster file against the pinned federation public key and parse it.

    Args:
        data: The file's bytes (at most 1 MiB).
        federation_key: The federation's raw 32-byte Ed25519 public key, as the site pinned it
            in its own configuration (never taken from the file or the server).

    Raises:
        IntegrityError: Too large, not the layout, signed by another key, or a bad signature.

    """
    if len(data) > _MAX_FILE_BYTES:
        raise IntegrityError(f"signed roster: {len(data)} bytes, more than {_MAX_FILE_BYTES}")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"signed roster: not JSON ({exc})") from exc
    if not isinstance(body, dict) or set(body) != {"roster", "signer", "signature"}:
        raise IntegrityError("signed roster: expected fields roster, signer, signature")
    try:
        signer = bytes.fromhex(body["signer"])
        signature = bytes.fromhex(body["signature"])
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"signed roster: bad hex ({exc})") from exc
    if signer != bytes(federation_key):
        raise IntegrityError("signed roster: signed by another key than the pinned federation key")
    roster = Roster.from_dict(body["roster"])
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(signature, _CONTEXT + roster.canonical())
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError("signed roster: the signature does not verify") from exc
    return roster
