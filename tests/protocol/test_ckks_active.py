"""The CKKS mode against a malicious server, over the runtime path (LocalLink + mode sides).

:class:`CKKSCollector` drives :class:`CKKSSite` endpoints over a link whose server side
rewrites the decrypt message (a malicious aggregator between the honest collector code and
the sites). Every attack must be refused by the key holder before any decryption: the test
counts calls of :meth:`CKKSDecryptor.decrypt` (the real one, wrapped).
"""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.crypto.ckks import CKKSAggregator, CKKSDecryptor, CKKSEncryptor
from securefed.crypto.ckks import framing as ckks_framing
from securefed.crypto.ckks.contributions import (
    Contribution,
    decode_contributions,
    encode_contributions,
)
from securefed.crypto.roster import Roster
from securefed.protocol.harness import ProtocolSite
from securefed.protocol.modes.base import run_session
from securefed.protocol.modes.ckks import CKKSMode, ckks_params, decrypting_site
from securefed.protocol.wire import Stage, vector_from_bytes
from tests.protocol.test_masking_active import MaliciousLink

ts = pytest.importorskip("tenseal")

DIM = 5
ROUND = 7
N = 3  # roster min_contributors 2
ATOL = 1e-6


@pytest.fixture(scope="module")
def keys():
    from securefed.crypto.ckks import generate_keys

    return generate_keys(params=ckks_params(RunConfig(secure_agg="he", clients=N)))


@pytest.fixture(scope="module")
def fed():
    return Roster.generate(N)


@pytest.fixture
def decryptions(monkeypatch):
    """Counts real decryptions (the wrapped method still decrypts)."""
    calls = []
    real = CKKSDecryptor.decrypt

    def counted(self, frame, *, round_index=None):
        calls.append(round_index)
        return real(self, frame, round_index=round_index)

    monkeypatch.setattr(CKKSDecryptor, "decrypt", counted)
    return calls


def _config(**overrides):
    return RunConfig(secure_agg="he", clients=N, **overrides)


def _holder(fed, round_index=ROUND, config=None):
    """The round's one decrypting site (a public function of the session and the round)."""
    return decrypting_site(fed[0], run_session(config or _config()), round_index)


def _not_holder(fed, index=0):
    """The ``index``-th site that is not the round's decrypting site."""
    return [s for s in range(N) if s != _holder(fed)][index]


def _vectors() -> dict[int, np.ndarray]:
    return {s: np.arange(DIM, dtype=float) + 10.0 * s for s in range(N)}


def _site(keys, fed, sid, config=None):
    roster, identities = fed
    return CKKSMode().site(
        config or _config(),
        site_id=sid,
        he_secret=keys.secret_context,
        roster=roster,
        identity=identities[sid],
    )


def _signed_elsewhere(keys, fed, sid, *, round_index, config=None, vector=None):
    """A contribution site ``sid`` really signed, in another round or run."""
    vector = np.ones(DIM) if vector is None else vector
    fit = _site(keys, fed, sid, config).protect(
        vector, round_index=round_index, n_sites=N, state={}
    )
    return Contribution(sid, fit["ciphertext"], fit["ciphertext_signature"])


def _scaled(keys, frame: bytes, *, k_bits: int = 72) -> bytes:
    """An update frame with its ciphertexts doubled ``k_bits`` times (the public context can)."""
    from securefed.crypto.ckks.keys import load_key

    ctx = load_key(keys.public_context, kinds=(ckks_framing.KIND_PUBLIC_CONTEXT,)).context
    header, blobs = ckks_framing.decode_vector_frame(frame, kinds=(3,), what="update")
    chunks = []
    for blob in blobs:
        vec = ts.ckks_vector_from(ctx, bytes(blob))
        for _ in range(k_bits):
            vec = vec + vec
        chunks.append(vec.serialize())
    return ckks_framing.encode_vector_frame(
        kind=ckks_framing.KIND_UPDATE,
        key_id=header.key_id,
        round_index=header.round_index,
        sender=header.sender,
        n_values=header.n_values,
        layout_id=header.layout_id,
        slots=header.slots,
        weighted=False,
        contributors=(),
        chunks=chunks,
    )


