"""The malicious-server harness: issue 14's attacks on masking, each stopped by the active variant.

Every strategy runs against the protocol's parties (:class:`SecAggClient`, and
:class:`SecAggServer` where the server behaves) with the server's side driven by hand, byte
for byte, as a malicious aggregator would. Where it shows something, a strategy runs twice:

* against the honest-but-curious variant (``active=None``: the protocol exactly as on base
  commit 60ad9a0, same messages without the signature blocks), where the attack SUCCEEDS:
  the test recovers a site's input to one quantum, or shows the site answering what it must
  not;
* against the active variant (signed round keys, signed share commitments, consistency
  round, n and t pinned from the roster), where it ends with a clear ProtocolError before
  any share that helps the attacker leaves a site. The assertions read what each honest site
  emitted (:class:`Party` records every message a site returns).

Hypothesis draws which sites are lied to, dropped, tampered with or replayed.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.crypto import kdf
from securefed.crypto.aead import open_sealed, seal
from securefed.crypto.messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyEntry,
    MaskedInput,
    PublicKeys,
    RelayedShares,
    UnmaskRequest,
    UnmaskShares,
    round_keys_payload,
    share_associated_data,
    share_pair_plaintext,
    split_share_pair,
)
from securefed.crypto.prg import apply_masks
from securefed.crypto.roster import Roster
from securefed.crypto.secagg import SecAggClient, SecAggConfig, SecAggServer
from securefed.crypto.secagg.active import ActiveSecurity, session_id
from securefed.crypto.shamir import PRIME, SHARE_BYTES, Share, combine
from securefed.errors import DropoutRecoveryError, IntegrityError, ProtocolError
from securefed.protocol.harness import secure_sum

ROUND = 7
DIM = 5
SESSION = session_id(b"test run")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _inputs(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-50, 50, size=DIM) for s in range(n)}


class Party:
    """The honest sites of one round, and everything each of them emitted or refused.

    Args:
        n: Sites 0..n-1.
        active: Run the active variant (else honest-but-curious, as on 60ad9a0).
        config: The parameters the *server* hands the sites (possibly lied).
        roster: The federation's roster and keys (a fresh one if None).
        roster_threshold: The roster's pinned threshold for a fresh roster.
        session: The run's session id.
        round_index: The round.

    """

    def __init__(
        self,
        n: int,
        *,
        active: bool,
        config: SecAggConfig,
        roster: tuple[Roster, dict[int, Ed25519PrivateKey]] | None = None,
        roster_threshold: int | None = None,
        session: bytes = SESSION,
        round_index: int = ROUND,
    ) -> None:
        self.roster, self.keys = roster or Roster.generate(n, threshold=roster_threshold)
        self.active = active
        self.session = session
        self.clients = {
            s: SecAggClient(
                site_id=s,
                config=config,
                round_index=round_index,
                dim=DIM,
                active=ActiveSecurity(
                    roster=self.roster, session=session, identity=self.keys[s], site_id=s
                )
                if active
                else None,
            )
            for s in range(n)
        }
        self.emitted: dict[int, dict[str, bytes]] = defaultdict(dict)
        self.errors: dict[int, ProtocolError] = {}

    def server_security(self) -> ActiveSecurity | None:
        """The server's view of the active variant (roster and session, no identity)."""
        return ActiveSecurity(roster=self.roster, session=self.session) if self.active else None

    def call(self, site: int, step: str, *args, **kwargs) -> bytes | None:
        """Run one step at ``site``; record what it emitted, or the error it refused with."""
        try:
            out = getattr(self.clients[site], step)(*args, **kwargs)
        except ProtocolError as exc:
            self.errors[site] = exc
            return None
        self.emitted[site][step] = out
        return out


def _run_to_upload(party: Party, inputs, *, server_config: SecAggConfig) -> SecAggServer:
    """An honest server up to the masked inputs (all sites upload)."""
    server = SecAggServer(
        config=server_config,
        round_index=ROUND,
        site_ids=list(party.clients),
        dim=DIM,
        active=party.server_security(),
    )
    for s in party.clients:
        server.receive_advertise_keys(party.call(s, "advertise_keys"))
    keys = server.public_keys()
    for s in party.clients:
        server.receive_encrypted_shares(party.call(s, "share_keys", keys))
    relays = server.relay_shares()
    for s in party.clients:
        server.receive_masked_input(party.call(s, "masked_input", relays[s], values=inputs[s]))
    return server


