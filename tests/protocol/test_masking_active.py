"""The masking mode against a malicious server, over the runtime path (LocalLink + mode sides).

The same strategies as tests/crypto/test_secagg_active.py, but through what a federated round
runs: :class:`MaskingCollector` drives :class:`MaskingSite` endpoints over a
:class:`LocalLink` whose server side rewrites what it sends (a malicious aggregator sits
between the honest collector code and the sites). Each test reads the replies the sites gave
and asserts that no share that helps the attacker left a site.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.crypto import kdf
from securefed.crypto.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    KeyEntry,
    PublicKeys,
    UnmaskRequest,
    UnmaskShares,
)
from securefed.crypto.roster import Roster
from securefed.crypto.shamir import PRIME, Share
from securefed.errors import ProtocolError
from securefed.protocol.harness import ProtocolSite
from securefed.protocol.link import LocalLink
from securefed.protocol.modes.masking import MaskingMode, secagg_config
from securefed.protocol.wire import Stage

DIM = 6
ROUND = 3
N = 5  # t = 4 (the 2/3 default for 5 sites)


def _config(**overrides):
    return RunConfig(secure_agg="mask", clients=N, secagg_clip=100.0, **overrides)


def _vectors() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(5)
    return {s: rng.uniform(-10, 10, size=DIM) for s in range(N)}


class MaliciousLink(LocalLink):
    """A LocalLink whose server side rewrites (or adds) messages, recording every reply.

    Args:
        sites: Site id -> endpoint.
        rewrite: (stage, site, fields, link) -> the fields actually sent.
        extra: (stage, link) -> more (site -> fields) the server sends at that stage.

    """

    def __init__(self, sites, *, rewrite=None, extra=None):
        super().__init__(sites)
        self.rewrite = rewrite or (lambda stage, sid, fields, link: fields)
        self.extra = extra or (lambda stage, link: {})
        self.replies: dict[str, dict[int, dict]] = defaultdict(dict)
        self.errors: dict[str, dict[int, str]] = defaultdict(dict)

    def exchange(self, payloads, *, timeout, group, awaited=None):
        sent = {}
        for sid, (stage, fields) in payloads.items():
            sent[sid] = (stage, self.rewrite(stage, sid, dict(fields), self))
        stages = {stage for stage, _ in payloads.values()}
        for stage in stages:
            for sid, fields in self.extra(stage, self).items():
                sent[sid] = (stage, fields)
        replies, errors = super().exchange(sent, timeout=timeout, group=group)
        for sid, (stage, _) in sent.items():
            if sid in replies:
                self.replies[stage][sid] = replies[sid]
            if sid in errors:
                self.errors[stage][sid] = errors[sid]
        return (
            {s: r for s, r in replies.items() if s in payloads},
            {s: e for s, e in errors.items() if s in payloads},
        )


def _round(config, vectors, *, rewrite=None, extra=None, wrap=None, n_sites=N):
    mode = MaskingMode()
    roster, keys = Roster.generate(N)
    sites = {
        s: ProtocolSite(mode.site(config, site_id=s, identity=keys[s], roster=roster), v)
        for s, v in vectors.items()
    }
    for sid, wrapper in (wrap or {}).items():
        sites[sid] = wrapper(sites[sid])
    link = MaliciousLink(sites, rewrite=rewrite, extra=extra)
    collector = mode.server(config, n_sites=N, roster=roster)
    fits, _ = link.exchange(
        {s: (Stage.FIT, {"round": ROUND, "n_sites": n_sites}) for s in sites},
        timeout=1,
        group=str(ROUND),
    )
    outcome = collector.collect(
        link, fits, round_index=ROUND, chosen=sorted(sites), dim=DIM, timeout=1
    )
    return outcome, link, sites


def _quantum(config):
    return N * secagg_config(config, n_sites=N).codec.quantum


def test_the_honest_runtime_round_equals_the_plaintext_sum_and_runs_every_stage():
    # Prepare
    config = _config()
    vectors = _vectors()

    # Execute
    outcome, link, sites = _round(config, vectors)

    # Assert
    assert outcome.error is None and outcome.survivors == list(range(N))
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=_quantum(config))
    for stage in (Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK):
        assert set(link.replies[stage]) == set(range(N)), stage
    assert all(not site.state for site in sites.values())


def test_a_substituted_key_is_refused_by_the_site_it_was_shown_to():
    # Prepare: the server shows site 0 a mask key of its own in site 1's entry.
    config = _config()
    swapped = kdf.public_bytes(kdf.generate_private_key())

    def rewrite(stage, sid, fields, link):
        if stage == Stage.SHARE and sid == 0:
            msg = PublicKeys.from_bytes(fields["message"])
            entries = tuple(
                KeyEntry(e.site, e.encryption_public, swapped, e.signature) if e.site == 1 else e
                for e in msg.entries
            )
            fields["message"] = PublicKeys(msg.round_index, msg.graph_seed, entries).to_bytes()
        return fields

    # Execute
    outcome, link, _ = _round(config, _vectors(), rewrite=rewrite)

    # Assert: site 0 dealt no share; the others finish without it.
    assert 0 not in link.replies[Stage.SHARE]
    assert "does not verify" in link.errors[Stage.SHARE][0]
    assert outcome.survivors == [1, 2, 3, 4]


@pytest.mark.parametrize("told_dropped", [{0, 1}, {0, 1, 2}, {1}])
def test_split_survivor_views_reveal_nothing_of_the_victim(told_dropped):
    # Prepare: the server tells `told_dropped` that site 4 dropped after its upload (and asks
    # them to unmask on that view with their own signatures); the others see the truth.
    victim = 4
    config = _config()
    others = tuple(s for s in range(N) if s != victim)

    def rewrite(stage, sid, fields, link):
        if stage == Stage.CONSISTENCY and sid in told_dropped:
            fields["message"] = ConsistencyRequest(ROUND, others).to_bytes()
        return fields

    def extra(stage, link):
        if stage != Stage.UNMASK:
            return {}
        sigs = tuple(
            sorted(
                (s, ConsistencySignature.from_bytes(r["message"]).signature)
                for s, r in link.replies[Stage.CONSISTENCY].items()
                if s in told_dropped
            )
        )
        request = UnmaskRequest(ROUND, others, (victim,), sigs).to_bytes()
        return {s: {"round": ROUND, "message": request} for s in told_dropped}

    # Execute
    outcome, link, _ = _round(config, _vectors(), rewrite=rewrite, extra=extra)

    # Assert: the lied-to group signed a list fewer than t = 4 sites signed, so it revealed
    # nothing. The others reveal only if t of them signed the true list (then site 4 is
    # unmasked as the survivor it is, its mask key stays secret, and the sum is exact).
    for s in told_dropped:
        assert s not in link.replies[Stage.UNMASK]
        if s in link.errors[Stage.UNMASK]:  # (asked only if the server got that far)
            assert "signed the list" in link.errors[Stage.UNMASK][s]
    if N - len(told_dropped) >= 4:
        np.testing.assert_allclose(outcome.total, sum(_vectors().values()), atol=_quantum(config))
    else:
        assert outcome.total is None and not link.replies[Stage.UNMASK]


def test_a_site_listed_as_dropped_after_its_upload_refuses_and_the_round_goes_on():
    # Prepare
    victim = 2
    config = _config()
    vectors = _vectors()

    def rewrite(stage, sid, fields, link):
        if stage == Stage.CONSISTENCY and sid == victim:
            survivors = tuple(s for s in range(N) if s != victim)
            fields["message"] = ConsistencyRequest(ROUND, survivors).to_bytes()
        return fields

    # Execute
    outcome, link, sites = _round(config, vectors, rewrite=rewrite)

    # Assert: the victim answered neither stage and dropped its round state; its input is in
    # the sum (it uploaded) and the 4 signers unmasked it honestly.
    assert "listed as dropped" in link.errors[Stage.CONSISTENCY][victim]
    assert victim not in link.replies[Stage.UNMASK] and not sites[victim].state
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=_quantum(config))


def test_a_lied_n_sites_and_a_lowered_threshold_are_ignored():
    # Prepare: the fit says the round has 2 sites and the run configuration t = 3; every
    # site pins n = 5 (the signed key list) and t = 4 (its roster: the default for 5).
    lowered = _config(secagg_threshold=3)

    # Execute
    outcome, link, _ = _round(lowered, _vectors(), n_sites=2)
    replies = link.replies[Stage.UNMASK]

    # Assert: the sum is right, and each site needed t = 4 signatures: one fewer is refused.
    assert outcome.error is None
    assert len(replies) == N

    def drop_one(stage, sid, fields, link):
        if stage == Stage.UNMASK:
            msg = UnmaskRequest.from_bytes(fields["message"])
            fields["message"] = UnmaskRequest(
                ROUND, msg.survivors, msg.dropped, msg.signatures[:3]
            ).to_bytes()
        return fields

    outcome, link, _ = _round(lowered, _vectors(), n_sites=2, rewrite=drop_one)
    assert outcome.total is None and not link.replies[Stage.UNMASK]
    assert all("only 3 survivors signed" in e for e in link.errors[Stage.UNMASK].values())


def test_replayed_and_cross_round_requests_are_refused():
    # Prepare: the server sends the unmask request twice, and a consistency request of
    # another round.
    config = _config()
    outcome, link, sites = _round(config, _vectors())
    request = {"round": ROUND, "message": b""}
    for s in range(N):
        request["message"] = UnmaskRequest(ROUND, tuple(range(N)), ()).to_bytes()
        with pytest.raises(ProtocolError, match="holds no state for round"):
            sites[s].handle(Stage.UNMASK, dict(request))

    def rewrite(stage, sid, fields, link):
        if stage == Stage.CONSISTENCY and sid == 0:
            fields["message"] = ConsistencyRequest(ROUND + 1, tuple(range(N))).to_bytes()
        return fields

    outcome, link, _ = _round(config, _vectors(), rewrite=rewrite)
    assert "replayed or stale" in link.errors[Stage.CONSISTENCY][0]
    assert 0 not in link.replies[Stage.UNMASK]


def test_a_tampered_seed_share_is_attributed_and_left_out():
    # Prepare: site 1 adds one to its seed share of site 0.
    config = _config()
    vectors = _vectors()

    class Tamperer:
        def __init__(self, site):
            self.site = site

        def handle(self, stage, fields):
            reply = self.site.handle(stage, fields)
            if stage == Stage.UNMASK:
                msg = UnmaskShares.from_bytes(reply["message"])
                seeds = tuple(
                    (o, Share(2, (int.from_bytes(d, "little") + 1) % PRIME).to_bytes())
                    if o == 0
                    else (o, d)
                    for o, d in msg.seed_shares
                )
                reply["message"] = UnmaskShares(
                    ROUND, msg.sender, seeds, msg.key_shares, msg.salts
                ).to_bytes()
            return reply

    # Execute
    outcome, _, _ = _round(config, vectors, wrap={1: Tamperer})

    # Assert: site 1 is named; the 4 other holders' shares give the exact sum.
    assert "site 1's seed share of site 0 does not open" in outcome.site_errors[1]
    np.testing.assert_allclose(outcome.total, sum(vectors.values()), atol=_quantum(config))


def test_a_site_without_a_roster_refuses_to_mask():
    # Prepare
    site = MaskingMode().site(_config(), site_id=0)

    # Execute / Assert
    with pytest.raises(ProtocolError, match="needs the federation's signed roster"):
        site.protect(np.ones(DIM), round_index=0, n_sites=N, state={})


def test_a_site_advertises_keys_for_a_round_once_so_a_rerun_without_one_site_is_refused():
    """The server re-runs a round (same session, same roster) without site 0 and differences.

    Before the fix, :meth:`MaskingSite.protect` accepted a second call for the same round and
    drew fresh keys: both runs unmasked, and ``first - second`` was site 0's input to within
    the fixed-point quantum (the review's m1_restart_round.py; without DP a site's re-fit of a
    round gives the same update). Now every site remembers, in its persistent store, the
    rounds it advertised keys for: the second run's fits are refused and no sum comes out.
    """
    # Prepare: the same site objects (the same sites of one run) answer both runs.
    config = _config()
    vectors = _vectors()
    mode = MaskingMode()
    roster, keys = Roster.generate(N)
    protections = {
        s: mode.site(config, site_id=s, identity=keys[s], roster=roster) for s in range(N)
    }

    def run(who):
        sites = {s: ProtocolSite(protections[s], vectors[s]) for s in who}
        link = LocalLink(sites)
        fits, errors = link.exchange(
            {s: (Stage.FIT, {"round": ROUND, "n_sites": N}) for s in sites},
            timeout=1,
            group=str(ROUND),
        )
        collector = mode.server(config, n_sites=N, roster=roster)
        outcome = collector.collect(
            link, fits, round_index=ROUND, chosen=sorted(sites), dim=DIM, timeout=1
        )
        return outcome, errors

    # Execute
    first, _ = run(range(N))
    second, errors = run(range(1, N))

    # Assert: the first sum is honest; the re-run gets no sum, every site refused its fit.
    np.testing.assert_allclose(first.total, sum(vectors.values()), atol=_quantum(config))
    assert second.total is None
    assert set(errors) == set(range(1, N))
    assert all("already done once" in why for why in errors.values())
    assert all(p.persistent["mask.rounds"] == [ROUND] for p in protections.values())
