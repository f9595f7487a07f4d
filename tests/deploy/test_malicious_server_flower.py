"""The masking protocol against a malicious server, over Flower messages.

The in-process harness (tests/protocol/test_masking_active.py, tests/crypto/
test_secagg_active.py) drives the protocol's parties directly. Here the server side is the
deployed :class:`~securefed.deploy.coordinator.Coordinator` and each site is the real Flower
ClientApp (``securefed.deploy.site_app``: its handlers, Flower ``Message``/``Context``, the
site's state kept in ``context.state`` between messages, its roster read from its node
settings). The server's link rewrites what it sends, as an aggregator that deviates from the
protocol would; each test reads the sites' own replies and asserts that no share that helps
the attacker left a site, and that the round is refused while the run goes on.

Against the honest-but-curious protocol (base 60ad9a0), both attacks succeed: sites accepted
any key list the server relayed (no signatures), and answered an unmask request naming a site
that had uploaded as dropped with their shares of its mask key.
"""

from __future__ import annotations

import json

import pytest

from securefed.crypto import kdf
from securefed.crypto.messages import ConsistencyRequest, KeyEntry, PublicKeys
from securefed.protocol.wire import Stage
from tests.conftest import tiny_config
from tests.deploy.test_site_messages import _deploy

pytestmark = pytest.mark.slow


def _run(small_npz, tmp_path, rewrite):
    config = tiny_config(small_npz, rounds=1, secure_agg="mask", dp_epsilon=None)
    grid, run = _deploy(config, tmp_path / "flower")
    honest = run.link.exchange

    def exchange(payloads, *, timeout, group, awaited=None):
        sent = {s: (stage, rewrite(stage, s, dict(f))) for s, (stage, f) in payloads.items()}
        return honest(sent, timeout=timeout, group=group, awaited=awaited)

    run.link.exchange = exchange
    out = run.run()
    replies: dict[str, list[dict]] = {}
    for stage, reply in grid.sent:
        replies.setdefault(stage, []).append(reply)
    record = json.loads((out / "metrics.json").read_text())["rounds"][0]
    return record, replies


def test_a_substituted_peer_key_is_refused_by_the_deployed_site(small_npz, tmp_path, task_identity):
    swapped = kdf.public_bytes(kdf.generate_private_key())

    def rewrite(stage, sid, fields):
        if stage == Stage.SHARE and sid == 0:
            msg = PublicKeys.from_bytes(fields["message"])
            entries = tuple(
                KeyEntry(e.site, e.encryption_public, swapped, e.signature) if e.site == 1 else e
                for e in msg.entries
            )
            fields["message"] = PublicKeys(msg.round_index, msg.graph_seed, entries).to_bytes()
        return fields

    record, replies = _run(small_npz, tmp_path, rewrite)

    # Site 0 dealt no share (its error names the signature), so with t = 3 of 3 nothing was
    # unmasked: no site sent an unmask reply, and the round was refused, not half-applied.
    assert len(replies.get(Stage.SHARE, [])) == 2
    assert "does not verify" in record["transport"]["site_errors"]["0"]
    assert Stage.UNMASK not in replies
    assert record["applied"] is False


def test_a_site_told_a_peer_dropped_after_it_uploaded_reveals_nothing(
    small_npz, tmp_path, task_identity
):
    # The server shows site 0 a survivor list without site 2 (which uploaded): answering the
    # unmask step on that view would hand over site 0's share of site 2's mask key.
    def rewrite(stage, sid, fields):
        if stage == Stage.CONSISTENCY and sid == 0:
            fields["message"] = ConsistencyRequest(int(fields["round"]), (0, 1)).to_bytes()
        return fields

    record, replies = _run(small_npz, tmp_path, rewrite)

    # Sites 1 and 2 signed the true list, site 0 the false one: no list has t = 3 signatures,
    # so no site revealed any share and the round was refused.
    assert Stage.UNMASK not in replies
    assert record["applied"] is False
