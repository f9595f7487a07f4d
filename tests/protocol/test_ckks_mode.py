"""CKKSMode over a LocalLink: the sum, a dropout at each stage, refused replies, the report."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.crypto.ckks.contributions import Contribution, encode_contributions
from securefed.crypto.roster import Roster
from securefed.errors import ConfigError, ProtocolError
from securefed.plugins import SECURE_AGG
from securefed.protocol.harness import ProtocolSite, run_sum
from securefed.protocol.modes.base import run_session
from securefed.protocol.modes.ckks import CKKSMode, ckks_params, decrypting_site
from securefed.protocol.wire import Stage, vector_from_bytes

pytest.importorskip("tenseal")

DIM = 5
ATOL = 1e-6


@pytest.fixture(scope="module")
def keys():
    from securefed.crypto.ckks import generate_keys

    return generate_keys(params=ckks_params(RunConfig(secure_agg="he", clients=4)))


@pytest.fixture(scope="module")
def fed():
    """A roster of 4 sites and their identity keys."""
    return Roster.generate(4)


def _vectors(n: int) -> dict[int, np.ndarray]:
    return {s: np.arange(DIM, dtype=float) + 10.0 * s for s in range(n)}


class _Counting:
    """Records which stages reached a site."""

    def __init__(self, site):
        self.site, self.stages = site, []

    def handle(self, stage, fields):
        self.stages.append(stage)
        return self.site.handle(stage, fields)


ROUND = 7


def _designated(n_sites, round_index=ROUND, *, clients=4, roster=None):
    """The site :func:`decrypting_site` names (it depends on the roster's ids, not its keys)."""
    roster = roster or Roster.generate(n_sites)[0]
    return decrypting_site(
        roster, run_session(RunConfig(secure_agg="he", clients=clients)), round_index
    )


def _round(keys, vectors, *, lost=None, wrap=None, clients=4, **drops):
    config = RunConfig(secure_agg="he", clients=clients)
    mode = CKKSMode()
    roster, identities = Roster.generate(len(vectors))
    sites = {
        s: _Counting(
            ProtocolSite(
                mode.site(
                    config,
                    site_id=s,
                    he_secret=keys.secret_context,
                    roster=roster,
                    identity=identities[s],
                ),
                v,
            )
        )
        for s, v in sorted(vectors.items())
    }
    endpoints = dict(sites)
    for sid, wrapper in (wrap or {}).items():
        endpoints[sid] = wrapper(sites[sid])
    collector = mode.server(
        config, n_sites=len(vectors), he_public=keys.public_context, roster=roster
    )
    outcome, _ = run_sum(
        collector, endpoints, round_index=ROUND, n_sites=len(vectors), dim=DIM, lost=lost, **drops
    )
    return outcome, sites


def test_the_registered_mode_sums_and_the_designated_site_decrypts(keys):
    # Prepare: the round's decrypting site, a public function of the session and the round.
    vectors = _vectors(4)
    holder = _designated(4)

    # Execute
    outcome, sites = _round(keys, vectors)

    # Assert: only that site was asked to decrypt, once; the others only fit.
    assert SECURE_AGG.get("he") is CKKSMode
    assert outcome.error is None and outcome.survivors == [0, 1, 2, 3]
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=ATOL, rtol=0)
    assert sites[holder].stages == [Stage.FIT, Stage.DECRYPT]
    assert all(sites[s].stages == [Stage.FIT] for s in range(4) if s != holder)


def test_the_decrypting_site_is_one_roster_site_fixed_by_the_session_and_the_round():
    # Prepare
    roster, _ = Roster.generate(4)
    session = run_session(RunConfig(secure_agg="he", clients=4))

    # Execute
    named = [decrypting_site(roster, session, r) for r in range(64)]

    # Assert: a roster site, the same every time it is computed, spread over the roster.
    assert set(named) <= set(roster.sites) and len(set(named)) > 1
    assert named == [decrypting_site(roster, session, r) for r in range(64)]


