"""The loader dispatcher: :func:`load_dataset` picks a loader by name or path.

The data model (:class:`ArraySplit`, :class:`DatasetBundle`, :func:`resolve_classes`, the
``SPLITS``/``TASKS``/``LABEL_CONVENTIONS`` tuples) lives in :mod:`securefed.data.bundle`, which
the loaders import; it is re-exported here so ``from securefed.data.dataset import ArraySplit``
keeps working. This module imports the loaders and no loader imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from securefed.data.bundle import (
    LABEL_CONVENTIONS,
    SPLITS,
    TASKS,
    ArraySplit,
    DatasetBundle,
    resolve_classes,
)
from securefed.data.imagefolder import load_image_folder
from securefed.data.medmnist import MEDMNIST_CLASS_NAMES, load_medmnist, load_medmnist_npz
from securefed.data.nifti import holds_nifti, load_nifti_segmentation
from securefed.data.registry import load_registered, resolve_dataset
from securefed.data.segmentation import make_synthetic_segmentation
from securefed.data.synthetic import make_synthetic
from securefed.errors import ConfigError, DataError

__all__ = [
    "LABEL_CONVENTIONS",
    "SPLITS",
    "TASKS",
    "ArraySplit",
    "DatasetBundle",
    "available_datasets",
    "load_dataset",
    "resolve_classes",
]


def available_datasets() -> tuple[str, ...]:
    """List the names :func:`load_dataset` knows without a path: synthetic sets and MedMNIST v2.

    Any other ``NAME`` also works when ``NAME.npz`` is in ``data_dir``.
    """
    return ("synthetic", "synthetic-seg", *sorted(MEDMNIST_CLASS_NAMES))


_SYNTHETIC_OPTIONS = (
    "spatial_dims",
    "num_classes",
    "n_train",
    "n_val",
    "n_test",
    "image_size",
    "records_per_patient",
)
_SYNTHETIC_SEG_OPTIONS = ("n_train", "n_val", "n_test", "image_size", "modalities", "n_groups")
_NIFTI_OPTIONS = (
    "image_size",
    "modalities",
    "label_name",
    "val_fraction",
    "test_fraction",
    "brats",
    "unlabelled",
)


def load_dataset(
    *,
    name: str = "synthetic",
    data_dir: str | Path | None = None,
    data: str | Path | None = None,
    seed: int = 0,
    num_classes: int | None = None,
    group_by: str | None = None,
    **options: Any,
) -> DatasetBundle:
    """Load a data set by name or path. Nothing is ever downloaded.

    Dispatch, in order:

    1. ``data`` is a folder holding ``.nii``/``.nii.gz`` files (within three levels): NIfTI
       segmentation subjects (:func:`~securefed.data.nifti.load_nifti_segmentation`;
       ``options`` may set ``image_size``, ``modalities``, ``label_name``, ``val_fraction``,
       ``test_fraction``, ``brats`` and ``unlabelled`` (subjects without a label map, for
       teacher-student); ``seed`` picks the carved splits).
    2. ``data`` is another folder: an image folder
       (:func:`~securefed.data.imagefolder.load_image_folder`; ``options`` may set
       ``image_size`` and ``val_fraction``; ``seed`` picks the carved validation split).
    3. ``data`` is a ``.npz`` file: a MedMNIST-layout archive (2D or 3D).
    4. ``name == "synthetic"``: the procedural shape generator
       (:func:`~securefed.data.synthetic.make_synthetic`; ``options`` are its keyword
       arguments, ``seed`` its seed).
    5. ``name`` was registered with :func:`~securefed.data.registry.register_dataset`, or is
       ``module:function``: that loader, called as ``loader(seed=seed, **options)``.
    6. ``name == "synthetic-seg"``: synthetic brain-tumour volumes from non-IID hospitals
       (:func:`~securefed.data.segmentation.make_synthetic_segmentation`; likewise).
    7. otherwise: MedMNIST ``{name}.npz`` in ``data_dir`` (default ``~/.medmnist``, where the
       ``medmnist`` package keeps its downloads).

    Patient ids (``group_by``, ``--group-by``; see ``docs/patients.md``): ``.npz`` files and
    MedMNIST names read the arrays ``train_KEY`` (and ``val_KEY``/``test_KEY`` when present)
    for ``group_by=KEY``; image folders take ``regex:PATTERN`` (on file names) or a
    ``file,patient`` ``.csv``; NIfTI folders take ``regex:PATTERN`` on subject folder names
    (without it each subject is one patient); synthetic data take the
    ``records_per_patient`` option instead. Synthetic, synthetic-seg and registered data sets
    refuse ``group_by`` (a registered loader may set ``patients`` itself).

    When ``data`` is given, ``name`` only labels the bundle (and picks MedMNIST class names);
    left at ``"synthetic"`` it is replaced by the file or folder name, and ``data_dir`` is
    ignored.

    Args:
        name: Data set name.
        data_dir: Folder holding MedMNIST ``.npz`` files.
        data: Path to a NIfTI folder, an image folder or a ``.npz`` file.
        seed: Seed for synthetic generation or the carved splits.
        num_classes: ``--num-classes``: the class count K when the data do not declare their
            classes (an ``.npz`` without ``class_names``; see :func:`resolve_classes`). For
            synthetic data it is the generator's ``num_classes``; every other loader knows its
            classes (folder names, label maps), and a different K is refused.
        group_by: Where each record's patient id comes from (see above), or None.
        **options: Loader-specific keyword arguments (see above).

    Returns:
        The validated, fingerprinted data set.

    Raises:
        DataError: The data are missing, unreadable or malformed (the message names the file).
        ConfigError: ``name``, ``options`` or ``group_by`` are invalid for the chosen loader.

    """
    if group_by is not None and (not isinstance(group_by, str) or not group_by.strip()):
        raise ConfigError(f"--group-by must be a non-empty string (got {group_by!r}).")
    if name == "synthetic" and data is None:
        _refuse_group_by(
            group_by,
            "synthetic data (use --data-option records_per_patient=K for patients of K records)",
        )
        # The generator's own option: it makes exactly that many classes.
        return make_synthetic(seed=seed, **_synthetic_options(options, num_classes))
    bundle = _load(
        name=name,
        data_dir=data_dir,
        data=data,
        seed=seed,
        num_classes=num_classes,
        group_by=group_by,
        **options,
    )
    if num_classes is not None and bundle.num_classes != num_classes:  # folders, label maps
        raise DataError(
            f"{bundle.source}: `--num-classes` is {num_classes} but the data have "
            f"{bundle.num_classes} classes ({', '.join(bundle.class_names)})."
        )
    return bundle


def _synthetic_options(options: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
    _check_options(options, accepted=_SYNTHETIC_OPTIONS, loader="synthetic data")
    return options if num_classes is None else {**options, "num_classes": num_classes}


def _load(
    *,
    name: str,
    data_dir: str | Path | None,
    data: str | Path | None,
    seed: int,
    num_classes: int | None,
    group_by: str | None,
    **options: Any,
) -> DatasetBundle:
    if data is not None:
        path = Path(data).expanduser()
        label = None if name == "synthetic" else name
        if path.is_dir():
            if holds_nifti(path):
                _check_options(options, accepted=_NIFTI_OPTIONS, loader="NIfTI folders")
                return load_nifti_segmentation(
                    root=path, name=label, seed=seed, group_by=group_by, **options
                )
            _check_options(options, accepted=("image_size", "val_fraction"), loader="image folders")
            return load_image_folder(root=path, name=label, seed=seed, group_by=group_by, **options)
        if path.suffix.lower() == ".npz":
            _check_options(options, accepted=(), loader=".npz files")
            return load_medmnist_npz(
                path=path, name=label, num_classes=num_classes, group_by=group_by
            )
        if not path.exists():
            raise DataError(f"{path}: no such file or folder; securefed never downloads data.")
        raise DataError(f"{path}: expected a folder of images or a .npz file.")
    if resolve_dataset(name):  # registered with register_dataset, or module:function
        _refuse_group_by(
            group_by, f"the registered data set {name!r} (its loader sets patient ids itself)"
        )
        return load_registered(name, seed=seed, **options)
    if name == "synthetic-seg":
        _refuse_group_by(group_by, "synthetic-seg data (it has no patients)")
        _check_options(options, accepted=_SYNTHETIC_SEG_OPTIONS, loader="synthetic-seg data")
        return make_synthetic_segmentation(seed=seed, **options)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise ConfigError(
            f"`name` must be 'synthetic', 'synthetic-seg' or a MedMNIST name such as "
            f"'pneumoniamnist' (got {name!r}); to load a path, pass it as `data`."
        )
    _check_options(options, accepted=(), loader="MedMNIST data sets")
    return load_medmnist(name=name, data_dir=data_dir, num_classes=num_classes, group_by=group_by)


def _refuse_group_by(group_by: str | None, loader: str) -> None:
    if group_by is not None:
        raise ConfigError(f"--group-by does not apply to {loader}.")


def _check_options(options: dict[str, Any], *, accepted: tuple[str, ...], loader: str) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        allowed = ", ".join(accepted) if accepted else "none"
        raise ConfigError(
            f"Option(s) {', '.join(unknown)} do not apply to {loader} (accepted: {allowed})."
        )