def _strip(words, *, codec, site, seed, pair_keys) -> np.ndarray:
    """What the server computes once it holds b_u and every s_uv: site u's own input.

    Args:
        words: y_u, the site's masked upload.
        codec: The fixed-point codec the site used.
        site: u.
        seed: b_u.
        pair_keys: Peer v -> the PRG key of s_uv.

    """
    ring = np.array(words, copy=True)
    add: list[bytes] = []
    subtract = [kdf.self_mask_key(seed=seed, round_index=ROUND, site=site)]
    for v, key in pair_keys.items():
        # The site added PRG(s_uv) for v > u and subtracted it for v < u.
        (subtract if v > site else add).append(key)
    apply_masks(ring, add=add, subtract=subtract)
    return codec.decode(ring)


def _junk_share() -> bytes:
    return int.from_bytes(os.urandom(64), "little").to_bytes(SHARE_BYTES, "little")


# -- (a) key substitution -------------------------------------------------------------------


def _substituted_lists(party, adverts, fake, *, victims, forge):
    """Per site u: the key list with every peer's keys replaced by the server's own."""
    seed = os.urandom(32)
    server_identity = Ed25519PrivateKey.generate()
    lists = {}
    for u in party.clients:
        entries = []
        for v in sorted(party.clients):
            a = adverts[v]
            if v == u or u not in victims:
                entries.append(
                    KeyEntry(
                        site=v,
                        encryption_public=a.encryption_public,
                        mask_public=a.mask_public,
                        signature=a.signature,
                    )
                )
                continue
            enc = kdf.public_bytes(fake[v][0]) if forge in ("both", "enc") else a.encryption_public
            mask = kdf.public_bytes(fake[v][1]) if forge in ("both", "mask") else a.mask_public
            signature = a.signature
            if party.active and forge == "both":
                # The server signs the substituted keys with a key of its own.
                signature = server_identity.sign(
                    round_keys_payload(
                        roster_digest=party.roster.digest(),
                        session=party.session,
                        round_index=ROUND,
                        site=v,
                        encryption_public=enc,
                        mask_public=mask,
                    )
                )
            entries.append(
                KeyEntry(site=v, encryption_public=enc, mask_public=mask, signature=signature)
            )
        lists[u] = PublicKeys(round_index=ROUND, graph_seed=seed, entries=tuple(entries))
    return lists


def test_key_substitution_recovers_every_input_of_the_honest_but_curious_protocol():
    """Issue 14 break 2(a): swap every peer's keys, unmask honestly, read all 3 inputs."""
    # Prepare
    party = Party(3, active=False, config=SecAggConfig(n_clients=3, clip_range=100.0))
    x = _inputs(3)
    adverts = {s: AdvertiseKeys.from_bytes(party.call(s, "advertise_keys")) for s in range(3)}
    fake = {v: (kdf.generate_private_key(), kdf.generate_private_key()) for v in range(3)}
    lists = _substituted_lists(party, adverts, fake, victims={0, 1, 2}, forge="both")

    # Execute: each site seals its shares to the server's keys; the server opens them, feeds
    # each site shares of its own, takes the masked inputs and runs an honest unmask.
    opened: dict[int, dict[int, bytes]] = {}
    masked = {}
    for u in range(3):
        shares = EncryptedShares.from_bytes(party.call(u, "share_keys", lists[u].to_bytes()))
        c_pk = adverts[u].encryption_public
        opened[u] = {}
        for v, sealed in shares.sealed:
            key = kdf.share_encryption_key(
                private_key=fake[v][0], peer_public=c_pk, round_index=ROUND, sender=u, recipient=v
            )
            ad = share_associated_data(round_index=ROUND, sender=u, recipient=v)
            opened[u][v] = split_share_pair(
                open_sealed(key=key, sealed=sealed, associated_data=ad)
            )[0]
        relayed = []
        for v in sorted(set(range(3)) - {u}):
            key = kdf.share_encryption_key(
                private_key=fake[v][0], peer_public=c_pk, round_index=ROUND, sender=v, recipient=u
            )
            plain = share_pair_plaintext(
                seed_share=_junk_share(),
                seed_salt=os.urandom(32),
                key_share=_junk_share(),
                key_salt=os.urandom(32),
            )
            ad = share_associated_data(round_index=ROUND, sender=v, recipient=u)
            relayed.append((v, seal(key=key, plaintext=plain, associated_data=ad)))
        relay = RelayedShares(round_index=ROUND, recipient=u, sealed=tuple(relayed))
        masked[u] = MaskedInput.from_bytes(
            party.call(u, "masked_input", relay.to_bytes(), values=x[u])
        )
    request = UnmaskRequest(round_index=ROUND, survivors=(0, 1, 2), dropped=()).to_bytes()
    recovered = {}
    for u in range(3):
        own = dict(UnmaskShares.from_bytes(party.call(u, "unmask", request)).seed_shares)[u]
        shares = [Share.from_bytes(index=u + 1, data=own)] + [
            Share.from_bytes(index=v + 1, data=s) for v, s in opened[u].items()
        ]
        seed = combine(shares=shares, secret_bytes=32)
        pair_keys = {
            v: kdf.pairwise_mask_key(
                private_key=fake[v][1],
                peer_public=adverts[u].mask_public,
                round_index=ROUND,
                site_a=v,
                site_b=u,
            )
            for v in range(3)
            if v != u
        }
        recovered[u] = _strip(
            masked[u].words,
            codec=party.clients[u].config.codec,
            site=u,
            seed=seed,
            pair_keys=pair_keys,
        )

    # Assert: every input, to one quantum, with no dropout at all.
    for u in range(3):
        np.testing.assert_allclose(
            recovered[u], x[u], atol=party.clients[u].config.codec.quantum, rtol=0
        )