def _other(holder):
    """A site of the 4 that is not the round's decrypting site."""
    return next(s for s in range(4) if s != holder)


@pytest.mark.parametrize(
    ("how", "uploaded"),
    [
        (lambda d: {"lost": {Stage.FIT: {d}}}, False),
        (lambda d: {"drop_before_upload": {d}}, False),
        (lambda d: {"lost": {Stage.DECRYPT: {d}}}, True),
        (lambda d: {"drop_after_upload": {d}}, True),
    ],
    ids=["lost-at-fit", "before-upload", "lost-at-decrypt", "after-upload"],
)
def test_a_dropout_at_each_stage_leaves_the_sum_of_the_uploaders(keys, how, uploaded):
    # Prepare: a site that is not the round's decrypting site drops out.
    vectors = _vectors(4)
    holder = _designated(4)
    dropped = _other(holder)
    included = [s for s in range(4) if uploaded or s != dropped]

    # Execute
    outcome, sites = _round(keys, vectors, **how(dropped))

    # Assert
    assert outcome.error is None and outcome.survivors == included
    np.testing.assert_allclose(outcome.total, sum(vectors[s] for s in included), atol=ATOL, rtol=0)
    assert Stage.DECRYPT in sites[holder].stages
    assert all(Stage.DECRYPT not in sites[s].stages for s in range(4) if s != holder)


@pytest.mark.parametrize("how", ["lost-at-decrypt", "after-upload"])
def test_a_round_whose_decrypting_site_is_away_is_not_decrypted(keys, how):
    # Prepare: the designated site uploads, then is gone; no other key holder may stand in.
    vectors = _vectors(4)
    holder = _designated(4)
    lost = how == "lost-at-decrypt"
    drops = {"lost": {Stage.DECRYPT: {holder}}} if lost else {"drop_after_upload": {holder}}

    # Execute
    outcome, sites = _round(keys, vectors, **drops)

    # Assert: no sum, the round says so, and nobody else was asked to decrypt.
    assert outcome.total is None and outcome.survivors == []
    assert "no key-holding site decrypted the sum" in outcome.error
    assert all(Stage.DECRYPT not in sites[s].stages for s in range(4) if s != holder)
    if lost:
        assert "decrypt" in outcome.site_errors[holder]


def test_the_decrypting_site_decrypts_a_round_it_did_not_contribute_to(keys):
    # Prepare: the designated site's fit is lost; it is still online for the decryption.
    vectors = _vectors(4)
    holder = _designated(4)

    # Execute
    outcome, sites = _round(keys, vectors, lost={Stage.FIT: {holder}})

    # Assert: it decrypted the others' sum (its fit request never reached it).
    others = [s for s in range(4) if s != holder]
    assert outcome.error is None and outcome.survivors == others
    np.testing.assert_allclose(outcome.total, sum(vectors[s] for s in others), atol=ATOL, rtol=0)
    assert sites[holder].stages == [Stage.DECRYPT]


def test_fewer_contributors_than_the_minimum_give_no_sum(keys):
    # Execute
    outcome, sites = _round(keys, _vectors(3), lost={Stage.FIT: {0, 1}})

    # Assert: one ciphertext is never sent for decryption (it would be one site's update).
    assert outcome.total is None and "only 1 ciphertexts; 2 are needed" in outcome.error
    assert Stage.DECRYPT not in sites[2].stages


def _site(keys, fed, site_id, *, config=None, **extra):
    roster, identities = fed
    config = config or RunConfig(secure_agg="he", clients=4)
    return CKKSMode().site(
        config,
        site_id=site_id,
        he_secret=keys.secret_context,
        roster=roster,
        identity=identities[site_id],
        **extra,
    )


