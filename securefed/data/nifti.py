"""NIfTI segmentation subjects (modalities + label map) from a folder, read with TorchIO."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefed.data.bundle import ArraySplit, DatasetBundle
from securefed.data.partition import stratified_holdout
from securefed.data.patients import encode_ids, parse_regex, patient_from_name
from securefed.errors import ConfigError, DataError

__all__ = [
    "MAX_LABEL",
    "NIFTI_SUFFIXES",
    "holds_nifti",
    "load_nifti_segmentation",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")

#: Largest label value accepted in a label map. Larger values are almost always an "ignore"
#: index (255) or an intensity image saved as a label map, not a class.
MAX_LABEL = 31

_BRATS_RAW = frozenset({0, 1, 2, 4})  # BraTS up to 2021: 4 is enhancing tumour
_BRATS_MODALITY_ORDER = ("t1", "t1ce", "t2", "flair")
# How deep holds_nifti looks: ROOT/<hospital>/<subject>/<file> is three levels.
_SCAN_DEPTH = 3


@dataclass(frozen=True)
class _Subject:
    folder: Path
    group: str | None
    files: dict[str, Path]  # name (modality or label) -> file


def holds_nifti(root: str | Path) -> bool:
    """Whether ``root`` has a ``.nii``/``.nii.gz`` file within three folder levels."""
    stack = [(Path(root), 0)]
    while stack:
        folder, depth = stack.pop()
        for entry in _visible(folder):
            if entry.is_file() and _nifti_name(entry) is not None:
                return True
            if entry.is_dir() and depth + 1 < _SCAN_DEPTH:
                stack.append((entry, depth + 1))
    return False


def load_nifti_segmentation(
    *,
    root: str | Path,
    name: str | None = None,
    image_size: int | Sequence[int] = 64,
    modalities: Sequence[str] | None = None,
    label_name: str = "seg",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    brats: bool | None = None,
    group_by: str | None = None,
    unlabelled: bool = False,
) -> DatasetBundle:
    r"""Load NIfTI subjects from ``root`` into a segmentation :class:`DatasetBundle`.

    Layout (see ``docs/segmentation-data.md``): one folder per subject holding one 3-D file
    per modality and a label map, ``ROOT/<subject>/<modality>.nii.gz`` and
    ``ROOT/<subject>/<label_name>.nii.gz`` (``.nii`` also accepted), optionally grouped by
    hospital as ``ROOT/<hospital>/<subject>/...``; the hospital folders become the groups
    (sorted names, ids 0, 1, ...). A file name may repeat its subject folder's name as a
    prefix (BraTS: ``BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz`` is modality
    ``flair``). Hidden entries and non-NIfTI files (JSON sidecars, notes) are ignored.

    Each subject is read with TorchIO and preprocessed with
    :func:`~securefed.data.transforms.preprocess_transform`: canonical orientation, resize to
    ``image_size`` (label maps with nearest neighbour), foreground z-normalisation, and the
    foreground's 0.5-99.5 percentiles rescaled to [0, 1]. Channels follow ``modalities``.

    Labels: with ``brats=True``, or by default when the label values are a subset of
    {0, 1, 2, 4} that contains 4, the BraTS convention applies and 4 (enhancing tumour) is
    remapped to 3. ``brats=True`` also accepts already remapped {0, 1, 2, 3} maps. Otherwise
    the classes are 0 ... max label, named by number.

    Patients: every subject folder is one patient by default (``patients`` is the subject's
    index among all subjects, in every split). ``group_by="regex:PATTERN"`` reads the patient
    from the subject folder's name instead (a Python regex searched in the name, with one
    capture group or a named group ``patient``), merging several sessions of one patient:
    ``regex:^(sub-\d+)`` makes ``sub-01_ses-1`` and ``sub-01_ses-2`` one patient.

    Splits are carved by patient, deterministically by ``seed``: ``test_fraction`` and then
    ``val_fraction`` of the patients, stratified by hospital when there are hospitals (every
    hospital with at least two patients gives at least one; a patient counts in the hospital
    of its first subject folder), each split at least one patient. With one subject per
    patient (the default) this is the split by subject.

    Unlabelled subjects (``unlabelled=True``, ``--data-option unlabelled=true``): a subject
    folder without the label map is then read as an unlabelled subject, for
    ``--strategy teacher-student``: its label map is all zeros and its training record has
    ``labelled`` False (:class:`~securefed.data.bundle.ArraySplit`). Unlabelled subjects are
    only ever training records: the validation and test patients are carved from the
    patients whose every subject is labelled (the fractions are of those patients), and every
    other patient is a training patient. With any unlabelled subject every split carries
    ``labelled`` flags; without one the bundle is exactly the one read without the option.

    Args:
        root: The data folder.
        name: Data set name (default: the folder name).
        image_size: Target spatial shape: an int for a cube, or three ints.
        modalities: Modality names in channel order; default: every modality found, which
            every subject must have, in BraTS order (t1, t1ce, t2, flair) when the names are
            BraTS's, otherwise sorted.
        label_name: File name (without suffix) of the label map.
        seed: Seed of the split.
        val_fraction: Share of subjects for validation, in (0, 1).
        test_fraction: Share of subjects for testing, in (0, 1), with
            ``val_fraction + test_fraction < 1``.
        brats: True: BraTS labels required; False: generic labels; None: detect.
        group_by: ``regex:PATTERN`` on the subject folder names, or None (one patient per
            subject).
        unlabelled: Accept subjects without the label map as unlabelled training subjects.

    Returns:
        The bundle (``task="segmentation"``), with groups when hospital folders are used.

    Raises:
        DataError: Missing or unreadable files, a subject missing a modality or the label
            map, shapes or orientations that differ within a subject, non-integer, negative
            or out-of-range labels, constant images, too few patients, a subject folder the
            ``group_by`` pattern does not match, fewer than 3 patients with labels; the
            message names the file or folder.
        ConfigError: Bad arguments (``group_by`` other than ``regex:PATTERN``, ``unlabelled``
            not a bool).

    """
    root = Path(root).expanduser()
    shape = _target_shape(image_size)
    _check_fractions(val_fraction, test_fraction)
    if not isinstance(label_name, str) or not label_name:
        raise ConfigError(f"`label_name` must be a non-empty string (got {label_name!r}).")
    if brats not in (None, True, False):
        raise ConfigError(f"`brats` must be True, False or None (got {brats!r}).")
    if not isinstance(unlabelled, bool):
        raise ConfigError(f"--data-option unlabelled must be true or false (got {unlabelled!r}).")
    if group_by is not None and not (isinstance(group_by, str) and group_by.startswith("regex:")):
        raise ConfigError(
            f"--group-by {group_by!r}: for NIfTI folders use regex:PATTERN, matched against each "
            "subject folder's name (each subject is its own patient by default)."
        )
    pattern = None if group_by is None else parse_regex(group_by)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; securefed never downloads data.")

    subjects = _discover(root, label_name=label_name)
    if pattern is None:
        patients = np.arange(len(subjects), dtype=np.int64)
    else:
        names = [patient_from_name(pattern, s.folder.name, path=s.folder) for s in subjects]
        patients = encode_ids({"subjects": np.array(names, dtype=str)}, source=str(root))[
            "subjects"
        ]
    channels = _modalities(
        subjects, requested=modalities, label_name=label_name, unlabelled=unlabelled
    )
    n = len(subjects)
    has_label = np.array([label_name in s.files for s in subjects], dtype=bool)
    images = np.empty((n, len(channels), *shape), dtype=np.float32)
    labels = np.empty((n, *shape), dtype=np.int64)
    found: list[np.ndarray] = []
    for i, subject in enumerate(subjects):
        images[i], labels[i], values = _load_subject(
            subject, channels=channels, label_name=label_name, shape=shape
        )
        found.append(values)
    convention, num_classes = _label_convention(
        subjects, found, brats=brats, label_name=label_name, root=root
    )
    if convention == "brats":
        labels[labels == 4] = 3
        from securefed.data.segmentation import BRATS_CLASS_NAMES

        class_names = BRATS_CLASS_NAMES
    else:
        class_names = tuple(str(c) for c in range(num_classes))

    group_names = sorted({s.group for s in subjects if s.group is not None})
    groups = (
        np.array([group_names.index(s.group) for s in subjects], dtype=np.int64)
        if group_names
        else None
    )
    # Carve whole patients: the carving runs on one row per patient (its first subject's
    # hospital), then expands to the patient's subjects. Only patients whose every subject
    # is labelled can be held out (held-out metrics need label maps); the others train.
    ids, first = np.unique(patients, return_index=True)
    partly_unlabelled = np.unique(patients[~has_label])
    eligible = np.flatnonzero(~np.isin(ids, partly_unlabelled))
    unit = "subject" if ids.size == n else "patient"
    if eligible.size < ids.size and eligible.size < 3:
        raise DataError(
            f"{root}: found {eligible.size} labelled {unit}(s) and "
            f"{ids.size - eligible.size} with unlabelled subjects; need at least 3 labelled "
            "ones for train, val and test splits (unlabelled subjects only train)."
        )
    unit_splits = _carve(
        eligible.size,
        groups=None if groups is None else groups[first][eligible],
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        unit=unit,
    )
    _, val_units, test_units = (eligible[units] for units in unit_splits)
    train_units = np.setdiff1d(np.arange(ids.size), np.concatenate([val_units, test_units]))
    train_idx, val_idx, test_idx = (
        np.flatnonzero(np.isin(patients, ids[units])).astype(np.int64)
        for units in (train_units, val_units, test_units)
    )
    # Flags only when some subject is unlabelled: a fully labelled folder gives the same
    # bundle (and fingerprint) as without the option.
    flags = None if has_label.all() else has_label

    def split(idx: np.ndarray) -> ArraySplit:
        return ArraySplit(
            images=images[idx],
            labels=labels[idx],
            groups=None if groups is None else groups[idx],
            patients=patients[idx],
            labelled=None if flags is None else flags[idx],
        )

    return DatasetBundle(
        name=root.resolve().name if name is None else name,
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        num_classes=num_classes,
        class_names=class_names,
        source=(
            f"{root.resolve()} (NIfTI, {n} subjects{_patient_note(ids.size, n)}"
            f"{_unlabelled_note(int(n - has_label.sum()))}, "
            f"image_size={'x'.join(map(str, shape))}; "
            f"val {val_fraction:g}, test {test_fraction:g} of {_unit_name(ids.size, n)}, "
            f"seed={seed})"
        ),
        task="segmentation",
        label_convention=convention,
        group_names=tuple(group_names) if group_names else None,
    )


def _unlabelled_note(count: int) -> str:
    # Absent when every subject is labelled, so sources read as before the option existed.
    return f", {count} unlabelled" if count else ""


def _patient_note(n_patients: int, n_subjects: int) -> str:
    return "" if n_patients == n_subjects else f" of {n_patients} patients"


def _unit_name(n_patients: int, n_subjects: int) -> str:
    # The old wording when every subject is its own patient, so sources read as before.
    return "subjects" if n_patients == n_subjects else "patients"


def _target_shape(image_size: int | Sequence[int]) -> tuple[int, int, int]:
    dims = (image_size,) * 3 if isinstance(image_size, int) else tuple(image_size)
    if len(dims) != 3 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims
    ):
        raise ConfigError(
            f"`image_size` must be a positive int or three positive ints (got {image_size!r})."
        )
    return (dims[0], dims[1], dims[2])


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for field_name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ConfigError(f"`{field_name}` must be in (0, 1) (got {value!r}).")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"`val_fraction` + `test_fraction` must be below 1 "
            f"(got {val_fraction:g} + {test_fraction:g})."
        )


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _nifti_name(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and _nifti_name(p) is not None]


def _discover(root: Path, *, label_name: str) -> list[_Subject]:
    stray = _nifti_files(root)
    if stray:
        raise DataError(
            f"{stray[0]}: NIfTI file directly in the data folder; put each subject's files in "
            "its own folder, ROOT/<subject>/<modality>.nii.gz."
        )
    subjects: list[_Subject] = []
    layouts: dict[str, Path] = {}
    for entry in (p for p in _visible(root) if p.is_dir()):
        if _nifti_files(entry):
            subjects.append(_subject(entry, group=None))
            layouts.setdefault("subject", entry)
            continue
        members = [p for p in _visible(entry) if p.is_dir()]
        if not members:
            raise DataError(
                f"{entry}: holds no NIfTI files and no subject folders; expected "
                "ROOT/<subject>/*.nii.gz or ROOT/<hospital>/<subject>/*.nii.gz."
            )
        for member in members:
            if not _nifti_files(member):
                raise DataError(f"{member}: subject folder holds no .nii or .nii.gz files.")
            subjects.append(_subject(member, group=entry.name))
        layouts.setdefault("hospital", entry)
    if not subjects:
        raise DataError(f"{root}: no subject folders with NIfTI files found.")
    if len(layouts) > 1:
        raise DataError(
            f"{root}: mixes subject folders ({layouts['subject'].name}) with hospital folders "
            f"({layouts['hospital'].name}); use one layout for every subject."
        )
    return subjects


def _subject(folder: Path, *, group: str | None) -> _Subject:
    files: dict[str, Path] = {}
    for path in _nifti_files(folder):
        stem = _nifti_name(path) or ""
        for separator in ("_", "-"):
            prefix = folder.name + separator
            if stem.startswith(prefix) and len(stem) > len(prefix):
                stem = stem[len(prefix) :]
                break
        if stem in files:
            raise DataError(
                f"{path}: duplicates {files[stem].name} (both are '{stem}'); keep one of them."
            )
        files[stem] = path
    return _Subject(folder=folder, group=group, files=files)


def _modalities(
    subjects: list[_Subject],
    *,
    requested: Sequence[str] | None,
    label_name: str,
    unlabelled: bool = False,
) -> tuple[str, ...]:
    for subject in subjects:
        if label_name not in subject.files and not unlabelled:
            raise DataError(
                f"{subject.folder / (label_name + '.nii.gz')}: missing label map "
                f"(found: {', '.join(sorted(subject.files))}); every subject needs one, "
                "unless unlabelled subjects are asked for with --data-option unlabelled=true "
                "(for --strategy teacher-student)."
            )
    if requested is not None:
        channels = tuple(requested)
        if (
            isinstance(requested, str)
            or not channels
            or not all(isinstance(m, str) and m for m in channels)
            or len(set(channels)) != len(channels)
            or label_name in channels
        ):
            raise ConfigError(
                f"`modalities` must be distinct modality names, excluding the label map "
                f"'{label_name}' (got {requested!r})."
            )
    else:
        union = sorted({m for s in subjects for m in s.files} - {label_name})
        if not union:
            raise DataError(f"{subjects[0].folder}: no image files besides the label map.")
        known = [m for m in _BRATS_MODALITY_ORDER if m in union]
        channels = tuple(known) if len(known) == len(union) else tuple(union)
    for subject in subjects:
        for modality in channels:
            if modality not in subject.files:
                hint = "" if requested is not None else " (other subjects have it)"
                raise DataError(
                    f"{subject.folder / (modality + '.nii.gz')}: missing modality "
                    f"'{modality}'{hint}; add it or pass `modalities` to choose the ones to use."
                )
    return channels


def _nibabel_reader(path: Path) -> tuple[Any, np.ndarray]:
    """TorchIO reader through nibabel: NIfTI's reference library, which keeps NaNs visible.

    TorchIO's default reader goes through SimpleITK first, and ITK silently replaces NaN
    voxels with 0; a corrupt scan must be refused, not quietly repaired.
    """
    import nibabel as nib
    import torch

    image = nib.load(str(path), mmap=False)
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:  # (X, Y, Z, volumes) -> (volumes, X, Y, Z)
        data = np.moveaxis(data, -1, 0)
    else:
        raise ValueError(f"{data.ndim}-D image data, expected 3-D")
    return torch.from_numpy(np.ascontiguousarray(data)), np.asarray(image.affine)


def _read(image: Any, path: Path) -> np.ndarray:
    try:
        image.load()
        data = image.data.numpy()
    except Exception as exc:  # nibabel raises many unrelated types (gzip, zlib, header errors)
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc}).") from None
    if data.ndim != 4 or data.shape[0] != 1:
        raise DataError(
            f"{path}: holds {data.shape[0]} volumes (shape {data.shape[1:]} x {data.shape[0]}); "
            "expected one 3-D volume per file."
        )
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: contains NaN or infinite values.")
    return data[0]


def _load_subject(
    subject: _Subject, *, channels: tuple[str, ...], label_name: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch
    import torchio as tio

    from securefed.data.transforms import preprocess_transform

    reference_name = "the label map's"
    if label_name in subject.files:
        label_path = subject.files[label_name]
        label = tio.LabelMap(label_path, reader=_nibabel_reader)
        raw_label = _read(label, label_path)
        if not np.array_equal(raw_label, np.round(raw_label)):
            raise DataError(f"{label_path}: label map holds non-integer values.")
        values = np.unique(raw_label).astype(np.int64)
        if values[0] < 0 or values[-1] > MAX_LABEL:
            bad = values[0] if values[0] < 0 else values[-1]
            raise DataError(f"{label_path}: label {bad} is out of range [0, {MAX_LABEL}].")
    else:
        # An unlabelled subject: its first modality is the reference the others must match,
        # and a zero map on its grid goes through the same preprocessing as a real one.
        label_path = subject.files[channels[0]]
        reference_name = "the first modality's"
        reference = tio.ScalarImage(label_path, reader=_nibabel_reader)
        raw_label = np.zeros_like(_read(reference, label_path))
        label = tio.LabelMap(
            tensor=torch.from_numpy(raw_label[None].astype(np.int64)), affine=reference.affine
        )
        values = np.zeros(0, dtype=np.int64)  # no class: the convention comes from the others
    images: dict[str, Any] = {}
    for modality in channels:
        path = subject.files[modality]
        image = tio.ScalarImage(path, reader=_nibabel_reader)
        data = _read(image, path)
        if data.shape != raw_label.shape:
            raise DataError(
                f"{path}: shape {data.shape} differs from {reference_name} {raw_label.shape} "
                f"({label_path.name})."
            )
        if not np.allclose(image.affine, label.affine, atol=1e-3):
            raise DataError(
                f"{path}: its voxel-to-world affine differs from {reference_name} "
                f"({label_path.name}); the images must be co-registered."
            )
        if float(data.max()) == float(data.min()):
            raise DataError(f"{path}: the image is constant ({float(data.min())}).")
        images[modality] = image
    names = dict(zip(channels, (f"image_{i}" for i in range(len(channels))), strict=True))
    tio_subject = tio.Subject(
        {names[m]: images[m] for m in channels} | {"label": label}
    )  # TorchIO keys must not clash with Subject attributes, hence neutral names
    try:
        out = preprocess_transform(target_shape=shape)(tio_subject)
    except RuntimeError as exc:
        raise DataError(f"{subject.folder}: preprocessing failed ({exc}).") from None
    stacked = np.stack([out[names[m]].data.numpy()[0] for m in channels]).astype(np.float32)
    if not np.all(np.isfinite(stacked)):
        raise DataError(
            f"{subject.folder}: preprocessing gave non-finite intensities (an image with a "
            "single foreground voxel?)."
        )
    result_label = np.rint(out["label"].data.numpy()[0]).astype(np.int64)
    return stacked, result_label, values


def _label_convention(
    subjects: list[_Subject],
    found: list[np.ndarray],
    *,
    brats: bool | None,
    label_name: str,
    root: Path,
) -> tuple[str | None, int]:
    union = set().union(*(set(v.tolist()) for v in found))
    if not union:
        raise DataError(f"{root}: no subject has a label map; segmentation needs labelled ones.")
    if brats is None:
        brats = 4 in union and union <= _BRATS_RAW
    if brats:
        for subject, values in zip(subjects, found, strict=True):
            bad = sorted(set(values.tolist()) - {0, 1, 2, 3, 4})
            if bad:
                raise DataError(
                    f"{subject.files[label_name]}: label {bad[0]} is not a BraTS label "
                    "(0, 1, 2, 4, or 3 for enhancing tumour once remapped)."
                )
        if {3, 4} <= union:
            first = next(
                s.files[label_name]
                for s, v in zip(subjects, found, strict=True)
                if 3 in v.tolist() or 4 in v.tolist()
            )
            raise DataError(
                f"{first}: the label maps mix BraTS label 4 and label 3 for enhancing tumour; "
                "use one convention for every subject."
            )
        return "brats", 4
    num_classes = max(union) + 1
    if num_classes < 2:
        raise DataError(
            f"{root}: every label map is empty (all 0); "
            "segmentation needs at least one foreground class."
        )
    return None, num_classes


def _carve(
    n: int,
    *,
    groups: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    unit: str = "subject",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if n < 3:
        raise DataError(f"found {n} {unit}(s); need at least 3 for train, val and test splits.")
    rng = np.random.default_rng(seed)
    pool = np.arange(n, dtype=np.int64)
    test = _holdout(pool, groups, fraction=test_fraction, keep=2, rng=rng)
    pool = np.setdiff1d(pool, test)
    val = _holdout(pool, groups, fraction=val_fraction / (1.0 - test_fraction), keep=1, rng=rng)
    train = np.setdiff1d(pool, val)
    return train, val, test


def _holdout(
    pool: np.ndarray,
    groups: np.ndarray | None,
    *,
    fraction: float,
    keep: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Hold out ``fraction`` of ``pool`` (by group when known): at least one, leaving ``keep``.

    Stratifying by hospital gives every hospital with two or more subjects held-out subjects
    of its own, so per-site validation measures each hospital; when that is impossible (one
    subject per hospital) the subjects are drawn uniformly.
    """
    if groups is not None:
        seed = int(rng.integers(2**63))
        _, held = stratified_holdout(groups[pool], fraction=fraction, seed=seed)
        if 0 < held.size <= pool.size - keep:
            return np.sort(pool[held])
    n_out = min(max(int(round(fraction * pool.size)), 1), pool.size - keep)
    return np.sort(rng.permutation(pool)[:n_out])
