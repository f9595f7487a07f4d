"""The warm site executor against a real Flower 1.42 SuperNode Runtime API (no SuperLink).

The SuperNode's own state and HTTP Runtime API run in this process; each test stores a run,
its app bundle, the node's context and a message the way the SuperNode's main loop does when a
message arrives, creates the task, and lets the executor claim and run it.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.app.message import make_message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.fab import Fab  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import (  # noqa: E402
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supernode.nodestate import NodeStateFactory  # noqa: E402

from securefed.deploy import executor as site_executor  # noqa: E402
from securefed.deploy import (
    polls,  # noqa: E402
    trust,  # noqa: E402
)
from securefed.deploy.local import free_port  # noqa: E402
from securefed.errors import ConfigError  # noqa: E402

NODE_ID = 7
#: The federation key that signs the test runs; the SuperNode's node config pins its public half.
FEDERATION = Ed25519PrivateKey.generate()
FEDERATION_PUB = FEDERATION.public_key().public_bytes_raw().hex()
RUN_CONFIG = {"config": "{}", "out": "/nowhere", "stop-after": 0, "signed-at": int(time.time())}
RUN_ID = 11
APP_REF = "tests.deploy.test_executor:counting_app"

counting_app = ClientApp()


@counting_app.query("count")
def _count(msg: Message, context: Context) -> Message:
    """Count this node's messages in Flower's Context (the only place state may live)."""
    seen = context.state.config_records.get("count")
    n = (int(seen["n"]) if seen is not None else 0) + 1
    context.state.config_records["count"] = ConfigRecord({"n": n})
    return Message(RecordDict({"reply": ConfigRecord({"n": n})}), reply_to=msg)


@counting_app.query("fail")
def _fail(msg: Message, context: Context) -> Message:
    raise ValueError("this message is refused")


def _fab(clientapp: str) -> Fab:
    manifest = (
        Path(__file__).parents[2] / "securefed" / "deploy" / "app" / "pyproject.toml"
    ).read_text()
    manifest = manifest.replace(
        'clientapp = "securefed.deploy.site_app:app"', f'clientapp = "{clientapp}"'
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", manifest)
    content = buf.getvalue()
    import hashlib

    return Fab(hashlib.sha256(content).hexdigest(), content, {})


class SuperNodeState:
    """A real SuperNode NodeState and Runtime API on 127.0.0.1, fed by hand."""

    def __init__(self) -> None:
        import uvicorn
        from flwr.supernode.main import create_app

        self.factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.factory.state()
        self.state.set_node_id(NODE_ID)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app=create_app(state_factory=self.factory),
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def start_run(
        self,
        fab: Fab,
        *,
        run_config: dict | None = None,
        signer: Ed25519PrivateKey | None = FEDERATION,
        pinned: str | None = FEDERATION_PUB,
        node_extra: dict | None = None,
    ) -> None:
        """Store a run as the SuperNode does; signed by ``signer`` unless it is None."""
        values = dict(RUN_CONFIG if run_config is None else run_config)
        if signer is not None:
            values[trust.SIGNATURE_KEY] = trust.sign_run(fab.content, values, signer)
        run = Run.create_empty(RUN_ID)
        run.fab_hash = fab.hash_str
        run.fab_id, run.fab_version = "securefed/securefed-app", "0.1.0"
        self.state.store_run(run)
        self.state.store_fab(fab)
        self.state.set_run_series_context(
            run.series_id,
            Context(
                run_id=RUN_ID,
                node_id=NODE_ID,
                node_config={
                    **({} if pinned is None else {"federation-key": pinned}),
                    **(node_extra or {}),
                },
                state=RecordDict(),
                run_config=values,
                series_id=run.series_id,
            ),
        )
        self.fab_hash = fab.hash_str
        self.series_id = run.series_id

    def deliver(self, message_type: str) -> str:
        """Store a server message and create its task, as the SuperNode's main loop does."""
        msg = make_message(
            metadata=Metadata(
                run_id=RUN_ID,
                message_id="",
                src_node_id=1,
                dst_node_id=NODE_ID,
                reply_to_message_id="",
                group_id="1",
                created_at=time.time(),
                ttl=3600.0,
                message_type=message_type,
            ),
            content=RecordDict({"ask": ConfigRecord({"t": message_type})}),
        )
        store = self.state.object_store
        with no_object_id_recompute():
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.state.store_message(msg)
            store.preregister(RUN_ID, get_object_tree(msg))
            for obj_id, obj in get_all_nested_objects(msg).items():
                store.put(obj_id, obj.deflate())
        self.state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=self.fab_hash)
        return msg.metadata.message_id

    def take_reply(self, message_id: str) -> Message:
        """The ClientApp's reply, then forget both (as the SuperNode does once it sent it)."""
        replies = self.state.get_messages_legacy(is_reply=True)
        assert len(replies) == 1
        stored = replies[0]
        assert stored.metadata.reply_to_message_id == message_id
        # The state holds the reply without its content; its parts are in the object store.
        store = self.state.object_store
        reply_id = stored.metadata.message_id
        tree = store.get_object_tree(reply_id)
        parts = {t.object_id: store.get(t.object_id) for t in iterate_object_tree(tree)}
        reply = inflate_object_from_contents(reply_id, parts)
        self.state.delete_messages(message_ids=[message_id, reply_id])
        return reply

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def supernode():
    node = SuperNodeState()
    try:
        yield node
    finally:
        node.close()