def _signed(keys, fed, *, round_index, sites, config=None, states=None):
    """What an honest server forwards: the signed fit ciphertexts of ``sites`` (a list blob).

    ``states`` (site -> state) supplies the states of sites whose fit the caller also runs.
    """
    entries = []
    for s in sites:
        state = {} if states is None or s not in states else states[s]
        fit = _site(keys, fed, s, config=config).protect(
            np.ones(DIM), round_index=round_index, n_sites=4, state=state
        )
        entries.append(Contribution(s, fit["ciphertext"], fit["ciphertext_signature"]))
    return encode_contributions(round_index, entries)


def _decrypt(site, blob, round_index, state):
    return site.step(Stage.DECRYPT, {"round": round_index, "contributions": blob}, state=state)


def test_the_decrypting_site_refuses_a_sum_of_fewer_than_min_contributors(keys, fed):
    # Prepare: a server that asks to decrypt the key holder's own ciphertext alone, and even
    # claims the run has one site (the old code took its minimum, min(2, clients), from that).
    # The key holder is the round's decrypting site under that (claimed) run's session.
    config = RunConfig(secure_agg="he", clients=1)
    holder = _designated(4, 1, clients=1, roster=fed[0])
    states = {holder: {}}
    alone = _signed(keys, fed, round_index=1, sites=[holder], config=config, states=states)
    site = _site(keys, fed, holder, config=config)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="1 signed contribution\\(s\\); at least 2 roster"):
        _decrypt(site, alone, 1, states[holder])
    with pytest.raises(ProtocolError, match="needs `contributions` bytes"):
        site.step(Stage.DECRYPT, {"round": 1}, state=states[holder])
    with pytest.raises(ProtocolError, match="needs `contributions` bytes"):
        site.step(Stage.DECRYPT, {"round": 1, "aggregate": alone}, state=states[holder])


def test_the_pinned_minimum_comes_from_the_roster_not_from_the_servers_config(keys):
    # Prepare: the federation pinned 3 contributors; the server's config says 4 sites. The
    # site under test is round 3's decrypting site.
    fed3 = Roster.generate(4, min_contributors=3)
    holder = _designated(4, 3, roster=fed3[0])
    others = [s for s in range(4) if s != holder]
    state = {}
    two = _signed(keys, fed3, round_index=3, sites=[holder, others[0]], states={holder: state})
    site = _site(keys, fed3, holder)
    state3 = {}
    three = _signed(keys, fed3, round_index=3, sites=[holder, *others[:2]], states={holder: state3})

    # Execute / Assert
    with pytest.raises(ProtocolError, match="2 signed contribution\\(s\\); at least 3"):
        _decrypt(site, two, 3, state)
    total = vector_from_bytes(_decrypt(site, three, 3, state3)["vector"], length=DIM, what="sum")
    np.testing.assert_allclose(total, np.full(DIM, 3.0), atol=ATOL, rtol=0)
    # the noise is sized for the roster's 4 sites, not the 3 signed contributions
    assert site.last_sigma == pytest.approx(keys.params.flooding_sigma(4))


