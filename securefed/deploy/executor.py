"""A site's long-lived ClientApp executor: every message of every run in one warm process.

Flower 1.42's SuperNode, by default, has its SuperExec start a fresh ``flwr-clientapp`` process
for each server message; that process imports torch, Opacus and MONAI (seconds each time) to
handle one message and exits. With ``flower-supernode --isolation process`` the SuperNode
instead waits for an outside process to claim its tasks over its local Runtime API. This module
is that process: it imports the ClientApp once, then loops

1. ``AcquireTask`` (claim the oldest pending ClientApp task, get its token);
2. pull the task's message and :class:`flwr.app.Context` (Flower's own ``pull_task_input``);
3. call the ClientApp in this process, ``app(message=..., context=...)``;
4. push the reply and the updated context back (Flower's ``push_message``/``push_task_output``).

So the ClientApp sees exactly what a ``flwr-clientapp`` process would: its state lives in the
``Context`` the SuperNode keeps, never in this process. An exception in one message becomes an
error reply, as Flower's own process makes it, and the executor goes on to the next message.

It only talks to its own SuperNode over loopback (the Runtime API has no TLS of its own: the
SuperNode serves it on 127.0.0.1), it only runs runs signed by the federation key the site
pinned (node config ``federation-key``; :mod:`securefed.deploy.trust`), each signature for one
run id only (remembered across restarts in ``<signing-key>.runs.json``, :func:`seen_runs_path`),
and it only runs the ClientApp it was started with: any other run gets an error reply, and its
app is never called.

What it uses from Flower is internal to Flower 1.42 (``flwr.supernode.runtime.run_clientapp``
helpers, ``RuntimeHttpClient``, the AcquireTask protocol): pyproject pins ``flwr<1.43``.
:mod:`securefed.deploy.supernode` starts it next to the SuperNode.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from securefed.allocator import tune_malloc
from securefed.deploy import polls
from securefed.errors import ConfigError

__all__ = [
    "DEFAULT_APP",
    "DEFAULT_PRELOAD",
    "SEEN_RUNS_SUFFIX",
    "SiteExecutor",
    "check_loopback",
    "load_app",
    "load_seen_runs",
    "log_to_stderr",
    "main",
    "preload",
    "pull_task_input",
    "save_seen_runs",
    "seen_runs_path",
]

log = logging.getLogger("securefed.executor")

#: The ClientApp a securefed site runs (the one the securefed Flower App names).
DEFAULT_APP = "securefed.deploy.site_app:app"
#: How long one task's calls to the SuperNode retry a lost connection before the task fails.
TASK_RETRY_SECONDS = 60.0
#: Modules imported once when the executor starts, before it takes a task: what the securefed
#: ClientApp imports lazily on its first training round (MONAI alone takes seconds; the first
#: torch optimizer imports torch._dynamo), so that cost is paid while the run connects rather
#: than inside round 1. Missing ones are skipped.
DEFAULT_PRELOAD = ("torch", "torch._dynamo", "opacus", "monai", "dp_accounting")


#: Next to the site's signing key (node config ``signing-key``): the signed runs it accepted.
SEEN_RUNS_SUFFIX = ".runs.json"


def seen_runs_path(node_config: Mapping[str, Any]) -> Path | None:
    """Where a site keeps the signed runs it accepted: ``<signing-key>.runs.json``.

    None when the node has no signing key (then the executor remembers only in memory, and a
    restarted executor would accept a replay of a run signed less than 24 h ago).
    """
    key = node_config.get("signing-key")
    if not key:
        return None
    path = Path(str(key))
    return path.with_name(path.name + SEEN_RUNS_SUFFIX)


def load_seen_runs(path: Path, *, now: float) -> dict[int, dict[str, Any]]:
    """The signed runs this site accepted (run id -> signature, signing time), still fresh.

    Entries signed more than :data:`~securefed.deploy.trust.MAX_SIGNATURE_AGE` ago are left
    out: :func:`~securefed.deploy.trust.check_fresh` refuses their replay anyway.

    Raises:
        ConfigError: The file exists but does not parse (the site refuses to run rather than
            forget what it accepted).

    """
    from securefed.deploy.trust import MAX_SIGNATURE_AGE

    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        runs = {
            int(rid): {"signature": str(e["signature"]), "signed_at": float(e["signed_at"])}
            for rid, e in raw["runs"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{path}: this site's record of accepted runs is unreadable ({exc})"
        ) from exc
    return {rid: e for rid, e in runs.items() if now - e["signed_at"] <= MAX_SIGNATURE_AGE}


def save_seen_runs(path: Path, runs: Mapping[int, Mapping[str, Any]]) -> None:
    """Write the accepted runs atomically, readable by the site's user only (0600)."""
    from securefed.persistent import write_private_atomic

    body = json.dumps({"runs": {str(rid): dict(e) for rid, e in sorted(runs.items())}}, indent=1)
    write_private_atomic(path, body)


