"""What crosses the network between the securefed ServerApp and a site: explicit records only.

Every securefed message carries one Flower ``ConfigRecord`` named ``securefed`` whose values
are scalars, strings (JSON documents) or raw bytes: the secure-aggregation messages in their
explicit byte layouts (:mod:`securefed.crypto.messages`), model weights as safetensors and
vectors as little-endian float64. Nothing is pickled, on either side.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from securefed.errors import ProtocolError

__all__ = [
    "from_record",
    "record_size",
    "to_record",
    "PROTOCOL",
    "RECORD",
    "RUN_CONFIG",
    "Stage",
    "decode",
    "encode",
    "payload_size",
    "vector_from_bytes",
    "vector_to_bytes",
]

#: Wire protocol version; both ends refuse a message of another version.
PROTOCOL = 1
#: Name of the one ConfigRecord a securefed message carries.
RECORD = "securefed"
#: Over Flower, the field every message to a site carries: the run configuration, which the
#: site checks against its own policy each time.
RUN_CONFIG = "run_config"


class Stage:
    """Flower message types, one per protocol step (``<category>.<action>``)."""

    SETUP = "query.setup"
    #: Clustered FL: the site picks the cluster model that fits its data best.
    SELECT = "query.select"
    FIT = "train.fit"
    SHARE = "train.share"
    MASKED = "train.masked"
    #: Masking, active variant: the survivors sign the survivor list (consistency round).
    CONSISTENCY = "train.consistency"
    UNMASK = "train.unmask"
    DECRYPT = "train.decrypt"
    EVALUATE = "evaluate.heldout"


_Value = int | float | str | bytes | bool


def to_record(fields: Mapping[str, Any]) -> dict[str, _Value]:
    """The flat record a message carries: scalars, strings, bytes; dicts and lists as JSON.

    The same record crosses in-process (:class:`~securefed.protocol.link.LocalLink`) and
    over Flower (inside one ``ConfigRecord``), so a field that cannot cross the network
    fails in both runtimes.
    """
    record: dict[str, _Value] = {"protocol": PROTOCOL}
    for key, value in fields.items():
        if key == "protocol" or key.startswith("json:"):
            raise ValueError(f"`{key}` is a reserved field name")
        if isinstance(value, (bytes, bytearray, memoryview)):
            record[key] = bytes(value)
        elif isinstance(value, (bool, int, float, str)):
            record[key] = value
        elif value is None or isinstance(value, (dict, list, tuple)):
            record["json:" + key] = json.dumps(value, allow_nan=True)
        else:
            raise TypeError(f"`{key}`: {type(value).__name__} cannot go on the wire")
    return record


def from_record(record: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """The fields of a record made by :func:`to_record` (JSON values parsed back).

    Raises:
        ProtocolError: If the record is of another protocol version or malformed.

    """
    if record.get("protocol") != PROTOCOL:
        raise ProtocolError(
            f"{what}: protocol version {record.get('protocol')!r}, this side speaks {PROTOCOL}"
        )
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "protocol":
            continue
        if key.startswith("json:"):
            try:
                out[key[5:]] = json.loads(value)
            except (TypeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"{what}: field `{key[5:]}` is not JSON") from exc
        else:
            out[key] = value
    return out


def record_size(record: Mapping[str, Any]) -> int:
    """Bytes of payload in a record (keys and values; framing not counted)."""
    total = 0
    for key, value in record.items():
        total += len(key)
        if isinstance(value, (bytes, str)):
            total += len(value)
        else:
            total += 8
    return total


def encode(fields: Mapping[str, Any]) -> Any:
    """A Flower ``RecordDict`` holding ``fields`` in one ``ConfigRecord``."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({RECORD: ConfigRecord(to_record(fields))})


def decode(content: Any, *, what: str) -> dict[str, Any]:
    """The fields of a securefed ``RecordDict``.

    Raises:
        ProtocolError: If the record is missing, of another protocol version, or malformed.

    """
    try:
        record = content.config_records[RECORD]
    except (KeyError, AttributeError) as exc:
        raise ProtocolError(f"{what}: not a securefed message (no `{RECORD}` record)") from exc
    return from_record(record, what=what)


def payload_size(content: Any) -> int:
    """Bytes of securefed payload in a ``RecordDict`` (keys and values; framing not counted)."""
    return sum(record_size(r) for r in content.config_records.values())


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """A float vector as little-endian float64 bytes."""
    return np.ascontiguousarray(vector, dtype="<f8").tobytes()


def vector_from_bytes(data: bytes, *, length: int | None = None, what: str) -> np.ndarray:
    """The inverse of :func:`vector_to_bytes`, refusing a wrong length or non-finite values."""
    if len(data) % 8:
        raise ProtocolError(f"{what}: {len(data)} bytes is not a float64 vector")
    out = np.frombuffer(data, dtype="<f8").astype(np.float64)
    if length is not None and out.shape[0] != length:
        raise ProtocolError(f"{what}: expected {length} values, got {out.shape[0]}")
    if not np.all(np.isfinite(out)):
        raise ProtocolError(f"{what}: holds NaN or infinity")
    return out
