"""The privacy report (``privacy.json``): schema, canonical hashing, reading and writing."""

from __future__ import annotations

import hashlib
import json
import math
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from securefed.errors import AuditError

__all__ = [
    "GUARANTEES",
    "NO_GUARANTEE",
    "SCHEMA_VERSION",
    "COLLUSION_BOUND_FROM",
    "THREAT_MODEL",
    "report_texts",
    "canonical_json",
    "report_hash",
    "json_ready",
    "malformed_as_audit_error",
    "write_json",
    "file_sha256",
    "read_json",
]

#: Bump the minor version for added keys, the major version for changed or removed ones.
#: privacy.json and config.json share it. 3.0: `transfer.frozen_parameters` counts scalars.
#: 3.1 (additive): the masking ring's choice and error bound; an optional `empirical` block
#: (audit runs) in privacy.json and `audit_canaries` in config.json (docs/schemas.md).
#: 3.2 (additive): `privacy_unit` may be "patient" (with its `guarantee`, `sampling` and
#: `clipping` wording); config.json's run gains `privacy_unit` and `group_by`.
#: 3.3 (additive): config.json's run gains `auto_rule` (the --model auto rule it ran with).
#: 3.4 (additive): config.json's run gains `lr_schedule`, `fair_q`, `fair_step`,
#: `fair_loss_noise` (q-FFL), `logit_adjust` and `prior_noise`; events may have phases
#: `fair-loss` and `class-prior`, and such runs' clients carry `fair_loss_releases` and
#: `class_prior_releases`.
#: 3.5 (additive): config.json's run gains `teacher` (teacher-student's: "fixed", the
#: --pretrained model in every round, or "global"; a run recorded before it ran "global").
#: 3.6 (additive): config.json's run gains `twin_privacy` ("dp", the only kind before, or
#: "local": twins trained without DP, no `personalize` events, their metrics declared outside
#: epsilon); privacy.json's strategy gains `twin_privacy`.
#: 3.7 (wording): `threat_model` states the masking bound of at most m - 2 colluders, and
#: `tolerated_colluders` uses it. `securefed audit` compares `guarantee`, `sampling`,
#: `clipping`, `dp_applies_to` and `threat_model` with the texts the run implies
#: (:func:`report_texts`) for reports of code from 3.6 on.
#: 3.8: the ``close`` block (the run's last round, the model files' SHA-256, the pinned roster)
#: and each DP site's ``close_signature`` over it with its claim; site claims are signed under
#: the v2 domain (:mod:`securefed.dp.signing`).
#: 3.9 (additive): config.json's run may carry `auto_rule` 3 (DP 2D classification picks
#: ``scatter-linear`` at every image size, not only above 64 px).
#: 3.10 (additive): config.json's run gains `sigma_search` (2: sigma found by a safeguarded
#: secant; a run without it bisected, search 1), with which the audit re-derives sigma.
#: 3.11 (additive): config.json's run gains `calibration_clip` (the decision calibration's R;
#: null: by model, 16 for scatter-linear, 4 otherwise; a run without it released with R = 4),
#: which the audit checks each release's C against.
#: 3.12 (additive): config.json's run gains `ring_auto_rule` (2: --secagg-ring-bits auto takes
#: the smallest ring of 8 to 64 bits within its tolerance, packed k bits a value; a run without
#: it chose between 32 and 64 bits, rule 1); masking's `ring_bits` may be any of 8 to 64 and its
#: `word_bytes` the bytes a value takes on the wire (k / 8, e.g. 3.75 for 30 bits).
SCHEMA_VERSION = "3.12"
#: The first schema whose `tolerated_colluders` uses the m - 2 bound (the audit names the old
#: formula when an older report's figure is one too many).
COLLUSION_BOUND_FROM = (3, 7)

THREAT_MODEL = (
    "(epsilon, delta)-DP per site and per privacy unit ('privacy_unit': one training record, or "
    "all of one patient's records) for replace-one adjacency: each site's DP-SGD guarantee "
    "covers the substitution of any one of its units, against anyone who "
    "sees everything the site releases (the server included: every field is listed in "
    "'disclosures' with its protection), accounted over all its steps in all rounds; sites do "
    "not gain amplification from being sampled by the server. The DP noise and the Poisson "
    "sampling come from a CSPRNG keyed at the site (never from the run's seed) unless 'noise' "
    "is 'reproducible'. Each site signs its privacy claim (Ed25519). Secure aggregation, "
    "'mask': the server may deviate from the protocol (swap keys, lie about dropouts or the "
    "round size, tamper with shares, replay messages); each site checks its peers' signed keys "
    "against the federation's signed roster, pins n, t and the minimum number of contributors, "
    "and reveals shares only after t matching signatures over the survivor list, so the server "
    "learns only the sum of a round unless it colludes with 2t - m of a site's m share holders, "
    "or with m - 1 of them ('tolerated_colluders' in 'secure_aggregation_params' states how "
    "many it survives, counted anywhere in the federation under SecAgg+; a roster "
    "threshold below floor(2m/3) + 1 trades it for dropouts). 'he': each site signs its "
    "ciphertext; the decrypting site adds the signed ciphertexts of at least its pinned minimum "
    "of roster sites itself, at one site per round fixed by the session and the round, and "
    "floods the sum it returns against key recovery, so an active server cannot present one "
    "site's ciphertext as a sum or difference two sums of a round; a site "
    "colluding with the server can still contribute an encryption of zero, and one colluding "
    "key holder reads every update. A site's update counts only within the run's update bound "
    "(--update-clip); up to n - t sites may drop out of a round; a network observer sees only "
    "encrypted traffic in a deployment. Out of scope: Byzantine sites inside the update bound, "
    "side channels other than the reply timing listed in 'disclosures', and a patient's "
    "several records (group privacy)."
)