def check_loopback(address: str) -> str:
    """Accept only a loopback ``host:port``: the executor serves its own SuperNode only.

    Raises:
        ValueError: For any other host, or a malformed address.

    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected HOST:PORT")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare != "localhost":
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"{address!r}: the site executor only connects to its own SuperNode on "
                "loopback (127.0.0.1, ::1 or localhost)"
            )
    return address


def load_app(ref: str) -> Any:
    """Import ``module:attribute`` once (the ClientApp object)."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r}: expected MODULE:ATTRIBUTE")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref}: not callable")
    return obj


def _fab_clientapp(fab_content: bytes) -> str | None:
    """The ClientApp reference a Flower App bundle names (``[tool.flwr.app.components]``)."""
    from flwr.common.config import get_fab_config

    config = get_fab_config(fab_content)
    ref = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    value = ref.get("clientapp")
    return str(value) if value is not None else None


class SiteExecutor:
    """Claims its SuperNode's ClientApp tasks and runs each in this process.

    Args:
        runtime_api_address: ``host:port`` of the SuperNode's Runtime API (loopback only).
        app_ref: ``module:attribute`` of the ClientApp; a run whose app bundle names another
            ClientApp gets an error reply.
        app: The ClientApp object itself (tests); default: imported from ``app_ref``.
        idle: The wait between two task requests while idle, reset after each task
            (default from :data:`securefed.deploy.polls.EXECUTOR_IDLE`).

    """

    def __init__(
        self,
        runtime_api_address: str,
        *,
        app_ref: str = DEFAULT_APP,
        app: Callable[..., Any] | None = None,
        idle: polls.IdleWait | None = None,
    ) -> None:
        self.address = check_loopback(runtime_api_address)
        self.app_ref = app_ref
        self.app = app if app is not None else load_app(app_ref)
        self.idle = idle if idle is not None else polls.IdleWait(*polls.EXECUTOR_IDLE)
        self.tasks_run = 0
        self._fab_refs: dict[str, str | None] = {}
        #: Run id -> the signature it was accepted under (a signature serves one run only).
        self._runs: dict[int, str] = {}
        self._stop = threading.Event()
        self._client = self._runtime_client(token=None)

    def _runtime_client(self, *, token: str | None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        # Plain HTTP: the Runtime API is the SuperNode's loopback-only local interface.
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=_retry_invoker(
                give_up_after=None if token is None else TASK_RETRY_SECONDS
            ),
        )

    def acquire(self) -> str | None:
        """Claim the oldest pending ClientApp task; its token, or None when there is none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def _check_app(self, fab: Any, context: Any) -> None:
        """Refuse a run not signed by this site's federation key, or naming another ClientApp.

        The signature (``app-signature`` in the run configuration, see
        :mod:`securefed.deploy.trust`) must verify against the federation public key pinned in
        this site's own node configuration (``federation-key``), over this FAB and every value
        of the run configuration. Checked before the ClientApp is called: a refused run's
        messages get an error reply and nothing of the app runs.
        """
        from securefed.deploy.trust import (
            SIGNATURE_KEY,
            load_federation_public,
            verify_run,
        )

        pinned = dict(context.node_config).get("federation-key") if context is not None else None
        if not pinned:
            raise PermissionError(
                "this site pins no federation key (node config federation-key); it runs no app"
            )
        try:
            federation = load_federation_public(str(pinned))
        except Exception as exc:  # noqa: BLE001  # ConfigError: the site's own setting is wrong
            raise PermissionError(f"this site's federation key: {exc}") from exc
        run_config = dict(context.run_config)
        verify_run(fab.content, run_config, federation)
        run_id = int(context.run_id)
        signature = str(run_config.get(SIGNATURE_KEY))
        if run_id not in self._runs:
            self._first_message(run_id, signature, run_config, dict(context.node_config))
        elif self._runs[run_id] != signature:
            raise PermissionError(f"run {run_id} changed its signature")
        if fab.hash_str not in self._fab_refs:
            self._fab_refs[fab.hash_str] = _fab_clientapp(fab.content)
        named = self._fab_refs[fab.hash_str]
        if named != self.app_ref:
            raise PermissionError(
                f"this site runs the ClientApp {self.app_ref}; the run's app names {named}"
            )

    def _first_message(
        self,
        run_id: int,
        signature: str,
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any],
    ) -> None:
        """A run this executor process has not seen: fresh, and not a replay of another run.

        What the site accepted is also on disk next to its signing key
        (:func:`seen_runs_path`), so a restarted executor still refuses a signed run replayed
        under another run id within the signature's 24 h, and still continues a run it had
        accepted.

        Raises:
            PermissionError: A stale signature, a replay, or a run id whose signature changed.

        """
        from securefed.deploy.trust import SIGNED_AT_KEY, check_fresh

        now = time.time()
        path = seen_runs_path(node_config)
        seen = load_seen_runs(path, now=now) if path is not None else {}
        if run_id in seen:
            if seen[run_id]["signature"] != signature:
                raise PermissionError(f"run {run_id} changed its signature")
            self._runs[run_id] = signature  # a run accepted before this executor restarted
            return
        # First message of a run: its signature must be fresh and not used by another run.
        check_fresh(run_config, now=now)
        used = set(self._runs.values()) | {e["signature"] for e in seen.values()}
        if signature in used:
            raise PermissionError(
                "this signed run was already run here under another run id (a replay); "
                "submit it again to sign it afresh"
            )
        if path is not None:
            seen[run_id] = {"signature": signature, "signed_at": float(run_config[SIGNED_AT_KEY])}
            save_seen_runs(path, seen)
        self._runs[run_id] = signature

    def run_task(self, token: str) -> bool:
        """Handle one claimed task the way ``flwr-clientapp`` does, without a new process.

        Returns:
            True when the ClientApp replied, False when it raised (an error reply was sent).

        """
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        start = time.perf_counter()
        app_seconds = 0.0
        client = self._runtime_client(token=token)
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, _run, fab = pull_task_input(client)
            self._check_app(fab, context)
            app_start = time.perf_counter()
            reply = self.app(message=message, context=context)
            app_seconds = time.perf_counter() - app_start
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001  # one message's failure must not end the site
            # The same reason text and error code as Flower's flwr-clientapp process.
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            log.error("ClientApp raised an exception", exc_info=exc)
            details = reason
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001
                log.error("could not push the reply to the SuperNode", exc_info=exc)
            if heartbeat.is_running:  # its thread may have ended on an unexpected error
                heartbeat.stop()
            try:
                # Like flwr-clientapp: the context goes back even after a failure.
                push_task_output(
                    client=client, context=context, sub_status=sub_status, details=details
                )
            finally:
                client.close()
                self.tasks_run += 1
                log.info(
                    "%s: %s in %.2f s (ClientApp %.2f s)",
                    message.metadata.message_type if message is not None else "task",
                    sub_status,
                    time.perf_counter() - start,
                    app_seconds,
                )
        return sub_status == SubStatus.COMPLETED

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll for tasks until :meth:`stop` (or ``max_tasks`` tasks, for tests)."""
        log.info("site executor: serving %s on %s", self.app_ref, self.address)
        while not self._stop.is_set():
            try:
                token = self.acquire()
            except Exception as exc:  # noqa: BLE001  # the SuperNode may be restarting
                log.warning("task request failed: %s", exc)
                self._stop.wait(1.0)
                continue
            if token is None:
                self._stop.wait(self.idle.next())
                continue
            try:
                self.run_task(token)
            except Exception as exc:  # noqa: BLE001  # e.g. the SuperNode dropped the task
                log.error("task failed outside the ClientApp: %s", exc)
            # The round's next message usually follows soon.
            self.idle.reset()
            if max_tasks is not None and self.tasks_run >= max_tasks:
                return

    def stop(self) -> None:
        """Make :meth:`serve` return after the current task."""
        self._stop.set()

    def close(self) -> None:
        """Stop and close the polling connection."""
        self.stop()
        self._client.close()


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower 1.42's ``run_clientapp.pull_task_input`` with a short first wait for parts.

    The same calls in the same order (Context, Run and FAB, then the message and its parts);
    only the back-off while a part is not yet at the SuperNode starts at
    :data:`securefed.deploy.polls.PULL_FIRST_WAIT_SECONDS` instead of 1 s (the SuperNode
    creates the task before it has fetched the message's parts from the SuperLink, so a warm
    executor often asks too early; a fresh flwr-clientapp process rarely did).
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=polls.PULL_FIRST_WAIT_SECONDS,
        backoff_cap=polls.PULL_MAX_WAIT_SECONDS,
    )
    # The deflated message does not carry its own id (its object id); Flower sets it here too.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def preload(modules: Sequence[str]) -> list[str]:
    """Import ``modules`` now; the ones that could not be imported (not installed) are skipped.

    Returns:
        The modules imported.

    """
    done = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.info("preload: %s not imported (%s)", name, exc)
            continue
        done.append(name)
    return done


