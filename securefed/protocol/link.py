"""The one interface every runtime implements: send a stage's payloads, get replies back.

Payloads and replies are keyed by **site id** (a runtime maps ids to its own addresses) and
are plain field dicts (:mod:`securefed.protocol.wire`): scalars, strings, bytes, JSON-able
dicts and lists. :class:`LocalLink` delivers them to in-process site endpoints as the record
layout the Flower link carries (without importing Flower), so the same bytes cross in both
runtimes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from securefed.errors import SecureFedError
from securefed.protocol.wire import from_record, record_size, to_record

__all__ = ["Link", "LocalLink", "Payloads", "Replies", "SiteEndpoint"]

#: site id -> (stage, fields)
Payloads = Mapping[int, tuple[str, dict[str, Any]]]
#: (replies by site id, reason by site id for each site that did not answer)
Replies = tuple[dict[int, dict[str, Any]], dict[int, str]]


class Link(Protocol):
    """Delivers one stage's messages to sites and collects what comes back.

    Attributes:
        sent: Per site, payload bytes sent to it so far.
        received: Per site, payload bytes received from it so far.

    """

    sent: dict[int, int]
    received: dict[int, int]

    def exchange(
        self,
        payloads: Payloads,
        *,
        timeout: float,
        group: str,
        awaited: set[int] | None = None,
    ) -> Replies:
        """Send each site its message and wait up to ``timeout`` s for the replies.

        Args:
            payloads: Site id -> (stage, fields).
            timeout: Seconds to wait.
            group: The round (``"1"``, ``"2"``...) or a phase name (``"setup"``, ``"final"``).
            awaited: Sites to wait for (default: all).

        Returns:
            Replies by site, and the reason for each site that failed (its error, a
            malformed reply, no reply in time).

        """
        ...


class SiteEndpoint(Protocol):
    """What a site runs for one message: a stage name and fields in, reply fields out."""

    def handle(self, stage: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Answer one message; raise a :class:`~securefed.errors.SecureFedError` to refuse."""
        ...


class LocalLink:
    """A link to site endpoints in this process (the in-process runtime and the harnesses).

    Every payload and reply is encoded and decoded as over Flower (so a field that cannot
    cross the network fails here too, and byte counts are the same). A site that raises a
    :class:`~securefed.errors.SecureFedError` fails that exchange with its message, as a
    Flower ClientApp's error reply would; any other exception is a bug and propagates.

    Args:
        sites: Site id -> endpoint.

    """

    def __init__(self, sites: Mapping[int, SiteEndpoint]) -> None:
        self.sites = dict(sites)
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        #: (group, stage) -> sites whose reply is lost (simulated dropouts).
        self._lost: dict[tuple[str, str], set[int]] = {}

    def lose(self, *, group: str, stage: str, sites: set[int]) -> None:
        """Simulate that ``sites`` vanish before replying to ``stage`` in ``group``.

        The site never gets the message (it went away), so it spends nothing for it.
        """
        self._lost.setdefault((group, stage), set()).update(sites)

    def exchange(
        self,
        payloads: Payloads,
        *,
        timeout: float,
        group: str,
        awaited: set[int] | None = None,
    ) -> Replies:
        """Deliver each payload in site order; see :meth:`Link.exchange`."""
        del timeout, awaited  # in-process sites answer at once or not at all
        replies: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        for sid in sorted(payloads):
            stage, fields = payloads[sid]
            content = to_record(fields)
            self.sent[sid] = self.sent.get(sid, 0) + record_size(content)
            if sid in self._lost.get((group, stage), set()):
                errors[sid] = "dropped out (simulated)"
                continue
            endpoint = self.sites.get(sid)
            if endpoint is None:
                errors[sid] = "no such site"
                continue
            try:
                reply = endpoint.handle(stage, from_record(content, what=f"{stage} message"))
            except SecureFedError as exc:
                errors[sid] = str(exc)
                continue
            encoded = self.encode_reply(sid, reply)
            self.received[sid] = self.received.get(sid, 0) + record_size(encoded)
            try:
                replies[sid] = from_record(encoded, what=f"reply of site {sid}")
            except SecureFedError as exc:
                # As over Flower: a reply the server cannot read fails that site only.
                errors[sid] = str(exc)
        return replies, errors

    def encode_reply(self, sid: int, reply: dict[str, Any]) -> dict[str, Any]:
        """The record site ``sid``'s reply crosses as (over Flower: the ConfigRecord it writes).

        A test overrides it to let a site write a record no honest site would.
        """
        del sid
        return to_record(reply)
