"""A securefed site process: Flower's SuperNode with a warm executor and short idle polls.

``python -m securefed.deploy.supernode [flower-supernode options]`` is what
``securefed deploy site`` (and :class:`~securefed.deploy.local.LocalDeployment`) runs. It is
Flower 1.42's own ``flower-supernode`` entry point, run in this process, with two changes:

- **process isolation with one warm executor**: the SuperNode runs with ``--isolation
  process`` and this process starts :mod:`securefed.deploy.executor` as its child, which claims
  every ClientApp task over the SuperNode's loopback Runtime API and runs the ClientApp in its
  own (long-lived) interpreter. The two live and die together: the executor exits when its
  parent does (even on SIGKILL), and the SuperNode is stopped if the executor dies.
- **shorter waits**: Flower's SuperNode sleeps a hard-coded 3 s between two requests for
  messages when idle, 0.5 s between two looks for the ClientApp's reply, and 1 s (doubling)
  for a message part not uploaded yet. :func:`securefed.deploy.polls.shorten_supernode_polls`
  shortens them in this process; :mod:`securefed.deploy.polls` lists every such wait and what
  it relies on in Flower 1.42.

The SuperLink connection (TLS, node authentication) is Flower's own and unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["executor_command", "main"]

log = logging.getLogger("securefed.supernode")


def _runtime_address(argv: Sequence[str]) -> str:
    """The loopback address of the SuperNode's Runtime API, from its ``--host``/``--port``."""
    from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default=UVICORN_DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=SUPERNODE_UVICORN_DEFAULT_PORT)
    known, _ = parser.parse_known_args(list(argv))
    host = known.host
    # A SuperNode listening on every interface is still reached over loopback from here.
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{known.port}"


def executor_command(runtime_api_address: str, *, parent_pid: int) -> list[str]:
    """The executor child's command line (this interpreter, so it imports this securefed)."""
    return [
        sys.executable,
        "-m",
        "securefed.deploy.executor",
        "--runtime-api-address",
        runtime_api_address,
        "--parent-pid",
        str(parent_pid),
    ]


def _start_executor(address: str) -> subprocess.Popen:
    """Start the executor and tie its life to this process's."""
    from flwr.supercore.exit import add_exit_handler

    child = subprocess.Popen(executor_command(address, parent_pid=os.getpid()))
    stopping = threading.Event()

    def stop_child() -> None:
        stopping.set()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()

    def watch() -> None:
        code = child.wait()
        if not stopping.is_set():
            # Without its executor the SuperNode would accept messages it can never answer.
            log.error("the site executor exited (code %s); stopping the SuperNode", code)
            os.kill(os.getpid(), signal.SIGTERM)

    add_exit_handler(stop_child)
    threading.Thread(target=watch, name="executor-watch", daemon=True).start()
    return child


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``flower-supernode`` with process isolation, its executor and short polls."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from securefed.deploy.executor import log_to_stderr
    from securefed.deploy.polls import shorten_supernode_polls

    args = list(sys.argv[1:] if argv is None else argv)
    log_to_stderr()
    if "--isolation" not in args:
        args += ["--isolation", "process"]
    elif args[args.index("--isolation") + 1] != "process":
        raise SystemExit("error: a securefed site runs Flower's SuperNode with --isolation process")
    shorten_supernode_polls()
    _start_executor(_runtime_address(args))
    # Flower's entry point reads its options from sys.argv.
    sys.argv = ["flower-supernode", *args]
    return flower_supernode()


if __name__ == "__main__":
    main()
