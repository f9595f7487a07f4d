"""The securefed Flower ClientApp: hands each server message to the site's runtime.

What a site does is :class:`securefed.fl.site_runtime.SiteRuntime`, the object the
in-process runtime simulates; this module only adapts Flower's messages to it. What a site
must remember between messages is kept at the site and never sent to the server: its secure-
sum secrets between protocol steps in Flower's ``context.state``; its own copy of its privacy
ledger and what it did once per round (:mod:`securefed.persistent`) on its own disk, in
``<signing-key>.state/<session>.json`` (the session: a hash of the run configuration), loaded
at every message (authoritative over ``context.state``) and written, fsynced, after every step
before its reply leaves. Flower 1.42's SuperNode keeps ``context.state`` in memory only and a
resubmitted run (``--resume``) gets a fresh one, so the disk is what makes a restarted site or
a resumed run remember the rounds it trained, keyed and decrypted. A site without a signing
key (plaintext runs without DP only) keeps all of it in ``context.state``: a restarted
SuperNode forgets it. Every ``context.state`` record carries its session and is ignored under
another. In a long-lived site process (``securefed deploy site`` runs one) the runtime is
built once per run and kept; the protocol steps of the secure sum need no torch and no data,
so they stay quick even in a fresh process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from securefed import persistent
from securefed.allocator import tune_malloc
from securefed.config import RunConfig
from securefed.deploy.site import NodeSettings, identity_proof
from securefed.deploy.trust import IDENTITY_FIELD
from securefed.dp.disclosures import check_reply
from securefed.errors import ProtocolError
from securefed.persistent import refuse_after_end
from securefed.protocol.modes import get_mode
from securefed.protocol.modes.base import run_session
from securefed.protocol.wire import RUN_CONFIG, Stage, decode, encode

# The process that imports this module is a site's ClientApp process (the executor, or a stock
# flwr-clientapp): it trains, so it keeps freed step memory (securefed.allocator).
tune_malloc()

if TYPE_CHECKING:
    from securefed.fl.site_runtime import SiteRuntime

__all__ = ["app"]

app = ClientApp()

_LEDGER = "securefed.ledger"
_PROTOCOL = "securefed.protocol"
#: In the protocol state: the run configuration the round's fit ran under.
_PINNED = "securefed.run_config"

#: The runtime of the run this process serves: (run id, node config, run config) -> runtime.
_RUNTIMES: dict[tuple[int, str, str], SiteRuntime] = {}


def _runtime(
    config: RunConfig, context: Context, ledger: list[dict[str, Any]] | None
) -> SiteRuntime:
    """The site's runtime for this run (built once per process and run).

    Args:
        config: The signed run configuration.
        context: The site's Flower context.
        ledger: The site's own privacy events in this session (None: it has none yet).

    """
    from securefed.deploy.site import deployed_site

    node = dict(context.node_config)
    key = (
        int(context.run_id),
        json.dumps(node, sort_keys=True),
        json.dumps(config.to_dict(), sort_keys=True),
    )
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        _RUNTIMES.clear()  # one run at a time per site process
        runtime = deployed_site(config, NodeSettings.from_node_config(node))
        if ledger is None:
            # A site new to this session learns what it spent from the server's copy at its
            # first fit; afterwards it compares every copy with its own.
            runtime.history_known = False
        else:
            runtime.restore_events(ledger)
        _RUNTIMES[key] = runtime
    return runtime


def _protocol_state(context: Context, session: str) -> dict[str, Any]:
    """The round's protocol state from ``context.state`` (empty when saved under another run)."""
    record = context.state.config_records.get(_PROTOCOL)
    if record is None:
        return {}
    state = dict(record.items())
    if state.pop(persistent.SESSION_KEY, None) != session:
        return {}
    return state


def _load(
    context: Context, path: Path | None, session: str
) -> tuple[persistent.PersistentStore, list[dict[str, Any]] | None]:
    """The session's store and the site's own ledger: from its disk, else ``context.state``.

    Raises:
        ConfigError: The state file is corrupt (the site refuses rather than forgets).

    """
    if path is not None:
        return persistent.read_site_file(path, session)
    record = context.state.config_records.get(_LEDGER)
    ledger = None
    if record is not None and record.get(persistent.SESSION_KEY) == session:
        ledger = json.loads(str(record["events"]))
    return persistent.load(context, session), ledger


