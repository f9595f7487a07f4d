"""Who may run what in a deployment: the federation key, signed runs, and site identity proofs.

A federation has one **federation key** (Ed25519), kept by whoever admits hospitals (the
federation admin), never by the aggregation server's operator alone:

- ``federation.key`` (private, mode 0600): signs the roster (:mod:`securefed.crypto.roster`)
  and every run that ``securefed deploy run`` submits;
- ``federation.pub`` (its public half, one hex line): given to every site, which pins it in its
  node configuration (``federation-key``).

**Signed runs.** ``securefed deploy run`` signs the app bundle (FAB) it submits *together with
the run's whole configuration*: ``Ed25519(federation key, "securefed/run/v1" || canonical JSON of
{fab sha256, run config})``. The signature travels in the run configuration itself
(``app-signature``). A site's executor checks it before any ClientApp code runs for the run
(:func:`verify_run`); a run that is not signed by the pinned key, or whose FAB or any run-config
value differs from what was signed, gets an error reply and nothing else. Binding the run
config matters because securefed's app bundle carries no code: a foreign submitter replaying a
signed bundle with its own configuration is refused too.

Why not Flower's ``--trusted-entities``: in Flower 1.42 a SuperNode started with trusted
entities checks ``Fab.verifications``, which only the SuperLink fills in, and only for apps it
fetched from the Flower Hub (``control_handlers.start_run``: a FAB submitted by ``flwr run``
from a folder gets no verifications). Such a SuperNode therefore refuses every locally built
app, ours included ("App verification is not supported by the connected SuperLink"), and it
would not bind the run configuration anyway. The check here is the same idea (an Ed25519
signature over the FAB's SHA-256, verified at the site against a key the site pinned), done by
the site's own executor.

**Identity proofs.** At set-up a site signs ``(federation, run id, node id, site id)`` with its
Ed25519 identity key (its claim-signing key, ``NodeSettings.signing_key``); the server checks
it against the roster's key for that site id (:func:`verify_identity`), so a site process
cannot claim another site's id, and a proof made for one node or run is useless for another.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefed.errors import ConfigError, IntegrityError, ProtocolError

__all__ = [
    "IDENTITY_FIELD",
    "MAX_SIGNATURE_AGE",
    "SIGNATURE_KEY",
    "SIGNED_AT_KEY",
    "check_fresh",
    "create_federation_key",
    "identity_message",
    "load_federation_key",
    "load_federation_public",
    "run_message",
    "sign_identity",
    "sign_run",
    "verify_identity",
    "verify_run",
]

#: The run-config key that carries the federation's signature over the run.
SIGNATURE_KEY = "app-signature"
#: The set-up reply field that carries a site's identity proof (the server removes it).
IDENTITY_FIELD = "identity"
#: The run-config key with the signing time (Unix seconds), inside what is signed.
SIGNED_AT_KEY = "signed-at"
#: How old a run's signature may be when a site first sees the run (a replay window).
MAX_SIGNATURE_AGE = 24 * 3600.0
#: How far in the future a signing time may be (clock differences between machines).
MAX_CLOCK_AHEAD = 600.0
_RUN_CONTEXT = b"securefed/run/v1\x00"
_IDENTITY_CONTEXT = b"securefed/site-identity/v1\x00"
_KEY_BYTES = 32


def create_federation_key(path: str | os.PathLike[str]) -> str:
    """Write a new federation key (PEM, mode 0600) and its public half (``<stem>.pub``, hex).

    Returns:
        The public key as hex (what sites pin).

    Raises:
        ConfigError: If either file exists (a federation key is never overwritten).

    """
    from securefed.dp.signing import SiteSigner

    private = Path(path)
    public = private.with_suffix(".pub")
    for target in (private, public):
        if os.path.lexists(target):
            raise ConfigError(f"{target} already exists; a federation key is never overwritten")
    # The same Ed25519 key file as a site's signing key (PKCS#8 PEM, created 0600, O_EXCL).
    signer = SiteSigner.generate()
    try:
        signer.save(private, fmt="pem")
    except OSError as exc:
        raise ConfigError(f"cannot write {private} ({exc.strerror})") from exc
    public.write_text(signer.public_key_hex + "\n")
    return signer.public_key_hex


def load_federation_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read the federation's private key (PEM, as :func:`create_federation_key` writes it).

    Raises:
        ConfigError: Missing, readable by others, or not an Ed25519 private key.

    """
    from securefed.dp.signing import SiteSigner

    try:
        return SiteSigner.load(path).private_key
    except OSError as exc:
        raise ConfigError(f"federation key {path}: {exc.strerror}") from exc
    except IntegrityError as exc:
        raise ConfigError(f"federation key {exc}") from exc