@SETTINGS
@given(
    victims=st.sets(st.integers(0, 3), min_size=1),
    forge=st.sampled_from(["both", "enc", "mask"]),
)
def test_key_substitution_is_refused_before_any_share_is_dealt(victims, forge):
    # Prepare
    party = Party(4, active=True, config=SecAggConfig(n_clients=4, clip_range=100.0))
    adverts = {s: AdvertiseKeys.from_bytes(party.call(s, "advertise_keys")) for s in range(4)}
    fake = {v: (kdf.generate_private_key(), kdf.generate_private_key()) for v in range(4)}
    lists = _substituted_lists(party, adverts, fake, victims=victims, forge=forge)

    # Execute
    for u in range(4):
        party.call(u, "share_keys", lists[u].to_bytes())

    # Assert: every site shown a substituted key refused, naming the peer; it dealt nothing.
    for u in victims:
        assert "share_keys" not in party.emitted[u]
        assert "does not verify against its roster key" in str(party.errors[u])
        assert "refusing before any share is dealt" in str(party.errors[u])
    for u in set(range(4)) - victims:
        assert u not in party.errors  # an untouched view runs on (its shares go to real keys)


def test_a_key_list_without_signatures_or_with_a_stranger_is_refused():
    # Prepare
    party = Party(3, active=True, config=SecAggConfig(n_clients=3))
    adverts = {s: AdvertiseKeys.from_bytes(party.call(s, "advertise_keys")) for s in range(3)}
    bare = PublicKeys(
        round_index=ROUND,
        graph_seed=os.urandom(32),
        entries=tuple(
            KeyEntry(site=s, encryption_public=a.encryption_public, mask_public=a.mask_public)
            for s, a in adverts.items()
        ),
    )
    stranger = Ed25519PrivateKey.generate()
    enc, mask = kdf.public_bytes(kdf.generate_private_key()), os.urandom(32)
    payload = round_keys_payload(
        roster_digest=party.roster.digest(),
        session=SESSION,
        round_index=ROUND,
        site=9,
        encryption_public=enc,
        mask_public=mask,
    )
    extra = PublicKeys(
        round_index=ROUND,
        graph_seed=os.urandom(32),
        entries=tuple(
            [
                KeyEntry(s, a.encryption_public, a.mask_public, a.signature)
                for s, a in adverts.items()
            ]
            + [KeyEntry(9, enc, mask, stranger.sign(payload))]
        ),
    )

    # Execute / Assert
    assert party.call(0, "share_keys", bare.to_bytes()) is None
    assert "carries no signatures" in str(party.errors[0])
    assert party.call(1, "share_keys", extra.to_bytes()) is None
    assert "site 9 is not in the federation's roster" in str(party.errors[1])


