"""Every message a deployed site sends, walked through the real server and site code.

A loopback Grid hands the Coordinator's messages to the ClientApp's handlers in this process
(what Flower's SuperLink and SuperNodes do over the network), so a whole round of each
aggregation mode runs in seconds. Every field of every reply is checked against privacy.json's
``disclosures``: nothing leaves a site that the list does not name.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
from flwr.app import Context, Error, Message, RecordDict

from securefed.config import RunConfig
from securefed.deploy import site_app
from securefed.deploy.coordinator import Coordinator, FlowerLink
from securefed.deploy.trust import IDENTITY_FIELD
from securefed.dp.calibration import calibrates, planned_entries
from securefed.dp.disclosures import check_reply, message_fields
from securefed.errors import ProtocolError
from securefed.fl.claims import ClaimBook
from securefed.protocol.modes.base import run_session
from securefed.protocol.wire import Stage, decode

_HANDLERS = {
    Stage.SETUP: site_app.setup,
    Stage.SELECT: site_app.select,
    Stage.FIT: site_app.fit,
    Stage.SHARE: site_app.share,
    Stage.MASKED: site_app.masked,
    Stage.CONSISTENCY: site_app.consistency,
    Stage.UNMASK: site_app.unmask,
    Stage.DECRYPT: site_app.decrypt,
    Stage.EVALUATE: site_app.evaluate,
    Stage.CALIBRATE: site_app.calibrate,
    Stage.CLOSE: site_app.close,
}


class LoopbackGrid:
    """Flower's Grid, in memory: each pushed message runs the site's handler at once."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict | None = None) -> None:
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=cfg,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node, cfg in node_configs.items()
        }
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[str, dict]] = []  # (message type, decoded reply)
        self._ids = itertools.count(1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # what the SuperLink does
            stage = msg.metadata.message_type
            try:
                reply = _HANDLERS[stage](msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # a site's error travels back as Flower's error reply
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            else:
                self.sent.append((stage, decode(reply.content, what="reply")))
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in ids if i in self.replies]


def federation(folder, n_sites):
    """A federation key and the signed roster of ``n_sites`` site identity keys, in ``folder``.

    Returns:
        (roster, roster file, federation public key hex, {site id: signing key file}).

    """
    from securefed.crypto.roster import Roster, sign_roster
    from securefed.deploy.launch import ensure_signing_key
    from securefed.deploy.trust import create_federation_key, load_federation_key

    folder.mkdir(parents=True, exist_ok=True)
    fed = folder / "federation.key"
    pub = create_federation_key(fed) if not fed.exists() else fed.with_suffix(".pub").read_text()
    keys = {}
    for sid in range(n_sites):
        keys[sid] = folder / f"site{sid}.signing.key"
        ensure_signing_key(keys[sid])
    roster = Roster(
        federation="test-federation",
        sites={sid: bytes.fromhex(ensure_signing_key(k)) for sid, k in keys.items()},
    )
    path = folder / "roster.json"
    path.write_bytes(sign_roster(roster, load_federation_key(fed)))
    return roster, path, pub.strip(), keys


def _deploy(config, out, node_extra=None, **kwargs):
    """A Coordinator over a loopback Grid to ``config.clients`` sites, with the roster."""
    out.mkdir(parents=True, exist_ok=True)
    roster, path, pub, keys = federation(out.parent / f"{out.name}-federation", config.clients)
    nodes = {}
    for sid in range(config.clients):
        nodes[100 + sid] = {
            "site-id": sid,
            "shard": True,
            "signing-key": str(keys[sid]),
            "federation-key": pub,
            "roster": str(path),
            **(node_extra or {}),
        }
    # What `deploy run` submits (and the sites' executors verify): the signed configuration.
    grid = LoopbackGrid(nodes, run_config={"config": json.dumps(config.to_dict())})
    link = FlowerLink(grid, poll=0.0)
    kwargs = {"roster": roster, "run_id": 1, **kwargs}
    run = Coordinator(config, link=link, out=out, stage_timeout=30, fit_timeout=120, **kwargs)
    return grid, run


def _stopped_and_resumed(config, out, *, stop_after):
    """A deployed run stopped after ``stop_after`` rounds, then resumed by a fresh server."""
    grid, first = _deploy(config, out, stop_after=stop_after)
    first.run()
    resumed = Coordinator(
        config, link=FlowerLink(grid, poll=0.0), out=out, resume=True, fit_timeout=120
    )
    return resumed.run()


@pytest.mark.slow
@pytest.mark.parametrize("secure_agg", ["none", "mask", "he"])
def test_every_field_a_site_sends_is_declared_and_none_reveals_size_or_loss(
    secure_agg, small_config, tmp_path, task_identity
):
    config = small_config.replace(secure_agg=secure_agg)
    extra = {}
    if secure_agg == "he":
        from securefed.crypto.ckks import generate_keys, write_key_files

        (tmp_path / "keys").mkdir()
        secret, _ = write_key_files(generate_keys(), directory=tmp_path / "keys")
        extra = {"he-key": str(secret)}
    grid, run = _deploy(config, tmp_path / "run", node_extra=extra)

    out = run.run()

    declared = message_fields(config, runtime="flower")
    by_stage = {stage.split(".")[-1] for stage, _ in grid.sent}
    expected = (
        {"setup", "fit", "heldout"}
        | ({"share", "masked", "consistency", "unmask"} if secure_agg == "mask" else set())
        | ({"decrypt"} if secure_agg == "he" else set())
        | ({"calibrate"} if calibrates(config.to_dict()) else set())
        | ({"close"} if config.dp_enabled else set())
    )
    assert by_stage == expected  # every message type of this mode was exercised
    for stage, reply in grid.sent:
        name = stage.split(".")[-1]
        allowed = set(declared[name])
        if name == "setup":
            assert IDENTITY_FIELD in reply  # the deployed site binds its id (declared)
        assert set(reply) <= allowed, (name, set(reply) - allowed)
        assert not {"train_loss", "num_samples", "class_counts", "train_seconds"} & set(reply)
    privacy = json.loads((out / "privacy.json").read_text())
    listed = {(d["message"], d["field"]) for d in privacy["disclosures"]}
    assert {(m, f) for m, fields in declared.items() for f in fields} <= listed
    metrics = json.loads((out / "metrics.json").read_text())
    for r in metrics["rounds"]:
        assert r["applied"], r["error"]
        for c in r["clients"]:
            assert "train_loss" not in c and "num_train_samples" not in c
    for c in privacy["clients"]:
        assert "num_samples" not in c
        assert c["delta"] <= 1e-5 and c["epsilon"] <= 8.0


def test_a_site_refuses_to_send_an_undeclared_field():
    config = RunConfig(secure_agg="mask")
    check_reply(config, "fit", {"advertise": b"", "events": [], "plan": {}, "epsilon": 1.0})
    for field in ("train_loss", "num_samples", "train_seconds"):
        with pytest.raises(ProtocolError, match="undeclared"):
            check_reply(config, "fit", {"advertise": b"", field: 1.0})
    # a site that opted in to disclose its size may send it at set-up
    opted = config.replace(disclose_site_sizes=True)
    check_reply(opted, "setup", {"site_id": 0, "num_samples": 10})


@pytest.mark.slow
def test_disclosed_sizes_reach_the_report_only_when_every_site_agreed(
    small_config, tmp_path, task_identity
):
    config = small_config.replace(rounds=1, disclose_site_sizes=True, secure_agg="none")
    _, refused = _deploy(config, tmp_path / "a")
    from securefed.errors import ConfigError

    with pytest.raises(ConfigError, match="disclose-size=false"):
        refused.run()
    _, run = _deploy(config, tmp_path / "b", node_extra={"disclose-size": True})
    privacy = json.loads((run.run() / "privacy.json").read_text())
    assert sum(c["num_samples"] for c in privacy["clients"]) == 240


@pytest.mark.slow
def test_a_deployed_run_is_signed_by_the_sites_and_audits_with_pinned_keys(
    small_config, tmp_path, task_identity
):
    from click.testing import CliRunner

    from securefed.cli import cli
    from securefed.deploy.launch import ensure_signing_key

    config = small_config.replace(secure_agg="mask")
    _, run = _deploy(config, tmp_path / "run")
    folder = tmp_path / "run-federation"
    out = run.run()
    keys = {str(sid): ensure_signing_key(folder / f"site{sid}.signing.key") for sid in range(3)}
    pinned = tmp_path / "keys.json"
    pinned.write_text(json.dumps(keys))
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["site_keys"] == keys  # the sites' own keys: the server made none
    result = CliRunner().invoke(cli, ["audit", str(out), "--site-keys", str(pinned)])
    assert result.exit_code == 0, result.output
    # a key the auditor did not pin is caught
    other = dict(keys, **{"1": ensure_signing_key(tmp_path / "other.key")})
    pinned.write_text(json.dumps(other))
    result = CliRunner().invoke(cli, ["audit", str(out), "--site-keys", str(pinned)])
    assert result.exit_code == 1, result.output


def test_the_server_cannot_attach_a_claim_the_site_did_not_sign():
    from securefed.dp.signing import SiteSigner, site_claim
    from securefed.errors import IntegrityError

    signer = SiteSigner.generate()
    entry = {
        "client_id": 0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.25,
        "max_grad_norm": 1.0, "planned_steps": 8, "epsilon": 3.0,
    }  # fmt: skip
    run = RunConfig().to_dict()
    claim = site_claim(
        entry=entry, events=[], run=run, noise="secret", adjacency="replace-one", accountant="pld"
    )
    sig = signer.sign_claim(claim)
    view = ClaimBook(RunConfig())
    view.keys = {0: signer.public_key_hex}
    view.signatures = {0: sig}
    privacy = {"clients": [dict(entry, epsilon=2.0)], "events": [], "noise": "secret"}
    privacy.update(adjacency="replace-one", accountant="pld")
    with pytest.raises(IntegrityError, match="signature does not match"):
        view.attach(privacy, run=run)  # epsilon lowered by the server
    privacy["clients"][0]["epsilon"] = 3.0
    view.attach(privacy, run=run)
    assert privacy["site_keys"] == {"0": signer.public_key_hex}


def test_a_dp_site_without_its_signing_key_stops_before_reading_data(tmp_path):
    from securefed.deploy.site import NodeSettings, deployed_site
    from securefed.errors import ConfigError

    node = NodeSettings.from_node_config({"site-id": 0, "data": str(tmp_path / "missing.npz")})
    with pytest.raises(ConfigError, match="signing key"):
        deployed_site(RunConfig(dp_epsilon=8.0), node)


@pytest.mark.slow
def test_a_resumed_deployed_run_accounts_every_step_of_every_round(
    small_config, tmp_path, task_identity
):
    # Opacus' GDP accountant, resumed in a fresh site process, ledgered 8 of 20 steps over 5
    # rounds; the site's ledger and the server's must hold every step, and epsilon all of them.
    from securefed.dp.accounting import compute_epsilon

    config = small_config.replace(rounds=5, clients=2, secure_agg="none")
    out = _stopped_and_resumed(config, tmp_path / "run", stop_after=2)
    privacy = json.loads((out / "privacy.json").read_text())
    release = planned_entries(config.to_dict())  # the decision calibration, after round 5
    for c in privacy["clients"]:
        own = [e for e in privacy["events"] if e["client_id"] == c["client_id"]]
        per_round = [e["steps"] for e in own if e["phase"] == "federated"]
        assert len(per_round) == 5 and sum(per_round) == c["planned_steps"]
        assert c["steps"] == c["planned_steps"] and c["calibration_releases"] == len(release)
        history = [(c["noise_multiplier"], c["sample_rate"], sum(per_round)), *release]
        assert c["epsilon"] == pytest.approx(compute_epsilon(history=history, delta=c["delta"]))
        assert 7.9 <= c["epsilon"] <= 8.0  # the whole budget, as planned


@pytest.mark.slow
def test_a_resumed_deployed_logit_adjust_run_releases_each_class_prior_once(
    small_config, tmp_path, task_identity
):
    # The class prior is a DP release a site makes once per run and keeps in its persistent
    # store; a resumed run (fresh coordinator, the sites' stores kept) must reuse it, and the
    # audit must find the one release in every site's epsilon.
    from securefed.dp.audit import audit_run

    config = small_config.replace(rounds=3, clients=2, secure_agg="none", logit_adjust=True)
    out = _stopped_and_resumed(config, tmp_path / "run", stop_after=1)
    privacy = json.loads((out / "privacy.json").read_text())
    for c in privacy["clients"]:
        own = [e for e in privacy["events"] if e["client_id"] == c["client_id"]]
        assert [e["phase"] for e in own].count("class-prior") == 1
        assert c["class_prior_releases"] == 1
        assert len([e for e in own if e["phase"] == "federated"]) == 3
    result = audit_run(out)
    assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]


