"""The Flower ClientApp keeps what the site spent, and the round's configuration, at the site."""

from __future__ import annotations

import json
from pathlib import Path

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


def _fresh_process(context, run_id):
    """The same site's context as a new site process sees it (empty state), in run ``run_id``."""
    site_app._RUNTIMES.clear()
    return Context(
        run_id=run_id,
        node_id=100,
        node_config=dict(context.node_config),
        state=RecordDict(),
        run_config=dict(context.run_config),
    )


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


def _state_file(context, config):
    from securefed.protocol.modes.base import run_session

    key = context.node_config["signing-key"]
    return Path(f"{key}.state") / f"{run_session(config).hex()}.json"


@pytest.mark.slow
@pytest.mark.parametrize("run_id", [7, 8], ids=["restarted-site", "resumed-run"])
def test_a_restarted_site_or_resumed_run_refuses_to_refit_a_round_and_keeps_its_ledger(
    small_npz, tmp_path, task_identity, run_id
):
    """Review p2/p1: a fresh Flower context (a restarted SuperNode, or `--resume`: a new run).

    Before, the site kept what it did only in context.state, which Flower 1.42 keeps in
    memory: a fresh context adopted the server's (empty) copy of its history and trained
    round 1 again. The site's own file (``<signing-key>.state/<session>.json``) remembers.
    """
    config = tiny_config(small_npz, secure_agg="none")
    context = _context(tmp_path / "site0.key", config)
    site_app._RUNTIMES.clear()
    site_app.fit(_message(Stage.FIT, _fit_fields(config), config), context)
    path = _state_file(context, config)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    body = json.loads(path.read_text())
    assert body["store"]["fit.rounds"] == [1]
    own = body["ledger"]
    assert [(e["round"], e["phase"]) for e in own] == [(1, "federated")]

    fresh = _fresh_process(context, run_id)
    # The server's shorter copy of the site's history is not adopted ...
    with pytest.raises(ProtocolError, match="copy of this site's privacy history differs"):
        site_app.fit(_message(Stage.FIT, _fit_fields(config), config), fresh)
    # ... and with the true one the round is still refused.
    with pytest.raises(ProtocolError, match="already trained"):
        site_app.fit(_message(Stage.FIT, {**_fit_fields(config), "history": own}, config), fresh)
    assert json.loads(path.read_text())["ledger"] == own
    # A round not yet done still trains (a resumed run continues).
    nxt = {**_fit_fields(config), "history": own, "round": 2}
    site_app.fit(_message(Stage.FIT, nxt, config), fresh)
    assert json.loads(path.read_text())["store"]["fit.rounds"] == [1, 2]
    site_app._RUNTIMES.clear()


@pytest.mark.slow
def test_a_restarted_site_without_dp_refuses_to_refit_a_round(small_npz, tmp_path, task_identity):
    config = tiny_config(small_npz, secure_agg="none", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    site_app._RUNTIMES.clear()
    site_app.fit(_message(Stage.FIT, _fit_fields(config), config), context)
    fresh = _fresh_process(context, 9)
    with pytest.raises(ProtocolError, match="training round 1: already done once"):
        site_app.fit(_message(Stage.FIT, _fit_fields(config), config), fresh)
    site_app._RUNTIMES.clear()


def test_a_corrupt_state_file_makes_the_site_refuse_not_forget(small_npz, tmp_path, task_identity):
    from securefed.errors import ConfigError

    config = tiny_config(small_npz, secure_agg="none", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    path = _state_file(context, config)
    path.parent.mkdir(mode=0o700)
    path.write_text('{"session": "')
    site_app._RUNTIMES.clear()
    with pytest.raises(ConfigError, match="run state is corrupt") as info:
        site_app.fit(_message(Stage.FIT, _fit_fields(config), config), context)
    assert "\n" not in str(info.value)
    assert path.read_text() == '{"session": "'  # left for the operator, not overwritten
    assert "securefed.ledger" not in context.state.config_records  # it never trained


def _masking_round_state(context, config):
    """Site 0's protocol state after protecting round 1 (what its fit leaves)."""
    import numpy as np

    from securefed import persistent
    from securefed.deploy.site import NodeSettings
    from securefed.protocol.modes import get_mode
    from securefed.protocol.modes.base import run_session

    mode = get_mode("mask")
    node = NodeSettings.from_node_config(dict(context.node_config))
    protection = mode.site(config, site_id=0, **site_app._identity_and_roster(mode, node))
    state: dict = {}
    protection.protect(np.ones(4), round_index=1, n_sites=3, state=state)
    state[site_app._PINNED] = json.dumps(config.to_dict(), sort_keys=True)
    state[persistent.SESSION_KEY] = run_session(config).hex()
    return state


def test_a_refused_protocol_step_still_writes_its_state_back(small_npz, tmp_path, task_identity):
    # Review s1: the state was saved only on success, so what a refused step popped (the
    # round's vector and seeds) stayed in context.state and the server could retry the step.
    config = tiny_config(small_npz, secure_agg="mask", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    context.state["securefed.protocol"] = ConfigRecord(_masking_round_state(context, config))
    bad = _message(Stage.SHARE, {"round": 1, "message": b"not a key list"}, config)
    with pytest.raises(Exception, match="truncated"):
        site_app.share(bad, context)
    kept = context.state.config_records["securefed.protocol"]
    assert not [k for k in kept.keys() if k.startswith("mask.")]


def test_a_protocol_state_another_run_left_is_ignored(small_npz, tmp_path, task_identity):
    # Review finding 5: context.state records carry their session; one saved under another
    # session (or none) is not this run's, even with a matching pin.
    config = tiny_config(small_npz, secure_agg="mask", dp_epsilon=None)
    context = _context(tmp_path / "site0.key", config)
    state = _masking_round_state(context, config)
    state["securefed.session"] = "00" * 32
    context.state["securefed.protocol"] = ConfigRecord(state)
    msg = _message(Stage.SHARE, {"round": 1, "message": b""}, config)
    with pytest.raises(ProtocolError, match="differs from the one this round's fit used"):
        site_app.share(msg, context)