def test_the_server_refuses_a_badly_signed_advertisement_naming_its_sender():
    # Prepare
    party = Party(3, active=True, config=SecAggConfig(n_clients=3))
    server = SecAggServer(
        config=SecAggConfig(n_clients=3),
        round_index=ROUND,
        site_ids=[0, 1, 2],
        dim=DIM,
        active=party.server_security(),
    )
    good = AdvertiseKeys.from_bytes(party.call(1, "advertise_keys"))
    forged = AdvertiseKeys(
        round_index=ROUND,
        sender=1,
        encryption_public=good.encryption_public,
        mask_public=os.urandom(32),
        signature=good.signature,
    )

    # Execute / Assert
    with pytest.raises(ProtocolError, match="round keys of site 1.*does not verify"):
        server.receive_advertise_keys(forged.to_bytes())
    server.receive_advertise_keys(good.to_bytes())  # the genuine one still gets in


def test_a_site_pins_its_own_floor_on_the_round_size_on_top_of_the_roster():
    # Prepare: the roster pins 2 contributors; site 0's own setting pins 4.
    party = Party(3, active=True, config=SecAggConfig(n_clients=3))
    party.clients[0].active = ActiveSecurity(
        roster=party.roster,
        session=SESSION,
        identity=party.keys[0],
        site_id=0,
        min_contributors=4,
    )
    server = SecAggServer(
        config=SecAggConfig(n_clients=3),
        round_index=ROUND,
        site_ids=[0, 1, 2],
        dim=DIM,
        active=party.server_security(),
    )
    for s in range(3):
        server.receive_advertise_keys(party.call(s, "advertise_keys"))

    # Execute
    keys = server.public_keys()
    for s in range(3):
        party.call(s, "share_keys", keys)

    # Assert: site 0 refuses the 3-site round; the others (roster floor 2) deal their shares.
    assert isinstance(party.errors[0], DropoutRecoveryError)
    assert "at least 4 contributors" in str(party.errors[0])
    assert set(party.errors) == {0}


# -- (b) split dropout views with a lied n_sites ---------------------------------------------


def _split_unmask(party, *, victim, told_dropped, sites=None, everyone=None):
    """Tell ``told_dropped`` that ``victim`` dropped and the other ``sites`` that it survived.

    Returns the seed and key shares of ``victim`` the server collected from ``sites`` (all
    of the party's by default); ``everyone`` is the round's full U3 (the same by default).
    """
    asked = sorted(party.clients if sites is None else sites)
    everyone = asked if everyone is None else sorted(everyone)
    views = {
        "dropped": tuple(s for s in everyone if s != victim),
        "alive": tuple(everyone),
    }
    group = {s: ("dropped" if s in told_dropped else "alive") for s in asked}
    signatures: dict[str, dict[int, bytes]] = {"dropped": {}, "alive": {}}
    if party.active:
        for s in asked:
            request = ConsistencyRequest(round_index=ROUND, survivors=views[group[s]])
            out = party.call(s, "consistency", request.to_bytes())
            if out is not None:
                signatures[group[s]][s] = ConsistencySignature.from_bytes(out).signature
    seeds, keys = [], []
    for s in asked:
        if s in party.errors:
            continue
        survivors = views[group[s]]
        request = UnmaskRequest(
            round_index=ROUND,
            survivors=survivors,
            dropped=tuple(sorted(set(everyone) - set(survivors))),
            signatures=tuple(sorted(signatures[group[s]].items())),
        )
        out = party.call(s, "unmask", request.to_bytes())
        if out is None:
            continue
        msg = UnmaskShares.from_bytes(out)
        seeds += [Share.from_bytes(index=s + 1, data=d) for o, d in msg.seed_shares if o == victim]
        keys += [Share.from_bytes(index=s + 1, data=d) for o, d in msg.key_shares if o == victim]
    return seeds, keys


def _recover(party, *, victim, seeds, keys, t):
    client = party.clients[victim]
    masked = MaskedInput.from_bytes(party.emitted[victim]["masked_input"])
    entries = PublicKeys.from_bytes(client._public_keys).entries
    seed = combine(shares=seeds[:t], secret_bytes=32)
    mask_key = kdf.load_private_key(combine(shares=keys[:t], secret_bytes=32))
    pair_keys = {
        e.site: kdf.pairwise_mask_key(
            private_key=mask_key,
            peer_public=e.mask_public,
            round_index=ROUND,
            site_a=victim,
            site_b=e.site,
        )
        for e in entries
        if e.site != victim
    }
    return _strip(
        masked.words, codec=client.config.codec, site=victim, seed=seed, pair_keys=pair_keys
    )


