"""The securefed server process: Flower's SuperLink with its Control API kept on the server host.

``python -m securefed.deploy.superlink [--expose-control CIDR]... [flower-superlink options]``
is what ``securefed deploy server`` (and :class:`~securefed.deploy.local.LocalDeployment`)
runs: Flower 1.42's own ``flower-superlink`` entry point, in this process, with one gate in
front of its HTTP API.

Flower 1.42 serves its Fleet API (the sites), its Control API (``flwr run``, ``flwr supernode
register``, ...) and its Runtime API (the SuperExec and the ServerApp) on **one** port, and the
open-source Control API has no authentication (``NoOpControlAuthnPlugin``: every caller is
the same anonymous account; OIDC is Flower Enterprise only). Anyone who can reach the port,
with only ``ca.crt``, could start a run, stop one, register a node or read a run's logs; the
Runtime API, in Flower's default subprocess isolation, does not authenticate the SuperExec
either (``--superexec-auth-secret-file`` applies only to ``--isolation process``). So the gate
(:class:`ApiGate`) answers:

- ``/v1/fleet/*`` (and ``/health``) from anywhere: the sites' API, behind Flower's own node
  authentication;
- everything else (Control, Runtime, the API docs) only to clients on the server host itself
  (a loopback address, or the address the connection came in on);
- ``/v1/control/*`` also to the networks given with ``--expose-control`` (a warning is logged:
  Flower has no authentication of its own there, so anyone in those networks can submit).

The SuperLink's legacy gRPC Control and Fleet servers (started only when Flower's internal
``FLWR_INTERNAL_GRPC_*`` variables are set) are kept off: they would bypass the gate.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

__all__ = ["ApiGate", "main"]

log = logging.getLogger("securefed.superlink")

#: Paths every client may reach (the sites' Fleet API is node-authenticated by Flower).
PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
#: Paths ``--expose-control`` opens to other networks.
CONTROL_PREFIX = "/v1/control/"
_INTERNAL_GRPC = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(value).strip("[]"))
    except ValueError:
        return None


class ApiGate:
    """ASGI middleware: the Fleet API for everyone, the rest for the server host only.

    Args:
        app: The SuperLink's ASGI application.
        expose_control: Networks (CIDR) whose clients may also use the Control API.

    """

    def __init__(self, app: Any, expose_control: Iterable[str] = ()) -> None:
        self.app = app
        self.expose = tuple(ipaddress.ip_network(n, strict=False) for n in expose_control)

    def allows(self, path: str, client: Any, server: Any) -> bool:
        """Whether a request for ``path`` from ``client`` (host, port) may pass."""
        if path.startswith(PUBLIC_PREFIXES):
            return True
        host = _address(client[0]) if client else None
        if host is None:
            return False
        local = _address(server[0]) if server else None
        if host.is_loopback or (local is not None and host == local):
            return True
        return path.startswith(CONTROL_PREFIX) and any(host in net for net in self.expose)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass allowed requests on; answer the others with 403 and a one-line reason."""
        if scope.get("type") == "http" and not self.allows(
            str(scope.get("path", "")), scope.get("client"), scope.get("server")
        ):
            body = json.dumps(
                {
                    "detail": "securefed: this SuperLink answers its Control and Runtime APIs "
                    "only on the server host (securefed deploy server --expose-control)"
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install_gate(expose_control: Sequence[str]) -> None:
    """Put :class:`ApiGate` in front of every middleware of Flower's SuperLink app."""
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    flower_middleware = superlink_main._get_middleware  # noqa: SLF001  # flwr 1.42 internal

    def gated() -> list[Middleware]:
        return [Middleware(ApiGate, expose_control=tuple(expose_control)), *flower_middleware()]

    superlink_main._get_middleware = gated  # noqa: SLF001


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``flower-superlink`` behind the gate."""
    from flwr.superlink.cli.flower_superlink import flower_superlink

    from securefed.deploy.executor import log_to_stderr

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--expose-control", action="append", default=[], metavar="CIDR")
    ours, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    log_to_stderr()
    try:
        for net in ours.expose_control:
            ipaddress.ip_network(net, strict=False)
    except ValueError as exc:
        raise SystemExit(f"error: --expose-control: {exc}") from exc
    for name in _INTERNAL_GRPC:
        os.environ.pop(name, None)  # an ungated gRPC Control or Fleet server
    if ours.expose_control:
        log.warning(
            "the Control API answers clients in %s: Flower 1.42 does not authenticate them, so "
            "anyone there can submit runs (sites still run only federation-signed ones)",
            ", ".join(ours.expose_control),
        )
    install_gate(ours.expose_control)
    sys.argv = ["flower-superlink", *rest]
    return flower_superlink()


if __name__ == "__main__":
    main()