def test_a_key_holder_decrypts_only_its_rounds_once_and_never_without_its_own_ciphertext(keys, fed):
    # Prepare: the site decrypting round 5, a round another site decrypts, and the next round
    # this site decrypts again.
    roster = fed[0]
    holder = _designated(4, 5, roster=roster)
    others = [s for s in range(4) if s != holder]
    not_mine = next(r for r in range(64) if _designated(4, r, roster=roster) != holder)
    later = next(r for r in range(6, 64) if _designated(4, r, roster=roster) == holder)
    site = _site(keys, fed, holder)
    state = {}
    current = _signed(keys, fed, round_index=5, sites=[holder, others[0]], states={holder: state})
    elsewhere = _signed(keys, fed, round_index=not_mine, sites=[holder, others[0]])
    without_me = _signed(keys, fed, round_index=5, sites=others[:2])

    # Execute / Assert: before the first decryption, nothing but this round's sum is served.
    with pytest.raises(
        ProtocolError,
        match=f"sum of round {not_mine} is decrypted by site {_designated(4, not_mine)}.*not by",
    ):
        _decrypt(site, elsewhere, not_mine, state)
    with pytest.raises(ProtocolError, match=f"list is for round {not_mine}, not 5"):
        _decrypt(site, elsewhere, 5, state)
    with pytest.raises(ProtocolError, match="leaves out or changes the ciphertext this site sent"):
        _decrypt(site, without_me, 5, state)
    reply = _decrypt(site, current, 5, state)
    with pytest.raises(ProtocolError, match="already decrypted; one decryption per round"):
        _decrypt(site, current, 5, state)
    with pytest.raises(ProtocolError, match="already decrypted; one decryption per round"):
        _decrypt(site, without_me, 5, state)

    # Assert: the session's state holds the round it fit and the frame's 32-byte digest; what
    # it decrypted is in its persistent store, which a new session (set-up) does not reset.
    assert len(reply["vector"]) == 8 * DIM
    assert set(state) == {"ckks.fit_round", "ckks.fit_digest"}
    assert state["ckks.fit_round"] == 5 and len(state["ckks.fit_digest"]) == 32
    kept = site.persistent
    assert kept["ckks.decrypted_rounds"] == [5] and kept["ckks.decryptions"] == 1
    with pytest.raises(ProtocolError, match="round 5 was already decrypted"):
        _decrypt(site, current, 5, {})
    # a server that re-runs round 5's fit later gets no second decryption of round 5
    _decrypt(
        site,
        _signed(keys, fed, round_index=later, sites=[holder, others[0]], states={holder: state}),
        later,
        state,
    )
    again = _signed(keys, fed, round_index=5, sites=[holder, others[0]], states={holder: state})
    with pytest.raises(ProtocolError, match="round 5 was already decrypted"):
        _decrypt(site, again, 5, state)
    assert site.persistent["ckks.decrypted_rounds"] == [5, later]


def test_a_key_holder_refuses_decryptions_beyond_its_share_of_the_budget(keys, fed):
    # Prepare: four sites share the key's 2^32-decryption budget; this one has used its share.
    from securefed.crypto.ckks.flooding import DECRYPTION_BUDGET

    state = {}
    # A round whose sum this site decrypts (the holder depends on the session and round).
    mine = next(r for r in range(1, 64) if _designated(4, r, roster=fed[0]) == 0)
    blob = _signed(keys, fed, round_index=mine, sites=[0, 1], states={0: state})
    site = _site(keys, fed, 0)
    site.persistent["ckks.decryptions"] = DECRYPTION_BUDGET // 4

    # Execute / Assert
    with pytest.raises(ProtocolError, match="decryption budget"):
        _decrypt(site, blob, mine, state)


def test_a_site_without_a_roster_or_identity_refuses_to_take_part(keys, fed):
    # Prepare: what `--insecure-no-roster` used to allow in a `he` run.
    config = RunConfig(secure_agg="he", clients=4)
    bare = CKKSMode().site(config, site_id=0, he_secret=keys.secret_context)
    no_identity = CKKSMode().site(config, site_id=0, he_secret=keys.secret_context, roster=fed[0])
    state = {}
    blob = _signed(keys, fed, round_index=1, sites=[0, 1], states={0: state})

    # Execute / Assert
    for site in (bare, no_identity):
        with pytest.raises(ProtocolError, match="needs the federation's signed roster"):
            site.protect(np.ones(DIM), round_index=1, n_sites=4, state={})
        with pytest.raises(ProtocolError, match="needs the federation's signed roster"):
            _decrypt(site, blob, 1, state)
    with pytest.raises(ConfigError, match="not the roster's key"):
        CKKSMode().site(
            config, site_id=0, he_secret=keys.secret_context, roster=fed[0], identity=fed[1][1]
        )