def _retry_invoker(*, give_up_after: float | None) -> Any:
    """Retry lost connections and 502/503/504 only; every other HTTP error is the caller's.

    Flower's ``make_simple_http_retry_invoker`` answers a 401 (a task token the SuperNode no
    longer knows) by sending SIGINT to its own process, which suits a one-message process but
    would end this one; here that error reaches :meth:`SiteExecutor.run_task` instead.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    retryable = {
        httpx.codes.BAD_GATEWAY,
        httpx.codes.SERVICE_UNAVAILABLE,
        httpx.codes.GATEWAY_TIMEOUT,
    }

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in retryable
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.2, max_delay=5),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=give_up_after,
        should_giveup=give_up,
    )


def _task_heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its SIGINT on a lost task (that would end the executor).

    Flower's own heartbeat function interrupts its one-shot process when the SuperNode no
    longer knows the task; here the task's reply is then simply refused by the SuperNode.
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False  # retried with back-off by HeartbeatSender
        except httpx.HTTPError as exc:
            log.warning("task heartbeat refused: %s", exc)
            return True
        if not res.success:
            log.warning("the SuperNode no longer knows this task")
        return True

    return beat


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the SuperNode that started us is gone (even SIGKILLed)."""

    def watch() -> None:
        while True:
            # Re-parenting changes getppid(), which a dead parent's pid (reused or a zombie)
            # would not show.
            if os.getppid() != parent_pid:
                log.info("site executor: the SuperNode exited; stopping")
                os._exit(0)
            time.sleep(0.2)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def log_to_stderr() -> None:
    """Send securefed's own log lines to stderr (the site's log), not via the root logger.

    A root handler would also print Flower's DEBUG lines and one httpx line per poll.
    """
    root = logging.getLogger("securefed")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m securefed.deploy.executor --runtime-api-address 127.0.0.1:PORT``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="loopback HOST:PORT")
    parser.add_argument("--app", default=DEFAULT_APP, help="the ClientApp, MODULE:ATTRIBUTE")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it is gone")
    parser.add_argument(
        "--preload",
        action="append",
        default=None,
        metavar="MODULE",
        help=f"import before serving (repeatable; default {' '.join(DEFAULT_PRELOAD)})",
    )
    args = parser.parse_args(argv)
    log_to_stderr()
    # This process trains the site's rounds: keep freed step memory (securefed.allocator).
    log.info("site executor: malloc %s", tune_malloc())

    def stop_now(signum: int, _frame: Any) -> None:
        # The executor holds no state of its own but its record of accepted runs, written
        # atomically (contexts live in the SuperNode), so a stop needs no clean-up; exiting
        # at once also cuts a long local training short.
        log.info("site executor: signal %d; stopping", signum)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_now)
    signal.signal(signal.SIGINT, stop_now)
    if args.parent_pid is not None:
        _watch_parent(args.parent_pid)
    try:
        executor = SiteExecutor(args.runtime_api_address, app_ref=args.app)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"error: site executor: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    loaded = preload(DEFAULT_PRELOAD if args.preload is None else args.preload)
    log.info("site executor: preloaded %s in %.1f s", loaded, time.perf_counter() - started)
    executor.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