def test_a_lied_n_sites_and_split_views_unmask_one_site_of_the_honest_but_curious_protocol():
    """Issue 14 break 2(b): n_sites=2 (so t=2) to 4 sites, split views, site 3's input read."""
    # Prepare: the server tells every site the round has 2 sites.
    lied = SecAggConfig(n_clients=2, clip_range=100.0)
    assert lied.threshold == 2
    party = Party(4, active=False, config=lied)
    x = _inputs(4)
    _run_to_upload(party, x, server_config=SecAggConfig(n_clients=4, clip_range=100.0))

    # Execute: sites 0 and 1 hear that site 3 dropped, sites 2 and 3 that it survived.
    seeds, keys = _split_unmask(party, victim=3, told_dropped={0, 1})

    # Assert
    assert not party.errors
    recovered = _recover(party, victim=3, seeds=seeds, keys=keys, t=2)
    np.testing.assert_allclose(recovered, x[3], atol=party.clients[3].config.codec.quantum, rtol=0)


@SETTINGS
@given(
    victim=st.integers(0, 3),
    told_dropped=st.sets(st.integers(0, 3), max_size=3),
    lied_n=st.sampled_from([2, 3]),
)
def test_a_lied_n_sites_and_split_views_are_refused(victim, told_dropped, lied_n):
    # Prepare
    told_dropped = told_dropped - {victim}
    party = Party(4, active=True, config=SecAggConfig(n_clients=lied_n, clip_range=100.0))
    _run_to_upload(party, _inputs(4), server_config=SecAggConfig(n_clients=4, clip_range=100.0))
    # Each site pinned n = 4 (the signed key list) and t = 3, whatever the server said.
    assert {c.config.threshold for c in party.clients.values()} == {3}
    assert {c.config.n_clients for c in party.clients.values()} == {4}

    # Execute
    seeds, keys = _split_unmask(party, victim=victim, told_dropped=told_dropped)

    # Assert: the server never holds t seed shares AND t key shares of the victim; a group
    # whose list fewer than t sites signed refused before revealing anything.
    assert len(seeds) < 3 or len(keys) < 3
    for group in (set(told_dropped), set(range(4)) - set(told_dropped)):
        if len(group) < 3:
            for s in group:
                assert "unmask" not in party.emitted[s]
                assert isinstance(party.errors[s], ProtocolError)
                assert "signed the list" in str(party.errors[s]) or "listed as dropped" in str(
                    party.errors[s]
                )


# -- (c) a lowered threshold, with one colluding site ----------------------------------------


def _collude(party, corrupt, *, victim):
    """A corrupt site hands the server both of its shares of ``victim``."""
    held = party.clients[corrupt]._held[victim]
    return Share.from_bytes(index=corrupt + 1, data=held[0]), Share.from_bytes(
        index=corrupt + 1, data=held[2]
    )


def test_a_lowered_threshold_unmasks_a_site_of_the_honest_but_curious_protocol():
    """t lowered from 4 to 3 of 5: two split groups plus one colluding site read site 4."""
    # Prepare
    party = Party(5, active=False, config=SecAggConfig(n_clients=5, threshold=3, clip_range=100.0))
    x = _inputs(5)
    _run_to_upload(party, x, server_config=SecAggConfig(n_clients=5, clip_range=100.0))

    # Execute: site 2 colludes; 0 and 1 hear that site 4 dropped, 3 and 4 that it survived.
    seed2, key2 = _collude(party, 2, victim=4)
    seeds, keys = _split_unmask(
        party, victim=4, told_dropped={0, 1}, sites={0, 1, 3, 4}, everyone=range(5)
    )

    # Assert
    recovered = _recover(party, victim=4, seeds=seeds + [seed2], keys=keys + [key2], t=3)
    np.testing.assert_allclose(recovered, x[4], atol=party.clients[4].config.codec.quantum, rtol=0)


@SETTINGS
@given(corrupt=st.integers(0, 3), told_dropped=st.sets(st.integers(0, 3), max_size=3))
def test_a_lowered_threshold_is_ignored_and_the_split_refused(corrupt, told_dropped):
    # Prepare: the server's parameters say t = 3; the roster pins the default for 5, t = 4.
    victim = 4
    party = Party(5, active=True, config=SecAggConfig(n_clients=5, threshold=3, clip_range=100.0))
    _run_to_upload(party, _inputs(5), server_config=SecAggConfig(n_clients=5, clip_range=100.0))
    assert {c.config.threshold for c in party.clients.values()} == {4}
    _collude(party, corrupt, victim=victim)  # both its shares go to the server
    told_dropped = told_dropped - {corrupt, victim}
    honest = set(range(5)) - {corrupt}

    # Execute
    seeds, keys = _split_unmask(
        party, victim=victim, told_dropped=told_dropped, sites=honest, everyone=range(5)
    )

    # Assert: even with the corrupt site's two shares, never 4 of each.
    assert len(seeds) + 1 < 4 or len(keys) + 1 < 4