def _round(keys, fed, *, rewrite=None, wrap=None, config=None):
    config = config or _config()
    roster, identities = fed
    mode = CKKSMode()
    sites = {
        s: ProtocolSite(
            mode.site(
                config,
                site_id=s,
                he_secret=keys.secret_context,
                roster=roster,
                identity=identities[s],
            ),
            v,
        )
        for s, v in _vectors().items()
    }
    for sid, wrapper in (wrap or {}).items():
        sites[sid] = wrapper(sites[sid])
    link = MaliciousLink(sites, rewrite=rewrite)
    collector = mode.server(config, n_sites=N, he_public=keys.public_context, roster=roster)
    fits, _ = link.exchange(
        {s: (Stage.FIT, {"round": ROUND, "n_sites": N}) for s in sites},
        timeout=1,
        group=str(ROUND),
    )
    outcome = collector.collect(
        link, fits, round_index=ROUND, chosen=sorted(sites), dim=DIM, timeout=1
    )
    return outcome, link


def _list_rewrite(change):
    """A server that rewrites the contribution list of every decrypt message."""

    def rewrite(stage, sid, fields, link):
        if stage != Stage.DECRYPT:
            return fields
        round_index, entries = decode_contributions(fields["contributions"])
        new_round, new_entries = change(sid, round_index, {e.site_id: e for e in entries})
        fields["contributions"] = encode_contributions(new_round, list(new_entries.values()))
        return fields

    return rewrite


def test_the_honest_round_decrypts_once_the_sum_of_the_signed_ciphertexts(keys, fed, decryptions):
    # Execute
    outcome, link = _round(keys, fed)

    # Assert: one decryption (the round's decrypting site), of the plaintext sum within the
    # documented precision.
    assert outcome.error is None and outcome.survivors == [0, 1, 2]
    np.testing.assert_allclose(outcome.total, sum(_vectors().values()), atol=ATOL, rtol=0)
    assert decryptions == [ROUND] and list(link.replies[Stage.DECRYPT]) == [_holder(fed)]
    assert all(len(r["ciphertext_signature"]) == 64 for r in link.replies[Stage.FIT].values())


def _scaled_as_aggregate(keys, fed):
    """The reviewer's attack on the former protocol: a scaled "aggregate" to decrypt."""

    def rewrite(stage, sid, fields, link):
        if stage != Stage.DECRYPT:
            return fields
        _, entries = decode_contributions(fields["contributions"])
        agg = CKKSAggregator(keys.public_context, round_index=ROUND)
        for e in entries:
            agg.add(_scaled(keys, e.frame), site_id=e.site_id)
        return {"round": ROUND, "aggregate": agg.aggregate()}

    return rewrite


def _enc0_booked_as(keys, fed, booked: int):
    """The server's own Enc(0) in place of site ``booked``, under a key of its own."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    frame = CKKSEncryptor(keys.public_context).encrypt(
        np.zeros(DIM), site_id=booked, round_index=ROUND
    )
    signature = Ed25519PrivateKey.generate().sign(b"not the site's")

    def change(sid, round_index, entries):
        entries[booked] = Contribution(booked, frame, signature)
        return round_index, entries

    return _list_rewrite(change)


def _scaled_entry(keys, fed, victim: int):
    """Site ``victim``'s ciphertext doubled 72 times, under its own signature."""

    def change(sid, round_index, entries):
        old = entries[victim]
        entries[victim] = Contribution(victim, _scaled(keys, old.frame), old.signature)
        return round_index, entries

    return _list_rewrite(change)


