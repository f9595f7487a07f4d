"""Signed site claims: each site answers, with its own Ed25519 key, for the DP it reports.

The report hash (:func:`securefed.dp.report.report_hash`) is unkeyed: whoever writes
``privacy.json`` can rewrite it consistently and recompute the hash. A site's signature over
its *claim* (what it ran: sigma, q, C, its ledger events, its epsilon, bound to the run's
configuration by ``run_sha256``) cannot be recomputed without the site's private key, so a
rewritten report fails verification unless the rewriter also holds every site's key.

The claim is rebuilt from ``privacy.json`` and ``config.json["run"]`` by one function,
:func:`claim_from_report`, used both by the signer and by ``securefed audit``; a site that
knows only its own report entry, its own events and the run dict builds the same claim with
:func:`site_claim`.

A site signs its claim after every step; a claim says "my events so far", not "my events in
the whole run". So a site also signs, once, a *closing* claim (:func:`close_message`): its
claim as the run ended, the last round the run ran, the digests of the model files it ended
with and the roster it pinned, after which the site takes no further step of the run. A
report that stops at an earlier round has no closing signature that fits it. Claims of sites
that close their runs are signed under :data:`CLAIM_DOMAIN` (v2); a v1 signature
(:data:`CLAIM_DOMAIN_V1`, code before closing claims) verifies as a legacy claim that never
closed, so an auditor knows which reports must carry closing signatures without trusting an
unsigned label.

A signature makes a site accountable for its claim; it does not prove that the noise was
drawn. Public keys carried in the report are self-asserted unless an auditor pins them
(``securefed audit --site-keys``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.dp.report import canonical_json, json_ready
from securefed.errors import IntegrityError

__all__ = [
    "CLAIM_DOMAIN",
    "CLAIM_DOMAIN_V1",
    "CLOSE_DOMAIN",
    "MODEL_FILE",
    "SiteSigner",
    "attach_site_signatures",
    "claim_from_report",
    "claim_message",
    "claim_version",
    "close_message",
    "run_digest",
    "sign_report",
    "site_claim",
    "verify_claim",
    "verify_close",
]

#: Domain separation: a signature over a claim can never be replayed as any other message.
#: v2: the claim of a site that signs a closing claim when its run ends (:func:`close_message`).
CLAIM_DOMAIN = b"securefed/site-claim/v2\x00"
#: Claims of code before closing claims: still verified, as claims no site closed.
CLAIM_DOMAIN_V1 = b"securefed/site-claim/v1\x00"
#: A site's closing claim: its claim as the run ended, and where and how it ended.
CLOSE_DOMAIN = b"securefed/site-close/v1\x00"
#: The fields of privacy.json's ``close`` block (each DP site signs them with its claim).
CLOSE_FIELDS = ("last_round", "models", "roster_sha256")
#: The model files a close may name (a run with several global models writes one per cluster).
MODEL_FILE = re.compile(r"model(_cluster[0-9]{1,3})?\.safetensors")
#: Domain tag of an audit run's signed empirical result (:func:`empirical_message`).
EMPIRICAL_DOMAIN = b"securefed/empirical-audit/v1\x00"
#: The fields of privacy.json's ``empirical`` block the audited site signs.
EMPIRICAL_FIELDS = (
    "site", "K", "eps_emp", "guesses", "correct", "confidence", "delta", "steps",
    "record_sha256",
)  # fmt: skip

_RAW_KEY_BYTES = 32


def run_digest(run: Mapping[str, Any]) -> str:
    """SHA-256 hex of the run configuration (``config.json["run"]``, i.e. RunConfig.to_dict()).

    Args:
        run: The run dict.

    Returns:
        64 hex characters.

    """
    return hashlib.sha256(canonical_json(json_ready(dict(run)))).hexdigest()


def site_claim(
    *,
    entry: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any],
    noise: str | None,
    adjacency: str | None,
    accountant: str | None,
    default_delta: float | None = None,
) -> dict[str, Any]:
    """The claim one site signs, built from what that site alone knows.

    Args:
        entry: The site's ``clients[]`` entry of privacy.json (client_id, delta,
            noise_multiplier, sample_rate, max_grad_norm, planned_steps, epsilon; num_samples
            only if the site discloses it).
        events: The site's ledger events (PrivacyEvent dicts), in ledger order.
        run: ``config.json["run"]``.
        noise: ``"secret"`` or ``"reproducible"`` (report top level).
        adjacency: ``"replace-one"`` (report top level).
        accountant: The accountant the site's epsilon comes from.
        default_delta: Used only when ``entry`` has no ``delta`` (reports before 2.0).

    Returns:
        The claim dict (JSON-ready).

    Raises:
        KeyError: ``entry`` lacks a claimed field.
        ValueError: An event belongs to another site.

    """
    cid = int(entry["client_id"])
    own = [dict(e) for e in events]
    if any(int(e["client_id"]) != cid for e in own):
        raise ValueError(f"site {cid}: claim events must all be the site's own")
    claim: dict[str, Any] = {
        "client_id": cid,
        "run_sha256": run_digest(run),
        "noise": noise,
        "adjacency": adjacency,
        "accountant": accountant,
        "delta": entry["delta"] if "delta" in entry else default_delta,
        "noise_multiplier": entry["noise_multiplier"],
        "sample_rate": entry["sample_rate"],
        "max_grad_norm": entry["max_grad_norm"],
        "planned_steps": entry["planned_steps"],
        "events": own,
        "epsilon": entry["epsilon"],
    }
    if "num_samples" in entry:
        claim["num_samples"] = entry["num_samples"]
    return json_ready(claim)


def claim_from_report(privacy: Mapping[str, Any], run: Mapping[str, Any], client_id: int) -> dict:
    """Rebuild site ``client_id``'s claim from privacy.json and ``config.json["run"]``.

    Args:
        privacy: The report.
        run: ``config.json["run"]``.
        client_id: The site.

    Returns:
        The claim dict, exactly as :func:`site_claim` builds it.

    Raises:
        KeyError: The site has no entry in ``clients``, or the entry lacks a claimed field.

    """
    entries = [c for c in privacy["clients"] if int(c["client_id"]) == int(client_id)]
    if len(entries) != 1:
        raise KeyError(f"site {client_id}: {len(entries)} entries in 'clients'")
    events = [e for e in privacy.get("events") or [] if int(e["client_id"]) == int(client_id)]
    return site_claim(
        entry=entries[0],
        events=events,
        run=run,
        noise=privacy.get("noise"),
        adjacency=privacy.get("adjacency"),
        accountant=privacy.get("accountant"),
        default_delta=privacy.get("delta"),
    )


def claim_message(claim: Mapping[str, Any], *, domain: bytes = CLAIM_DOMAIN) -> bytes:
    """The exact bytes signed: the domain tag, then the claim's canonical JSON."""
    return domain + canonical_json(json_ready(dict(claim)))