def test_the_data_fingerprint_a_site_sends_cannot_confirm_a_guess_of_its_data(
    small_config, tmp_path
):
    from securefed.data.dataset import load_dataset
    from securefed.deploy.launch import ensure_signing_key
    from securefed.deploy.site import NodeSettings, deployed_site

    def fingerprint(key_name):
        key = tmp_path / key_name
        ensure_signing_key(key)
        node = NodeSettings.from_node_config(
            {"site-id": 0, "signing-key": str(key), "data": str(small_config.data)}
        )
        site = deployed_site(small_config, node)
        return site.describe()["fingerprint"], load_dataset(data=small_config.data).fingerprint

    sent, plain = fingerprint("a.key")
    assert sent != plain  # an adversary who guesses the data file computes `plain`, not `sent`
    assert fingerprint("a.key")[0] == sent  # stable for the site: a resume can compare it
    assert fingerprint("b.key")[0] != sent


@pytest.mark.slow
def test_a_deployed_site_trains_and_masks_a_round_once_across_setup_and_a_fresh_process(
    small_config, tmp_path, task_identity
):
    """The server replays round 1's set-up and fit to a site after the round completed.

    Before the fix, a masking run without DP accepted it (the review's
    m3_deployed_refit_same_round.py): the budget check returned early without DP, ``setup``
    reset the protocol state, and the site trained round 1 again (the same update) and
    advertised fresh signed round-1 keys, so the server could sum the round again without
    another site and difference the two sums. The site now keeps the rounds it trained and
    advertised keys for in ``context.state["securefed.persistent"]``, which ``setup`` does
    not clear and a fresh site process reads.
    """
    import copy

    config = small_config.replace(secure_agg="mask", rounds=1, dp_epsilon=None)
    grid, run = _deploy(config, tmp_path / "run")
    sent: dict[str, Message] = {}
    push = grid.push_messages

    def recording(messages):
        for m in messages:
            if m.metadata.dst_node_id == 100:
                sent[m.metadata.message_type] = Message(
                    copy.deepcopy(m.content), dst_node_id=100, message_type=m.metadata.message_type
                )
        return push(messages)

    grid.push_messages = recording
    run.run()
    context = grid.contexts[100]
    assert context.state.config_records["securefed.persistent"]["fit.rounds"] == [1]
    assert context.state.config_records["securefed.persistent"]["mask.rounds"] == [1]

    site_app._RUNTIMES.clear()  # a fresh site process
    site_app.setup(sent[Stage.SETUP], context)  # a new session: the protocol state is reset
    with pytest.raises(ProtocolError, match="training round 1: already done once"):
        site_app.fit(sent[Stage.FIT], context)
    site_app._RUNTIMES.clear()


