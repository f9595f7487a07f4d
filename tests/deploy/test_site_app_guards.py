"""The Flower ClientApp keeps what the site spent, and the round's configuration, at the site."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from securefed.deploy import site_app
from securefed.errors import ProtocolError
from securefed.protocol.wire import Stage, encode
from tests.conftest import tiny_config


def _context(key_path, config):
    """Site 0's Flower context in a run the federation signed with ``config``, with a roster."""
    from tests.deploy.test_site_messages import federation

    _, roster, pub, keys = federation(key_path.parent / "federation", config.clients)
    node = {
        "site-id": 0,
        "shard": True,
        "signing-key": str(keys[0]),
        "federation-key": pub,
        "roster": str(roster),
    }
    signed = {"config": json.dumps(config.to_dict())}
    return Context(run_id=7, node_id=100, node_config=node, state=RecordDict(), run_config=signed)


def _message(stage, fields, config):
    return Message(
        encode({**fields, "run_config": config.to_dict()}),
        dst_node_id=100,
        message_type=stage,
        group_id="1",
    )


def _fit_fields(config):
    from securefed.fl.simulation import Federation

    fed = Federation(config)  # the server's weights and layout for round 1
    return {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": 1,
        "n_sites": config.clients,
        "history": [],
    }


@pytest.mark.slow
def test_a_fit_that_fails_after_training_still_stores_what_the_site_spent(
    small_npz, tmp_path, task_identity, monkeypatch
):
    # Without it, a fresh site process would trust the server's (shorter) copy of its
    # history and spend the lost round's budget again.
    config = tiny_config(small_npz, secure_agg="mask")
    context = _context(tmp_path / "site0.key", config)
    site_app._RUNTIMES.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("the site's machine failed while masking")

    from securefed.protocol.modes.masking import MaskingSite

    monkeypatch.setattr(MaskingSite, "protect", broken)
    with pytest.raises(RuntimeError):
        site_app.fit(_message(Stage.FIT, _fit_fields(config), config), context)
    stored = json.loads(str(context.state.config_records["securefed.ledger"]["events"]))
    assert [(e["round"], e["phase"]) for e in stored] == [(1, "federated")]
    site_app._RUNTIMES.clear()


def test_a_protocol_step_under_another_configuration_is_refused(small_npz, tmp_path, task_identity):
    # Without the pin, a server could have a site answer the share step of a round under a
    # lower threshold or fewer neighbours than the keys it advertised were made for.
    config = tiny_config(small_npz, secure_agg="mask", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    context.state["securefed.protocol"] = ConfigRecord(
        {"securefed.run_config": json.dumps(config.to_dict(), sort_keys=True)}
    )
    looser = config.replace(secagg_threshold=1)
    with pytest.raises(ProtocolError, match="differs from the run the federation signed"):
        site_app.share(_message(Stage.SHARE, {"round": 1, "message": b""}, looser), context)
    # A run signed with the looser configuration still cannot change the round's pin.
    context = _context(tmp_path / "site0.key", looser)
    context.state["securefed.protocol"] = ConfigRecord(
        {"securefed.run_config": json.dumps(config.to_dict(), sort_keys=True)}
    )
    with pytest.raises(ProtocolError, match="differs from the one this round's fit used"):
        site_app.share(_message(Stage.SHARE, {"round": 1, "message": b""}, looser), context)


def test_a_message_that_turns_secure_aggregation_off_is_refused_before_training(
    small_npz, tmp_path, task_identity
):
    """The server writes `secure_agg=none` into a fit message of a run signed with `mask`.

    Before, the site acted on each message's configuration and answered with its update in
    the clear (review of issue 14: fields epsilon, events, plan, signature, vector).
    """
    config = tiny_config(small_npz, secure_agg="mask", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    site_app._RUNTIMES.clear()
    plain = config.replace(secure_agg="none")
    with pytest.raises(ProtocolError, match="differs from the run the federation signed"):
        site_app.fit(_message(Stage.FIT, _fit_fields(plain), plain), context)
    assert "securefed.ledger" not in context.state.config_records  # it never trained
    # A run with no signed configuration at all runs nothing either.
    node = dict(context.node_config)
    bare = Context(run_id=8, node_id=100, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match="no signed configuration"):
        site_app.fit(_message(Stage.FIT, _fit_fields(config), config), bare)
