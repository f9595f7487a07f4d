"""The exact collusion tolerance of the active masking protocol: fewer than 2t - m sites.

A malicious server that colludes with ``c`` sites holds their state and can have each one
answer twice, once in each of two survivor lists U3 it shows two disjoint groups of honest
sites: group A (with the victim) as survivors, group B told the victim dropped. A group's
sites unmask only over a list with at least t signatures of its members, so both groups
unmask when ``honest_A + c >= t`` and ``honest_B + c >= t``; the ``m - c`` honest holders
(victim included) suffice exactly when ``c >= 2t - m``. Then group A's seed shares give the
victim's self-mask seed and group B's key shares its mask key: its update in the clear.
These tests pin the bound both ways (docs/secure-aggregation.md, "Collusion tolerance").
"""

from __future__ import annotations

import numpy as np
import pytest

from securefed.crypto import kdf
from securefed.crypto.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    PublicKeys,
    UnmaskRequest,
    UnmaskShares,
)
from securefed.crypto.roster import Roster
from securefed.crypto.secagg import SecAggClient, SecAggConfig, SecAggServer
from securefed.crypto.secagg.active import ActiveSecurity, collusion_tolerance, session_id
from securefed.crypto.shamir import Share, combine
from securefed.errors import ProtocolError

ROUND = 2
DIM = 4
VICTIM = 0


def _attack(n: int, threshold: int | None, colluders: int) -> tuple[bool, bool]:
    """Run the split-U3 attack with the last ``colluders`` sites; (seed, key) recovered."""
    roster, keys = Roster.generate(n, threshold=threshold)
    session = session_id(b"collusion")
    cfg = SecAggConfig(n_clients=n, threshold=threshold, clip_range=100.0)

    def active(s):
        return ActiveSecurity(roster=roster, session=session, identity=keys[s], site_id=s)

    sites = {
        s: SecAggClient(site_id=s, config=cfg, round_index=ROUND, dim=DIM, active=active(s))
        for s in range(n)
    }
    server = SecAggServer(
        config=cfg,
        round_index=ROUND,
        site_ids=range(n),
        dim=DIM,
        active=ActiveSecurity(roster=roster, session=session),
    )
    for s in sites:
        server.receive_advertise_keys(sites[s].advertise_keys())
    public = server.public_keys()
    for s in sites:
        server.receive_encrypted_shares(sites[s].share_keys(public))
    relayed = server.relay_shares()
    for s in sites:
        values = np.arange(DIM) + 10.0 * s + 1
        server.receive_masked_input(sites[s].masked_input(relayed[s], values=values))
    t = sites[VICTIM].config.threshold
    victim_seed = sites[VICTIM]._seed  # (the site forgets it once it unmasks)
    corrupt = list(range(n - colluders, n))
    honest = [s for s in range(n) if s != VICTIM and s not in corrupt]
    # The attacker's best split: group A just reaches t (its unmask gives the seed), group B
    # gets every other honest site.
    in_a = max(0, t - colluders - 1)
    group_a = tuple(sorted([VICTIM, *honest[:in_a], *corrupt]))
    group_b = tuple(sorted([*honest[in_a:], *corrupt]))
    saved = {c: sites[c].export_state() for c in corrupt}

    def signatures(u3):
        request = ConsistencyRequest(round_index=ROUND, survivors=u3).to_bytes()
        signed = []
        for s in u3:
            try:  # an honest site refuses to sign a list shorter than t
                signed.append((s, ConsistencySignature.from_bytes(sites[s].consistency(request))))
            except ProtocolError:
                continue
        return tuple((s, reply.signature) for s, reply in signed)

    signed_a = signatures(group_a)
    for c in corrupt:  # the colluders answer again, from their saved state
        sites[c] = SecAggClient.from_state(saved[c], config=cfg, active=sites[c].active)
    signed_b = signatures(group_b)
    seeds, mask_keys = [], []
    for s in [VICTIM, *honest[:in_a]]:
        request = UnmaskRequest(
            round_index=ROUND, survivors=group_a, dropped=tuple(honest[in_a:]), signatures=signed_a
        )
        try:
            reply = UnmaskShares.from_bytes(sites[s].unmask(request.to_bytes()))
        except ProtocolError:
            continue
        seeds += [
            Share.from_bytes(index=s + 1, data=d) for o, d in reply.seed_shares if o == VICTIM
        ]
    for s in honest[in_a:]:
        request = UnmaskRequest(
            round_index=ROUND,
            survivors=group_b,
            dropped=tuple([VICTIM, *honest[:in_a]]),
            signatures=signed_b,
        )
        try:
            reply = UnmaskShares.from_bytes(sites[s].unmask(request.to_bytes()))
        except ProtocolError:
            continue
        mask_keys += [
            Share.from_bytes(index=s + 1, data=d) for o, d in reply.key_shares if o == VICTIM
        ]
    for c in corrupt:  # what the colluders hold for the victim, handed over
        held = SecAggClient.from_state(saved[c], config=cfg, active=None)._held[VICTIM]
        seeds.append(Share.from_bytes(index=c + 1, data=held[0]))
        mask_keys.append(Share.from_bytes(index=c + 1, data=held[2]))
    victim_public = next(e for e in PublicKeys.from_bytes(public).entries if e.site == VICTIM)
    seed_ok = len(seeds) >= t and combine(shares=seeds, secret_bytes=32) == victim_seed
    key_ok = (
        len(mask_keys) >= t
        and kdf.public_bytes(kdf.load_private_key(combine(shares=mask_keys, secret_bytes=32)))
        == victim_public.mask_public
    )
    return seed_ok, key_ok


@pytest.mark.parametrize(
    ("n", "threshold", "t"),
    [
        (5, 3, 3),  # a roster pin of a bare majority: 2t - m = 1, no colluder tolerated
        (5, None, 4),  # the default floor(2m/3) + 1: 2t - m = 3, two colluders tolerated
        (7, None, 5),  # 2t - m = 3
    ],
)
def test_split_views_unmask_a_victim_with_2t_minus_m_colluders_and_not_with_one_fewer(
    n, threshold, t
):
    # Without the consistency round's t signatures per list, even one colluder (or none)
    # would do; with them the bound is exact, and the report states it.
    bound = 2 * t - n
    assert collusion_tolerance(threshold=t, holders=n) == bound - 1
    assert _attack(n, threshold, bound) == (True, True)
    seed_ok, key_ok = _attack(n, threshold, bound - 1) if bound >= 1 else (False, False)
    assert not (seed_ok and key_ok)
