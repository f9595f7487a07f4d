"""A throwaway test PKI for a Flower deployment: CA, SuperLink TLS certificate, SuperNode keys.

This is a TEST CA, for trials and CI; a hospital deployment uses certificates from its own PKI.
:func:`create_test_pki` writes, into one folder, each party's part apart:

- ``ca.crt`` (everyone) and ``ca/ca.key``: a self-signed CA (EC P-256, SHA-256), its private key
  alone in ``ca/``, which no other party needs. No name constraints: gRPC's BoringSSL fails the
  handshake on an iPAddress constraint ("unsupported name constraint type").
- ``server.pem`` / ``server.key`` (the server): the SuperLink's TLS certificate
  (``--ssl-certfile`` / ``--ssl-keyfile``, with ``--ssl-ca-certfile ca.crt``); SuperNodes and
  the ``flwr`` CLI trust it through ``--root-certificates ca.crt``.
- ``site-{i}/`` (site i, and only site i): ``site{i}.key`` / ``site{i}.pub``, its SECP384R1 key
  pair for ``flower-superlink --enable-supernode-auth``, and a copy of ``ca.crt``. The private
  key is in OpenSSH format because Flower 1.42 reads ``--auth-supernode-private-key`` with
  ``load_ssh_private_key``; the public key is an OpenSSH ``ecdsa-sha2-nistp384`` line for
  ``flwr supernode register`` (the server operator needs the ``.pub`` only).

Folders are 0700; private keys are created with ``O_EXCL`` and mode 0600, so they never exist
world-readable. (Before issue 14, every key, ``ca.key`` included, was in the one folder.)
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securefed.errors import ConfigError, IntegrityError

__all__ = [
    "TEST_PKI_NOTICE",
    "CertificateSet",
    "create_test_pki",
    "verify_server_certificate",
]

TEST_PKI_NOTICE = (
    "TEST CA, for trials and CI; a hospital deployment uses certificates from its own PKI."
)

_MAX_SITES = 1000
# 825 days: the CA/Browser Forum ceiling for a TLS server certificate's lifetime (2018-2020).
_MAX_DAYS = 825
# Backdate notBefore so a peer whose clock runs a few minutes behind still accepts the cert.
_CLOCK_SKEW = timedelta(minutes=5)
# RFC 5280 ub-common-name: a longer first host cannot be the subject CN (the SAN still has it).
_MAX_COMMON_NAME = 64
_FALLBACK_SERVER_CN = "securefed test SuperLink"
_CA_COMMON_NAME = "securefed TEST CA - not for production"
_ORGANIZATION = "securefed test PKI"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644

# RFC 1123 labels; an optional leading "*." wildcard label (RFC 6125 section 6.4.3).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_MAX_DNS_NAME = 253


@dataclass(frozen=True)
class CertificateSet:
    """Paths of the files :func:`create_test_pki` wrote (a TEST CA, see :data:`TEST_PKI_NOTICE`).

    Attributes:
        folder: The folder holding every file below.
        ca_cert: ``ca.crt``, the CA certificate (PEM); ``--ssl-ca-certfile`` on the SuperLink,
            ``--root-certificates`` on SuperNodes and the ``flwr`` CLI.
        ca_key: ``ca/ca.key``, the CA private key (PKCS8 PEM, mode 0600, folder 0700).
        server_cert: ``server.pem``, the SuperLink certificate (PEM), ``--ssl-certfile``.
        server_key: ``server.key``, its private key (PKCS8 PEM, mode 0600), ``--ssl-keyfile``.
        site_keys: Per site ``(private key, public key)``: ``site-{i}/site{i}.key`` (OpenSSH
            private key, mode 0600, ``--auth-supernode-private-key``) and
            ``site-{i}/site{i}.pub`` (OpenSSH public key line, for ``flwr supernode register``);
            ``site-{i}/`` (0700) also holds a copy of ``ca.crt``.
        hosts: Host names and IP addresses the server certificate is valid for.

    """

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: tuple[tuple[Path, Path], ...]
    hosts: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check that every path is a :class:`~pathlib.Path` and at least one host is named."""
        for name in ("folder", "ca_cert", "ca_key", "server_cert", "server_key"):
            if not isinstance(getattr(self, name), Path):
                raise ConfigError(f"`{name}` must be a pathlib.Path (got {getattr(self, name)!r}).")
        if not isinstance(self.site_keys, tuple) or not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and all(isinstance(path, Path) for path in pair)
            for pair in self.site_keys
        ):
            raise ConfigError("`site_keys` must be a tuple of (private, public) Path pairs.")
        if (
            not isinstance(self.hosts, tuple)
            or not self.hosts
            or not all(isinstance(host, str) and host for host in self.hosts)
        ):
            raise ConfigError(
                f"`hosts` must be a non-empty tuple of host names (got {self.hosts!r})."
            )

    def describe(self) -> dict[str, Any]:
        """Return a JSON-ready summary: purpose, paths (as str), hosts and Flower 1.42 flags."""
        ca = str(self.ca_cert)
        return {
            "purpose": TEST_PKI_NOTICE,
            "folder": str(self.folder),
            "ca_cert": ca,
            "ca_key": str(self.ca_key),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "hosts": list(self.hosts),
            "superlink_args": [
                "--ssl-ca-certfile",
                ca,
                "--ssl-certfile",
                str(self.server_cert),
                "--ssl-keyfile",
                str(self.server_key),
            ],
            "sites": [
                {
                    "site": index,
                    "private_key": str(private),
                    "public_key": str(public),
                    "supernode_args": [
                        "--root-certificates",
                        ca,
                        "--auth-supernode-private-key",
                        str(private),
                    ],
                }
                for index, (private, public) in enumerate(self.site_keys)
            ],
        }