def _store(
    context: Context,
    *,
    path: Path | None,
    session: str,
    state: dict[str, Any],
    store: persistent.PersistentStore,
    events: list[dict[str, Any]] | None,
) -> None:
    """Save the step's state: the disk file first (fsynced), then ``context.state``."""
    if path is not None:
        persistent.write_site_file(path, session, store, events)
    context.state[_PROTOCOL] = ConfigRecord({**state, persistent.SESSION_KEY: session})
    if events is not None:
        context.state[_LEDGER] = ConfigRecord(
            {"events": json.dumps(events), persistent.SESSION_KEY: session}
        )
    persistent.save(context, store, session)


def _identity_and_roster(mode: Any, node: NodeSettings) -> dict[str, Any]:
    """The site's identity key, verified roster and own minimum, for modes that use them.

    The roster comes from the node's own settings (the signed roster file, checked against the
    federation key the site pinned), never from the server's message; the minimum number of
    contributors is the larger of the site's own (``min-contributors``) and the roster's.
    Without a roster a site refuses (``--insecure-no-roster`` covers plaintext runs only).
    """
    if not mode.uses_roster:
        return {}
    signer = node.signer() if node.roster is not None else None
    roster = node.load_roster(signer)
    if roster is None:
        raise ProtocolError(
            f"site {node.site_id}: --secure-agg {mode.name} needs the federation's signed "
            "roster (node settings `roster` and `federation-key`); refusing to run the "
            "protocol without it"
        )
    assert signer is not None
    return {
        "identity": signer.private_key,
        "roster": roster,
        "min_contributors": node.min_contributors_floor(roster),
    }


def _signed_config(stage: str, context: Context) -> RunConfig:
    """The run's configuration as submitted and signed (``deploy run``), from Flower's run config.

    Raises:
        ProtocolError: The run carries none, or it does not parse.

    """
    raw = (context.run_config or {}).get("config")
    if raw is None:
        raise ProtocolError(
            f"{stage}: the run carries no signed configuration; this site acts only on runs "
            "the federation signed"
        )
    try:
        return RunConfig.from_peer(json.loads(str(raw)))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{stage}: the run's configuration does not parse ({exc})") from exc


def _handle(msg: Message, context: Context) -> Message:
    """Decode, answer with the site's runtime (or its secure-sum side), encode."""
    stage = msg.metadata.message_type
    fields = decode(msg.content, what=f"{stage} message")
    config = _signed_config(stage, context)
    try:
        sent = RunConfig.from_peer(fields.pop(RUN_CONFIG))
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"{stage} message: no valid run configuration ({exc})") from exc
    if sent != config:
        # The site acts on the run the federation signed (checked by its executor before this
        # app runs), never on a configuration the server writes into a message: a server
        # that turned `--secure-agg mask` into `none` here would get the update in the clear.
        raise ProtocolError(
            f"{stage} message: its run configuration differs from the run the federation signed"
        )
    session = run_session(config).hex()
    path = persistent.state_path(dict(context.node_config), session)
    # From reading the state to writing it back, no other process of this site acts on the
    # session (the same signed run submitted twice): it would claim the same round.
    with persistent.site_lock(path):
        return _answer(msg, context, config=config, fields=fields, session=session, path=path)