def test_a_deployed_site_answers_no_protocol_step_after_its_local_twin(
    small_config, tmp_path, task_identity
):
    """A server asks site 0 for its local twin between the last fit and the secure sum.

    The twin's metric is the site's one release outside epsilon (docs/twins.md) and must come
    last. In-process ``SiteRuntime.handle`` refuses the later steps; deployed, the secure-sum
    steps reach the site app without a runtime, so the app must refuse them too (the second
    review's s2_deploy.py: before the fix, share, masked and unmask were all answered).
    """
    config = small_config.replace(
        rounds=1, personalize=1, twin_privacy="local", secure_agg="mask", secagg_threshold=2
    )
    _, run = _deploy(config, tmp_path / "run", node_extra={"allow-local-twins": True})
    seen: dict[str, object] = {}

    class AskEarly:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def exchange(self, payloads, *, timeout, group, awaited=None):
            stages = {stage for stage, _ in payloads.values()}
            if Stage.SHARE in stages and "twin" not in seen:
                fit, reply = seen["fit"]
                fields = {
                    "weights": fit["weights"],
                    "layout_keys": fit["layout_keys"],
                    "round": 1,
                    "personalize": True,
                    "history": [*fit["history"], *reply.get("events", [])],
                }
                got, _ = self.inner.exchange(
                    {0: (Stage.EVALUATE, fields)}, timeout=timeout, group=group
                )
                seen["twin"] = got[0]["twin"]
            replies, errors = self.inner.exchange(
                payloads, timeout=timeout, group=group, awaited=awaited
            )
            if Stage.FIT in stages:
                seen["fit"] = (payloads[0][1], replies[0])
            if Stage.SHARE in stages:
                seen["share_error"] = errors.get(0)
            return replies, errors

    run.link = run.logged.link = AskEarly(run.link)
    run.run()
    assert set(seen["twin"]) == {"accuracy"}
    assert "answered for its local twin" in str(seen["share_error"])


