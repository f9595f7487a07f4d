"""Who may run what: the SuperLink's API gate, signed runs, the roster, and site identities.

Fast tests, no processes: Flower's real SuperLink app behind the gate (over an in-memory ASGI
transport, with the client address chosen), the run signature, the roster command and node
settings, and the coordinator's set-up against sites that claim another site's id.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefed.deploy import trust
from securefed.deploy.launch import ensure_signing_key
from securefed.deploy.site import NodeSettings
from securefed.deploy.superlink import ApiGate
from securefed.errors import ConfigError, ProtocolError
from tests.deploy.test_site_messages import _deploy, federation
from tests.deploy.test_wire_and_launch import securefed

# -- the API gate --------------------------------------------------------------------------------


def _superlink_app():
    """Flower 1.42's own SuperLink FastAPI app, with the gate installed as the server does."""
    import flwr.superlink.main as superlink_main

    from securefed.deploy import superlink

    original = superlink_main._get_middleware
    try:
        superlink.install_gate(())
        return superlink_main.create_app()
    finally:
        superlink_main._get_middleware = original


def _status(app, path: str, client: str, server: str = "127.0.0.1") -> int:
    async def call() -> int:
        transport = httpx.ASGITransport(app=app, client=(client, 40000))
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{server}") as http:
            return (await http.post(path, content=b"")).status_code

    return asyncio.run(call())


def test_the_control_api_answers_only_the_server_host() -> None:
    """Against 60ad9a0 a remote client reached Flower's unauthenticated Control API."""
    app = _superlink_app()
    # Flower's own StartRun route: from another host, refused by the gate (403) ...
    assert _status(app, "/v1/control/start-run", "10.1.2.3") == 403
    assert _status(app, "/v1/runtime/acquire-task", "10.1.2.3") == 403
    # ... from the server host it reaches Flower (which answers the empty body itself).
    assert _status(app, "/v1/control/start-run", "127.0.0.1") != 403


def test_the_fleet_api_stays_open_to_the_sites() -> None:
    app = _superlink_app()
    assert _status(app, "/v1/fleet/create-node", "10.1.2.3") != 403


@pytest.mark.parametrize(
    "path, client, server, expose, allowed",
    [
        ("/v1/fleet/pull-messages", "203.0.113.9", "10.0.0.5", (), True),
        ("/health", "203.0.113.9", "10.0.0.5", (), True),
        ("/v1/control/start-run", "203.0.113.9", "10.0.0.5", (), False),
        ("/v1/control/start-run", "::1", "::1", (), True),
        # the server's own address: the SuperExec and the ServerApp on a non-loopback bind
        ("/v1/runtime/pull-messages", "10.0.0.5", "10.0.0.5", (), True),
        ("/v1/control/start-run", "10.0.0.7", "10.0.0.5", ("10.0.0.0/24",), True),
        # --expose-control opens the Control API, never the Runtime API
        ("/v1/runtime/pull-messages", "10.0.0.7", "10.0.0.5", ("10.0.0.0/24",), False),
        ("/docs", "203.0.113.9", "10.0.0.5", (), False),
        ("/v1/control/start-run", "testclient", "10.0.0.5", (), False),
    ],
)
def test_gate_rules(path, client, server, expose, allowed) -> None:
    gate = ApiGate(app=None, expose_control=expose)
    assert gate.allows(path, (client, 1), (server, 8000)) is allowed


# -- signed runs -----------------------------------------------------------------------------------


def test_a_run_signature_covers_the_bundle_and_every_config_value() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    config = {"out": "/runs/a", "stop-after": 0}
    signed = {**config, trust.SIGNATURE_KEY: trust.sign_run(b"fab", config, key)}
    trust.verify_run(b"fab", signed, pub)
    with pytest.raises(PermissionError):
        trust.verify_run(b"other fab", signed, pub)
    with pytest.raises(PermissionError):
        trust.verify_run(b"fab", {**signed, "stop-after": 1}, pub)
    with pytest.raises(PermissionError):
        trust.verify_run(b"fab", {**signed, "extra": "value"}, pub)
    with pytest.raises(PermissionError, match="not signed"):
        trust.verify_run(b"fab", config, pub)


def test_federation_key_files(tmp_path) -> None:
    hexkey = trust.create_federation_key(tmp_path / "federation.key")
    assert (tmp_path / "federation.key").stat().st_mode & 0o777 == 0o600
    assert trust.load_federation_public(tmp_path / "federation.pub").hex() == hexkey
    assert trust.load_federation_public(hexkey).hex() == hexkey
    with pytest.raises(ConfigError, match="never overwritten"):
        trust.create_federation_key(tmp_path / "federation.key")
    (tmp_path / "federation.key").chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        trust.load_federation_key(tmp_path / "federation.key")


