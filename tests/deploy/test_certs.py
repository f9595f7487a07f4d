"""Tests for the test PKI: files and modes, certificate checks, real TLS handshakes, Flower keys."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.deploy.certs import (
    TEST_PKI_NOTICE,
    CertificateSet,
    create_test_pki,
    verify_server_certificate,
)
from securefed.errors import ConfigError, IntegrityError

NOW_TOLERANCE = timedelta(minutes=1)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _all_paths(pki: CertificateSet) -> list[Path]:
    paths = [pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key]
    return paths + [path for pair in pki.site_keys for path in pair]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (by relative path): its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _client_auth_cert(pki: CertificateSet, *, host: str, out: Path) -> tuple[Path, Path]:
    """A certificate for ``host`` signed by the real CA but for TLS *client* authentication."""
    ca_cert = _load_cert(pki.ca_cert)
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "client.pem", out / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """One-connection TLS server on 127.0.0.1 that sends b"ok" after a successful handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile=cert, keyfile=key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: that is what some tests expect

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=5)


def _client_handshake(*, port: int, cafile: Path, server_hostname: str) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    # Python 3.13 turns strict RFC 5280 checks on by default; ask for them on every version.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(2)


@pytest.fixture
def pki(tmp_path: Path) -> CertificateSet:
    return create_test_pki(folder=tmp_path / "pki", sites=3, days=30)


@pytest.fixture
def other_pki(tmp_path: Path) -> CertificateSet:
    return create_test_pki(folder=tmp_path / "other", sites=0)


# --- files -----------------------------------------------------------------------------------


def test_writes_every_file_with_private_keys_0600(pki: CertificateSet) -> None:
    # Prepare / Execute: the fixture wrote the set.
    folder = pki.folder

    # Assert
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["ca.crt", "ca", "server.pem", "server.key"] + [f"site-{i}" for i in range(3)]
    )
    for private in [pki.ca_key, pki.server_key] + [pair[0] for pair in pki.site_keys]:
        assert _mode(private) == 0o600, private
    for public in [pki.ca_cert, pki.server_cert] + [pair[1] for pair in pki.site_keys]:
        assert _mode(public) == 0o644, public
    assert pki.site_keys[2] == (folder / "site-2" / "site2.key", folder / "site-2" / "site2.pub")
    assert pki.ca_key == folder / "ca" / "ca.key"


