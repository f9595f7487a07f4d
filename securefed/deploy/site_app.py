"""The securefed Flower ClientApp: what a hospital's SuperNode runs for each server message.

Flower starts a fresh process per message, so what a site must remember between the steps of
a round (its update vector, its secure-aggregation secrets, its own copy of its privacy
ledger) lives in ``context.state``, which Flower keeps in the SuperNode's memory at the site;
it is never sent to the server. The key-exchange, masking and unmasking steps import no torch
and load no data, so they are quick.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from securefed.config import RunConfig
from securefed.crypto.secagg import SecAggClient, SecAggConfig
from securefed.protocol.wire import decode, encode, vector_from_bytes, vector_to_bytes
from securefed.errors import ProtocolError
from securefed.fl.disclosures import check_reply

__all__ = ["app", "secagg_config"]

app = ClientApp()

_ROUND = "securefed.round"
_LEDGER = "securefed.ledger"


def secagg_config(config: RunConfig, *, n_sites: int) -> SecAggConfig:
    """The masking parameters for a round of ``n_sites`` (identical at server and sites)."""
    return SecAggConfig(
        n_clients=n_sites,
        threshold=config.secagg_threshold,
        neighbors=config.secagg_neighbors,
        ring_bits=config.secagg_ring_bits,
        clip_range=config.secagg_clip,
    )


def _node(context: Context) -> Any:
    from securefed.deploy.site import NodeSettings

    return NodeSettings.from_node_config(dict(context.node_config))


def _site(fields: dict[str, Any], context: Context) -> Any:
    from securefed.deploy.site import DeployedSite

    return DeployedSite(RunConfig.from_dict(fields["config"]), _node(context))


def _round_state(context: Context, round_index: int) -> ConfigRecord:
    state = context.state.config_records.get(_ROUND)
    if state is None or state.get("round") != round_index:
        raise ProtocolError(
            f"this site holds no state for round {round_index} (it restarted mid-round)"
        )
    return state


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Load the site's data and report its size and model shape (no records leave)."""
    fields = decode(msg.content, what="set-up message")
    site = _site(fields, context)
    context.state.config_records.pop(_ROUND, None)
    info = site.describe()
    if site.config.secure_agg == "he":
        info["he_public"] = site.node.he_contexts()[1]
    return _reply(site.config, "setup", info, msg)


