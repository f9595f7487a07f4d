"""Patient ids for the loaders: ``--group-by`` specs, id encoding and carving by patient.

Patient-level DP counts all of a patient's records as one privacy unit, so every loader can
attach a patient id to each record (:attr:`~securefed.data.bundle.ArraySplit.patients`). This
module holds what the loaders share: parsing ``regex:PATTERN`` specs, reading a
``file,patient`` CSV, turning raw ids (integers or strings) into int64 codes that agree across
splits, and holding out whole patients when a loader carves a split.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from securefed.data.partition import stratified_holdout
from securefed.errors import ConfigError, DataError

__all__ = [
    "REGEX_PREFIX",
    "encode_ids",
    "holdout_by_patient",
    "parse_regex",
    "patient_from_name",
    "read_patient_csv",
]

#: Prefix of a ``--group-by`` spec that reads the patient id from a name.
REGEX_PREFIX = "regex:"


def parse_regex(spec: str) -> re.Pattern[str]:
    """Compile the pattern of a ``regex:PATTERN`` spec.

    The pattern must have a named group ``patient`` (other groups are then ignored) or exactly
    one capture group: with two unnamed groups, which one is the patient would be a guess.

    Raises:
        ConfigError: Not a ``regex:`` spec, an invalid pattern, or the wrong groups.

    """
    if not spec.startswith(REGEX_PREFIX):
        raise ConfigError(f"--group-by {spec!r}: expected regex:PATTERN.")
    text = spec[len(REGEX_PREFIX) :]
    try:
        pattern = re.compile(text)
    except re.error as exc:
        raise ConfigError(f"--group-by {spec!r}: invalid regular expression ({exc}).") from None
    if "patient" not in pattern.groupindex and pattern.groups != 1:
        raise ConfigError(
            f"--group-by {spec!r}: the pattern must have exactly one capture group or a named "
            f"group (?P<patient>...) (it has {pattern.groups} capture groups)."
        )
    return pattern


def patient_from_name(pattern: re.Pattern[str], name: str, *, path: Path | str) -> str:
    """The patient id ``pattern`` finds in ``name`` (searched, not anchored).

    Raises:
        DataError: The name does not match, or the group matched nothing; names ``path``.

    """
    match = pattern.search(name)
    group = "patient" if "patient" in pattern.groupindex else 1
    value = match.group(group) if match else None
    if not value:
        raise DataError(
            f"{path}: name {name!r} does not match the --group-by pattern {pattern.pattern!r} "
            "(or its patient group is empty); every file must name its patient."
        )
    return value


def read_patient_csv(path: Path, *, root: Path) -> dict[str, str]:
    """Read a ``file,patient`` CSV (with header) into ``{file relative to root: patient}``.

    File paths use ``/`` separators and are normalised (``./a/b.png`` is ``a/b.png``). Extra
    columns are ignored.

    Raises:
        DataError: Unreadable file, missing columns, an empty or absolute file or patient,
            or a file listed twice; the message names the CSV and its line.

    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "file" not in columns or "patient" not in columns:
                raise DataError(
                    f"{path}: needs a header with columns file,patient "
                    f"(found: {','.join(columns) or 'no header'})."
                )
            reader.fieldnames = columns
            table: dict[str, str] = {}
            for row in reader:
                line = reader.line_num
                file = (row.get("file") or "").strip().replace("\\", "/")
                patient = (row.get("patient") or "").strip()
                if not file or not patient:
                    raise DataError(f"{path}: line {line}: empty file or patient.")
                if file.startswith("/"):
                    raise DataError(
                        f"{path}: line {line}: {file!r} must be relative to the data folder {root}."
                    )
                key = Path(file).as_posix()
                if key in table:
                    raise DataError(f"{path}: line {line}: {key} is listed twice.")
                table[key] = patient
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the patient CSV ({exc}).") from None
    return table


def encode_ids(
    ids: Mapping[str, np.ndarray | Sequence[str]], *, source: str
) -> dict[str, np.ndarray]:
    """Map raw patient ids of several splits to int64 codes that agree across the splits.

    The codes are the ranks of the ids among every distinct id of every split (so integer ids
    keep their order, and one id in two splits gets one code). String ids are compared after
    Unicode NFC normalisation and stripping surrounding white space.

    Args:
        ids: Per split, its 1-D raw ids: integers, or strings (str or bytes).
        source: What to name in errors (the file).

    Raises:
        DataError: Ids that are neither integers nor strings, empty strings, or integer ids
            in one split and strings in another.

    """
    arrays: dict[str, np.ndarray] = {}
    for split, raw in ids.items():
        array = np.asarray(raw)
        if array.dtype.kind == "S":
            try:
                array = np.char.decode(array, "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{source}: `{split}` patient ids are not UTF-8.") from None
        if array.dtype.kind not in "iuU" or array.ndim != 1:
            raise DataError(
                f"{source}: `{split}` patient ids must be a 1-D array of integers or strings "
                f"(got dtype {array.dtype}, shape {array.shape})."
            )
        if array.dtype.kind == "U" and array.size:
            # One patient, one id: " P1" and "P1", or "é" composed and decomposed, are the same
            # patient in a hospital export, and would be two units (each at epsilon) otherwise.
            array = np.array(
                [unicodedata.normalize("NFC", str(v)).strip() for v in array], dtype=str
            )
        if array.dtype.kind == "U" and array.size and not np.all(np.char.str_len(array) > 0):
            raise DataError(f"{source}: `{split}` patient ids contain an empty string.")
        arrays[split] = array
    kinds = {"U" if a.dtype.kind == "U" else "int" for a in arrays.values()}
    if len(kinds) > 1:
        raise DataError(
            f"{source}: patient ids are integers in some splits and strings in others; use one "
            "kind so that one patient has one id."
        )
    if kinds == {"int"}:
        # One integer dtype: concatenating uint64 with int64 would give float64 and merge ids.
        for split, array in arrays.items():
            if array.dtype.kind == "u" and array.size and int(array.max()) >= 2**63:
                raise DataError(f"{source}: `{split}` patient ids exceed the int64 range.")
        arrays = {split: array.astype(np.int64) for split, array in arrays.items()}
    distinct = np.unique(np.concatenate(list(arrays.values())))
    return {
        split: np.searchsorted(distinct, array).astype(np.int64) for split, array in arrays.items()
    }


def holdout_by_patient(
    labels: np.ndarray, patients: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of the patients, stratified by each patient's first label.

    The whole-patient counterpart of
    :func:`~securefed.data.partition.stratified_holdout`: a patient's records all stay on
    one side, so no patient is in both splits.

    Args:
        labels: (N,) class labels of the records.
        patients: (N,) patient codes of the records.
        fraction: Share of patients held out, in (0, 1).
        seed: Seed of the choice.

    Returns:
        Sorted int64 record indices ``(kept, held_out)``, disjoint, covering every record.

    """
    ids, first = np.unique(patients, return_index=True)
    _, held_units = stratified_holdout(labels[first], fraction=fraction, seed=seed)
    held_out = np.flatnonzero(np.isin(patients, ids[held_units])).astype(np.int64)
    kept = np.setdiff1d(np.arange(patients.size, dtype=np.int64), held_out)
    return kept, held_out