def _replayed(keys, fed, victim: int, *, round_index: int, config=None):
    """Site ``victim``'s ciphertext, really signed, from another round or run."""
    old = _signed_elsewhere(keys, fed, victim, round_index=round_index, config=config)

    def change(sid, listed, entries):
        entries[victim] = old
        return listed, entries

    return _list_rewrite(change)


def _alone(which):
    """One site's ciphertext presented alone (``which``: "self" or "other")."""

    def change(sid, round_index, entries):
        keep = sid if which == "self" else next(s for s in entries if s != sid)
        return round_index, {keep: entries[keep]}

    return _list_rewrite(change)


def _left_out():
    """The others' signed ciphertexts, without the key holder's own (it contributed)."""

    def change(sid, round_index, entries):
        return round_index, {s: e for s, e in entries.items() if s != sid}

    return _list_rewrite(change)


def _unsigned(victim: int):
    def change(sid, round_index, entries):
        entries[victim] = Contribution(victim, entries[victim].frame, bytes(64))
        return round_index, entries

    return _list_rewrite(change)


def _relabelled(victim: int):
    """The key holder's own signed ciphertext booked as site ``victim`` too."""

    def change(sid, round_index, entries):
        own = entries[sid]
        target = victim if victim != sid else (victim + 1) % N
        entries[target] = Contribution(target, own.frame, own.signature)
        return round_index, entries

    return _list_rewrite(change)


