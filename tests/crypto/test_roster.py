"""The signed roster: a server that edits it, or signs it itself, is refused."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefed.crypto.roster import Roster, federation_public_key, load_signed_roster, sign_roster
from securefed.errors import ConfigError, IntegrityError, ProtocolError


def test_round_trip_and_pins():
    roster, keys = Roster.generate(4, federation="trial-1")
    fed = Ed25519PrivateKey.generate()
    loaded = load_signed_roster(sign_roster(roster, fed), federation_key=federation_public_key(fed))
    assert loaded == roster
    assert loaded.pinned_threshold == 3 and loaded.min_contributors == 2
    loaded.verify(2, b"hello", keys[2].sign(b"hello"))
    with pytest.raises(ProtocolError):
        loaded.verify(1, b"hello", keys[2].sign(b"hello"))
    with pytest.raises(ProtocolError):
        loaded.identity(9)


def test_server_edits_are_refused():
    roster, _ = Roster.generate(4)
    fed = Ed25519PrivateKey.generate()
    signed = json.loads(sign_roster(roster, fed))
    # Attack: lower the threshold and swap in a key the server controls, keep the signature.
    signed["roster"]["threshold"] = 2
    signed["roster"]["sites"]["3"] = federation_public_key(Ed25519PrivateKey.generate()).hex()
    with pytest.raises(IntegrityError, match="does not verify"):
        load_signed_roster(json.dumps(signed).encode(), federation_key=federation_public_key(fed))
    # Attack: the server re-signs the edited roster with its own key.
    server = Ed25519PrivateKey.generate()
    forged = sign_roster(Roster.from_dict(signed["roster"]), server)
    with pytest.raises(IntegrityError, match="another key"):
        load_signed_roster(forged, federation_key=federation_public_key(fed))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_contributors": 1},
        {"threshold": 1},
        {"threshold": 5},
    ],
)
def test_loose_limits_are_refused(kwargs):
    _, keys = Roster.generate(4)
    sites = {i: federation_public_key(k) for i, k in keys.items()}
    with pytest.raises(ConfigError):
        Roster(federation="f", sites=sites, **kwargs)


def test_malformed_files():
    fed = Ed25519PrivateKey.generate()
    pub = federation_public_key(fed)
    bad = b'{"roster": 1, "signer": "", "signature": ""}'
    for data in (b"", b"[]", b"{" * 10, b" " * (2 << 20), bad):
        with pytest.raises(IntegrityError):
            load_signed_roster(data, federation_key=pub)
