import os
import stat

import pytest

from securefed.dp.signing import (
    CLAIM_DOMAIN,
    CLAIM_DOMAIN_V1,
    SiteSigner,
    attach_site_signatures,
    claim_from_report,
    claim_message,
    claim_version,
    run_digest,
    sign_report,
    site_claim,
    verify_claim,
    verify_close,
)
from securefed.errors import IntegrityError

RUN = {"rounds": 2, "local_epochs": 1, "batch_size": 32, "dp_epsilon": 4.0, "seed": 0}


def _event(cid, r, phase="federated"):
    return {
        "round": r,
        "client_id": cid,
        "noise_multiplier": 1.25,
        "sample_rate": 0.25,
        "steps": 4,
        "max_grad_norm": 1.0,
        "phase": phase,
    }


def _report():
    clients = [
        {
            "client_id": cid,
            "delta": 1e-5,
            "sample_rate": 0.25,
            "noise_multiplier": 1.25,
            "max_grad_norm": 1.0,
            "planned_steps": 8,
            "steps": 8,
            "epsilon": 3.9,
            "epsilon_per_round": [2.5, 3.9],
        }
        for cid in (0, 1)
    ]
    clients[1]["num_samples"] = 120  # site 1 discloses n, site 0 does not
    return {
        "noise": "secret",
        "adjacency": "replace-one",
        "accountant": "pld",
        "delta": 1e-5,
        "clients": clients,
        "events": [_event(0, 1), _event(1, 1), _event(0, 2), _event(1, 2)],
    }


def test_claim_has_exactly_the_contract_fields():
    privacy = _report()
    claim = claim_from_report(privacy, RUN, 0)
    assert set(claim) == {
        "client_id",
        "run_sha256",
        "noise",
        "adjacency",
        "accountant",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "max_grad_norm",
        "planned_steps",
        "events",
        "epsilon",
    }
    assert claim["run_sha256"] == run_digest(RUN)
    assert [e["round"] for e in claim["events"]] == [1, 2]
    assert claim_from_report(privacy, RUN, 1)["num_samples"] == 120


def test_a_site_builds_the_auditors_claim_from_its_own_data_only():
    privacy = _report()
    own = site_claim(
        entry=privacy["clients"][1],
        events=[e for e in privacy["events"] if e["client_id"] == 1],
        run=RUN,
        noise="secret",
        adjacency="replace-one",
        accountant="pld",
    )
    assert own == claim_from_report(privacy, RUN, 1)
    with pytest.raises(ValueError, match="own"):
        site_claim(
            entry=privacy["clients"][1],
            events=privacy["events"],
            run=RUN,
            noise="secret",
            adjacency="replace-one",
            accountant="pld",
        )


def test_signature_verifies_and_any_edit_breaks_it():
    signer = SiteSigner.generate()
    privacy = _report()
    claim = claim_from_report(privacy, RUN, 0)
    sig = signer.sign_claim(claim)
    assert verify_claim(claim, sig, signer.public_key_hex)
    # Attacks: a rewritten q, sigma, ledger, run configuration, or another site's key.
    assert not verify_claim({**claim, "sample_rate": 0.0625}, sig, signer.public_key_hex)
    assert not verify_claim({**claim, "noise_multiplier": 2.5}, sig, signer.public_key_hex)
    assert not verify_claim({**claim, "events": claim["events"][:1]}, sig, signer.public_key_hex)
    assert not verify_claim(
        {**claim, "run_sha256": run_digest({**RUN, "rounds": 1})}, sig, signer.public_key_hex
    )
    assert not verify_claim(claim, sig, SiteSigner.generate().public_key_hex)
    assert not verify_claim(claim, "zz", signer.public_key_hex)
    assert not verify_claim(claim, sig, "00" * 31)


def test_message_is_domain_separated():
    # A signature over the bare canonical JSON (some other protocol's message) never verifies.
    signer = SiteSigner.generate()
    claim = claim_from_report(_report(), RUN, 0)
    msg = claim_message(claim)
    assert msg.startswith(CLAIM_DOMAIN) and CLAIM_DOMAIN == b"securefed/site-claim/v2\x00"
    bare = signer._key.sign(msg[len(CLAIM_DOMAIN) :]).hex()
    assert not verify_claim(claim, bare, signer.public_key_hex)
    # A closing signature is not a claim's, and a claim's is not a closing one.
    close = {"last_round": 2, "models": {"model.safetensors": "ab" * 32}, "roster_sha256": None}
    closing = signer.sign_close(claim, close)
    assert not verify_claim(claim, closing, signer.public_key_hex)
    assert not verify_close(claim, close, signer.sign_claim(claim), signer.public_key_hex)