def test_submit_signs_the_bundle_flwr_run_builds(tmp_path) -> None:
    """The FAB hash signed at submit is the one a site sees (Flower's build is deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    from securefed.deploy.launch import prepare_app

    first = build_fab_from_disk(prepare_app(tmp_path / "a"))
    second = build_fab_from_disk(prepare_app(tmp_path / "b"))
    assert first == second


# -- the roster command and a site's settings ------------------------------------------------------


def test_deploy_roster_writes_a_roster_the_sites_verify(tmp_path) -> None:
    from securefed.cli.deploy import deploy

    def run(*args) -> str:
        result = CliRunner().invoke(deploy, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    fed = tmp_path / "federation.key"
    run("federation-key", "--out", fed)
    keys = {sid: str(tmp_path / f"s{sid}.key") for sid in range(3)}
    hexes = {sid: run("site-key", "--signing-key", keys[sid]).strip() for sid in range(3)}
    (tmp_path / "s2.id.pub").write_text(hexes[2] + "\n")
    run(
        "roster",
        "--federation-key",
        fed,
        "--site",
        f"0={hexes[0]}",
        "--site",
        f"1={hexes[1]}",
        "--site",
        f"2={tmp_path / 's2.id.pub'}",
        "--min-contributors",
        "3",
        "--out",
        tmp_path / "roster.json",
    )
    node = NodeSettings.from_node_config(
        {
            "site-id": 1,
            "federation-key": str(tmp_path / "federation.pub"),
            "roster": str(tmp_path / "roster.json"),
            "signing-key": keys[1],
            "min-contributors": 2,
        }
    )
    roster = node.load_roster(node.signer())
    assert roster.sites[2].hex() == hexes[2]
    assert node.min_contributors_floor(roster) == 3  # the roster's, larger than the site's own
    # A site whose key the roster does not list for its id refuses to start the run.
    wrong = NodeSettings.from_node_config({**_raw(node), "signing-key": keys[0]})
    with pytest.raises(ConfigError, match="another identity key"):
        wrong.load_roster(wrong.signer())
    # A roster signed by another federation key is refused.
    other = NodeSettings.from_node_config({**_raw(node), "federation-key": "cd" * 32})
    with pytest.raises(ConfigError, match="another key"):
        other.load_roster()


def _raw(node: NodeSettings) -> dict:
    return {
        "site-id": node.site_id,
        "federation-key": node.federation_key,
        "roster": node.roster,
        "signing-key": node.signing_key,
    }


def test_node_settings_refuse_a_min_contributors_below_two() -> None:
    with pytest.raises(ConfigError, match="min-contributors"):
        NodeSettings.from_node_config({"site-id": 0, "min-contributors": 1})


def test_a_secure_aggregation_run_without_a_roster_is_refused_unless_insecure(
    small_config, tmp_path
) -> None:
    from securefed.deploy.site import deployed_site

    # Both secure-aggregation modes rest on the roster: --insecure-no-roster does not lift that
    # (it covers plaintext runs only).
    for mode in ("mask", "he"):
        config = small_config.replace(secure_agg=mode, dp_epsilon=None)
        for insecure in (False, True):
            node = NodeSettings(site_id=0, shard=True, insecure_no_roster=insecure)
            with pytest.raises(ConfigError, match="signed roster"):
                deployed_site(config, node)
    plain = small_config.replace(secure_agg="none", dp_epsilon=None)
    runtime = deployed_site(plain, NodeSettings(site_id=0, shard=True, insecure_no_roster=True))
    assert runtime.roster is None


# -- a site claiming another site's id -----------------------------------------------------------


def _spoofed(small_config, tmp_path, spoofer_node_config, secure_agg="mask"):
    """Sites 0..2 at nodes 100..102, plus node 99 claiming site-id 0."""
    grid, run = _deploy(small_config.replace(secure_agg=secure_agg), tmp_path / "run")
    honest = grid.contexts[100]
    spoofer = type(honest)(
        run_id=1,
        node_id=99,
        node_config={**honest.node_config, **spoofer_node_config},
        state=type(honest.state)(),
        run_config=dict(honest.run_config),
    )
    grid.contexts = {99: spoofer, **grid.contexts}
    run.connect_timeout = 5
    run.out.mkdir(parents=True, exist_ok=True)
    return grid, run


def _attacker_federation(tmp_path):
    """A roster of the attacker's own, listing its key as site 0 (signed by its own key)."""
    roster, path, pub, keys = federation(tmp_path / "mallory", 2)
    return {"signing-key": str(keys[0]), "federation-key": pub, "roster": str(path)}