def test_a_site_that_keeps_its_twin_metric_sends_nothing_about_its_local_twin(
    small_config, tmp_path, task_identity, caplog
):
    # Its own policy, for a hospital that wants epsilon to hold against a server that crafts
    # the weights: the twin is trained and scored at the site, and only its log sees it.
    config = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    grid, run = _deploy(config, tmp_path / "run", node_extra={"keep-twin-metric": True})
    with caplog.at_level("WARNING", logger="securefed.site"):
        out = run.run()
    heldout = [reply for stage, reply in grid.sent if stage == Stage.EVALUATE]
    assert heldout and all("twin" not in reply for reply in heldout)
    assert not json.loads((out / "metrics.json").read_text())["personalization"]
    assert sum("local twin accuracy" in r.getMessage() for r in caplog.records) == 3
    # Nothing about the twins left a site, so the summary does not put them outside epsilon.
    summary = (out / "summary.md").read_text()
    assert "not covered" not in summary and "no site sent a twin's figure" in summary


def test_a_second_process_cannot_fit_a_round_another_process_of_the_site_is_fitting(
    small_config, tmp_path, task_identity, monkeypatch
):
    """The same signed run, submitted twice, served by two processes of one site at once.

    Both map to one session and one state file. Without the session lock the second process
    read the file before the first wrote its claim, trained round 1 again with fresh noise and
    answered: two independent noisy updates of one round, of which the site's ledger keeps one.
    Here the test holds the lock as the first process would while it trains, restores the file
    as that process read it, and lets a second process start the same fit.
    """
    import copy
    import threading

    from securefed import persistent

    config = small_config.replace(rounds=1, secure_agg="mask")
    grid, run = _deploy(config, tmp_path / "run")
    path = persistent.state_path(dict(grid.contexts[100].node_config), run_session(config).hex())
    sent: dict[str, object] = {}
    push = grid.push_messages

    def recording(messages):
        for m in messages:
            if m.metadata.dst_node_id == 100 and m.metadata.message_type == Stage.FIT:
                sent["fit"] = Message(
                    copy.deepcopy(m.content), dst_node_id=100, message_type=Stage.FIT
                )
                sent["before"] = path.read_bytes()  # the file as the fitting process read it
            if m.metadata.dst_node_id == 100 and m.metadata.message_type == Stage.CLOSE:
                # The file once round 1 is done, before the site closes the run (a closed site
                # refuses every fit, which is not what this test is about).
                sent["after"] = path.read_bytes()
        return push(messages)

    grid.push_messages = recording
    run.run()
    after = sent["after"]
    assert json.loads(after)["store"]["fit.rounds"] == [1]

    read = threading.Event()
    real_read = persistent.read_site_file

    def reading(*args, **kwargs):
        got = real_read(*args, **kwargs)
        read.set()
        return got

    monkeypatch.setattr(persistent, "read_site_file", reading)
    outcome: dict[str, object] = {}

    def second_process():
        context = Context(
            run_id=2,  # the second Flower run of the same signed configuration
            node_id=100,
            node_config=dict(grid.contexts[100].node_config),
            state=RecordDict(),
            run_config=dict(grid.contexts[100].run_config),
        )
        try:
            outcome["reply"] = site_app.fit(sent["fit"], context)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome["error"] = exc

    site_app._RUNTIMES.clear()  # a fresh site process
    with persistent.site_lock(path):  # the first process, training round 1
        path.write_bytes(sent["before"])
        worker = threading.Thread(target=second_process)
        worker.start()
        # Without the lock the second process reads the file now, trains round 1 again and
        # answers; with it, it reads nothing before the first process has written its claim.
        read.wait(timeout=3.0)
        path.write_bytes(after)  # the first process claims round 1 and stores its state
    worker.join(timeout=300)
    site_app._RUNTIMES.clear()
    assert not worker.is_alive()
    assert "reply" not in outcome
    # It reads the first process's ledger and claim, and refuses at the first check they fail.
    assert isinstance(outcome["error"], ProtocolError)
    assert re.search("privacy history differs|already done once", str(outcome["error"]))