# -- (d) a site listed as dropped after it uploaded -------------------------------------------


def test_a_site_listed_as_dropped_after_upload_still_answers_in_the_honest_but_curious_protocol():
    # Prepare
    party = Party(4, active=False, config=SecAggConfig(n_clients=4, clip_range=100.0))
    _run_to_upload(party, _inputs(4), server_config=SecAggConfig(n_clients=4, clip_range=100.0))
    request = UnmaskRequest(round_index=ROUND, survivors=(0, 1, 2), dropped=(3,))

    # Execute
    out = UnmaskShares.from_bytes(party.call(3, "unmask", request.to_bytes()))

    # Assert: it reveals its share of its own mask key, and its peers' seed shares.
    assert 3 in dict(out.key_shares) and set(dict(out.seed_shares)) == {0, 1, 2}


@SETTINGS
@given(victim=st.integers(0, 3), after_signing=st.booleans())
def test_a_site_listed_as_dropped_after_upload_refuses(victim, after_signing):
    # Prepare
    party = Party(4, active=True, config=SecAggConfig(n_clients=4, clip_range=100.0))
    _run_to_upload(party, _inputs(4), server_config=SecAggConfig(n_clients=4, clip_range=100.0))
    others = tuple(s for s in range(4) if s != victim)
    signatures = {}
    for s in others:
        request = ConsistencyRequest(round_index=ROUND, survivors=others)
        signatures[s] = ConsistencySignature.from_bytes(
            party.call(s, "consistency", request.to_bytes())
        ).signature
    if after_signing:
        # The victim saw (and signed) the honest list; the unmask request then drops it.
        honest = ConsistencyRequest(round_index=ROUND, survivors=tuple(range(4)))
        party.call(victim, "consistency", honest.to_bytes())
    else:
        party.call(victim, "consistency", ConsistencyRequest(ROUND, others).to_bytes())
        assert "listed as dropped" in str(party.errors.pop(victim))
    request = UnmaskRequest(
        round_index=ROUND,
        survivors=others,
        dropped=(victim,),
        signatures=tuple(sorted(signatures.items())),
    )

    # Execute
    party.call(victim, "unmask", request.to_bytes())

    # Assert: nothing leaves the victim in the unmasking round.
    assert "unmask" not in party.emitted[victim]
    assert isinstance(party.errors[victim], ProtocolError)


# -- (e) replayed, cross-round and cross-session messages -------------------------------------


def _reframed(adverts, *, round_index):
    """The server re-frames advertisements of another round or session as this round's list."""
    return PublicKeys(
        round_index=round_index,
        graph_seed=os.urandom(32),
        entries=tuple(
            KeyEntry(s, a.encryption_public, a.mask_public, a.signature)
            for s, a in sorted(adverts.items())
        ),
    )


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize("replay", ["round", "session"])
def test_keys_of_another_round_or_session_are_refused(active, replay):
    """A key list made of keys another round (or run) advertised: accepted without
    signatures (as on 60ad9a0: the header round is all that is checked, and the server can
    re-frame), refused with them."""
    # Prepare: the same federation, an earlier round (or another run) and this one.
    roster = Roster.generate(3)
    config = SecAggConfig(n_clients=3)
    old = Party(
        3,
        active=active,
        config=config,
        roster=roster,
        round_index=ROUND - 1 if replay == "round" else ROUND,
        session=SESSION if replay == "round" else session_id(b"another run"),
    )
    now = Party(3, active=active, config=config, roster=roster)
    stale = {s: AdvertiseKeys.from_bytes(old.call(s, "advertise_keys")) for s in range(3)}
    fresh = {s: AdvertiseKeys.from_bytes(now.call(s, "advertise_keys")) for s in range(3)}

    # Execute: site 0 is shown its own fresh keys and its peers' stale ones.
    shown = {0: fresh[0], 1: stale[1], 2: stale[2]}
    out = now.call(0, "share_keys", _reframed(shown, round_index=ROUND).to_bytes())

    # Assert
    if active:
        assert out is None and "does not verify" in str(now.errors[0])
    else:
        assert out is not None  # the old protocol deals its shares to the stale keys