def _answer(
    msg: Message,
    context: Context,
    *,
    config: RunConfig,
    fields: dict[str, Any],
    session: str,
    path: Path | None,
) -> Message:
    """The step itself, under the session's lock: load the state, answer, store the state."""
    stage = msg.metadata.message_type
    # What the site did in this run (rounds trained, keys advertised, rounds decrypted, its
    # own ledger) outlives the session, the site process and the Flower run: from its disk.
    store, ledger = _load(context, path, session)
    state = _protocol_state(context, session)
    mode = get_mode(config.secure_agg)
    pinned = json.dumps(config.to_dict(), sort_keys=True)
    if stage in mode.stages:
        # The round's protocol runs under the configuration its fit ran under: a server that
        # changes it between steps (another threshold, fewer neighbours) is refused.
        if state.get(_PINNED) != pinned:
            raise ProtocolError(
                f"{stage}: the run configuration differs from the one this round's fit used"
            )
        # Protocol steps: the site's secure-sum side only (no torch, no data).
        node = NodeSettings.from_node_config(dict(context.node_config))
        node.check_policy(config)
        refuse_after_end(store, stage, node.site_id)
        secret = node.he_contexts()[0] if config.secure_agg == "he" else None
        protection = mode.site(
            config, site_id=node.site_id, he_secret=secret, **_identity_and_roster(mode, node)
        )
        protection.persistent = store
        try:
            reply = check_reply(
                config,
                stage.rsplit(".", 1)[-1],
                protection.answer(stage, fields, state=state),
            )
        finally:
            # A refused step too: what it popped from the state (a seed, a key) stays gone.
            _store(
                context,
                path=path,
                session=session,
                state=state,
                store=protection.persistent,
                events=ledger,
            )
        return Message(encode(reply), reply_to=msg)
    runtime = _runtime(config, context, ledger)
    if stage == Stage.SETUP:
        state = {}  # a new session: no protocol step of an earlier one continues
    runtime.state = state
    runtime.persistent = store
    try:
        reply = runtime.handle(stage, fields)
        if stage == Stage.SETUP:
            proof = identity_proof(runtime, run_id=context.run_id, node_id=context.node_id)
            if proof is not None:
                # The server checks it against the roster; the site's own disclosure check
                # covers it like every other field.
                reply = check_reply(config, "setup", {**reply, IDENTITY_FIELD: proof})
        if stage == Stage.FIT:
            runtime.state[_PINNED] = pinned
    finally:
        # Even when the step fails after training: the site's own ledger must hold what it
        # spent, or a fresh site process would believe the server's shorter copy.
        _store(
            context,
            path=path,
            session=session,
            state=runtime.state,
            store=runtime.persistent,
            events=runtime.own_events() if runtime.history_known else ledger,
        )
    return Message(encode(reply), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Load the site's data and report its shapes, keys and plan (no records leave)."""
    return _handle(msg, context)


@app.query("select")
def select(msg: Message, context: Context) -> Message:
    """Clustered FL: name the cluster model with the lowest loss on the site's data."""
    return _handle(msg, context)


@app.evaluate("heldout")
def evaluate(msg: Message, context: Context) -> Message:
    """The served model's metrics on this site's held-out data (and its twin's)."""
    return _handle(msg, context)


@app.evaluate("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    """DP classification, after the last round: noised per-class score statistics."""
    return _handle(msg, context)


@app.query("close")
def close(msg: Message, context: Context) -> Message:
    """After the run's last step: sign the closing claim, then take no further step of the run."""
    return _handle(msg, context)


@app.train("fit")
def fit(msg: Message, context: Context) -> Message:
    """Train a round with DP-SGD and protect the update (the secure sum's first step)."""
    return _handle(msg, context)


@app.train("share")
def share(msg: Message, context: Context) -> Message:
    """Bonawitz step 1: secret-share the mask seed and key, sealed to each neighbour."""
    return _handle(msg, context)


@app.train("masked")
def masked(msg: Message, context: Context) -> Message:
    """Bonawitz step 2: upload the masked, fixed-point-encoded update."""
    return _handle(msg, context)


@app.train("consistency")
def consistency(msg: Message, context: Context) -> Message:
    """Bonawitz step 3 (active): sign the survivor list the server shows this site."""
    return _handle(msg, context)


@app.train("unmask")
def unmask(msg: Message, context: Context) -> Message:
    """Bonawitz step 4: reveal shares, once at least t survivors signed the same list."""
    return _handle(msg, context)


@app.train("decrypt")
def decrypt(msg: Message, context: Context) -> Message:
    """CKKS key holder: decrypt a sum of at least ``min_contributors`` sites' updates."""
    return _handle(msg, context)