def test_claim_version_tells_legacy_claims_from_closing_ones():
    # v1 (code before closing claims) still verifies for the audit, as a claim never closed;
    # today's sites sign v2 only, and the server's check takes v2 only.
    signer = SiteSigner.generate()
    claim = claim_from_report(_report(), RUN, 0)
    legacy = signer.sign_message(claim_message(claim, domain=CLAIM_DOMAIN_V1))
    assert claim_version(claim, legacy, signer.public_key_hex) == 1
    assert not verify_claim(claim, legacy, signer.public_key_hex)
    assert claim_version(claim, signer.sign_claim(claim), signer.public_key_hex) == 2
    assert claim_version({**claim, "epsilon": 1.0}, legacy, signer.public_key_hex) is None


def test_a_closing_signature_binds_the_claim_the_last_round_the_models_and_the_roster():
    signer = SiteSigner.generate()
    claim = claim_from_report(_report(), RUN, 0)
    close = {
        "last_round": 2,
        "models": {"model.safetensors": "ab" * 32},
        "roster_sha256": "cd" * 32,
    }
    sig = signer.sign_close(claim, close)
    key = signer.public_key_hex
    assert verify_close(claim, close, sig, key)
    assert not verify_close({**claim, "events": claim["events"][:1]}, close, sig, key)
    assert not verify_close(claim, {**close, "last_round": 1}, sig, key)
    assert not verify_close(claim, {**close, "models": {"model.safetensors": "ef" * 32}}, sig, key)
    assert not verify_close(claim, {**close, "roster_sha256": None}, sig, key)
    assert not verify_close(claim, {"last_round": 2}, sig, key)  # malformed: False, no error
    # Extra, unsigned fields of the block (the sites that did not close) do not matter.
    assert verify_close(claim, {**close, "not_closed": {"3": "timeout"}}, sig, key)


def test_sign_report_adds_keys_and_signatures():
    privacy = _report()
    signers = {0: SiteSigner.generate(), 1: SiteSigner.generate()}
    sign_report(privacy, run=RUN, signers=signers)
    assert privacy["site_keys"] == {str(k): s.public_key_hex for k, s in signers.items()}
    for c in privacy["clients"]:
        claim = claim_from_report(privacy, RUN, c["client_id"])
        assert verify_claim(claim, c["signature"], privacy["site_keys"][str(c["client_id"])])
    with pytest.raises(KeyError, match="no signing key"):
        sign_report(_report(), run=RUN, signers={0: signers[0]})


@pytest.mark.parametrize("fmt", ["pem", "raw"])
def test_key_round_trips_with_mode_0600(tmp_path, fmt):
    signer = SiteSigner.generate()
    path = tmp_path / f"site.{fmt}"
    signer.save(path, fmt=fmt)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SiteSigner.load(path).public_key_hex == signer.public_key_hex
    with pytest.raises(FileExistsError):
        signer.save(path, fmt=fmt)  # never overwrite a key


def test_world_readable_key_is_refused(tmp_path):
    path = tmp_path / "site.pem"
    SiteSigner.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IntegrityError, match="chmod 600"):
        SiteSigner.load(path)


def test_garbage_key_file_is_refused(tmp_path):
    path = tmp_path / "site.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(IntegrityError, match="not an Ed25519 private key"):
        SiteSigner.load(path)


def test_deployment_attaches_what_each_site_signed_and_refuses_a_mismatch():
    privacy = _report()
    signers = {0: SiteSigner.generate(), 1: SiteSigner.generate()}
    # Each site signs from its own entry, events and the run dict only.
    signed = {}
    for cid, signer in signers.items():
        claim = site_claim(
            entry=privacy["clients"][cid],
            events=[e for e in privacy["events"] if e["client_id"] == cid],
            run=RUN,
            noise="secret",
            adjacency="replace-one",
            accountant="pld",
        )
        signed[cid] = (signer.public_key_hex, signer.sign_claim(claim))
    attach_site_signatures(privacy, run=RUN, signed=signed)
    for cid in (0, 1):
        claim = claim_from_report(privacy, RUN, cid)
        assert verify_claim(claim, privacy["clients"][cid]["signature"], signed[cid][0])
    # A server that writes a smaller epsilon than the site signed cannot attach it.
    tampered = _report()
    tampered["clients"][0]["epsilon"] = 1.0
    with pytest.raises(IntegrityError, match="site 0: signature does not match"):
        attach_site_signatures(tampered, run=RUN, signed=signed)
    with pytest.raises(IntegrityError, match="site 1: sent no signed claim"):
        attach_site_signatures(_report(), run=RUN, signed={0: signed[0]})