def test_the_audit_checks_a_masking_reports_pins_against_the_federations_roster_file(
    small_config, tmp_path, task_identity
):
    # Review 32c: without the roster the pins are the report's own word, so a rewriter who
    # states other pins (and the tolerance that follows from them) passes; with --roster the
    # report's roster digest and the file's pins decide.
    from click.testing import CliRunner

    from securefed.cli import cli
    from securefed.crypto.roster import Roster
    from securefed.protocol.modes.masking import MaskingMode
    from tests.dp.audit_fixtures import rehash

    config = small_config.replace(rounds=1, secure_agg="mask")
    _, run = _deploy(config, tmp_path / "run")
    out = run.run()
    roster = tmp_path / "run-federation" / "roster.json"

    def audit(*args):
        return CliRunner().invoke(cli, ["audit", str(out), *args])

    assert audit("--roster", str(roster)).exit_code == 0
    privacy = json.loads((out / "privacy.json").read_text())
    params = privacy["secure_aggregation_params"]
    # Claim the roster pinned every site as a minimum contributor, with what follows from it.
    stated, _ = Roster.generate(3, min_contributors=3, threshold=params["pinned_threshold"])
    params.update(
        {
            k: v
            for k, v in MaskingMode().server(config, n_sites=3, roster=stated).describe().items()
            if k in ("min_contributors", "tolerated_colluders", "tolerated_colluders_full_round")
        }
    )
    (out / "privacy.json").write_text(json.dumps(privacy))
    rehash(out)
    assert audit().exit_code == 0  # the report's own word, as the docs say
    res = audit("--roster", str(roster))
    assert res.exit_code == 1
    assert "[FAIL] masking: stated parameters follow from the run and the roster's pins" in (
        res.output
    )