def load_federation_public(value: str | os.PathLike[str]) -> bytes:
    """The pinned federation public key: 64 hex characters, or a file holding them.

    Raises:
        ConfigError: Neither a readable file nor a 32-byte hex key.

    """
    text = str(value).strip()
    path = Path(text)
    if not _is_hex_key(text) and path.is_file():
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"federation public key {path}: unreadable ({exc})") from exc
    if not _is_hex_key(text):
        raise ConfigError(
            f"federation public key {value!s}: expected 64 hex characters or a federation.pub file"
        )
    return bytes.fromhex(text)


def _is_hex_key(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == _KEY_BYTES
    except ValueError:
        return False


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def run_message(fab: bytes, run_config: Mapping[str, Any]) -> bytes:
    """What the federation key signs for a run: the FAB's SHA-256 and every run-config value."""
    values = {k: v for k, v in run_config.items() if k != SIGNATURE_KEY}
    body = {"fab_sha256": hashlib.sha256(fab).hexdigest(), "run_config": values}
    return _RUN_CONTEXT + _canonical(body)


def sign_run(fab: bytes, run_config: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The ``app-signature`` value for a run (URL-safe base64)."""
    return base64.urlsafe_b64encode(key.sign(run_message(fab, run_config))).decode()


def verify_run(fab: bytes, run_config: Mapping[str, Any], federation_public: bytes) -> None:
    """Check a run's ``app-signature`` against the site's pinned federation key.

    Raises:
        PermissionError: Unsigned, malformed, or not signed by the pinned key over exactly
            this FAB and run configuration.

    """
    signature = run_config.get(SIGNATURE_KEY)
    if not isinstance(signature, str) or not signature:
        raise PermissionError("the run is not signed by the federation key; this site runs no app")
    try:
        raw = base64.urlsafe_b64decode(signature.encode())
        Ed25519PublicKey.from_public_bytes(federation_public).verify(
            raw, run_message(fab, run_config)
        )
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise PermissionError(
            "the run's signature does not verify against this site's federation key "
            "(another key, or the app or its configuration changed after signing)"
        ) from exc


def check_fresh(run_config: Mapping[str, Any], *, now: float) -> None:
    """Refuse a run whose (verified) signing time is too old or too far ahead of ``now``.

    A signed run replayed later (its bundle and configuration resubmitted unchanged by
    someone who saw them) would otherwise make the sites train, and spend privacy budget,
    again. A site checks this when it first sees a run.

    Raises:
        PermissionError: No signing time, or one outside the window.

    """
    signed_at = run_config.get(SIGNED_AT_KEY)
    if isinstance(signed_at, bool) or not isinstance(signed_at, int | float):
        raise PermissionError("the run's signature carries no signing time (signed-at)")
    age = now - float(signed_at)
    if age > MAX_SIGNATURE_AGE:
        raise PermissionError(
            f"the run was signed {age / 3600:.1f} h ago (a site accepts "
            f"{MAX_SIGNATURE_AGE / 3600:g} h): submit it again to sign it afresh"
        )
    if age < -MAX_CLOCK_AHEAD:
        raise PermissionError(
            f"the run's signing time is {-age:.0f} s in the future; check the clocks"
        )


def identity_message(*, federation: str, run_id: int, node_id: int, site_id: int) -> bytes:
    """What a site's identity key signs at set-up: this run, this Flower node, this site id."""
    body = {
        "federation": federation,
        "node_id": int(node_id),
        "run_id": int(run_id),
        "site_id": int(site_id),
    }
    return _IDENTITY_CONTEXT + _canonical(body)


def sign_identity(
    key: Ed25519PrivateKey, *, federation: str, run_id: int, node_id: int, site_id: int
) -> str:
    """A site's identity proof for its set-up reply (hex)."""
    message = identity_message(
        federation=federation, run_id=run_id, node_id=node_id, site_id=site_id
    )
    return key.sign(message).hex()


def verify_identity(roster: Any, proof: Any, *, run_id: int, node_id: int, site_id: int) -> None:
    """Check that the process on ``node_id`` holds the roster's identity key of ``site_id``.

    Args:
        roster: The federation's :class:`~securefed.crypto.roster.Roster`.
        proof: The ``identity`` field of the site's set-up reply (hex signature).
        run_id: The Flower run id.
        node_id: The Flower node the reply came from.
        site_id: The site id the reply claims.

    Raises:
        ProtocolError: The id is not in the roster, or the proof is missing or not by its key.

    """
    if not isinstance(proof, str):
        raise ProtocolError(
            f"node {node_id} claims site-id {site_id} but sent no identity proof "
            "(start the site with the roster: securefed deploy site --roster ...)"
        )
    try:
        signature = bytes.fromhex(proof)
    except ValueError as exc:
        raise ProtocolError(f"node {node_id}: identity proof is not hex") from exc
    message = identity_message(
        federation=roster.federation, run_id=run_id, node_id=node_id, site_id=site_id
    )
    try:
        roster.verify(site_id, message, signature)
    except ProtocolError as exc:
        raise ProtocolError(
            f"node {node_id} claims site-id {site_id}, but its identity proof is not by that "
            f"site's registered key ({exc})"
        ) from exc