def create_test_pki(
    *,
    folder: str | os.PathLike[str],
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    sites: int = 3,
    days: int = 30,
    overwrite: bool = False,
) -> CertificateSet:
    """Create a TEST CA, a SuperLink certificate for ``hosts`` and ``sites`` SuperNode key pairs.

    For trials and CI; a hospital deployment uses certificates from its own PKI. Every check
    (arguments, existing files) runs before anything is written, so a refused call leaves the
    folder as it was. Without ``overwrite`` each file is created with ``O_EXCL``; with it, each
    file is written beside its target and moved over it with an atomic rename, so a reader never
    sees a half-written key.

    Args:
        folder: Where to write; created (with parents, mode 0700) if missing.
        hosts: Host names and IP addresses the sites dial; the server certificate's
            SubjectAlternativeName lists them all and its CN is the first.
        sites: Number of SuperNode key pairs, 0 to 1000.
        days: Validity of the CA and server certificates, 1 to 825 days.
        overwrite: Replace files left by an earlier call instead of refusing.

    Returns:
        The paths written.

    Raises:
        ConfigError: An argument is out of range, ``folder`` is not a directory, a target file
            exists and ``overwrite`` is False (or is a directory), or a file cannot be written.

    """
    names = _parse_hosts(hosts)
    if isinstance(sites, bool) or not isinstance(sites, int) or not 0 <= sites <= _MAX_SITES:
        raise ConfigError(f"`sites` must be an integer from 0 to {_MAX_SITES} (got {sites!r}).")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= _MAX_DAYS:
        raise ConfigError(f"`days` must be an integer from 1 to {_MAX_DAYS} (got {days!r}).")
    root = _prepare_folder(Path(folder))

    result = CertificateSet(
        folder=root,
        ca_cert=root / "ca.crt",
        ca_key=root / "ca" / "ca.key",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        site_keys=tuple(
            (_site_folder(root, i) / f"site{i}.key", _site_folder(root, i) / f"site{i}.pub")
            for i in range(sites)
        ),
        hosts=tuple(hosts),
    )
    site_cas = [_site_folder(root, i) / "ca.crt" for i in range(sites)]
    targets = [result.ca_cert, result.ca_key, result.server_cert, result.server_key]
    targets += [path for pair in result.site_keys for path in pair] + site_cas
    _check_targets(targets, overwrite=overwrite)

    files = _build_files(result, names, days=days)
    ca_pem = next(data for path, data, _ in files if path == result.ca_cert)
    files += [(path, ca_pem, _PUBLIC_MODE) for path in site_cas]
    # Each party's private files in a folder of its own (0700): the CA key in ca/, site i's
    # node key in site-<i>/ (with a copy of ca.crt: the folder is what site i is given).
    for sub in [result.ca_key.parent] + [_site_folder(root, i) for i in range(sites)]:
        _prepare_folder(sub)
        os.chmod(sub, 0o700)
    if overwrite:
        _replace_files(files)
    else:
        _create_files(files)
    return result