def _reply_content(node: SuperNodeState, reply: Message) -> int:
    assert not reply.has_error(), reply.error.reason
    return int(reply.content.config_records["reply"]["n"])


def test_one_process_runs_every_message_and_state_stays_in_the_context(supernode) -> None:
    supernode.start_run(_fab(APP_REF))
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        for expected in (1, 2, 3):
            mid = supernode.deliver("query.count")
            ex.serve(max_tasks=expected)
            assert _reply_content(supernode, supernode.take_reply(mid)) == expected
    finally:
        ex.close()
    # The count lives in the SuperNode's copy of the context, not in the executor.
    context = supernode.state.get_run_series_context(supernode.series_id)
    assert int(context.state.config_records["count"]["n"]) == 3


def test_a_failing_message_gets_flowers_error_reply_and_the_executor_goes_on(supernode) -> None:
    supernode.start_run(_fab(APP_REF))
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        first = supernode.deliver("query.count")
        ex.serve(max_tasks=1)
        assert _reply_content(supernode, supernode.take_reply(first)) == 1

        failing = supernode.deliver("query.fail")
        ex.serve(max_tasks=2)
        error = supernode.take_reply(failing)
        assert error.has_error()
        assert error.error.code == 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert error.error.reason == "<class 'ValueError'>:<'this message is refused'>"

        after = supernode.deliver("query.count")
        ex.serve(max_tasks=3)
        assert _reply_content(supernode, supernode.take_reply(after)) == 2
    finally:
        ex.close()
    finished = [t.status.sub_status for t in supernode.state.get_tasks()]
    assert sorted(finished) == ["completed", "completed", "failed"]


def test_a_run_naming_another_clientapp_is_refused(supernode) -> None:
    supernode.start_run(_fab("somebody.else:app"))
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        mid = supernode.deliver("query.count")
        ex.serve(max_tasks=1)
    finally:
        ex.close()
    reply = supernode.take_reply(mid)
    assert reply.has_error()
    assert "somebody.else:app" in reply.error.reason
    assert supernode.state.get_run_series_context(supernode.series_id).state.config_records == {}


@pytest.mark.parametrize("address", ["127.0.0.1:9094", "127.8.0.1:1", "[::1]:9094", "localhost:5"])
def test_the_executor_accepts_loopback_addresses(address) -> None:
    assert site_executor.check_loopback(address) == address


@pytest.mark.parametrize("address", ["10.0.0.5:9094", "0.0.0.0:9094", "example.org:80", "9094"])
def test_the_executor_refuses_any_other_address(address) -> None:
    with pytest.raises(ValueError):
        site_executor.check_loopback(address)