@app.evaluate("heldout")
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's metrics on this site's held-out data."""
    fields = decode(msg.content, what="evaluate message")
    site = _site(fields, context)
    metrics = site.evaluate(weights=fields["weights"], layout_keys=fields["layout_keys"])
    return _reply(site.config, "heldout", {"metrics": metrics}, msg)


@app.train("fit")
def fit(msg: Message, context: Context) -> Message:
    """Evaluate the model received (the previous round's), train a round, start the protocol."""
    fields = decode(msg.content, what="fit message")
    round_index = int(fields["round"])
    own = context.state.config_records.get(_LEDGER)
    history = fields["history"]
    if own is not None and json.loads(own["events"]) != history:
        # Within a run the site keeps its own copy: a server that under-reports the
        # budget already spent would otherwise make the site over-spend it.
        raise ProtocolError("the server's copy of this site's privacy history differs")
    site = _site(fields, context)
    previous = None
    if fields.get("evaluate_first"):
        previous = site.evaluate(weights=fields["weights"], layout_keys=fields["layout_keys"])
    result = site.fit(
        weights=fields["weights"],
        layout_keys=fields["layout_keys"],
        round_index=round_index,
        history=history,
    )
    context.state[_LEDGER] = ConfigRecord({"events": json.dumps(history + result["events"])})
    reply: dict[str, Any] = {"previous_metrics": previous}
    if result["plan"] is not None:
        reply.update(
            events=result["events"],
            epsilon=result["epsilon"],
            plan=result["plan"],
            signature=result["signature"],
        )
    vector = result["vector"]
    if fields["secure_agg"] == "none":
        reply["vector"] = vector_to_bytes(vector)
    elif fields["secure_agg"] == "he":
        start = time.perf_counter()
        reply["ciphertext"] = _encrypt(
            site.node, vector, round_index=round_index, n_sites=int(fields["n_sites"])
        )
        reply["protect_seconds"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        config = secagg_config(site.config, n_sites=int(fields["n_sites"]))
        client = SecAggClient(
            site_id=site.node.site_id, config=config, round_index=round_index, dim=len(vector)
        )
        reply["advertise"] = client.advertise_keys()
        reply["protect_seconds"] = time.perf_counter() - start
        context.state[_ROUND] = ConfigRecord(
            {
                "round": round_index,
                "n_sites": int(fields["n_sites"]),
                "config": json.dumps(fields["config"]),
                "vector": vector_to_bytes(vector),
                "secagg": client.export_state(),
            }
        )
    return _reply(site.config, "fit", reply, msg)


def _reply(config: RunConfig, message: str, fields: dict[str, Any], msg: Message) -> Message:
    """Every reply a site sends passes here: a field privacy.json does not declare is refused."""
    return Message(encode(check_reply(config, message, fields)), reply_to=msg)


def _encrypt(node: Any, vector: Any, *, round_index: int, n_sites: int) -> bytes:
    """CKKS-encrypt the update under the sites' shared key, refusing a sum that could overflow."""
    import numpy as np

    from securefed.crypto.ckks import CKKSEncryptor
    from securefed.errors import DataError

    secret, _ = node.he_contexts()
    encryptor = CKKSEncryptor(secret)
    limit = encryptor.params.max_abs_sum()
    if not float(np.max(np.abs(vector))) * n_sites < limit:
        raise DataError(
            f"site {node.site_id}: a sum of {n_sites} updates like this one may exceed the CKKS "
            f"bound {limit:.3g}; use more data-prime bits"
        )
    return encryptor.encrypt(vector, site_id=node.site_id, round_index=round_index)


@app.train("decrypt")
def decrypt(msg: Message, context: Context) -> Message:
    """Key holder: decrypt the server's sum of at least ``min_contributors`` sites' updates.

    The server only ever holds the public context; a site decrypts sums, never one update
    (the frame's contributor count is checked; an honest-but-curious server is assumed).
    """
    from securefed.crypto.ckks import CKKSDecryptor

    fields = decode(msg.content, what="decrypt message")
    secret, _ = _node(context).he_contexts()
    decryptor = CKKSDecryptor(secret, min_contributors=int(fields["min_contributors"]))
    total = decryptor.decrypt(fields["aggregate"], round_index=int(fields["round"]))
    return _reply(
        RunConfig.from_dict(fields["config"]), "decrypt", {"vector": vector_to_bytes(total)}, msg
    )


def _protocol_step(msg: Message, context: Context, step: str) -> Message:
    fields = decode(msg.content, what=f"{step} message")
    round_index = int(fields["round"])
    state = _round_state(context, round_index)
    start = time.perf_counter()
    config = secagg_config(
        RunConfig.from_dict(json.loads(state["config"])), n_sites=int(state["n_sites"])
    )
    client = SecAggClient.from_state(state["secagg"], config=config)
    reply: dict[str, Any] = {}
    if step == "share":
        reply["message"] = client.share_keys(fields["message"])
    elif step == "masked":
        values = vector_from_bytes(state["vector"], what="the stored update")
        reply["message"] = client.masked_input(fields["message"], values=values)
        reply["clipped"] = int(client.clipped or 0)
        # The plaintext update is not needed any more: do not keep it at the site either.
        state["vector"] = b""
    else:
        reply["message"] = client.unmask(fields["message"])
        context.state.config_records.pop(_ROUND, None)
    if step != "unmask":
        state["secagg"] = client.export_state()
        context.state[_ROUND] = state
    reply["protect_seconds"] = time.perf_counter() - start
    run = RunConfig.from_dict(json.loads(state["config"]))
    return _reply(run, step, reply, msg)


@app.train("share")
def share(msg: Message, context: Context) -> Message:
    """Bonawitz step 1: secret-share the mask seed and key, sealed to each neighbour."""
    return _protocol_step(msg, context, "share")


@app.train("masked")
def masked(msg: Message, context: Context) -> Message:
    """Bonawitz step 2: upload the masked, fixed-point-encoded update."""
    return _protocol_step(msg, context, "masked")


@app.train("unmask")
def unmask(msg: Message, context: Context) -> Message:
    """Bonawitz step 3: reveal the shares the server needs to remove the masks."""
    return _protocol_step(msg, context, "unmask")