def verify_server_certificate(
    *,
    ca_cert: str | os.PathLike[str],
    server_cert: str | os.PathLike[str],
    host: str,
    at: datetime | None = None,
) -> None:
    """Check that ``server_cert`` is a valid TLS server certificate for ``host`` under ``ca_cert``.

    Specific checks come first for a precise message (signature, validity window, SAN entry);
    then the chain goes through cryptography's RFC 5280 path validation
    (:class:`cryptography.x509.verification.PolicyBuilder`), which also enforces the CA's
    basic constraints and name constraints and the server's extended key usage.

    Args:
        ca_cert: The CA certificate (PEM) the sites trust.
        server_cert: The server certificate (PEM).
        host: The host name or IP address a site dials.
        at: The time to check validity at (timezone-aware); default now. A later time answers
            "will it still be valid on the day of the trial?".

    Raises:
        ConfigError: A file is unreadable or not a PEM certificate, ``host`` is malformed, or
            ``at`` is naive.
        IntegrityError: The server certificate is not signed by the CA, either certificate is
            expired or not yet valid at ``at``, ``host`` is not in its SubjectAlternativeName, or
            path validation fails.

    """
    subject = _verification_subject(host)
    if at is None:
        at = datetime.now(timezone.utc)
    elif at.tzinfo is None or at.utcoffset() is None:
        raise ConfigError(f"`at` must be a timezone-aware datetime (got naive {at.isoformat()}).")
    ca_path, server_path = Path(ca_cert), Path(server_cert)
    ca = _load_certificate(ca_path, field="ca_cert")
    server = _load_certificate(server_path, field="server_cert")

    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IntegrityError(
            f"server certificate {server_path} is not signed by the CA in {ca_path} "
            f"({type(exc).__name__}: {exc or 'bad signature'})."
        ) from exc
    for path, cert in ((ca_path, ca), (server_path, server)):
        if at < cert.not_valid_before_utc:
            raise IntegrityError(
                f"certificate {path} is not valid before {cert.not_valid_before_utc.isoformat()} "
                f"(checked at {at.isoformat()})."
            )
        if at > cert.not_valid_after_utc:
            raise IntegrityError(
                f"certificate {path} expired on {cert.not_valid_after_utc.isoformat()} "
                f"(checked at {at.isoformat()})."
            )
    try:
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IntegrityError(
            f"server certificate {server_path} has no SubjectAlternativeName extension."
        ) from exc
    if not _san_matches(san, host):
        listed = [str(name.value) for name in san]
        raise IntegrityError(
            f"host {host!r} is not in the SubjectAlternativeName of {server_path} "
            f"(it lists {listed})."
        )

    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .time(at)
        .build_server_verifier(subject)
    )
    try:
        verifier.verify(server, [])
    except verification.VerificationError as exc:
        raise IntegrityError(
            f"server certificate {server_path} fails path validation against {ca_path}: {exc}."
        ) from exc


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    # A bare string is a Sequence[str] too; iterating "localhost" would yield one SAN per letter.
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, Sequence):
        raise ConfigError(f"`hosts` must be a sequence of host names (got {hosts!r}).")
    if not hosts:
        raise ConfigError("`hosts` must name at least one host name or IP address (got none).")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        name = _general_name(host)
        key = str(name.value).lower()
        if key in seen:
            raise ConfigError(f"`hosts` lists {host!r} more than once.")
        seen.add(key)
        names.append(name)
    return names


def _general_name(host: object) -> x509.GeneralName:
    if not isinstance(host, str) or not host:
        raise ConfigError(
            f"`hosts` entries must be non-empty host names or IP addresses (got {host!r})."
        )
    if any(char.isspace() for char in host):
        raise ConfigError(f"`hosts` entry {host!r} contains whitespace.")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    # An all-digit last label is a mistyped IP address (e.g. 10.0.0.256), never a real name.
    if (
        len(host) > _MAX_DNS_NAME
        or not _DNS_NAME.fullmatch(host)
        or host.rsplit(".", 1)[-1].isdigit()
    ):
        raise ConfigError(
            f"`hosts` entry {host!r} is neither an IP address nor a DNS host name "
            "(letters, digits, '-', dot-separated; non-ASCII names in their xn-- form)."
        )
    return x509.DNSName(host)


def _site_folder(root: Path, index: int) -> Path:
    """Site ``index``'s own folder: its node key pair and a copy of ``ca.crt``."""
    return root / f"site-{index}"


