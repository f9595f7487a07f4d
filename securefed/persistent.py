"""A site's memory that outlives a secure-sum session: what it already did in this run.

The protocol state of a round (:data:`securefed.protocol.modes.base.SiteState`) is cleared
when a new session starts (a deployed site resets it at ``setup``). Some facts must survive
that, or a server could replay a step and difference the answers: the rounds a site trained
and advertised masking keys for, the rounds a CKKS key holder decrypted, its decryption
count. They live in a :class:`PersistentStore`. In-process, a
:class:`~securefed.fl.site_runtime.SiteRuntime` and its mode's site side share one store.

A deployed site keeps it on its own disk (:func:`state_path`, :func:`read_site_file`,
:func:`write_site_file`): ``<signing-key>.state/<session hex>.json``, one file per run
session (:func:`securefed.protocol.modes.base.run_session`, a hash of the run
configuration), 0600 in a 0700 folder, written atomically and fsynced before any reply
leaves the site. Flower's ``context.state`` is not enough: Flower 1.42's SuperNode keeps it
in memory only, so a restarted site (``securefed deploy site``) or a resubmitted run
(``--resume``: a new Flower run, a fresh context) would forget what it did, and a server
could re-fit or re-key a round and difference the answers. ``context.state`` still holds a
copy under the record :data:`RECORD` (:func:`load` / :func:`save`), tagged with its session
and ignored under another; it is what a site without a signing key (plaintext runs without
DP only) relies on, within one SuperNode process.

Values are what a Flower ``ConfigRecord`` holds: int, float, str, bytes, bool, or a list of
one of them.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securefed.errors import ConfigError, ProtocolError
from securefed.protocol.wire import Stage

if TYPE_CHECKING:
    from flwr.app import Context

__all__ = [
    "RECORD",
    "SESSION_KEY",
    "STATE_SUFFIX",
    "PersistentStore",
    "load",
    "read_site_file",
    "save",
    "site_lock",
    "state_path",
    "write_private_atomic",
    "write_site_file",
]

#: The record of ``context.state`` a deployed site keeps its store in.
RECORD = "securefed.persistent"
#: In each of a deployed site's ``context.state`` records: the session it belongs to (hex).
SESSION_KEY = "securefed.session"
#: Next to the site's signing key: the folder of its per-session state files.
STATE_SUFFIX = ".state"

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


#: ``--twin-privacy local``: the rounds the site answered for its local twin (one at most).
LOCAL_TWIN_ROUNDS = "evaluate.local_twin.rounds"
#: The site closed the run (signed its closing claim): the close's fields as canonical JSON.
CLOSED = "query.close.fields"
#: ... and the closing signature it gave (a repeated close gets the same one).
CLOSE_SIGNATURE = "query.close.signature"


def refuse_after_end(store: Mapping[str, Any], stage: str, site: int) -> None:
    """Refuse the steps a site's part in the run no longer allows.

    Once the site answered for its local twin (``--twin-privacy local``), only set-up,
    evaluation and the close remain: the local twin's metric is the site's one release
    outside epsilon (docs/twins.md) and comes last, so no DP release (training,
    calibration) and no protocol step follows it. Once the site closed the run, only set-up
    and the close itself remain: its closing claim says it spent nothing more. Both runtimes
    call this: ``SiteRuntime.handle``, and a deployed site's app for the secure-sum steps it
    answers without a runtime.

    Raises:
        ProtocolError: The step comes after the site's part in the run ended.

    """
    if stage not in (Stage.CLOSE, Stage.SETUP) and store.get(CLOSED):
        raise ProtocolError(f"site {site}: it closed the run; refusing {stage}")
    if stage not in (Stage.EVALUATE, Stage.SETUP, Stage.CLOSE) and store.get(LOCAL_TWIN_ROUNDS):
        raise ProtocolError(
            f"site {site}: it answered for its local twin, which ends its part in the run; "
            f"refusing {stage}"
        )


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


def load(context: Context, session: str | None = None) -> PersistentStore:
    """The site's store from Flower's ``context.state`` (empty when none was saved).

    Args:
        context: The site's Flower context.
        session: The run's session (hex); a record saved under another session is ignored.

    """
    record = context.state.config_records.get(RECORD)
    if record is None:
        return PersistentStore()
    values = dict(record.items())
    if values.pop(SESSION_KEY, None) != session:
        return PersistentStore()
    return PersistentStore(values)


def save(context: Context, store: PersistentStore, session: str | None = None) -> None:
    """Write the store back into ``context.state``, tagged with its session (hex)."""
    from flwr.app import ConfigRecord

    values = store.to_dict()
    if session is not None:
        values[SESSION_KEY] = session
    context.state[RECORD] = ConfigRecord(values)


def state_path(node_config: Mapping[str, Any], session: str) -> Path | None:
    """Where a deployed site keeps a session's state: ``<signing-key>.state/<session>.json``.

    None when the node has no signing key (plaintext runs without DP): then the site keeps
    its state in Flower's ``context.state`` only, which a restarted SuperNode forgets.
    """
    key = node_config.get("signing-key")
    if not key:
        return None
    if not session or any(c not in "0123456789abcdef" for c in session):
        raise ProtocolError("persistent store: a session is lower-case hex")
    path = Path(str(key))
    return path.with_name(path.name + STATE_SUFFIX) / f"{session}.json"


@contextmanager
def site_lock(path: Path | None) -> Iterator[None]:
    """Hold a session's state file exclusively, from reading it to writing it back.

    A server can submit the same signed run twice as two Flower runs; both map to one session
    and one state file, and a SuperNode may serve them in two ClientApp processes at once. Each
    would read the file before the other wrote it, so both would claim the same round, train it
    with fresh noise and answer, and the last write would drop the other's ledger event. Under
    this lock (``flock`` on ``<session>.json.lock``, 0600 in the 0700 folder) the second step
    waits, then reads what the first claimed and refuses. The lock is released when the step
    ends, or when its process dies.

    Args:
        path: From :func:`state_path`; None (no signing key, no disk state) locks nothing.

    """
    if path is None:
        yield
        return
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # Unlocked before closing: a process forked during the step would otherwise keep
            # the lock (its copy of the descriptor) and block the session's next step.
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return bytes.fromhex(str(value["bytes"]))
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def read_site_file(path: Path, session: str) -> tuple[PersistentStore, list[dict[str, Any]] | None]:
    """A session's state file: the store and the site's own privacy ledger (None: none yet).

    A missing file is a session the site has not served (an empty store, no ledger).

    Raises:
        ConfigError: The file exists but is unreadable, malformed, or for another session: the
            site refuses to act rather than forget what it did.

    """
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return PersistentStore(), None
    except OSError as exc:
        raise ConfigError(f"{path}: this site's run state is unreadable ({exc})") from exc
    try:
        body = json.loads(raw)
        if body["session"] != session:
            raise ValueError("it belongs to another session")
        store = PersistentStore({str(k): _decode(v) for k, v in body["store"].items()})
        ledger = body["ledger"]
        if ledger is not None and not (
            isinstance(ledger, list) and all(isinstance(e, dict) for e in ledger)
        ):
            raise ValueError("its ledger is not a list of events")
    except (ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
        raise ConfigError(
            f"{path}: this site's run state is corrupt ({exc}); refusing to act on this run"
        ) from exc
    return store, ledger


def write_site_file(
    path: Path, session: str, store: PersistentStore, ledger: list[dict[str, Any]] | None
) -> None:
    """Write a session's state atomically: 0600 file, 0700 folder, fsynced, then renamed.

    Args:
        path: From :func:`state_path`.
        session: The run's session (hex).
        store: What the site did once in the run.
        ledger: The site's own privacy events (None: it does not know them yet).

    """
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    body = json.dumps(
        {
            "session": session,
            "store": {k: _encode(v) for k, v in store.to_dict().items()},
            "ledger": ledger,
        },
        sort_keys=True,
    )
    write_private_atomic(path, body)


def write_private_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, readable by its owner only (0600).

    Written to a temporary file beside it, fsynced, renamed over it, and the folder fsynced,
    so a crash leaves the old file or the new one, never a part of either.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