@pytest.mark.parametrize(
    "attack, why",
    [
        # The attacker's site code signs with its own key (under a roster it made itself).
        ("own key", "not by that site's registered key"),
        # The attacker's site sends no proof at all.
        ("no proof", "no identity proof"),
    ],
)
def test_a_site_claiming_another_sites_id_is_refused(
    small_config, tmp_path, task_identity, attack, why
) -> None:
    """Node 99 says it is site 0 but cannot sign as the roster's site 0: refused.

    The coordinator refuses it and binds the real site 0. Checked against 60ad9a0 with the same
    loopback set-up (a scratch test in an export of that commit): there, this set-up ended in
    "two site processes claim site-id 0" (the run died), and without the real site 0 the
    spoofer was bound as site 0 ({0: 99, 1: 101, 2: 102}).
    """
    if attack == "own key":
        extra = _attacker_federation(tmp_path)
    else:
        mallory = tmp_path / "mallory.key"
        ensure_signing_key(mallory)
        extra = {"signing-key": str(mallory), "roster": None, "insecure-no-roster": True}
    # Without a roster a site takes part in plaintext runs only; the server still holds one.
    mode = "none" if attack == "no proof" else "mask"
    cfg = {k: v for k, v in extra.items() if v is not None}
    grid, run = _spoofed(small_config, tmp_path, cfg, secure_agg=mode)
    if "roster" in extra and extra["roster"] is None:
        del grid.contexts[99].node_config["roster"]
    run._setup()
    assert run.link.nodes == {0: 100, 1: 101, 2: 102}
    log = [json.loads(line) for line in (run.out / "deploy-log.jsonl").open()]
    refused = [e for e in log if e["event"] == "refused"]
    assert [(e["node"], e["site"]) for e in refused] == [("99", 0)]
    assert why in refused[0]["why"]


def test_a_proof_for_another_node_or_run_does_not_verify(tmp_path) -> None:
    roster, _, _, keys = federation(tmp_path, 2)
    from securefed.dp.signing import SiteSigner

    key = SiteSigner.load(keys[0])._key
    proof = trust.sign_identity(key, federation=roster.federation, run_id=5, node_id=100, site_id=0)
    trust.verify_identity(roster, proof, run_id=5, node_id=100, site_id=0)
    for changed in ({"run_id": 6}, {"node_id": 101}, {"site_id": 1}):
        where = {"run_id": 5, "node_id": 100, "site_id": 0, **changed}
        with pytest.raises(ProtocolError):
            trust.verify_identity(roster, proof, **where)
    with pytest.raises(ProtocolError, match="no identity proof"):
        trust.verify_identity(roster, None, run_id=5, node_id=100, site_id=0)


# -- the server and site commands ------------------------------------------------------------------


@pytest.fixture
def no_exec(monkeypatch):
    """Capture the command `securefed deploy server|site` would run instead of running it."""
    import importlib

    cli_deploy = importlib.import_module("securefed.cli.deploy")  # the module, not the group
    ran: list[list[str]] = []
    monkeypatch.setattr(cli_deploy, "_exec", lambda cmd: ran.append(cmd))
    return ran


def test_deploy_server_has_node_auth_on_and_warns_when_it_is_off(no_exec) -> None:
    from securefed.cli.deploy import deploy

    result = CliRunner().invoke(deploy, ["server", "--insecure"])
    assert result.exit_code == 0, result.output
    assert "--enable-supernode-auth" in no_exec[-1]
    assert "warning" not in result.output
    result = CliRunner().invoke(
        deploy, ["server", "--insecure", "--no-node-auth", "--expose-control", "10.0.0.0/8"]
    )
    assert result.exit_code == 0, result.output
    assert "--enable-supernode-auth" not in no_exec[-1]
    assert "warning: --no-node-auth" in result.output
    assert "warning: --expose-control: anyone in 10.0.0.0/8 can submit runs" in result.output


def test_deploy_site_without_the_federation_key_is_one_line(monkeypatch, capsys) -> None:
    code, err = securefed(monkeypatch, capsys, "deploy", "site", "--insecure", "--site-id", "0")
    assert code == 2
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert "--federation-key" in err


@pytest.mark.parametrize("bad", [None, "0", -1, True, 1.5])
def test_a_node_without_a_valid_site_id_is_refused_and_set_up_goes_on(
    small_config, tmp_path, task_identity, monkeypatch, bad
) -> None:
    """A node whose set-up reply names no valid site id is refused, not a crash of set-up.

    Before, the coordinator read ``int(info["site_id"])``: a missing id raised ``KeyError``
    and ended the run's set-up for every site.
    """
    from flwr.app import Message

    import tests.deploy.test_site_messages as messages
    from securefed.protocol.wire import Stage, decode, encode

    grid, run = _spoofed(small_config, tmp_path, {})
    real = messages._HANDLERS[Stage.SETUP]

    def setup(msg, context):
        reply = real(msg, context)
        if context.node_id != 99:
            return reply
        fields = decode(reply.content, what="reply")
        if bad is None:
            fields.pop("site_id")
        else:
            fields["site_id"] = bad
        return Message(encode(fields), reply_to=msg)

    monkeypatch.setitem(messages._HANDLERS, Stage.SETUP, setup)
    run._setup()
    assert run.link.nodes == {0: 100, 1: 101, 2: 102}
    log = [json.loads(line) for line in (run.out / "deploy-log.jsonl").open()]
    refused = [e for e in log if e["event"] == "refused"]
    assert [e["node"] for e in refused] == ["99"] and "no valid site id" in refused[0]["why"]
