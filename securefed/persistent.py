"""A site's memory that outlives a secure-sum session: what it already did in this run.

The protocol state of a round (:data:`securefed.protocol.modes.base.SiteState`) is cleared
when a new session starts (a deployed site resets it at ``setup``). Some facts must survive
that, or a server could replay a step and difference the answers: the rounds a site trained
and advertised masking keys for, the rounds a CKKS key holder decrypted, its decryption
count. They live in a :class:`PersistentStore`. In-process, a
:class:`~securefed.fl.site_runtime.SiteRuntime` and its mode's site side share one store;
a deployed site keeps it in Flower's ``context.state`` under the record :data:`RECORD`
(:func:`load` / :func:`save`), which Flower keeps at the site across messages and processes
of a run and which the ``setup`` stage never clears.

Values are what a Flower ``ConfigRecord`` holds: int, float, str, bytes, bool, or a list of
one of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from securefed.errors import ProtocolError

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = ["RECORD", "PersistentStore", "load", "save"]

#: The record of ``context.state`` a deployed site keeps its store in.
RECORD = "securefed.persistent"

_SCALARS = (bool, int, float, str, bytes)


def _check_value(key: str, value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and not all(type(v) is type(items[0]) for v in items):
            raise ProtocolError(f"persistent store: {key!r} mixes value types")
        if items and not isinstance(items[0], _SCALARS):
            raise ProtocolError(f"persistent store: {key!r} holds a {type(items[0]).__name__}")
        return items
    raise ProtocolError(f"persistent store: {key!r} cannot hold a {type(value).__name__}")


class PersistentStore(MutableMapping[str, Any]):
    """Str keys to ConfigRecord values; survives the sessions of one run at one site.

    Keys are namespaced by their owner (``fit.rounds``, ``mask.rounds``, ``ckks.decryptions``)
    so modes cannot collide.

    Args:
        values: The stored values to continue from (a fresh site process: its record).

    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values: dict[str, Any] = {}
        for key, value in (values or {}).items():
            self[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise ProtocolError("persistent store: keys are non-empty strings")
        self._values[key] = _check_value(key, value)

    def __delitem__(self, key: str) -> None:
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def claim_once(self, key: str, item: int | str, *, what: str) -> None:
        """Record ``item`` under the list ``key``; refuse an item recorded before.

        The check and the record are one step: call it *before* doing the thing that must
        happen once (training a round, advertising a round's keys), so a step that fails
        half-way still counts as done.

        Args:
            key: The list's key (e.g. ``"mask.rounds"``).
            item: What may happen once (a round index).
            what: Names the refused step in the error.

        Raises:
            ProtocolError: ``item`` is recorded already.

        """
        done = list(self._values.get(key, []))
        if item in done:
            raise ProtocolError(f"{what}: already done once in this run; refusing to repeat it")
        self[key] = [*done, item]

    def to_dict(self) -> dict[str, Any]:
        """A copy of the values (lists copied)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._values.items()}


def load(context: Context) -> PersistentStore:
    """The site's store from Flower's ``context.state`` (empty when none was saved)."""
    record = context.state.config_records.get(RECORD)
    return PersistentStore(dict(record.items()) if record is not None else None)


def save(context: Context, store: PersistentStore) -> None:
    """Write the store back into ``context.state`` (Flower keeps it at the site)."""
    from flwr.app import ConfigRecord

    context.state[RECORD] = ConfigRecord(store.to_dict())