def close_message(claim: Mapping[str, Any], close: Mapping[str, Any]) -> bytes:
    """The bytes of a site's closing claim: its claim, then how the run ended.

    Args:
        claim: The site's claim over every event of the run (:func:`site_claim`).
        close: ``last_round`` (the run's last round), ``models`` (model file name -> SHA-256
            hex of the file the run wrote) and ``roster_sha256`` (the roster the site pinned,
            or None without one).

    Raises:
        KeyError: ``close`` lacks a field of :data:`CLOSE_FIELDS`.

    """
    fields = {k: close[k] for k in CLOSE_FIELDS}
    body = {"claim": json_ready(dict(claim)), "close": json_ready(fields)}
    return CLOSE_DOMAIN + canonical_json(body)


def empirical_message(block: Mapping[str, Any]) -> bytes:
    """The bytes an audit run's site signs: its eps_emp and the digest of its record.

    Raises:
        KeyError: A field of :data:`EMPIRICAL_FIELDS` is missing.

    """
    fields = {k: block[k] for k in EMPIRICAL_FIELDS}
    return EMPIRICAL_DOMAIN + canonical_json(json_ready(fields))


def verify_claim(claim: Mapping[str, Any], signature_hex: str, public_key_hex: str) -> bool:
    """Whether ``signature_hex`` is a valid Ed25519 signature of ``claim`` by that key.

    Args:
        claim: The claim dict.
        signature_hex: Hex of the 64-byte signature.
        public_key_hex: Hex of the raw 32-byte public key.

    Returns:
        True only for a valid signature; malformed hex or keys give False, never an exception.

    """
    return verify_message(claim_message(claim), signature_hex, public_key_hex)


