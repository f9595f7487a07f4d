"""The in-memory data model every loader builds: validated splits and a fingerprinted bundle.

Loaders (:mod:`~securefed.data.medmnist`, :mod:`~securefed.data.nifti`, ...) import these types
from here; the dispatcher :mod:`securefed.data.dataset` imports the loaders. Keeping the types
apart from the dispatcher is what lets the arrows point one way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

__all__ = [
    "LABEL_CONVENTIONS",
    "SPLITS",
    "TASKS",
    "ArraySplit",
    "DatasetBundle",
    "resolve_classes",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Learning tasks a bundle can hold.
TASKS: tuple[str, ...] = ("classification", "segmentation")

#: Accepted ``DatasetBundle.label_convention`` values (None: no convention).
LABEL_CONVENTIONS: tuple[str | None, ...] = (None, "brats")

# Version tag of the fingerprint byte layout; bump it if the layout ever changes so old and
# new fingerprints can never be confused.
_FINGERPRINT_TAG = b"securefed.dataset.fingerprint.v1\n"


@dataclass(frozen=True, eq=False)
class ArraySplit:
    """One split of a classification or segmentation data set, held in memory.

    Attributes:
        images: float32 array of shape (N, C, H, W) or (N, C, D, H, W), values in [0, 1].
            Normalisation is the model's job, so the data stay interpretable as pixels.
        labels: int64, non-negative. Classification: shape (N,), one class index per sample.
            Segmentation: shape (N, *spatial), one label map per sample with the images'
            spatial shape ((N, H, W) or (N, D, H, W)).
        groups: Optional int64 array of shape (N,), non-negative: the acquisition site
            (hospital, scanner) each sample came from. ``by-group`` partitioning uses it.
        patients: Optional int64 array of shape (N,), non-negative: the patient each record
            belongs to (ids need not be contiguous). Patient-level DP treats all of a
            patient's records as one privacy unit, and site partitioning keeps them at one
            site. None means every record is its own unit.
        labelled: Optional bool array of shape (N,): whether each record has a true label
            map. False marks an unlabelled record (segmentation subjects without a label map,
            read with the NIfTI loader's ``unlabelled`` option): its label map is all zeros
            and means nothing, so only ``--strategy teacher-student`` may train on it, and
            held-out splits never hold one. None means every record is labelled.

    The arrays are stored as read-only views, so code handed a split cannot alter it and a
    bundle's fingerprint keeps describing the data a run used (the loaders build fresh arrays,
    so no writable alias survives them). Splits compare by identity.

    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    patients: np.ndarray | None = None
    labelled: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.float32:
            raise DataError(
                "`images` must be a float32 numpy array "
                f"(got {type(images).__name__} of dtype {getattr(images, 'dtype', None)})."
            )
        if images.ndim not in (4, 5):
            raise DataError(
                "`images` must have shape (N, C, H, W) or (N, C, D, H, W) "
                f"(got shape {images.shape})."
            )
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim < 1:
            raise DataError(
                "`labels` must be an int64 numpy array of shape (N,) or (N, *spatial) "
                f"(got dtype {getattr(labels, 'dtype', None)}, "
                f"shape {getattr(labels, 'shape', None)})."
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"`images` and `labels` must have the same length "
                f"(got {images.shape[0]} images and {labels.shape[0]} labels)."
            )
        if labels.ndim > 1 and labels.shape[1:] != images.shape[2:]:
            raise DataError(
                f"`labels` label maps must have the images' spatial shape {images.shape[2:]} "
                f"(got labels of shape {labels.shape} for images of shape {images.shape})."
            )
        if labels.shape[0] == 0:
            raise DataError("A split must hold at least one sample (got 0).")
        if min(images.shape[1:]) < 1:
            raise DataError(f"`images` has an empty axis (shape {images.shape}).")
        # min and max already see every non-finite value (NaN propagates, +-Inf is an
        # extreme), so a clean split pays for no extra pass; the count is made only to refuse.
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(_non_finite_message(images))
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"`images` values must be finite and in [0, 1] (got [{lo}, {hi}]).")
        if int(labels.min()) < 0:
            raise DataError(f"`labels` must be non-negative (got {int(labels.min())}).")
        # Optional per-record arrays: (field, dtype, kind named in errors).
        for field_name, dtype, kind in (
            ("groups", np.int64, "int64"),
            ("patients", np.int64, "int64"),
            ("labelled", np.bool_, "bool"),
        ):
            ids = getattr(self, field_name)
            if ids is None:
                continue
            if not isinstance(ids, np.ndarray) or ids.dtype != dtype or ids.ndim != 1:
                raise DataError(
                    f"`{field_name}` must be None or a 1-D {kind} numpy array "
                    f"(got dtype {getattr(ids, 'dtype', None)}, "
                    f"shape {getattr(ids, 'shape', None)})."
                )
            if ids.shape[0] != labels.shape[0]:
                raise DataError(
                    f"`{field_name}` must hold one entry per sample "
                    f"(got {ids.shape[0]} entries for {labels.shape[0]} samples)."
                )
            if dtype is np.int64 and int(ids.min()) < 0:
                raise DataError(f"`{field_name}` must be non-negative (got {int(ids.min())}).")
            object.__setattr__(self, field_name, _read_only(ids))
        object.__setattr__(self, "images", _read_only(images))
        object.__setattr__(self, "labels", _read_only(labels))

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.labels.shape[0])

    @property
    def task(self) -> str:
        """``"segmentation"`` when the labels are label maps, else ``"classification"``."""
        return "segmentation" if self.labels.ndim > 1 else "classification"

    def class_counts(self, *, num_classes: int) -> np.ndarray:
        """Count samples per class, as an int64 array of length ``num_classes``.

        Classification: the number of samples of each class. Segmentation: the number of
        samples whose label map contains the class at least once (so the counts can sum to
        more than N, and class 0 usually counts every sample).
        """
        if self.labels.ndim == 1:
            return np.bincount(self.labels, minlength=num_classes).astype(np.int64)
        flat = self.labels.reshape(len(self), -1)
        width = max(num_classes, int(flat.max()) + 1)
        present = np.zeros(width, dtype=np.int64)
        for row in flat:
            present += np.bincount(row, minlength=width) > 0
        return present

    def group_counts(self) -> dict[int, int]:
        """Samples per group, ``{group: count}`` in group order; empty without groups."""
        if self.groups is None:
            return {}
        ids, counts = np.unique(self.groups, return_counts=True)
        return {int(g): int(c) for g, c in zip(ids, counts, strict=True)}

    def patient_count(self) -> int:
        """Distinct patients; ``len(self)`` without ids, since then every record is a unit."""
        if self.patients is None:
            return len(self)
        return int(np.unique(self.patients).size)

    def units(self) -> list[np.ndarray]:
        """The privacy units: record indices of each patient, in ascending patient id order.

        One sorted int64 index array per distinct id; without ``patients`` every record is its
        own unit (``[array([0]), array([1]), ...]``). O(N log N): one stable sort, then a
        split at the id boundaries.
        """
        if self.patients is None:
            return [np.array([i], dtype=np.int64) for i in range(len(self))]
        order = np.argsort(self.patients, kind="stable").astype(np.int64)
        ordered = self.patients[order]
        bounds = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        return np.split(order, bounds)

    @property
    def unlabelled_count(self) -> int:
        """Records without a true label map (``labelled`` False); 0 without flags."""
        if self.labelled is None:
            return 0
        return int(self.labelled.size - np.count_nonzero(self.labelled))

    def subset(self, *, indices: np.ndarray) -> ArraySplit:
        """Return a new split holding the samples at ``indices`` (e.g. one site's partition)."""
        idx = np.asarray(indices, dtype=np.int64)
        groups = None if self.groups is None else self.groups[idx]
        patients = None if self.patients is None else self.patients[idx]
        labelled = None if self.labelled is None else self.labelled[idx]
        return ArraySplit(
            images=self.images[idx],
            labels=self.labels[idx],
            groups=groups,
            patients=patients,
            labelled=labelled,
        )

    def to_torch(self) -> TensorDataset:
        """Wrap as a torch ``TensorDataset`` of ``(image float32, label int64)`` tensors.

        Labels have shape () for classification and the spatial shape for segmentation.
        The tensors are copies: torch cannot wrap the read-only arrays without a warning,
        and training code must not be able to alter the fingerprinted data.
        """
        import torch
        from torch.utils.data import TensorDataset

        return TensorDataset(torch.tensor(self.images), torch.tensor(self.labels))