#: ``threat_model`` as reports of schema 3.6 wrote it (before the m - 1 masking bound).
THREAT_MODEL_3_6 = THREAT_MODEL.replace(
    "of a site's m share holders, or with m - 1 of them ('tolerated_colluders' in "
    "'secure_aggregation_params' states how many it survives, counted anywhere in the "
    "federation under SecAgg+; a roster ",
    "of a site's m share holders ('tolerated_colluders' in 'secure_aggregation_params' states "
    "how many it survives; a roster ",
)

#: privacy.json ``guarantee``, by ``privacy_unit``.
GUARANTEES = {
    "record": (
        "record-level (epsilon, delta)-DP per site, over all rounds, for replace-one "
        "adjacency (one training record substituted by any other). A patient with k "
        "records is protected at group size k (about k x epsilon), not at epsilon."
    ),
    "patient": (
        "patient-level (epsilon, delta)-DP per site, over all rounds, for replace-one "
        "adjacency over patients (all of one patient's training records at the site "
        "substituted by any other patient's, whatever their number): Poisson sampling "
        "over patients, each sampled patient's mean gradient clipped to C. It holds as far "
        "as the site's patient ids (--group-by) are right: two ids for one patient are two "
        "units."
    ),
}
NO_GUARANTEE = "none: this run makes no DP claim"


def report_texts(
    *, dp: bool, unit: str, frozen: bool, teacher_student: bool, local_twins: bool
) -> dict[str, str | None]:
    """privacy.json's fixed texts as the run implies them: the run writes them, the audit checks.

    Args:
        dp: Whether the run trains with DP.
        unit: ``privacy_unit`` (``record`` or ``patient``).
        frozen: Whether some parameters were frozen (transfer learning).
        teacher_student: ``--strategy teacher-student``.
        local_twins: ``--twin-privacy local`` with DP.

    """
    patient = unit == "patient"
    return {
        "guarantee": GUARANTEES[unit] if dp else NO_GUARANTEE,
        "sampling": ("poisson over patients" if patient else "poisson") if dp else "shuffle",
        "clipping": (
            ("flat L2 of each patient's mean gradient" if patient else "flat per-sample L2")
            if dp
            else None
        ),
        "dp_applies_to": (
            "trainable parameters only (frozen parameters never change and are never sent)"
            if frozen
            else "all model parameters"
        )
        + (
            "; teacher-student: the pseudo-labels are computed at each site from its private "
            "unlabelled volumes, so training on them is training on private data: it is DP-SGD "
            "(each volume one sample, clipped and noised with the labelled ones) and every "
            "step is in the site's events"
            if teacher_student
            else ""
        )
        + (
            "; not the digital twins: --twin-privacy local fine-tunes them without DP. A twin "
            "never leaves its site; its primary held-out metric, sent once after the last "
            "round, is the one release outside epsilon (disclosures: outside-epsilon)"
            if local_twins
            else ""
        ),
        "threat_model": THREAT_MODEL,
    }


def json_ready(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` (JSON has no NaN/inf) recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> bytes:
    """Canonical bytes of a JSON value: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def report_hash(*, privacy: dict[str, Any], config: Any, metrics: Any) -> str:
    """SHA-256 binding the report body (without its ``sha256`` key), config and metrics.

    An unkeyed hash detects edits made without recomputing it (an accidental or naive
    change to any of the three files); it is not a signature. Keep a copy of the hash
    somewhere the run's operator cannot write to detect a deliberate rewrite.
    """
    body = {k: v for k, v in privacy.items() if k != "sha256"}
    digest = hashlib.sha256()
    for part in (body, config, metrics):
        blob = canonical_json(part)
        digest.update(len(blob).to_bytes(8, "big"))
        digest.update(blob)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-finite floats become null), atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


@contextmanager
def malformed_as_audit_error(where: object, what: str = "report") -> Iterator[None]:
    """Turn what a malformed input raises inside the audit's checks into one :class:`AuditError`.

    A value no run writes (NaN, a wrong type, a number past a range, a structure too deep or
    too large to hold) then ends the audit with exit 2 and one line naming ``where``, never a
    traceback.
    """
    try:
        yield
    except AuditError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RecursionError,
        OverflowError,
        MemoryError,
    ) as exc:
        raise AuditError(
            f"{where}: malformed {what} ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


#: The largest report file read (a run's privacy.json or metrics.json is far below it).
MAX_JSON_BYTES = 64 * 2**20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (model files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key written twice.

    Python keeps the last of two equal keys, other readers the first: a report could show
    one value to the audit (and its hash) and another to a reader.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def read_json(path: Path) -> Any:
    """Read a JSON file; any failure is an :class:`AuditError` naming the file.

    Only a regular file of at most :data:`MAX_JSON_BYTES` is read: a report linked to
    ``/dev/zero`` or a huge file would otherwise fill memory before parsing fails.
    """
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"{path}: not a regular file")
        if info.st_size > MAX_JSON_BYTES:
            raise AuditError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB")
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise AuditError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB")
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except AuditError:
        raise
    except FileNotFoundError as exc:
        raise AuditError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: malformed JSON, or an integer past Python's digit limit.
        raise AuditError(f"{path}: not readable JSON ({str(exc)[:200]})") from exc