def claim_version(claim: Mapping[str, Any], signature_hex: Any, public_key_hex: Any) -> int | None:
    """Which claim format a signature verifies under: 2, 1 (legacy, never closed) or None.

    A site of today's code signs v2 only, so a v1 signature of a run's claim exists only if
    the site ran code before closing claims: whoever holds v2 signatures cannot make one.
    """
    for version, domain in ((2, CLAIM_DOMAIN), (1, CLAIM_DOMAIN_V1)):
        if verify_message(claim_message(claim, domain=domain), signature_hex, public_key_hex):
            return version
    return None


def verify_close(
    claim: Mapping[str, Any],
    close: Mapping[str, Any],
    signature_hex: Any,
    public_key_hex: Any,
) -> bool:
    """Whether ``signature_hex`` is the key's closing signature over ``claim`` and ``close``.

    Returns:
        True only for a valid signature; a malformed ``close`` gives False, never an exception.

    """
    try:
        message = close_message(claim, close)
    except (KeyError, TypeError, ValueError):
        return False
    return verify_message(message, signature_hex, public_key_hex)


def verify_message(message: bytes, signature_hex: Any, public_key_hex: Any) -> bool:
    """Whether ``signature_hex`` is a valid Ed25519 signature of ``message`` by that key.

    Returns:
        True only for a valid signature; malformed hex or keys give False, never an exception.

    """
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError, AttributeError):
        return False
    return True