def _labelled_class_counts(split: ArraySplit, num_classes: int) -> list[int]:
    """:meth:`ArraySplit.class_counts` over the labelled records alone.

    An unlabelled record's zero map holds no class, so it would inflate the background count.
    """
    if not split.unlabelled_count:
        return split.class_counts(num_classes=num_classes).tolist()
    if split.unlabelled_count == len(split):
        return [0] * num_classes
    labelled = split.subset(indices=np.flatnonzero(split.labelled))
    return labelled.class_counts(num_classes=num_classes).tolist()


def _non_finite_message(images: np.ndarray) -> str:
    """Say how many image values are NaN or infinite, and the first record holding one."""
    finite = np.isfinite(images.reshape(images.shape[0], -1))
    bad_records = np.flatnonzero(~finite.all(axis=1))
    count = int(finite.size - np.count_nonzero(finite))
    return (
        f"`images` hold {count} non-finite value(s) (NaN or +-Inf) of {finite.size}, in "
        f"{bad_records.size} record(s), the first record {int(bad_records[0])}; "
        "values must be finite and in [0, 1]."
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(array).view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A classification or segmentation data set with train/val/test splits and provenance.

    Attributes:
        name: Data set name (e.g. ``"pneumoniamnist"``, ``"synthetic"``).
        train: Training split (partitioned across sites).
        val: Validation split (held out; used for per-site and global validation).
        test: Test split (held out; used only for the final evaluation).
        num_classes: Number of classes K; every label (or label-map voxel) is in [0, K).
            For segmentation class 0 is the background.
        class_names: K human-readable class names.
        source: Where the data came from: a resolved file or folder path, or
            ``"synthetic(seed=...)"``.
        task: ``"classification"`` (labels (N,)) or ``"segmentation"`` (label maps
            (N, *spatial)); every split must match it.
        label_convention: None, or ``"brats"``: K = 4 with 0 background, 1 necrotic /
            non-enhancing tumour core, 2 peritumoural oedema, 3 enhancing tumour (BraTS label
            4, remapped to 3). It tells the metrics how to form the BraTS regions.
        group_names: Optional names of the acquisition groups (hospitals), indexed by group
            id. Requires groups; every group id must be below its length.
        in_channels: C, derived from the images.
        spatial_dims: 2 for (C, H, W) images, 3 for (C, D, H, W) volumes.
        image_shape: Spatial shape, (H, W) or (D, H, W).
        fingerprint: SHA-256 hex digest of every split's arrays (layout in
            :meth:`compute_fingerprint`), so a privacy report can pin the exact data. Bundles
            compare by identity; compare fingerprints to compare data.

    Either every split carries ``groups`` or none does. ``patients`` may be on the training
    split alone (patient-level DP needs them there; held-out splits often lack ids), but a
    held-out split with patients needs a training split with them too. Unlabelled records
    (``labelled`` False) may only be in ``train``.

    """

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    num_classes: int
    class_names: tuple[str, ...]
    source: str
    task: str = "classification"
    label_convention: str | None = None
    group_names: tuple[str, ...] | None = None
    in_channels: int = field(init=False)
    spatial_dims: int = field(init=False)
    image_shape: tuple[int, ...] = field(init=False)
    fingerprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"`name` must be a non-empty string (got {self.name!r}).")
        if self.task not in TASKS:
            raise DataError(f"`task` must be one of {', '.join(TASKS)} (got {self.task!r}).")
        for split in SPLITS:
            if not isinstance(getattr(self, split), ArraySplit):
                raise DataError(f"`{split}` must be an ArraySplit.")
        sample_shape = self.train.images.shape[1:]
        for split in SPLITS[1:]:
            other = getattr(self, split).images.shape[1:]
            if other != sample_shape:
                raise DataError(
                    f"{self.name}: `{split}` images have per-sample shape {other} but `train` "
                    f"images have {sample_shape}."
                )
        for split in SPLITS:
            if getattr(self, split).task != self.task:
                raise DataError(
                    f"{self.name}: task '{self.task}' needs labels of shape "
                    f"{'(N,)' if self.task == 'classification' else '(N, *spatial)'} but "
                    f"`{split}` labels have shape {getattr(self, split).labels.shape}."
                )
        with_groups = [s for s in SPLITS if getattr(self, s).groups is not None]
        if with_groups and len(with_groups) != len(SPLITS):
            raise DataError(
                f"{self.name}: either every split has `groups` or none does "
                f"(only {', '.join(with_groups)} do)."
            )
        with_patients = [s for s in SPLITS if getattr(self, s).patients is not None]
        if with_patients and self.train.patients is None:
            raise DataError(
                f"{self.name}: {', '.join(with_patients)} record patients but `train` does not; "
                "give the training split patient ids too (or drop them)."
            )
        for split in SPLITS[1:]:
            # Held-out metrics compare predictions with label maps: an unlabelled record's
            # zero map would score as all background.
            missing = getattr(self, split).unlabelled_count
            if missing:
                raise DataError(
                    f"{self.name}: `{split}` holds {missing} unlabelled record(s); held-out "
                    "splits need label maps, so unlabelled records may only be training records."
                )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise DataError(f"`num_classes` must be an int (got {self.num_classes!r}).")
        if self.num_classes < 2:
            raise DataError(
                f"{self.name}: {self.task} needs at least 2 classes (got {self.num_classes})."
            )
        for split in SPLITS:
            top = int(getattr(self, split).labels.max())
            if top >= self.num_classes:
                raise DataError(
                    f"{self.name}: `{split}` labels must be in [0, {self.num_classes}) "
                    f"(found label {top})."
                )
        names = tuple(self.class_names)
        if len(names) != self.num_classes or not all(isinstance(n, str) for n in names):
            raise DataError(
                f"{self.name}: `class_names` must be {self.num_classes} strings (got {names!r})."
            )
        if self.label_convention not in LABEL_CONVENTIONS:
            raise DataError(
                f"`label_convention` must be None or one of {', '.join(LABEL_CONVENTIONS[1:])} "
                f"(got {self.label_convention!r})."
            )
        if self.label_convention == "brats" and (
            self.task != "segmentation" or self.num_classes != 4
        ):
            raise DataError(
                f"{self.name}: label convention 'brats' needs a segmentation task with 4 classes "
                f"(got task '{self.task}', {self.num_classes} classes)."
            )
        if self.group_names is not None:
            group_names = tuple(self.group_names)
            if not with_groups:
                raise DataError(f"{self.name}: `group_names` given but the splits have no groups.")
            top_group = max(int(getattr(self, s).groups.max()) for s in SPLITS)
            if top_group >= len(group_names) or not all(isinstance(g, str) for g in group_names):
                raise DataError(
                    f"{self.name}: `group_names` must be strings naming every group id up to "
                    f"{top_group} (got {len(group_names)} names)."
                )
            object.__setattr__(self, "group_names", group_names)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "in_channels", int(sample_shape[0]))
        object.__setattr__(self, "spatial_dims", len(sample_shape) - 1)
        object.__setattr__(self, "image_shape", tuple(int(s) for s in sample_shape[1:]))
        object.__setattr__(self, "fingerprint", self.compute_fingerprint())

    @property
    def has_groups(self) -> bool:
        """Whether the splits record each sample's acquisition group (hospital)."""
        return self.train.groups is not None

    @property
    def has_patients(self) -> bool:
        """Whether the training split records each sample's patient (patient-level DP)."""
        return self.train.patients is not None

    def compute_fingerprint(self) -> str:
        r"""Hash the arrays of all splits (SHA-256), in a fixed, documented byte layout.

        The digest input is the tag ``b"securefed.dataset.fingerprint.v1\n"``, then, only for a
        bundle whose task is not classification, the ASCII line
        ``"task:{task};label_convention:{label_convention}\n"`` (``None`` written as ``none``),
        then, for each split in the order train, val, test and for each of its arrays in the
        order images, labels, groups, patients, labelled (the last three only when present),
        the ASCII header
        ``"{split}/{array}:{dtype}:{shape}\n"`` (dtype ``<f4``, ``<i8``, or ``|u1`` for
        ``labelled`` stored as one byte 0 or 1 per record; shape as comma-separated integers)
        and the array's little-endian, C-order bytes. A classification bundle without groups
        or patients therefore hashes exactly as before groups, patients and segmentation
        existed, and a bundle without ``labelled`` flags exactly as before they existed
        (which records are unlabelled changes what a run trains on, so the flags are hashed
        when present). Patient ids are hashed as stored (not
        renumbered): which records form one patient changes what a patient-level privacy
        claim covers. Group names are labels, not data, and are not hashed. Anyone holding the
        same arrays can recompute it without securefed.
        """
        digest = hashlib.sha256(_FINGERPRINT_TAG)
        if self.task != "classification":
            convention = "none" if self.label_convention is None else self.label_convention
            digest.update(f"task:{self.task};label_convention:{convention}\n".encode("ascii"))
        for split_name in SPLITS:
            split = getattr(self, split_name)
            arrays = [("images", split.images, "<f4"), ("labels", split.labels, "<i8")]
            if split.groups is not None:
                arrays.append(("groups", split.groups, "<i8"))
            if split.patients is not None:
                arrays.append(("patients", split.patients, "<i8"))
            if split.labelled is not None:
                arrays.append(("labelled", split.labelled, "|u1"))
            for array_name, array, dtype in arrays:
                data = np.ascontiguousarray(array, dtype=dtype)
                shape = ",".join(str(s) for s in data.shape)
                digest.update(f"{split_name}/{array_name}:{dtype}:{shape}\n".encode("ascii"))
                digest.update(memoryview(data).cast("B"))
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """Summarise as a JSON-ready dict for ``config.json`` and the privacy report.

        ``class_counts`` counts samples per class; for segmentation, the samples whose label
        map contains the class (see :meth:`ArraySplit.class_counts`). ``group_counts`` maps
        each split to ``{group id as a string: samples}``, or is None without groups.
        ``patient_counts`` maps each split to its number of distinct patients (None for a
        split without ids), or is None when no split has patient ids. With unlabelled
        training records, ``class_counts`` counts the labelled records alone (a zero map is
        no class) and the key ``unlabelled_count`` (training records without a label map) is
        added; without ``labelled`` flags the summary is as before they existed.
        """
        out = {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "task": self.task,
            "label_convention": self.label_convention,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "image_shape": list(self.image_shape),
            "sizes": {s: len(getattr(self, s)) for s in SPLITS},
            "class_counts": {
                s: _labelled_class_counts(getattr(self, s), self.num_classes) for s in SPLITS
            },
            "group_names": None if self.group_names is None else list(self.group_names),
            "group_counts": (
                {s: {str(g): c for g, c in getattr(self, s).group_counts().items()} for s in SPLITS}
                if self.has_groups
                else None
            ),
            "patient_counts": (
                {
                    s: None
                    if getattr(self, s).patients is None
                    else getattr(self, s).patient_count()
                    for s in SPLITS
                }
                if self.has_patients
                else None
            ),
        }
        if self.train.labelled is not None:
            out["unlabelled_count"] = self.train.unlabelled_count
        return out