ATTACKS = {
    "scaled aggregate": (_scaled_as_aggregate, "needs `contributions` bytes"),
    "scaled ciphertext under its signature": (
        lambda k, f: _scaled_entry(k, f, _not_holder(f)),
        "signature does not verify",
    ),
    "Enc(0) booked as another site": (
        lambda k, f: _enc0_booked_as(k, f, _not_holder(f, 1)),
        "signature does not verify",
    ),
    "ciphertext replayed from another round": (
        lambda k, f: _replayed(k, f, _not_holder(f), round_index=ROUND - 1),
        "signature does not verify",
    ),
    "ciphertext replayed from another session": (
        lambda k, f: _replayed(k, f, _not_holder(f), round_index=ROUND, config=_config(seed=99)),
        "signature does not verify",
    ),
    "the key holder's ciphertext alone": (lambda k, f: _alone("self"), "at least 2 roster"),
    "another site's ciphertext alone": (
        lambda k, f: _alone("other"),
        "leaves out or changes the ciphertext this site sent",
    ),
    "the key holder's ciphertext left out": (
        lambda k, f: _left_out(),
        "leaves out or changes the ciphertext this site sent",
    ),
    "unsigned contribution": (
        lambda k, f: _unsigned(_not_holder(f, 1)),
        "signature does not verify",
    ),
    "own ciphertext booked as another site": (
        lambda k, f: _relabelled(_not_holder(f, 1)),
        "signature does not verify",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_is_refused_before_any_decryption(keys, fed, decryptions, attack):
    # Prepare
    make, reason = ATTACKS[attack]

    # Execute: the server rewrites every decrypt message it sends (to the round's decrypting
    # site, the only one it may ask).
    outcome, link = _round(keys, fed, rewrite=make(keys, fed))

    # Assert: the key holder refused, with the reason, and nothing was decrypted.
    assert decryptions == []
    assert outcome.total is None and "no key-holding site decrypted" in outcome.error
    assert not link.replies[Stage.DECRYPT]
    assert set(link.errors[Stage.DECRYPT]) == {_holder(fed)}
    assert all(reason in e for e in link.errors[Stage.DECRYPT].values())


def test_overlapping_subsets_cannot_be_decrypted_by_different_key_holders(
    keys, fed, decryptions, monkeypatch
):
    """The second review's attack: three key holders, three overlapping pairs of one round.

    With N=3 and a roster minimum of 2, a server sends the signed lists {0,1}, {1,2}, {0,2}
    to holders 0, 1 and 2. Under the former rule (any key holder that contributed decrypts,
    once per round) each holder decrypted its pair, and (s01 + s02 - s12) / 2 etc. gave every
    site's update: measured at 1.4e-10 on commit e534be4 (/tmp/review14b). Now one site,
    fixed by the session and the round, decrypts one list per round.
    """
    from securefed.errors import ProtocolError
    from securefed.protocol.modes import ckks as ckks_mode

    # Prepare
    x = {s: np.random.default_rng(s).normal(size=DIM) for s in range(N)}
    pairs = {0: (0, 1), 1: (1, 2), 2: (0, 2)}  # holder -> the subset it is asked to decrypt

    def federation():
        """Fresh sites (persistent stores), their fit states and signed contributions."""
        sites = {s: _site(keys, fed, s) for s in range(N)}
        states = {s: {} for s in range(N)}
        signed = {}
        for s in range(N):
            fit = sites[s].protect(x[s], round_index=ROUND, n_sites=N, state=states[s])
            signed[s] = Contribution(s, fit["ciphertext"], fit["ciphertext_signature"])
        return sites, states, signed

    def ask(sites, states, signed, holder, subset):
        blob = encode_contributions(ROUND, [signed[s] for s in subset])
        reply = sites[holder].step(
            Stage.DECRYPT, {"round": ROUND, "contributions": blob}, state=states[holder]
        )
        return vector_from_bytes(reply["vector"], length=DIM, what="sum")

    # Execute (before): the rule bypassed, so that each asked holder counts as the round's
    # decrypting site; every holder is in its pair, as the former rule required.
    sites, states, signed = federation()
    sums = {}
    for holder, subset in pairs.items():
        with monkeypatch.context() as patch:
            patch.setattr(ckks_mode, "decrypting_site", lambda *_, h=holder: h)
            sums[subset] = ask(sites, states, signed, holder, subset)
    s01, s12, s02 = sums[(0, 1)], sums[(1, 2)], sums[(0, 2)]
    recovered = {0: (s01 + s02 - s12) / 2, 1: (s01 + s12 - s02) / 2, 2: (s12 + s02 - s01) / 2}

    # Assert (before): three decryptions, every single update recovered.
    assert decryptions == [ROUND] * 3
    for s in range(N):
        np.testing.assert_allclose(recovered[s], x[s], atol=ATOL, rtol=0)

    # Execute (now): the same attack on fresh sites, under the rule.
    decryptions.clear()
    sites, states, signed = federation()
    holder = _holder(fed)
    released, refused = {}, {}
    for asked, subset in pairs.items():
        try:
            released[asked] = ask(sites, states, signed, asked, subset)
        except ProtocolError as exc:
            refused[asked] = str(exc)

    # Assert (now): only the round's decrypting site decrypted, once, one pair's sum; the other
    # two refused, naming it. One sum of two updates gives neither update.
    assert list(released) == [holder] and decryptions == [ROUND]
    np.testing.assert_allclose(
        released[holder], sum(x[s] for s in pairs[holder]), atol=ATOL, rtol=0
    )
    assert set(refused) == set(range(N)) - {holder}
    assert all(
        f"is decrypted by site {holder}" in why and "not by this site" in why
        for why in refused.values()
    )
    # the decrypting site refuses a second list of the round (another pair, all three)
    for subset in (pairs[(holder + 1) % N], tuple(range(N))):
        if holder not in subset:
            subset = (*subset, holder)
        with pytest.raises(ProtocolError, match="already decrypted; one decryption per round"):
            ask(sites, states, signed, holder, sorted(set(subset)))
    assert decryptions == [ROUND]


def test_without_the_signature_checks_an_enc0_booked_as_a_site_releases_one_update(keys, fed):
    # Prepare: what the former key holder accepted: an aggregate the server added itself of
    # site 0's real ciphertext and its own Enc(0) booked as site 1 (it "sums 2 sites").
    site0 = _signed_elsewhere(keys, fed, 0, round_index=ROUND, vector=_vectors()[0])
    enc = CKKSEncryptor(keys.public_context)
    agg = CKKSAggregator(keys.public_context, round_index=ROUND)
    agg.add(site0.frame, site_id=0)
    agg.add(enc.encrypt(np.zeros(DIM), site_id=1, round_index=ROUND), site_id=1)

    # Execute
    released = CKKSDecryptor(keys.secret_context, min_contributors=2, max_contributors=N).decrypt(
        agg.aggregate(), round_index=ROUND
    )

    # Assert: site 0's update alone, in the clear.
    np.testing.assert_allclose(released, _vectors()[0], atol=ATOL, rtol=0)


def test_the_server_drops_a_site_whose_signature_does_not_verify(keys, fed, decryptions):
    # Prepare: site 2's fit reply carries a signature over another frame.
    class _BadSignature:
        def __init__(self, site):
            self.site = site

        def handle(self, stage, fields):
            reply = self.site.handle(stage, fields)
            if stage == Stage.FIT:
                sig = bytearray(reply["ciphertext_signature"])
                sig[0] ^= 1
                reply["ciphertext_signature"] = bytes(sig)
            return reply

    # Execute: the forger is not the round's decrypting site (which depends on the session)
    bad = _not_holder(fed)
    outcome, _ = _round(keys, fed, wrap={bad: _BadSignature})

    # Assert: the forger dropped with the reason; the others' sum decrypted once.
    rest = [s for s in range(N) if s != bad]
    assert outcome.survivors == rest and "signature does not verify" in outcome.site_errors[bad]
    vectors = _vectors()
    np.testing.assert_allclose(outcome.total, sum(vectors[s] for s in rest), atol=ATOL, rtol=0)
    assert decryptions == [ROUND]


def test_the_contribution_list_is_parsed_strictly(keys, fed):
    # Prepare
    from securefed.errors import IntegrityError, ProtocolError

    entry = _signed_elsewhere(keys, fed, 0, round_index=ROUND)
    blob = encode_contributions(ROUND, [entry])

    # Execute / Assert: a damaged list, a forged count, a repeated site.
    with pytest.raises(IntegrityError, match="SHA-256"):
        decode_contributions(blob[:-1] + bytes([blob[-1] ^ 1]))
    import hashlib
    import struct

    body = bytearray(blob[:-32])
    struct.pack_into(">I", body, 15, 1 << 20)
    with pytest.raises(IntegrityError, match="declares 1048576 entries"):
        decode_contributions(bytes(body) + hashlib.sha256(body).digest())
    with pytest.raises(ProtocolError, match="contributes twice"):
        encode_contributions(ROUND, [entry, entry])
    assert decode_contributions(blob) == (ROUND, [entry])


def test_a_contribution_signature_binds_the_roster_the_session_the_round_and_the_site(keys, fed):
    # Prepare: one signed contribution, and the same keys under another federation's roster.
    from securefed.crypto.ckks.contributions import verify_contribution
    from securefed.errors import ProtocolError
    from securefed.protocol.modes.base import run_session

    roster, _ = fed
    entry = _signed_elsewhere(keys, fed, 1, round_index=ROUND)
    other_roster = Roster(federation="elsewhere", sites=roster.sites)
    session = run_session(_config())

    # Execute / Assert: it verifies only as signed.
    verify_contribution(roster, session=session, round_index=ROUND, contribution=entry)
    for changed in (
        {"roster": other_roster},
        {"session": run_session(_config(seed=99))},
        {"round_index": ROUND + 1},
        {"contribution": Contribution(2, entry.frame, entry.signature)},
    ):
        args = {
            "roster": roster,
            "session": session,
            "round_index": ROUND,
            "contribution": entry,
        } | changed
        with pytest.raises(ProtocolError, match="does not verify"):
            verify_contribution(
                args.pop("roster"),
                **args,
            )