class SiteSigner:
    """One site's Ed25519 signing key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        """Wrap an existing private key (use :meth:`generate` or :meth:`load`)."""
        self._key = private_key

    @classmethod
    def generate(cls) -> SiteSigner:
        """A fresh key from the operating system's CSPRNG (``os.urandom``)."""
        return cls(Ed25519PrivateKey.from_private_bytes(os.urandom(_RAW_KEY_BYTES)))

    @classmethod
    def load(cls, path: str | Path) -> SiteSigner:
        """Read a key saved by :meth:`save` (unencrypted PKCS#8 PEM, or 32 raw bytes).

        Raises:
            IntegrityError: The file is readable by group or others, or is not a key.

        """
        path = Path(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            # A site key others can read lets them sign claims in the site's name.
            raise IntegrityError(
                f"{path}: key file mode {mode:o} lets others read it; make it 0600 (chmod 600)"
            )
        data = path.read_bytes()
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(data, password=None)
            elif len(data) == _RAW_KEY_BYTES:
                key = Ed25519PrivateKey.from_private_bytes(data)
            else:
                raise ValueError(f"{len(data)} bytes, neither PEM nor a raw 32-byte key")
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"{path}: not an Ed25519 private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IntegrityError(f"{path}: not an Ed25519 private key")
        return cls(key)

    def save(self, path: str | Path, *, fmt: str = "pem") -> None:
        """Write the private key to a new file with mode 0600.

        Args:
            path: Must not exist (a key is never silently overwritten).
            fmt: ``pem`` (unencrypted PKCS#8) or ``raw`` (32 bytes).

        """
        if fmt == "pem":
            data = self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        elif fmt == "raw":
            data = self._key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        else:
            raise ValueError(f"unknown key format {fmt!r} (pem or raw)")
        # O_EXCL + 0600 at creation: the key is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # umask can only remove bits; make the mode exact
            os.write(fd, data)
        finally:
            os.close(fd)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The Ed25519 private key: the site's identity key in secure aggregation too."""
        return self._key

    @property
    def public_key_hex(self) -> str:
        """Hex of the raw 32-byte public key."""
        return (
            self._key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def sign_claim(self, claim: Mapping[str, Any]) -> str:
        """Hex Ed25519 signature over :func:`claim_message` of ``claim``."""
        return self.sign_message(claim_message(claim))

    def sign_close(self, claim: Mapping[str, Any], close: Mapping[str, Any]) -> str:
        """Hex Ed25519 signature over :func:`close_message` (the site's closing claim)."""
        return self.sign_message(close_message(claim, close))

    def sign_message(self, message: bytes) -> str:
        """Hex Ed25519 signature over ``message`` (domain-tagged by its builder)."""
        return self._key.sign(message).hex()

    def keyed_digest(self, data: str | bytes, *, purpose: str) -> str:
        """HMAC-SHA256 of ``data`` under a key derived from this site's private key.

        Stable for one site (so a server can tell that a site's data did not change between
        two sessions) and meaningless to anyone else: unlike a plain hash of the site's data,
        it cannot be used to confirm a guess of that data.
        """
        from cryptography.hazmat.primitives import hashes, hmac
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        raw = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=b"securefed/keyed-digest/v1\x00" + purpose.encode(),
        ).derive(raw)
        mac = hmac.HMAC(key, hashes.SHA256())
        mac.update(data.encode() if isinstance(data, str) else bytes(data))
        return mac.finalize().hex()


def sign_report(
    privacy: dict[str, Any], *, run: Mapping[str, Any], signers: Mapping[int, SiteSigner]
) -> None:
    """Add ``site_keys`` and each DP site's ``signature`` to ``privacy`` (in place).

    When the report has a ``close`` block, each DP site's ``close_signature`` over it too.
    Call before the report hash is computed, so the hash covers keys and signatures.

    Args:
        privacy: The report; its ``clients``, ``events`` and ``close`` must be final.
        run: ``config.json["run"]``.
        signers: One signer per DP site (a site with a noise multiplier).

    Raises:
        KeyError: A DP site has no signer.

    """
    keys: dict[str, str] = {}
    close = privacy.get("close")
    for entry in privacy["clients"]:
        if entry.get("noise_multiplier") is None:
            continue  # no DP plan at this site: nothing to claim
        cid = int(entry["client_id"])
        if cid not in signers:
            raise KeyError(f"site {cid}: no signing key")
        keys[str(cid)] = signers[cid].public_key_hex
        claim = claim_from_report(privacy, run, cid)
        entry["signature"] = signers[cid].sign_claim(claim)
        if isinstance(close, Mapping):
            entry["close_signature"] = signers[cid].sign_close(claim, close)
    privacy["site_keys"] = keys


def attach_site_signatures(
    privacy: dict[str, Any],
    *,
    run: Mapping[str, Any],
    signed: Mapping[int, tuple[str, str]],
    closed: Mapping[int, str] | None = None,
) -> None:
    """Add signatures that the sites made themselves (a deployment), verifying each first.

    The server writing the report holds no site key; it checks that every site signed
    exactly the claim the report now states (and, with ``closed``, closed the run exactly as
    the report's ``close`` block states), so a report it writes never carries a signature
    that the audit would reject.

    Args:
        privacy: The report; its ``clients``, ``events`` and ``close`` must be final.
        run: ``config.json["run"]``.
        signed: ``{client_id: (public_key_hex, signature_hex)}`` as each site sent them.
        closed: ``{client_id: close_signature_hex}`` of the sites that closed the run.

    Raises:
        IntegrityError: A DP site sent no signature, or one that does not verify against
            the claim rebuilt from the report (or its closing signature against ``close``).

    """
    keys: dict[str, str] = {}
    for entry in privacy["clients"]:
        if entry.get("noise_multiplier") is None:
            continue
        cid = int(entry["client_id"])
        if cid not in signed:
            raise IntegrityError(f"site {cid}: sent no signed claim")
        key_hex, sig_hex = signed[cid]
        claim = claim_from_report(privacy, run, cid)
        if not verify_claim(claim, sig_hex, key_hex):
            raise IntegrityError(f"site {cid}: signature does not match the report's claim")
        keys[str(cid)] = key_hex
        entry["signature"] = sig_hex
        if closed and cid in closed:
            if not verify_close(claim, privacy.get("close") or {}, closed[cid], key_hex):
                raise IntegrityError(f"site {cid}: its closing signature does not fit the report")
            entry["close_signature"] = closed[cid]
    privacy["site_keys"] = keys