def test_idle_wait_starts_short_after_activity_and_grows_to_its_cap() -> None:
    wait = polls.IdleWait(0.1, 0.3, growth=2)
    assert [wait.next() for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
    wait.reset()
    assert wait.next() == 0.1
    with pytest.raises(ValueError):
        polls.IdleWait(0.5, 0.1)


def test_shortened_supernode_sleeps_map_only_flowers_constants(monkeypatch) -> None:
    from flwr.supernode import start_client_internal as loop

    original = loop.time, loop.pull_objects, loop._pull_and_store_message
    slept: list[float] = []
    wait = polls.IdleWait(0.01, 0.04, growth=2)
    try:
        assert polls.shorten_supernode_polls(wait, {0.5: 0.002})
        # The shim calls the real time.sleep with the value it maps to.
        monkeypatch.setattr(time, "sleep", slept.append)
        for seconds in (3, 3, 3, 3, 0.5, 1.25):
            loop.time.sleep(seconds)
        assert slept == [0.01, 0.02, 0.04, 0.04, 0.002, 1.25]
        assert loop.time.monotonic is time.monotonic
        assert loop.pull_objects.keywords == {
            "initial_backoff": polls.PULL_FIRST_WAIT_SECONDS,
            "backoff_cap": polls.PULL_MAX_WAIT_SECONDS,
        }
    finally:
        loop.time, loop.pull_objects, loop._pull_and_store_message = original


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A dead child not yet reaped by its (dead) parent is a zombie: gone for our purpose.
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize("kill", ["site-sigkill", "site-sigterm", "executor-sigkill"])
def test_the_site_process_and_its_executor_stop_together(tmp_path, kill) -> None:
    from securefed.deploy import launch

    cmd = launch.supernode_command(
        superlink=f"127.0.0.1:{free_port()}",  # nothing listens: the SuperNode keeps retrying
        site_id=0,
        certs=None,
        insecure=True,
        runtime_port=free_port(),
        federation_key=FEDERATION_PUB,
    )
    with open(tmp_path / "site.log", "wb") as log:
        site = subprocess.Popen(cmd, env=launch.flower_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not _children(site.pid) and time.monotonic() < deadline:
            assert site.poll() is None, (tmp_path / "site.log").read_text()[-2000:]
            time.sleep(0.1)
        (executor_pid,) = _children(site.pid)
        # Between fork and exec the child still shows its parent's command line: wait for it.
        cmdline: list[bytes] = []
        while time.monotonic() < deadline:
            cmdline = Path(f"/proc/{executor_pid}/cmdline").read_bytes().split(b"\0")
            if b"securefed.deploy.executor" in cmdline:
                break
            time.sleep(0.1)
        assert b"securefed.deploy.executor" in cmdline
        if kill.startswith("site"):
            site.send_signal(signal.SIGKILL if kill == "site-sigkill" else signal.SIGTERM)
            site.wait(timeout=60)
            assert _gone(executor_pid, 30), "the executor outlived its SuperNode"
        else:
            os.kill(executor_pid, signal.SIGKILL)
            # Without its executor the SuperNode stops instead of taking messages it cannot run.
            site.wait(timeout=60)
    finally:
        if site.poll() is None:
            site.kill()
            site.wait(timeout=30)
    assert sys.executable == cmd[0]


def _refused(supernode: SuperNodeState) -> str:
    """Deliver one message, let the executor take it; the error reason (the app never ran)."""
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        mid = supernode.deliver("query.count")
        ex.serve(max_tasks=1)
    finally:
        ex.close()
    reply = supernode.take_reply(mid)
    assert reply.has_error()
    # counting_app stores its count in the context on every call: it was never called.
    assert supernode.state.get_run_series_context(supernode.series_id).state.config_records == {}
    return str(reply.error.reason)


def test_an_unsigned_run_is_refused_before_the_app_runs(supernode) -> None:
    """Against 60ad9a0 this run was executed (the executor checked only the ClientApp name)."""
    supernode.start_run(_fab(APP_REF), signer=None)
    assert "not signed by the federation key" in _refused(supernode)


def test_a_run_signed_by_another_key_is_refused(supernode) -> None:
    supernode.start_run(_fab(APP_REF), signer=Ed25519PrivateKey.generate())
    assert "does not verify" in _refused(supernode)


def test_a_signed_app_replayed_with_another_run_config_is_refused(supernode) -> None:
    fab = _fab(APP_REF)
    signed = dict(RUN_CONFIG)
    signed[trust.SIGNATURE_KEY] = trust.sign_run(fab.content, signed, FEDERATION)
    replayed = {**signed, "out": "/elsewhere"}  # the signature of another configuration
    supernode.start_run(fab, run_config=replayed, signer=None)
    assert "does not verify" in _refused(supernode)


def test_a_site_without_a_pinned_federation_key_runs_nothing(supernode) -> None:
    supernode.start_run(_fab(APP_REF), pinned=None)
    assert "pins no federation key" in _refused(supernode)


def test_a_stale_signed_run_is_refused(supernode) -> None:
    """A signed run replayed a day later (unchanged, so its signature verifies) is refused."""
    stale = {**RUN_CONFIG, "signed-at": int(time.time() - trust.MAX_SIGNATURE_AGE - 60)}
    supernode.start_run(_fab(APP_REF), run_config=stale)
    reason = _refused(supernode)
    assert "signed" in reason and "h ago" in reason


def test_one_signature_serves_one_run(supernode) -> None:
    """The same signed run under a second run id (a replay) is refused by the site."""
    fab = _fab(APP_REF)
    supernode.start_run(fab)
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        mid = supernode.deliver("query.count")
        ex.serve(max_tasks=1)
        assert not supernode.take_reply(mid).has_error()
        # As if the run the executor served was run 12, and run 11 now replays its bundle and
        # configuration unchanged (its signature verifies).
        context = supernode.state.get_run_series_context(supernode.series_id)
        ex._runs = {12: ex._runs[RUN_ID]}
        mid = supernode.deliver("query.count")
        ex.serve(max_tasks=2)
        reply = supernode.take_reply(mid)
    finally:
        ex.close()
    assert reply.has_error() and "replay" in reply.error.reason
    assert int(context.state.config_records["count"]["n"]) == 1


def _serve_one(supernode: SuperNodeState):
    """A fresh executor process (as after a restart) takes one message; its reply."""
    ex = site_executor.SiteExecutor(supernode.address, app_ref=APP_REF, app=counting_app)
    try:
        mid = supernode.deliver("query.count")
        ex.serve(max_tasks=1)
    finally:
        ex.close()
    return supernode.take_reply(mid)


def test_a_restarted_executor_still_refuses_a_replayed_signed_run(supernode, tmp_path) -> None:
    """A signed run replayed under a new run id after the site's executor restarted.

    Before the fix the executor remembered accepted signatures only in memory, so a restarted
    executor accepted the replay within the signature's 24 h (the review's
    d4_replay_after_restart.py). It now keeps them next to the site's signing key (0600).
    """
    key = tmp_path / "site.signing.key"
    fab = _fab(APP_REF)
    supernode.start_run(fab, node_extra={"signing-key": str(key)})
    assert not _serve_one(supernode).has_error()
    path = site_executor.seen_runs_path({"signing-key": str(key)})
    assert path is not None and path.stat().st_mode & 0o777 == 0o600
    seen = site_executor.load_seen_runs(path, now=time.time())
    assert list(seen) == [RUN_ID]
    # A restarted executor continues the run it accepted.
    assert not _serve_one(supernode).has_error()
    # As if run 12 was the run it served, and run 11 now replays its bundle and configuration.
    site_executor.save_seen_runs(path, {12: seen[RUN_ID]})
    reply = _serve_one(supernode)
    assert reply.has_error() and "replay" in reply.error.reason
    context = supernode.state.get_run_series_context(supernode.series_id)
    assert int(context.state.config_records["count"]["n"]) == 2  # the replay never ran


def test_the_record_of_accepted_runs_forgets_what_can_no_longer_be_replayed(tmp_path) -> None:
    # Entries older than a signature's lifetime are refused by their age anyway: pruned.
    path = tmp_path / "site.signing.key.runs.json"
    now = time.time()
    old = {"signature": "aa", "signed_at": now - trust.MAX_SIGNATURE_AGE - 1}
    recent = {"signature": "bb", "signed_at": now - 60}
    site_executor.save_seen_runs(path, {1: old, 2: recent})
    assert site_executor.load_seen_runs(path, now=now) == {2: recent}
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        site_executor.load_seen_runs(path, now=now)