class _Tamper:
    def __init__(self, site, stage, field, change):
        self.site, self.stage, self.field, self.change = site, stage, field, change

    def handle(self, stage, fields):
        reply = self.site.handle(stage, fields)
        if stage == self.stage:
            reply[self.field] = self.change(reply[self.field])
        return reply


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0x01
    return bytes(out)


def test_a_tampered_ciphertext_is_refused_and_the_others_are_summed(keys):
    # Prepare: the tampered site is not the key holder (who refuses its own bad frame).
    vectors = _vectors(4)
    bad = next(s for s in (2, 3, 1, 0) if s != _designated(4))
    good = [s for s in range(4) if s != bad]

    # Execute
    outcome, _ = _round(
        keys, vectors, wrap={bad: lambda s: _Tamper(s, Stage.FIT, "ciphertext", _flip)}
    )

    # Assert
    assert outcome.survivors == good and "ciphertext" in outcome.site_errors[bad]
    np.testing.assert_allclose(outcome.total, sum(vectors[s] for s in good), atol=ATOL, rtol=0)


def test_a_malformed_decryption_is_refused_and_no_other_site_asked(keys):
    # Prepare: the round's decrypting site answers with a vector of the wrong length.
    vectors = _vectors(3)
    holder = _designated(3)

    # Execute
    outcome, sites = _round(
        keys,
        vectors,
        wrap={holder: lambda s: _Tamper(s, Stage.DECRYPT, "vector", lambda v: v[:8])},
    )

    # Assert: refused, and no other key holder is asked for the round's sum instead.
    assert "decrypt" in outcome.site_errors[holder]
    assert outcome.total is None and "no key-holding site decrypted the sum" in outcome.error
    assert all(Stage.DECRYPT not in sites[s].stages for s in range(3) if s != holder)


def test_the_server_side_gets_only_a_public_context_for_the_runs_parameters(keys):
    # Prepare
    config = RunConfig(secure_agg="he", clients=4)
    other = RunConfig(secure_agg="he", clients=4, he_scale_bits=90)
    coarse = RunConfig(
        secure_agg="he", clients=4, he_coeff_mod_bit_sizes=(60, 40, 40, 60), he_scale_bits=40
    )

    # Execute / Assert
    with pytest.raises(ProtocolError, match="must not hold the CKKS secret key"):
        CKKSMode().server(config, n_sites=4, he_public=keys.secret_context)
    with pytest.raises(ConfigError, match="other parameters"):
        CKKSMode().server(other, n_sites=4, he_public=keys.public_context)
    with pytest.raises(ConfigError, match="no site sent"):
        CKKSMode().server(config, n_sites=4)
    with pytest.raises(ConfigError, match="secret key"):
        CKKSMode().site(config, site_id=0)
    # The former defaults: the flooding noise would exceed the documented bound.
    for side in (
        lambda: CKKSMode().server(coarse, n_sites=4, he_public=keys.public_context),
        lambda: CKKSMode().site(coarse, site_id=0, he_secret=keys.secret_context),
    ):
        with pytest.raises(ConfigError, match="flooding noise .* above the documented bound"):
            side()


def test_describe_is_the_deployed_privacy_report_entry(keys):
    # Prepare
    config = RunConfig(secure_agg="he", clients=4)

    # Execute
    entry = CKKSMode().server(config, n_sites=4, he_public=keys.public_context).describe()

    # Assert: today's privacy.json entry of a deployed CKKS run.
    assert entry == {
        "protocol": "ckks",
        "library": "tenseal",
        "server_holds_secret_key": False,
        "key_holder": "the sites (one key set, distributed out of band); one site per "
        "round, fixed by the run's session and the round, checks the contributors' signed "
        "ciphertexts, adds them itself and decrypts the sum, once, adding flooding noise",
        "min_contributors": 2,
        **ckks_params(config).describe(n_sites=4),
    }
    assert entry["flooding_sigma"] == pytest.approx(keys.params.flooding_sigma(4))
    assert entry["precision"] < 1e-9