def test_each_party_gets_a_folder_of_its_own(pki: CertificateSet) -> None:
    """The CA key and each site's key each sit in a 0700 folder no other party is given.

    Against 60ad9a0 this fails: every site key and ca.key were in one folder.
    """
    folder = pki.folder
    assert sorted(p.name for p in (folder / "ca").iterdir()) == ["ca.key"]
    assert _mode(folder / "ca") == 0o700
    for i in range(3):
        site = folder / f"site-{i}"
        assert _mode(site) == 0o700
        assert sorted(p.name for p in site.iterdir()) == ["ca.crt", f"site{i}.key", f"site{i}.pub"]
        assert (site / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
    # No private key of anyone but the server at the top level (what the server is given).
    assert not [p for p in folder.iterdir() if p.suffix == ".key" and p.name != "server.key"]
    assert pki.hosts == ("127.0.0.1", "localhost")


def test_describe_is_json_and_says_it_is_a_test_ca(pki: CertificateSet) -> None:
    # Execute
    described = json.loads(json.dumps(pki.describe()))

    # Assert
    assert described["purpose"] == TEST_PKI_NOTICE
    assert (
        "for trials and CI; a hospital deployment uses certificates from its own PKI"
        in (described["purpose"])
    )
    assert described["server_cert"] == str(pki.server_cert)
    assert described["hosts"] == ["127.0.0.1", "localhost"]
    assert described["superlink_args"] == [
        "--ssl-ca-certfile",
        str(pki.ca_cert),
        "--ssl-certfile",
        str(pki.server_cert),
        "--ssl-keyfile",
        str(pki.server_key),
    ]
    assert [s["private_key"] for s in described["sites"]] == [
        str(pair[0]) for pair in pki.site_keys
    ]
    assert described["sites"][1]["supernode_args"] == [
        "--root-certificates",
        str(pki.ca_cert),
        "--auth-supernode-private-key",
        str(pki.site_keys[1][0]),
    ]


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    # Execute
    pki = create_test_pki(folder=tmp_path / "a" / "b" / "c", sites=1)

    # Assert
    assert pki.folder == tmp_path / "a" / "b" / "c"
    assert pki.server_cert.is_file()


def test_existing_files_are_refused_and_left_unchanged(pki: CertificateSet) -> None:
    # Prepare
    before = _snapshot(pki.folder)

    # Execute / Assert
    with pytest.raises(ConfigError, match="already exist"):
        create_test_pki(folder=pki.folder, sites=3)
    assert _snapshot(pki.folder) == before


def test_one_existing_target_blocks_every_write(tmp_path: Path) -> None:
    # Prepare: only the last target exists, so a writer that checked file by file would have
    # written everything else before noticing.
    folder = tmp_path / "pki"
    (folder / "site-1").mkdir(parents=True)
    (folder / "site-1" / "ca.crt").write_text("someone else's CA\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="ca.crt"):
        create_test_pki(folder=folder, sites=2)
    assert [p.name for p in folder.iterdir()] == ["site-1"]
    assert [p.name for p in (folder / "site-1").iterdir()] == ["ca.crt"]
    assert (folder / "site-1" / "ca.crt").read_text() == "someone else's CA\n"


def test_overwrite_replaces_every_file(pki: CertificateSet) -> None:
    # Prepare
    before = _snapshot(pki.folder)

    # Execute
    again = create_test_pki(folder=pki.folder, sites=3, overwrite=True)

    # Assert
    after = _snapshot(again.folder)
    assert sorted(after) == sorted(before)  # no temporary file left behind
    assert all(after[name][0] != before[name][0] for name in before)
    assert _mode(again.ca_key) == 0o600 and _mode(again.site_keys[0][0]) == 0o600
    verify_server_certificate(
        ca_cert=again.ca_cert, server_cert=again.server_cert, host="localhost"
    )


def test_overwrite_never_replaces_a_directory(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "pki"
    (folder / "server.key").mkdir(parents=True)

    # Execute / Assert
    with pytest.raises(ConfigError, match="is a directory"):
        create_test_pki(folder=folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["server.key"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder_is_a_config_error(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "pki"
    folder.mkdir(mode=0o500)

    # Execute / Assert
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            create_test_pki(folder=folder)
    finally:
        folder.chmod(0o700)
    assert not list(folder.iterdir())


def test_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "pki"
    target.write_text("not a folder")

    # Execute / Assert
    with pytest.raises(ConfigError, match="not a directory"):
        create_test_pki(folder=target)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": ()}, "at least one"),
        ({"hosts": ("",)}, "non-empty"),
        ({"hosts": ("local host",)}, "whitespace"),
        ({"hosts": ("localhost\n",)}, "whitespace"),
        ({"hosts": "localhost"}, "sequence"),
        ({"hosts": ("10.0.0.256",)}, "neither"),
        ({"hosts": ("bad_name!",)}, "neither"),
        ({"hosts": ("localhost", "LOCALHOST")}, "more than once"),
        ({"sites": -1}, "`sites`"),
        ({"sites": 1001}, "`sites`"),
        ({"sites": True}, "`sites`"),
        ({"sites": 2.0}, "`sites`"),
        ({"days": 0}, "`days`"),
        ({"days": 826}, "`days`"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    # Prepare
    folder = tmp_path / "pki"

    # Execute / Assert
    with pytest.raises(ConfigError, match=match):
        create_test_pki(folder=folder, **kwargs)
    assert not folder.exists()


# --- certificate contents and verification ---------------------------------------------------


def test_certificates_carry_the_requested_extensions(pki: CertificateSet) -> None:
    # Prepare
    ca, server = _load_cert(pki.ca_cert), _load_cert(pki.server_cert)
    now = datetime.now(timezone.utc)

    # Assert: the CA
    assert ca.subject == ca.issuer
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature

    # Assert: the server
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(server.signature_hash_algorithm, hashes.SHA256)
    assert server.serial_number != ca.serial_number

    # Assert: backdated for clock skew, valid for `days`
    for cert in (ca, server):
        skew = now - cert.not_valid_before_utc
        assert timedelta(minutes=4) < skew < timedelta(minutes=5) + NOW_TOLERANCE
        assert abs(cert.not_valid_after_utc - (now + timedelta(days=30))) < NOW_TOLERANCE


def test_server_certificate_verifies_for_every_host(pki: CertificateSet) -> None:
    # Execute / Assert: no exception for each host the sites may dial
    for host in pki.hosts:
        verify_server_certificate(ca_cert=pki.ca_cert, server_cert=pki.server_cert, host=host)


def test_certificate_from_another_ca_fails(pki: CertificateSet, other_pki: CertificateSet) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match="not signed by the CA"):
        verify_server_certificate(
            ca_cert=other_pki.ca_cert, server_cert=pki.server_cert, host="localhost"
        )


@pytest.mark.parametrize("host", ["example.org", "10.0.0.1", "::1", "sub.localhost"])
def test_host_not_in_san_fails(pki: CertificateSet, host: str) -> None:
    # Execute / Assert
    with pytest.raises(IntegrityError, match="not in the SubjectAlternativeName"):
        verify_server_certificate(ca_cert=pki.ca_cert, server_cert=pki.server_cert, host=host)


def test_validity_window_is_enforced(pki: CertificateSet) -> None:
    # Prepare
    now = datetime.now(timezone.utc)
    check = {"ca_cert": pki.ca_cert, "server_cert": pki.server_cert, "host": "localhost"}

    # Execute / Assert
    verify_server_certificate(**check, at=now + timedelta(days=29))
    with pytest.raises(IntegrityError, match="expired"):
        verify_server_certificate(**check, at=now + timedelta(days=31))
    with pytest.raises(IntegrityError, match="not valid before"):
        verify_server_certificate(**check, at=now - timedelta(hours=1))
    with pytest.raises(ConfigError, match="timezone-aware"):
        verify_server_certificate(**check, at=datetime.now())


def test_ca_signed_certificate_without_server_auth_fails_path_validation(
    pki: CertificateSet, tmp_path: Path
) -> None:
    # Prepare: right CA, right name, in date, but its extended key usage is TLS client only.
    cert, key = _client_auth_cert(pki, host="localhost", out=tmp_path)

    # Execute / Assert: our check and OpenSSL (through ssl) both refuse it as a server.
    with pytest.raises(IntegrityError, match="path validation"):
        verify_server_certificate(ca_cert=pki.ca_cert, server_cert=cert, host="localhost")
    with _tls_server(cert, key) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            _client_handshake(port=port, cafile=pki.ca_cert, server_hostname="localhost")


def test_unreadable_or_non_pem_files_are_config_errors(pki: CertificateSet) -> None:
    # Prepare
    garbage = pki.folder / "garbage.pem"
    garbage.write_text("not a certificate\n")

    # Execute / Assert
    with pytest.raises(ConfigError, match="cannot be read"):
        verify_server_certificate(
            ca_cert=pki.folder / "missing.crt", server_cert=pki.server_cert, host="localhost"
        )
    with pytest.raises(ConfigError, match="not a PEM X.509 certificate"):
        verify_server_certificate(ca_cert=pki.ca_cert, server_cert=garbage, host="localhost")
    with pytest.raises(ConfigError, match="not a PEM X.509 certificate"):
        verify_server_certificate(ca_cert=pki.ca_key, server_cert=pki.server_cert, host="localhost")
    with pytest.raises(ConfigError, match="`host`"):
        verify_server_certificate(ca_cert=pki.ca_cert, server_cert=pki.server_cert, host="")


_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)
_dns = st.lists(_label, min_size=1, max_size=3).map(".".join)
_hosts = st.lists(
    st.one_of(_dns, st.ip_addresses().map(str)),
    min_size=1,
    max_size=4,
    unique_by=str.lower,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Host labels are at most 12 characters, so the outsider's first label can never be one of them.
@given(hosts=_hosts, outsider=_dns.map(lambda name: f"not-listed-here-{name}"))
def test_every_requested_host_verifies_and_no_other(hosts: list[str], outsider: str) -> None:
    # Prepare
    with tempfile.TemporaryDirectory() as scratch:
        # Execute
        pki = create_test_pki(folder=Path(scratch), hosts=hosts, sites=0)

        # Assert
        for host in hosts:
            verify_server_certificate(ca_cert=pki.ca_cert, server_cert=pki.server_cert, host=host)
        with pytest.raises(IntegrityError):
            verify_server_certificate(
                ca_cert=pki.ca_cert, server_cert=pki.server_cert, host=outsider
            )


# --- real TLS --------------------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_succeeds_with_the_test_ca(pki: CertificateSet, server_hostname: str) -> None:
    # Prepare
    with _tls_server(pki.server_cert, pki.server_key) as port:
        # Execute
        received = _client_handshake(port=port, cafile=pki.ca_cert, server_hostname=server_hostname)

    # Assert
    assert received == b"ok"


def test_tls_client_trusting_another_ca_refuses_the_server(
    pki: CertificateSet, other_pki: CertificateSet
) -> None:
    # Prepare
    with _tls_server(pki.server_cert, pki.server_key) as port:
        # Execute / Assert
        with pytest.raises(ssl.SSLCertVerificationError):
            _client_handshake(port=port, cafile=other_pki.ca_cert, server_hostname="localhost")


def test_tls_client_dialling_an_unlisted_name_refuses_the_server(pki: CertificateSet) -> None:
    # Prepare
    with _tls_server(pki.server_cert, pki.server_key) as port:
        # Execute / Assert
        with pytest.raises(ssl.SSLCertVerificationError):
            _client_handshake(port=port, cafile=pki.ca_cert, server_hostname="example.org")


def test_grpc_secure_channel_connects(pki: CertificateSet) -> None:
    """The SuperLink serves gRPC with grpc.ssl_server_credentials(ca, cert, key) as Flower does."""
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    # Prepare
    credentials = grpc.ssl_server_credentials(
        ((pki.server_key.read_bytes(), pki.server_cert.read_bytes()),),
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=False,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        for target in (f"127.0.0.1:{port}", f"localhost:{port}"):
            channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
            )
            try:
                # Execute / Assert: READY needs a completed TLS handshake.
                grpc.channel_ready_future(channel).result(timeout=5)
            finally:
                channel.close()
    finally:
        server.stop(grace=None)


# --- SuperNode authentication keys -----------------------------------------------------------


def test_site_keys_are_p384_pairs_that_sign_and_verify(pki: CertificateSet) -> None:
    # Prepare
    message = b"round 3 update digest"
    publics = []

    for private_path, public_path in pki.site_keys:
        # Execute
        private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        signature = private.sign(message, ec.ECDSA(hashes.SHA256()))

        # Assert
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP384R1)
        assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        assert private.public_key() == public
        publics.append(public_path.read_bytes())
    assert len(set(publics)) == len(pki.site_keys)  # a fresh key per site


def test_flower_loads_the_site_keys(pki: CertificateSet) -> None:
    """Flower's own loaders for --auth-supernode-private-key and `flwr supernode register`."""
    pytest.importorskip("flwr")
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for private_path, public_path in pki.site_keys:
        # Execute
        loaded = _try_setup_client_authentication(
            argparse.Namespace(
                auth_supernode_private_key=str(private_path), auth_supernode_public_key=None
            )
        )
        registered = try_load_public_key(public_path)

        # Assert: the key the SuperNode signs with is the one registered with the SuperLink.
        assert loaded is not None
        assert public_key_to_bytes(loaded[1]) == registered


def test_zero_sites_writes_no_site_keys(tmp_path: Path) -> None:
    # Execute
    pki = create_test_pki(folder=tmp_path / "pki", sites=0)

    # Assert
    assert pki.site_keys == ()
    assert not list(pki.folder.glob("site*"))
    assert pki.describe()["sites"] == []
