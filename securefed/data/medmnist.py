"""MedMNIST v2 ``.npz`` archives (2D grayscale/RGB and 3D), read without pickle or downloads."""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

import numpy as np

from securefed.data.bundle import SPLITS, ArraySplit, DatasetBundle, resolve_classes
from securefed.data.patients import REGEX_PREFIX, encode_ids
from securefed.errors import ConfigError, DataError

__all__ = [
    "MEDMNIST_CLASS_NAMES",
    "check_medmnist_npz",
    "default_data_dir",
    "load_medmnist",
    "load_medmnist_npz",
    "read_npy_header",
]

_ORGANS_2D = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# Class names of the single-label MedMNIST v2 sets, in label order, as published in the
# medmnist package's INFO table. ChestMNIST is multi-label and therefore absent.
MEDMNIST_CLASS_NAMES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "pathmnist": (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
        "dermamnist": (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
        "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        "pneumoniamnist": ("normal", "pneumonia"),
        "retinamnist": ("0", "1", "2", "3", "4"),
        "breastmnist": ("malignant", "normal, benign"),
        "bloodmnist": (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
        "tissuemnist": (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
        "organamnist": _ORGANS_2D,
        "organcmnist": _ORGANS_2D,
        "organsmnist": _ORGANS_2D,
        # The 3D organ set numbers its classes differently from the 2D ones.
        "organmnist3d": (
            "liver",
            "kidney-right",
            "kidney-left",
            "femur-right",
            "femur-left",
            "bladder",
            "heart",
            "lung-right",
            "lung-left",
            "spleen",
            "pancreas",
        ),
        "nodulemnist3d": ("benign", "malignant"),
        "adrenalmnist3d": ("normal", "hyperplasia"),
        "fracturemnist3d": (
            "buckle rib fracture",
            "nondisplaced rib fracture",
            "displaced rib fracture",
        ),
        "vesselmnist3d": ("vessel", "aneurysm"),
        "synapsemnist3d": ("inhibitory synapse", "excitatory synapse"),
    }
)

_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
# Exports from other tools (and Kaggle copies) spell the validation split ``valid_*``.
_VALID_ALIASES = {"val_images": "valid_images", "val_labels": "valid_labels"}


def default_data_dir() -> Path:
    """``~/.medmnist``: where the ``medmnist`` package stores its downloads."""
    return Path.home() / ".medmnist"


def load_medmnist(
    *,
    name: str,
    data_dir: str | Path | None = None,
    num_classes: int | None = None,
    group_by: str | None = None,
) -> DatasetBundle:
    """Load ``{name}.npz`` from ``data_dir`` (default ``~/.medmnist``). Never downloads.

    Args:
        name: MedMNIST file stem, e.g. ``"pneumoniamnist"`` or ``"pneumoniamnist_64"``.
        data_dir: Folder holding the archive.
        num_classes: Class count when the file does not declare its classes (see
            :func:`load_medmnist_npz`).
        group_by: Key of the patient id arrays (see :func:`load_medmnist_npz`).

    Raises:
        DataError: The file is missing or malformed (see :func:`load_medmnist_npz`).

    """
    folder = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = folder / f"{name}.npz"
    if not path.is_file():
        known = ", ".join(sorted(MEDMNIST_CLASS_NAMES))
        raise DataError(
            f"{path}: not found (looked for dataset '{name}' in {folder}); securefed never "
            f"downloads data: put the MedMNIST .npz there, set `data_dir`, or pass the file as "
            f"`data`. Known MedMNIST names: {known}."
        )
    return load_medmnist_npz(path=path, name=name, num_classes=num_classes, group_by=group_by)


def load_medmnist_npz(
    *,
    path: str | Path,
    name: str | None = None,
    num_classes: int | None = None,
    group_by: str | None = None,
) -> DatasetBundle:
    """Read a MedMNIST-layout ``.npz`` into a :class:`DatasetBundle`.

    The archive must hold ``{train,val,test}_{images,labels}``; ``valid_images`` and
    ``valid_labels`` are read as ``val_*`` (a file holding both spellings is refused, since
    which one is the validation split would be a guess). Images are uint8 (scaled by
    1/255) or floats already in [0, 1], laid out (N, H, W) grayscale, (N, H, W, 3) RGB or
    (N, D, H, W) volumes; they become (N, C, H, W) / (N, 1, D, H, W) float32. A 4-D array whose
    last axis is 1 or 3 is read as channels-last 2D unless ``name`` ends in ``3d``. Labels are
    (N,) or (N, 1) non-negative integers.

    The classes (:func:`~securefed.data.bundle.resolve_classes`): an optional 1-D string array
    ``class_names`` in the archive declares them; else a known MedMNIST set (see
    :data:`MEDMNIST_CLASS_NAMES`) has its published ones; else ``num_classes`` fixes K (classes
    ``"0"`` ... ``"K-1"``); else K is the largest training label + 1, and every class below it
    must occur in training. A label outside [0, K) in any split is refused.

    Patient ids (``group_by=KEY``, ``--group-by KEY``): the array ``train_KEY`` (required) and
    ``val_KEY`` / ``test_KEY`` (each optional; ``valid_KEY`` in a ``valid_*`` file) hold one id
    per record, integers or strings (a unicode array loads without pickle), shape (N,) or
    (N, 1). They become int64 codes, the same code for the same id in every split.

    Args:
        path: The ``.npz`` file.
        name: Data set name; default the file stem. A ``_64``-style size suffix is ignored when
            looking up class names.
        num_classes: ``--num-classes``, for a file that declares no classes.
        group_by: Key of the patient id arrays, or None for no patient ids.

    Raises:
        DataError: One line naming the file and the problem: missing, not an npz, corrupt,
            pickled objects, missing keys, both ``val_*`` and ``valid_*`` keys, wrong dtype or
            shape, length mismatch, negative or out-of-range labels, multi-label targets, or an
            empty split; a missing ``train_KEY`` (listing the keys present) or patient ids of
            the wrong kind or length.
        ConfigError: ``group_by`` is not an array key (a ``regex:`` or ``.csv`` spec).

    """
    path = Path(path).expanduser()
    name = path.stem if name is None else name
    checked = _checked_npz(path, name=name, num_classes=num_classes, group_by=group_by)
    splits = {
        s: ArraySplit(
            images=_to_channels_first(checked.images[s], checked.layout),
            labels=checked.labels[s],
            patients=checked.patients.get(s),
        )
        for s in SPLITS
    }
    return DatasetBundle(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(checked.class_names),
        class_names=checked.class_names,
        source=str(path.resolve()),
    )


def check_medmnist_npz(
    *,
    path: str | Path,
    name: str | None = None,
    num_classes: int | None = None,
    group_by: str | None = None,
) -> None:
    """Make :func:`load_medmnist_npz`'s checks that need no pixel: in milliseconds, not seconds.

    The same code refuses the same files with the same one-line errors: missing or corrupt
    archive, missing keys, pickled arrays, dtypes and shapes (from each image array's ``.npy``
    header, so no image is decompressed), length mismatches, empty splits, labels and their
    classes, and patient ids (labels and ids are read whole: a few bytes a record). What it
    cannot see, float pixels outside [0, 1] or a corrupt image member, the loader refuses.
    ``securefed train`` calls it before importing the training stack.

    Raises:
        DataError: As :func:`load_medmnist_npz`.
        ConfigError: As :func:`load_medmnist_npz`.

    """
    path = Path(path).expanduser()
    name = path.stem if name is None else name
    _checked_npz(path, name=name, num_classes=num_classes, group_by=group_by, pixels=False)


@dataclass(frozen=True)
class _ArrayHeader:
    """What an ``.npy`` header says of an array: enough for the shape and dtype checks."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:  # noqa: D102
        return len(self.shape)


@dataclass(frozen=True)
class _CheckedNpz:
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    layout: str
    class_names: tuple[str, ...]
    patients: dict[str, np.ndarray]


def _checked_npz(
    path: Path,
    *,
    name: str,
    num_classes: int | None,
    group_by: str | None,
    pixels: bool = True,
) -> _CheckedNpz:
    """Every check of :func:`load_medmnist_npz`; without ``pixels``, images are headers only."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; securefed never downloads data.")
    if group_by is not None and (
        not isinstance(group_by, str)
        or not re.fullmatch(r"[A-Za-z0-9_.-]+", group_by)
        or group_by.startswith(REGEX_PREFIX)
    ):
        raise ConfigError(
            f"{path}: for .npz files --group-by names the id arrays by KEY (reads train_KEY), "
            f"e.g. --group-by patient_ids (got {group_by!r})."
        )
    arrays, stored = _read_npz(path, group_by=group_by, pixels=pixels)
    base = re.sub(r"_\d+$", "", name.lower())
    images = {
        s: _images(arrays[f"{s}_images"], key=stored[f"{s}_images"], path=path) for s in SPLITS
    }
    labels = {
        s: _labels(arrays[f"{s}_labels"], key=stored[f"{s}_labels"], path=path) for s in SPLITS
    }

    train_shape = images["train"].shape
    if len(train_shape) == 3:
        layout = "gray"
    elif len(train_shape) == 4 and train_shape[-1] in (1, 3) and not base.endswith("3d"):
        layout = "channels_last"
    elif len(train_shape) == 4:
        layout = "volume"
    else:
        raise DataError(
            f"{path}: `train_images` has shape {train_shape}; expected (N, H, W), (N, H, W, 3) "
            "or (N, D, H, W)."
        )
    for split in SPLITS:
        key = stored[f"{split}_images"]
        if images[split].shape[1:] != train_shape[1:]:
            raise DataError(
                f"{path}: `{key}` has shape {images[split].shape}; its per-image shape must "
                f"match `train_images` {train_shape[1:]}."
            )
        if images[split].shape[0] != labels[split].shape[0]:
            raise DataError(
                f"{path}: `{stored[f'{split}_labels']}` has {labels[split].shape[0]} labels but "
                f"`{key}` has {images[split].shape[0]} images."
            )
        if images[split].shape[0] == 0:
            raise DataError(f"{path}: split `{split}` is empty (0 images).")

    declared, declared_by = arrays.get("class_names"), "its `class_names` array"
    if declared is None and base in MEDMNIST_CLASS_NAMES:
        declared, declared_by = MEDMNIST_CLASS_NAMES[base], f"MedMNIST {base}"
    class_names = resolve_classes(
        labels=labels,
        source=str(path),
        declared=None if declared is None else tuple(declared),
        declared_by=declared_by,
        num_classes=num_classes,
        key="`{split}_labels`",
    )

    patients = _patients(arrays, stored, labels=labels, path=path)
    return _CheckedNpz(
        images=images,
        labels=labels,
        layout=layout,
        class_names=tuple(class_names),
        patients=patients,
    )


def _read_npz(
    path: Path, *, group_by: str | None = None, pixels: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays under their canonical keys, and each canonical key's name in the file.

    With ``group_by``, the patient id arrays come back as ``{split}_patients`` (``val`` and
    ``test`` only when the file has them), their names in the file in the second dict.
    Without ``pixels`` each ``{split}_images`` is an :class:`_ArrayHeader`.
    """
    with path.open("rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: is a single .npy array, not an .npz archive.")
    if not magic.startswith(b"PK"):
        raise DataError(f"{path}: not an .npz archive (no zip signature).")
    arrays: dict[str, np.ndarray] = {}
    key = None
    try:
        with np.load(path, allow_pickle=False) as archive:
            stored = _stored_keys(archive.files, path=path)
            missing = [stored[k] for k in _KEYS if stored[k] not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing keys {', '.join(missing)} (found: "
                    f"{', '.join(sorted(archive.files)) or 'none'})."
                )
            for canonical in _KEYS:
                key = stored[canonical]
                if pixels or not canonical.endswith("_images"):
                    arrays[canonical] = archive[key]
                else:
                    arrays[canonical] = _header(archive, key)
            if "class_names" in archive.files:
                key = "class_names"
                arrays[key] = _class_names(archive[key], path=path)
            if group_by is not None:
                for split in SPLITS:
                    names = [f"{split}_{group_by}"]
                    if split == "val":
                        names.append(f"valid_{group_by}")
                    key = next((k for k in names if k in archive.files), None)
                    if key is None and split == "train":
                        raise DataError(
                            f"{path}: --group-by {group_by}: no `train_{group_by}` array (found: "
                            f"{', '.join(sorted(archive.files))})."
                        )
                    if key is not None:
                        arrays[f"{split}_patients"] = archive[key]
                        stored[f"{split}_patients"] = key
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path}: `{key}` contains pickled objects; refusing to load."
            ) from None
        raise DataError(f"{path}: corrupt .npz archive ({_where(key)}: {exc}).") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise DataError(f"{path}: corrupt .npz archive ({_where(key)}: {exc}).") from None
    return arrays, stored


def read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from an open ``.npy`` stream's header (format 1.0 or 2.0, else None).

    numpy parses the header as a literal: nothing is unpickled, no array data is read.
    """
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        return None
    return tuple(shape), dtype


def _header(archive: np.lib.npyio.NpzFile, key: str) -> _ArrayHeader | np.ndarray:
    """``archive[key]``'s shape and dtype from its ``.npy`` header (the array if unusual).

    Raises:
        ValueError: The array holds Python objects (as ``archive[key]`` would, unpickling
            nothing).

    """
    with archive.zip.open(f"{key}.npy") as handle:
        header = read_npy_header(handle)
    if header is None:
        return archive[key]  # a format numpy may add later: read it as the loader does
    shape, dtype = header
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return _ArrayHeader(shape=tuple(int(n) for n in shape), dtype=dtype)


def _stored_keys(files: list[str], *, path: Path) -> dict[str, str]:
    """Canonical key -> its name in the file: ``valid_*`` stands for ``val_*`` when alone."""
    present = set(files)
    val = sorted(k for k in _VALID_ALIASES if k in present)
    valid = sorted(a for a in _VALID_ALIASES.values() if a in present)
    if val and valid:
        raise DataError(
            f"{path}: holds both {', '.join(val)} and {', '.join(valid)}; keep one naming of "
            "the validation split."
        )
    stored = {k: k for k in _KEYS}
    if valid:
        stored.update(_VALID_ALIASES)
    return stored


def _class_names(array: np.ndarray, *, path: Path) -> np.ndarray:
    """A declared ``class_names`` array: 1-D, unique non-empty strings (str or bytes)."""
    if array.dtype.kind == "S":
        array = np.char.decode(array, "utf-8")
    names = [str(n) for n in array.tolist()] if array.ndim == 1 else []
    if array.dtype.kind != "U" or array.ndim != 1 or len(names) < 2:
        raise DataError(
            f"{path}: `class_names` must be a 1-D array of at least 2 strings "
            f"(got dtype {array.dtype}, shape {array.shape})."
        )
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}: `class_names` must be unique, non-empty strings (got {names}).")
    return array


def _patients(
    arrays: dict[str, np.ndarray],
    stored: dict[str, str],
    *,
    labels: dict[str, np.ndarray],
    path: Path,
) -> dict[str, np.ndarray]:
    """The int64 patient codes of each split that has ids (none without ``--group-by``)."""
    raw: dict[str, np.ndarray] = {}
    for split in SPLITS:
        if f"{split}_patients" not in arrays:
            continue
        key, ids = stored[f"{split}_patients"], arrays[f"{split}_patients"]
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        if ids.ndim != 1 or ids.shape[0] != labels[split].shape[0]:
            raise DataError(
                f"{path}: `{key}` has shape {ids.shape}; expected one patient id per record "
                f"({labels[split].shape[0]},)."
            )
        raw[key] = ids
    if not raw:
        return {}
    codes = encode_ids(raw, source=str(path))
    by_key = {stored[f"{s}_patients"]: s for s in SPLITS if f"{s}_patients" in stored}
    return {by_key[key]: code for key, code in codes.items()}


def _where(key: str | None) -> str:
    return "reading the index" if key is None else f"reading `{key}`"


def _images(array: np.ndarray, *, key: str, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if isinstance(array, _ArrayHeader) or not array.size:
            return array  # a header has no values to check: the loader checks them
        # min and max see NaN (it propagates) and +-Inf; counting is left to the refusal.
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise DataError(
                f"{path}: `{key}` holds {bad} non-finite value(s) (NaN or +-Inf) of "
                f"{array.size}; images must be finite floats in [0, 1]."
            )
        if lo < 0 or hi > 1:
            raise DataError(f"{path}: `{key}` holds floats outside [0, 1] (got [{lo}, {hi}]).")
        return array
    raise DataError(
        f"{path}: `{key}` has dtype {array.dtype}; expected uint8 pixels or floats in [0, 1]."
    )


def _labels(array: np.ndarray, *, key: str, path: Path) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] > 1:
        raise DataError(
            f"{path}: `{key}` has shape {array.shape}: multi-label targets are not supported "
            "(securefed trains single-label classifiers)."
        )
    if array.ndim == 2:
        array = array[:, 0]
    elif array.ndim != 1:
        raise DataError(f"{path}: `{key}` has shape {array.shape}; expected (N,) or (N, 1).")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: `{key}` has dtype {array.dtype}; expected integer labels.")
    if array.size and int(array.min()) < 0:
        raise DataError(f"{path}: `{key}` contains negative labels (min {int(array.min())}).")
    return array.astype(np.int64)


def _to_channels_first(images: np.ndarray, layout: str) -> np.ndarray:
    if layout == "channels_last":
        images = np.moveaxis(images, -1, 1)
    else:
        images = images[:, None]
    if images.dtype == np.uint8:
        out = images.astype(np.float32)
        out /= 255.0  # division, not multiplication by 1/255, maps 255 to exactly 1.0
        return out
    return np.ascontiguousarray(images, dtype=np.float32)