def test_a_replayed_server_message_of_another_round_is_refused():
    """The header round check was on 60ad9a0 already (kept); new is that a site signs at most
    one survivor list: on 60ad9a0 there was no list to sign, and an unmask request needed no
    signature at all (see the dropped-after-upload test)."""
    # Prepare
    party = Party(3, active=True, config=SecAggConfig(n_clients=3))
    server = _run_to_upload(party, _inputs(3), server_config=SecAggConfig(n_clients=3))
    request = server.consistency_request()

    # Execute / Assert: the same request, re-framed for the next round.
    later = ConsistencyRequest(round_index=ROUND + 1, survivors=(0, 1, 2))
    assert party.call(0, "consistency", later.to_bytes()) is None
    assert "replayed or stale" in str(party.errors[0])
    assert party.call(1, "consistency", request) is not None
    assert party.call(1, "consistency", request) is None  # answered at most once
    assert "phase UNMASK" in str(party.errors[1])


def test_consistency_signatures_of_another_round_are_refused():
    """On 60ad9a0 an unmask request carried no signatures, so any request was answered; here
    signatures collected in an earlier round (same sites, same survivor ids) do not verify,
    because they bind the round and that round's key list."""
    # Prepare: round 6 ran to its consistency round; round 7 reuses its signatures.
    roster = Roster.generate(3)
    config = SecAggConfig(n_clients=3)
    old = Party(3, active=True, config=config, roster=roster, round_index=ROUND - 1)
    server = SecAggServer(
        config=config,
        round_index=ROUND - 1,
        site_ids=[0, 1, 2],
        dim=DIM,
        active=old.server_security(),
    )
    for s in range(3):
        server.receive_advertise_keys(old.call(s, "advertise_keys"))
    keys = server.public_keys()
    for s in range(3):
        server.receive_encrypted_shares(old.call(s, "share_keys", keys))
    relays = server.relay_shares()
    for s in range(3):
        server.receive_masked_input(old.call(s, "masked_input", relays[s], values=np.ones(DIM)))
    check = server.consistency_request()
    stale = {
        s: ConsistencySignature.from_bytes(old.call(s, "consistency", check)).signature
        for s in range(3)
    }
    now = Party(3, active=True, config=config, roster=roster)
    _run_to_upload(now, _inputs(3), server_config=config)
    now.call(0, "consistency", ConsistencyRequest(ROUND, (0, 1, 2)).to_bytes())

    # Execute
    request = UnmaskRequest(
        round_index=ROUND, survivors=(0, 1, 2), dropped=(), signatures=tuple(stale.items())
    )
    now.call(0, "unmask", request.to_bytes())

    # Assert
    assert "unmask" not in now.emitted[0]
    assert "consistency signature" in str(now.errors[0])


# -- (f) tampered seed shares -----------------------------------------------------------------


def _tamper(message: bytes, *, owner: int, delta: int = 1) -> bytes:
    msg = UnmaskShares.from_bytes(message)
    seeds = tuple(
        (o, Share((msg.sender + 1), (int.from_bytes(d, "little") + delta) % PRIME).to_bytes())
        if o == owner
        else (o, d)
        for o, d in msg.seed_shares
    )
    return UnmaskShares(
        round_index=msg.round_index,
        sender=msg.sender,
        seed_shares=seeds,
        key_shares=msg.key_shares,
        salts=msg.salts,
    ).to_bytes()


def _unmask_all(party, server, *, answering):
    if party.active:
        check = server.consistency_request()
        for s in party.clients:
            server.receive_consistency(party.call(s, "consistency", check))
    request = server.unmask_request()
    return {s: party.call(s, "unmask", request) for s in answering}


def test_a_tampered_seed_share_silently_corrupts_the_honest_but_curious_sum():
    """Issue 14 break 2: one holder adds to its seed share; the sum is garbage, no error."""
    # Prepare
    party = Party(4, active=False, config=SecAggConfig(n_clients=4, clip_range=100.0))
    x = _inputs(4)
    server = _run_to_upload(party, x, server_config=SecAggConfig(n_clients=4, clip_range=100.0))
    answers = _unmask_all(party, server, answering=range(4))
    answers[1] = _tamper(answers[1], owner=0)

    # Execute
    for s in range(4):
        server.receive_unmask_shares(answers[s])
    total = server.aggregate()

    # Assert: no error, and the sum is far from the truth (server takes shares of 0, 1, 2).
    assert np.max(np.abs(total - sum(x.values()))) > 1e3