def _prepare_folder(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"`folder` {folder} exists and is not a directory.")
    try:
        # 0700: the folder holds private keys (umask can only narrow this further).
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"`folder` {folder} cannot be created ({exc.strerror}).") from exc
    return folder


def _check_targets(targets: Sequence[Path], *, overwrite: bool) -> None:
    # lexists: a dangling symlink is an existing target too (O_EXCL would refuse it anyway).
    present = [path for path in targets if os.path.lexists(path)]
    if not present:
        return
    if not overwrite:
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise ConfigError(
            f"{present[0]}{more} already exist; pass overwrite=True to replace the test PKI."
        )
    for path in present:
        if path.is_dir() and not path.is_symlink():
            raise ConfigError(f"{path} is a directory; refusing to replace it with a key file.")


def _build_files(
    result: CertificateSet, names: Sequence[x509.GeneralName], *, days: int
) -> list[tuple[Path, bytes, int]]:
    now = datetime.now(timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    first = result.hosts[0]
    server_cn = first if len(first) <= _MAX_COMMON_NAME else _FALLBACK_SERVER_CN
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, server_cn),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Digital signature only: RFC 5480 section 3 does not allow keyEncipherment on an EC key
        # (ECDHE key exchange needs only the signature).
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files: list[tuple[Path, bytes, int]] = [
        (result.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        (result.ca_key, _pkcs8(ca_key), _PRIVATE_MODE),
        (result.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE),
        (result.server_key, _pkcs8(server_key), _PRIVATE_MODE),
    ]
    for index, (private_path, public_path) in enumerate(result.site_keys):
        # SECP384R1: the curve Flower's own node-auth tooling generates and documents.
        site_key = ec.generate_private_key(ec.SECP384R1())
        private = site_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = site_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        files.append((private_path, private, _PRIVATE_MODE))
        files.append((public_path, public + f" securefed-site{index}\n".encode(), _PUBLIC_MODE))
    return files


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _open_new(path: Path, mode: int) -> int:
    # O_EXCL: never clobber or follow a planted file or symlink; the mode is set at creation, so a
    # private key is never world-readable, and fchmod makes it independent of the umask.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _create_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    created: list[Path] = []
    try:
        for path, data, mode in files:
            fd = _open_new(path, mode)
            created.append(path)
            _write_fd(fd, data)
    except FileExistsError as exc:
        _remove(created)
        raise ConfigError(
            f"{exc.filename} appeared while the test PKI was being written; nothing was kept."
        ) from exc
    except OSError as exc:
        _remove(created)
        raise ConfigError(
            f"cannot write {exc.filename} ({exc.strerror}); nothing was kept."
        ) from exc
    except BaseException:
        _remove(created)
        raise


def _replace_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    # Every new file is complete on disk before the first rename, so a failure while writing
    # leaves the old set untouched.
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = _open_new(temporary, mode)
            staged.append((temporary, path))
            _write_fd(fd, data)
        for temporary, path in staged:
            os.replace(temporary, path)
    except OSError as exc:
        _remove([temporary for temporary, _ in staged])
        raise ConfigError(f"cannot write {exc.filename} ({exc.strerror}).") from exc
    except BaseException:
        _remove([temporary for temporary, _ in staged])
        raise


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _load_certificate(path: Path, *, field: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"`{field}` {path} cannot be read ({exc.strerror}).") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"`{field}` {path} is not a PEM X.509 certificate.") from exc


def _verification_subject(host: str) -> verification.IPAddress | verification.DNSName:
    if not isinstance(host, str) or not host or any(char.isspace() for char in host):
        raise ConfigError(
            f"`host` must be a host name or IP address without spaces (got {host!r})."
        )
    try:
        return verification.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return verification.DNSName(host)
    except ValueError as exc:
        raise ConfigError(f"`host` {host!r} is neither an IP address nor a DNS name.") from exc


def _san_matches(san: x509.SubjectAlternativeName, host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return any(_dns_matches(pattern, host) for pattern in san.get_values_for_type(x509.DNSName))
    return address in san.get_values_for_type(x509.IPAddress)


def _dns_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == host
    # RFC 6125 section 6.4.3: the wildcard stands for exactly one whole left-most label.
    label, _, rest = host.partition(".")
    return bool(label) and rest == pattern[2:]