def resolve_classes(
    *,
    labels: Mapping[str, np.ndarray],
    source: str,
    declared: Sequence[str] | None = None,
    declared_by: str = "the data set",
    num_classes: int | None = None,
    key: str = "`{split}` labels",
) -> tuple[str, ...]:
    """The classes of a classification data set, and a check that every label is one of them.

    One rule for every loader whose labels are numbers (``.npz`` files, by path or by name):

    1. ``declared`` class names (a ``class_names`` array in the file, or a known MedMNIST
       set's published list) fix K; ``num_classes``, when given too, must agree.
    2. else ``num_classes`` (``--num-classes``) fixes K; classes are named ``"0"`` ...
    3. else K is the largest training label + 1, and every class below it must occur in the
       training split: a gap means a stray label (one 7 in a binary set), not seven classes.

    Then a label outside [0, K) in any split is refused. Inferring K from all splits, as
    before, turned one stray test label into an extra class the model could never learn.

    Args:
        labels: Per split (``train``, ``val``, ``test``), its (N,) non-negative int labels.
        source: What to name in errors (the file).
        declared: Class names the data declare, or None.
        declared_by: Who declared them, for errors (e.g. "its `class_names` array").
        num_classes: K requested by the user (``--num-classes``), or None.
        key: How to name a split's labels in errors; ``{split}`` is replaced.

    Returns:
        The K class names.

    Raises:
        DataError: One line naming ``source``, the split and the offending label.

    """
    if declared is not None:
        names = tuple(str(n) for n in declared)
        if num_classes is not None and num_classes != len(names):
            raise DataError(
                f"{source}: `--num-classes` is {num_classes} but {declared_by} declares "
                f"{len(names)} classes; drop --num-classes or fix the declaration."
            )
        origin = f"the {len(names)} classes {declared_by} declares"
    elif num_classes is not None:
        names = tuple(str(c) for c in range(num_classes))
        origin = f"`--num-classes` {num_classes}"
    else:
        train = labels["train"]
        top = int(train.max())
        counts = np.bincount(train, minlength=top + 1)
        missing = [c for c in range(top + 1) if counts[c] == 0]
        if missing:
            shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{source}: {key.format(split='train')} hold label {top} but never "
                f"{shown}: a stray label, or classes the data do not declare; declare the "
                "classes (a `class_names` array in the .npz, or --num-classes) or fix the label."
            )
        names = tuple(str(c) for c in range(top + 1))
        origin = f"the training labels 0..{top}"
    if len(names) < 2:
        raise DataError(
            f"{source}: classification needs at least 2 classes (got {len(names)}, from {origin})."
        )
    for split in SPLITS:
        top = int(labels[split].max())
        if top >= len(names):
            raise DataError(
                f"{source}: {key.format(split=split)} must be in [0, {len(names)}) "
                f"({origin}) but hold label {top}."
            )
    return names