@SETTINGS
@given(
    tamperer=st.integers(0, 3),
    owner=st.integers(0, 3),
    delta=st.integers(1, PRIME - 1),
)
def test_a_tampered_seed_share_is_caught_attributed_and_left_out(tamperer, owner, delta):
    # Prepare: 4 sites, t = 3, every site answers.
    party = Party(4, active=True, config=SecAggConfig(n_clients=4, clip_range=100.0))
    x = _inputs(4)
    server = _run_to_upload(party, x, server_config=SecAggConfig(n_clients=4, clip_range=100.0))
    answers = _unmask_all(party, server, answering=range(4))
    answers[tamperer] = _tamper(answers[tamperer], owner=owner, delta=delta)

    # Execute
    refused = {}
    for s in range(4):
        try:
            server.receive_unmask_shares(answers[s])
        except IntegrityError as exc:
            refused[s] = str(exc)
    total = server.aggregate()

    # Assert: a tampered share of another site is attributed to its holder and left out; the
    # sum of the 3 remaining holders' shares is exact. (A site's own share of its own seed
    # is not committed: tampering with it corrupts only that site's own contribution.)
    if tamperer != owner:
        assert set(refused) == {tamperer}
        assert f"site {tamperer}'s seed share of site {owner} does not open" in refused[tamperer]
        np.testing.assert_allclose(total, sum(x.values()), atol=4 * server.config.codec.quantum)


def test_a_tampered_share_with_only_t_answers_fails_the_round_clearly():
    # Prepare: site 3 is gone after its upload, so exactly t = 3 sites answer.
    party = Party(4, active=True, config=SecAggConfig(n_clients=4, clip_range=100.0))
    server = _run_to_upload(
        party, _inputs(4), server_config=SecAggConfig(n_clients=4, clip_range=100.0)
    )
    answers = _unmask_all(party, server, answering=range(3))
    answers[1] = _tamper(answers[1], owner=0)

    # Execute / Assert
    with pytest.raises(IntegrityError, match="site 1's seed share of site 0"):
        server.receive_unmask_shares(answers[1])
    server.receive_unmask_shares(answers[0])
    server.receive_unmask_shares(answers[2])
    with pytest.raises(DropoutRecoveryError, match="only 2 of 4 sites answered"):
        server.aggregate()


def test_a_tampered_share_dealt_by_its_owner_is_refused_by_the_holder():
    # Prepare: site 0 deals site 1 a pair that does not match the commitments it signed.
    party = Party(3, active=True, config=SecAggConfig(n_clients=3, clip_range=100.0))
    server = SecAggServer(
        config=SecAggConfig(n_clients=3, clip_range=100.0),
        round_index=ROUND,
        site_ids=[0, 1, 2],
        dim=DIM,
        active=party.server_security(),
    )
    for s in range(3):
        server.receive_advertise_keys(party.call(s, "advertise_keys"))
    keys = server.public_keys()
    for s in range(3):
        server.receive_encrypted_shares(party.call(s, "share_keys", keys))
    relays = dict(server.relay_shares())
    msg = RelayedShares.from_bytes(relays[1])
    (c_seed, c_key, sig), rest = msg.commitments[0], msg.commitments[1:]
    bent = RelayedShares(
        round_index=ROUND,
        recipient=1,
        sealed=msg.sealed,
        commitments=((c_key, c_seed, sig), *rest),  # commitments swapped: no longer signed
    )

    # Execute / Assert
    assert party.call(1, "masked_input", bent.to_bytes(), values=np.ones(DIM)) is None
    assert "share commitments relayed from site 0" in str(party.errors[1])


# -- the honest path ---------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(3, 6),
    data=st.data(),
)
def test_the_honest_active_protocol_equals_the_plaintext_sum_to_the_quantum(n, data):
    # Prepare
    config = SecAggConfig(n_clients=n, clip_range=100.0)
    spare = n - config.threshold
    gone = data.draw(st.sets(st.integers(0, n - 1), max_size=spare))
    phase = data.draw(st.sampled_from(["drop_before_upload", "drop_after_upload"]))
    x = _inputs(n, seed=n)

    # Execute
    result = secure_sum(x, config=config, round_index=ROUND, **{phase: gone})

    # Assert
    kept = set(range(n)) - (gone if phase == "drop_before_upload" else set())
    expected = sum(x[s] for s in kept)
    np.testing.assert_allclose(result.total, expected, atol=n * config.codec.quantum, rtol=0)
    assert set(result.survivors) == kept
