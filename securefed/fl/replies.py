"""What the server accepts in a site's reply: one schema per field, checked before use.

Every reply of a round passes :meth:`ReplySchema.check` before the engine, the claim book or
a secure-sum mode reads a field of it. A reply that fails makes its site a dropout for that
step of the round (``metrics.json`` names the site and the reason); it never raises out of
the round. The checks, in order:

1. every field is one the run's disclosure list declares for the message
   (:func:`securefed.dp.disclosures.message_fields`: what an honest site may send);
2. the message's required fields are present (:data:`REQUIRED`, plus the DP claim under DP
   and the mode's update field in a fit reply that carries an update);
3. each field has its kind and range (:data:`FIELDS`, per message); a field a mode declares
   that this table does not know (a plug-in's, a new stage's) is left to the mode, which
   parses its own bytes.

JSON size and nesting were capped before parsing, by :func:`securefed.protocol.wire.from_record`.
The table is documented in docs/poisoning.md ("Reply schema").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from securefed.config import RunConfig
from securefed.dp.disclosures import message_fields
from securefed.errors import ProtocolError

__all__ = ["FIELDS", "REQUIRED", "SERVER_FIELDS", "ReplySchema"]

#: Longest text field (a refusal reason, a dataset name) a site may send.
MAX_TEXT = 2000
#: Most entries in one list field (events of one step, class counts, metrics' lists).
MAX_ITEMS = 100_000
#: Fields of a ``metrics.json`` site row that the server computes: a site's metrics never
#: replace them (they are set after the site's figures, and a site metric of that name is
#: refused).
SERVER_FIELDS = frozenset(
    {"client_id", "participated", "epsilon", "num_train_samples", "cluster", "twin"}
)
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

Check = Callable[[Any], str | None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bytes(v: Any) -> str | None:
    return None if isinstance(v, bytes) else "must be bytes"


def _text(v: Any) -> str | None:
    if not isinstance(v, str):
        return "must be a string"
    return None if len(v) <= MAX_TEXT else f"is longer than {MAX_TEXT} characters"


def _count(low: int, high: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not _is_int(v) or v < low or (high is not None and v > high):
            return f"must be an integer in [{low}, {high if high is not None else 'inf'})"
        return None

    return check


def _seconds(v: Any) -> str | None:
    if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= 1e7:
        return "must be a finite number of seconds >= 0"
    return None


def _epsilon(v: Any) -> str | None:
    # The site's own figure (the server recomputes epsilon from the events): +inf is a
    # spent budget, NaN or a negative one is malformed.
    if not _is_number(v) or math.isnan(v) or v < 0:
        return "must be a number >= 0"
    return None


def _object(v: Any) -> str | None:
    if not isinstance(v, dict) or len(v) > 64:
        return "must be an object of at most 64 keys"
    return None


def _events(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_ITEMS or not all(isinstance(e, dict) for e in v):
        return "must be a list of event objects"
    return None


def _counts(v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_ITEMS or not all(_is_int(c) and c >= 0 for c in v):
        return "must be a list of counts"
    return None


def _list(v: Any) -> str | None:
    # Only the shape here: a calibration reply must reach the claim book (its release is
    # accounted) even when its numbers are bad; the engine checks them after accounting.
    if not isinstance(v, list) or len(v) > 1_000_000:
        return "is not a list"
    return None


def _finite_json(v: Any, depth: int = 0) -> str | None:
    """A metric value: None, a finite number, a short string, or lists/objects of them."""
    if depth > 4:
        return "nests too deep"
    if v is None or isinstance(v, bool):
        return None
    if _is_number(v):
        return None if math.isfinite(v) else "holds NaN or infinity"
    if isinstance(v, str):
        return None if len(v) <= 256 else "holds a string longer than 256 characters"
    items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
    if items is None:
        return f"holds a {type(v).__name__}"
    if len(v) > MAX_ITEMS:
        return f"holds more than {MAX_ITEMS} entries"
    for item in items:
        why = _finite_json(item, depth + 1)
        if why:
            return why
    return None


def _metrics(v: Any, *, primary: str, nullable: bool) -> str | None:
    """A held-out metrics object: metric names to finite values; the primary one a number."""
    if v is None:
        return None if nullable else "must be an object of metrics"
    if not isinstance(v, dict) or len(v) > 256:
        return "must be an object of at most 256 metrics"
    for key, value in v.items():
        if not _METRIC_NAME.fullmatch(key) or key in SERVER_FIELDS:
            return f"holds a metric named {key[:40]!r} (a server field, or not a metric name)"
        why = _finite_json(value, 1)
        if why:
            return f"metric {key!r} {why}"
    if primary not in v:
        return f"lacks the primary metric {primary!r}"
    value = v[primary]
    if value is not None and not _is_number(value):
        return f"metric {primary!r} must be a number or null"
    return None


_CLAIM: dict[str, Check] = {
    "events": _events,
    "epsilon": _epsilon,
    "plan": _object,
    "signature": _text,
}
_MASKING: dict[str, Check] = {"message": _bytes}

#: Per message (the Flower message type's action: ``fit``, ``heldout``...), every reply field
#: the server reads and its check; ``*`` applies to every message. (CFL's ``cluster``, the
#: held-out ``metrics`` and ``twin`` depend on the run: :class:`ReplySchema` adds them.)
FIELDS: dict[str, dict[str, Check]] = {
    "*": {"protect_seconds": _seconds},
    "setup": {
        "site_id": _count(0),
        "num_heldout": _count(0),
        "num_samples": _count(1),
        "class_counts": _counts,
        "dataset": _text,
        "fingerprint": _text,
        "task": _text,
        "spec": _object,
        "signing_key": _text,
        "plan": _object,
        "signature": _text,
        "he_public": _bytes,
    },
    "fit": {
        **_CLAIM,
        "refused": _text,
        "weights": _bytes,
        "vector": _bytes,
        "advertise": _bytes,
        "ciphertext": _bytes,
        "ciphertext_signature": _bytes,
    },
    "heldout": dict(_CLAIM),
    "share": _MASKING,
    "masked": {**_MASKING, "clipped": _count(0)},
    "unmask": _MASKING,
    "decrypt": {"vector": _bytes},
    "calibrate": {**_CLAIM, "statistics": _list},
    "close": {"close_signature": _text, "roster_sha256": _text},
}

#: Fields each message must carry (more under DP, and the update in a fit reply).
REQUIRED: dict[str, frozenset[str]] = {
    "setup": frozenset({"site_id", "num_heldout", "dataset", "fingerprint", "task", "spec"}),
    "select": frozenset({"cluster"}),
    "heldout": frozenset({"metrics"}),
    "share": frozenset({"message"}),
    "masked": frozenset({"message"}),
    "unmask": frozenset({"message"}),
    "decrypt": frozenset({"vector"}),
    # `statistics` is checked by the engine after the release is accounted.
    "calibrate": frozenset({"events", "epsilon", "plan", "signature"}),
    "close": frozenset({"close_signature"}),
}

#: The field that carries a site's protected update in its fit reply, per mode.
_UPDATE_FIELD = {"none": "vector", "mask": "advertise", "he": "ciphertext"}
_CLAIM_FIELDS = frozenset({"events", "epsilon", "plan", "signature"})


class ReplySchema:
    """The checks of one run's replies.

    Args:
        config: The run (which fields the disclosures allow, DP, the mode, cyclic).
        num_models: Models the run trains (CFL's K): a cluster index is below it.
        primary_metric: The task's primary metric (a site's must be a number).

    """

    def __init__(self, config: RunConfig, *, num_models: int, primary_metric: str) -> None:
        self.config = config
        self.allowed = message_fields(config)
        self.primary = primary_metric
        cluster = _count(0, num_models - 1)
        run: dict[str, dict[str, Check]] = {
            "select": {"cluster": cluster},
            "heldout": {
                "cluster": cluster,
                "metrics": lambda v: _metrics(v, primary=primary_metric, nullable=True),
                "twin": lambda v: _metrics(v, primary=primary_metric, nullable=False),
            },
        }
        self.fields: dict[str, dict[str, Check]] = {
            message: {**FIELDS["*"], **FIELDS.get(message, {}), **run.get(message, {})}
            for message in set(FIELDS) | set(run) | set(self.allowed)
        }

    def required(self, message: str, reply: Mapping[str, Any]) -> frozenset[str]:
        """The fields ``reply`` to ``message`` must carry."""
        need = set(REQUIRED.get(message, frozenset()))
        dp = self.config.dp_enabled
        if message == "setup" and dp:
            need |= {"signing_key", "plan", "signature"}
        if message == "fit":
            if dp:
                need |= _CLAIM_FIELDS
            if "refused" not in reply:
                if self.config.schedule == "cyclic":
                    need.add("weights")
                elif self.config.secure_agg in _UPDATE_FIELD:
                    need.add(_UPDATE_FIELD[self.config.secure_agg])
                    if self.config.secure_agg == "he":
                        need.add("ciphertext_signature")  # the key holder sums signed ones
        return frozenset(need)

    def check(self, message: str, reply: Mapping[str, Any]) -> None:
        """Refuse a reply to ``message`` that an honest site would not send.

        Raises:
            ProtocolError: Naming the first field that is unknown, missing or malformed.

        """
        if not isinstance(reply, Mapping):
            raise ProtocolError("the reply is not a record of fields")
        allowed = self.allowed.get(message, set())
        unknown = sorted(k for k in reply if k not in allowed)
        if unknown:
            shown = ", ".join(f"`{k[:40]}`" for k in unknown[:5])
            raise ProtocolError(f"unknown field(s) {shown} for a {message} reply")
        missing = sorted(self.required(message, reply) - set(reply))
        if missing:
            raise ProtocolError(f"missing field `{missing[0]}` in a {message} reply")
        checks = self.fields.get(message, FIELDS["*"])
        for key, value in reply.items():
            check = checks.get(key)
            why = check(value) if check is not None else None
            if why:
                raise ProtocolError(f"field `{key}` {why}")
