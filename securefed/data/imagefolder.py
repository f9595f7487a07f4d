"""Image folders laid out as ``split/<class>/*.png``: a user's own data, loaded strictly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from securefed.data.bundle import SPLITS, ArraySplit, DatasetBundle
from securefed.data.partition import stratified_holdout
from securefed.data.patients import (
    REGEX_PREFIX,
    encode_ids,
    holdout_by_patient,
    parse_regex,
    patient_from_name,
    read_patient_csv,
)
from securefed.errors import ConfigError, DataError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# 16-bit grayscale (common for X-ray exports); scaled by 1/65535 rather than through Pillow's
# convert("L"), which clips values above 255 instead of rescaling them.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Single-band modes, and gray with alpha (alpha is dropped, see `_read_image`).
_GRAY_MODES = frozenset({"1", "L", "LA", "La"})


def load_image_folder(
    *,
    root: str | Path,
    name: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    group_by: str | None = None,
) -> DatasetBundle:
    """Load ``root/{train,val,test}/<class>/...`` image files into a :class:`DatasetBundle`.

    Layout and rules:

    - Class names are the sub-folder names of ``train/``, sorted; label i is the i-th name.
      ``val/`` and ``test/`` may omit a class but may not add one.
    - Images may sit in nested folders below a class folder (e.g. one per patient). Accepted
      suffixes: see :data:`IMAGE_SUFFIXES` (any case). Entries whose name starts with ``.`` are
      skipped; any other file is an error, so no data is dropped silently.
    - Channels: an image is grayscale when it has one band (Pillow modes 1, L, I;16, I) or
      when its colour channels are equal everywhere (R == G == B), whatever its mode: RGB,
      RGBA, LA, or a palette ("P") image whose used colours are gray. The folder has one
      channel if every image is grayscale, otherwise three (RGB; grayscale images are
      replicated). 8-bit images are scaled by 1/255, 16-bit ones by 1/65535.
    - Alpha is dropped, not composited: each pixel keeps its recorded intensity. Medical
      exports carry alpha as an opaque filler or an annotation layer, and compositing on
      black would darken every partly transparent pixel, changing the measurement itself.
    - Size: with ``image_size=None`` every image must already have the same size (no
      resampling, so pixels stay exactly as exported); otherwise every image is resized to
      ``image_size`` (an int for square, or (height, width)) with bilinear, anti-aliased
      resampling, ignoring aspect ratio.
    - ``val/`` missing: a stratified ``val_fraction`` of each training class is held out,
      chosen by ``seed``. Without patient ids this split is per image; with ``group_by`` it
      holds out whole patients (stratified by each patient's first label), so no patient is
      in both train and val.
    - ``test/`` missing: an error. A test set carved at random would change with the seed and
      could put one patient's images on both sides; the user must fix it.
    - Patient ids (``group_by``, ``--group-by``): ``regex:PATTERN`` searches each file's name
      without suffix (its stem) with a Python regex that has one capture group or a named
      group ``patient``; or the path of a ``.csv`` file with a header and columns
      ``file,patient``, ``file`` relative to ``root`` (``train/normal/img01.png``), listing
      every image and nothing else. One id string gets one code in every split.

    Args:
        root: Folder holding ``train/``, ``test/`` and optionally ``val/``.
        name: Data set name (default: the folder name).
        image_size: Target size, or None to require equal sizes.
        seed: Seed of the carved validation split.
        val_fraction: Fraction held out when ``val/`` is missing, in (0, 1).
        group_by: ``regex:PATTERN`` or a ``.csv`` path giving each image's patient, or None.

    Raises:
        DataError: Missing folders, unreadable or unsupported images, a stray file, unequal
            sizes without ``image_size``, or an empty split; a file the ``group_by`` pattern
            does not match, or an image the CSV does not list (or a row naming no image); the
            message names the path.
        ConfigError: Bad ``image_size``, ``val_fraction`` or ``group_by``.

    """
    root = Path(root).expanduser()
    size = _target_size(image_size)
    pattern, csv_path = _patient_source(group_by)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"`val_fraction` must be in (0, 1) (got {val_fraction!r}).")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; securefed never downloads data.")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; expected train/<class>/<image files>.")
    if not (root / "test").is_dir():
        raise DataError(
            f"{root}: no test/ folder; provide a fixed test split as test/<class>/<images> "
            "(a split carved at random could mix one patient's images across train and test)."
        )
    class_names = _class_folders(train_dir, known=None)
    if len(class_names) < 2:
        raise DataError(
            f"{train_dir}: found {len(class_names)} class folder(s); classification needs "
            "at least 2."
        )
    listed = {
        split: _list_images(root / split, class_names)
        for split in SPLITS
        if (root / split).is_dir()
    }
    for split, entries in listed.items():
        if not entries:
            raise DataError(f"{root / split}: contains no images.")
    patients = _patients(listed, root=root, pattern=pattern, csv_path=csv_path)
    per_class = np.bincount([label for _, label in listed["train"]], minlength=len(class_names))
    if per_class.min() == 0:
        empty = class_names[int(np.argmin(per_class))]
        raise DataError(f"{train_dir / empty}: class folder contains no images.")

    decoded = {
        split: [_read_image(path) for path, _ in entries] for split, entries in listed.items()
    }
    gray = all(is_gray for images in decoded.values() for _, is_gray in images)
    if size is None:
        first_path = listed["train"][0][0]
        size = decoded["train"][0][0].shape[:2]
        for split, entries in listed.items():
            for (path, _), (img, _) in zip(entries, decoded[split], strict=True):
                if img.shape[:2] != size:
                    raise DataError(
                        f"{path}: is {img.shape[1]}x{img.shape[0]} (WxH) but {first_path} is "
                        f"{size[1]}x{size[0]}; pass `image_size` to resize all images."
                    )

    splits: dict[str, ArraySplit] = {}
    for split, entries in listed.items():
        images = np.stack([_conform(img, gray=gray, size=size) for img, _ in decoded[split]])
        labels = np.array([label for _, label in entries], dtype=np.int64)
        splits[split] = ArraySplit(images=images, labels=labels, patients=patients.get(split))
    if "val" not in splits:
        pool = splits["train"]
        if pool.patients is None:
            kept, held_out = stratified_holdout(pool.labels, fraction=val_fraction, seed=seed)
            unit = "images"
        else:
            kept, held_out = holdout_by_patient(
                pool.labels, pool.patients, fraction=val_fraction, seed=seed
            )
            unit = "patients"
        if held_out.size == 0 or kept.size == 0:
            raise DataError(
                f"{train_dir}: too few {unit} to hold out a validation split; add a val/ folder."
            )
        splits["train"] = pool.subset(indices=kept)
        splits["val"] = pool.subset(indices=held_out)
        by = "" if pool.patients is None else " by patient"
        source = f"{root.resolve()} (val: stratified {val_fraction:g} of train{by}, seed={seed})"
    else:
        source = str(root.resolve())

    return DatasetBundle(
        name=root.resolve().name if name is None else name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=len(class_names),
        class_names=tuple(class_names),
        source=source,
    )


def _patient_source(group_by: str | None) -> tuple[re.Pattern[str] | None, Path | None]:
    """The compiled ``regex:`` pattern or the CSV path of a ``group_by`` spec."""
    if group_by is None:
        return None, None
    if not isinstance(group_by, str) or not group_by:
        raise ConfigError(f"--group-by must be regex:PATTERN or a .csv path (got {group_by!r}).")
    if group_by.startswith(REGEX_PREFIX):
        return parse_regex(group_by), None
    if group_by.lower().endswith(".csv"):
        path = Path(group_by).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: patient CSV not found (--group-by).")
        return None, path
    raise ConfigError(
        f"--group-by {group_by!r}: for image folders use regex:PATTERN (matched against each "
        "file name) or the path of a file,patient .csv."
    )


def _patients(
    listed: dict[str, list[tuple[Path, int]]],
    *,
    root: Path,
    pattern: re.Pattern[str] | None,
    csv_path: Path | None,
) -> dict[str, np.ndarray]:
    """Each split's int64 patient codes, in ``listed`` order (empty without a source)."""
    raw: dict[str, list[str]] = {}
    if pattern is not None:
        for split, entries in listed.items():
            raw[split] = [patient_from_name(pattern, path.stem, path=path) for path, _ in entries]
    elif csv_path is not None:
        table = read_patient_csv(csv_path, root=root)
        seen: set[str] = set()
        for split, entries in listed.items():
            ids = []
            for path, _ in entries:
                key = path.relative_to(root).as_posix()
                if key not in table:
                    raise DataError(
                        f"{path}: not listed in {csv_path}; every image needs a file,patient row "
                        f"(file written as {key})."
                    )
                seen.add(key)
                ids.append(table[key])
            raw[split] = ids
        extra = sorted(set(table) - seen)
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise DataError(
                f"{csv_path}: lists {extra[0]}{more}, which is not an image of {root}; "
                "remove the row(s) or add the file(s)."
            )
    if not raw:
        return {}
    return encode_ids(
        {s: np.array(ids, dtype=str) for s, ids in raw.items()},
        source=str(csv_path or root),
    )


def _target_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    dims = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(dims) != 2 or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims
    ):
        raise ConfigError(
            f"`image_size` must be a positive int or (height, width) (got {image_size!r})."
        )
    return (dims[0], dims[1])


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(split_dir: Path, *, known: list[str] | None) -> list[str]:
    names = []
    for entry in _visible(split_dir):
        if not entry.is_dir():
            raise DataError(f"{entry}: unexpected file; images belong in <split>/<class>/ folders.")
        if known is not None and entry.name not in known:
            raise DataError(
                f"{entry}: class '{entry.name}' is not a class folder of train/ "
                f"(known: {', '.join(known)})."
            )
        names.append(entry.name)
    return names


def _list_images(split_dir: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    entries: list[tuple[Path, int]] = []
    for cls in _class_folders(split_dir, known=class_names):
        label = class_names.index(cls)
        stack = [split_dir / cls]
        while stack:
            for entry in _visible(stack.pop()):
                if entry.is_dir():
                    stack.append(entry)
                elif entry.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((entry, label))
                else:
                    raise DataError(
                        f"{entry}: not a supported image ({', '.join(IMAGE_SUFFIXES)}); "
                        "move it out of the data folder or rename it with a leading '.'."
                    )
    return sorted(entries)


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """Decode one file to float32 (H, W) or (H, W, 3) in [0, 1] and whether it is grayscale."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _SIXTEEN_BIT_MODES:
                pixels = np.asarray(img).astype(np.float64)
                if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
                    raise DataError(f"{path}: {mode} pixel values outside the 16-bit range.")
                return (pixels / 65535.0).astype(np.float32), True
            if mode == "F":
                raise DataError(f"{path}: floating-point (mode F) images are not supported.")
            if mode in _GRAY_MODES:
                # Pillow's LA -> L keeps the gray band as is: the alpha is dropped.
                return np.asarray(img.convert("L"), dtype=np.float32) / 255.0, True
            # RGB(A), palette, CMYK...: Pillow's RGBA -> RGB also drops alpha, uncomposited. A
            # palette goes through RGBA so that Pillow does not warn about its transparency.
            colour = img.convert("RGBA") if mode in ("P", "PA") else img
            rgb = np.asarray(colour.convert("RGB"), dtype=np.float32) / 255.0
            if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(
                rgb[..., 1], rgb[..., 2]
            ):
                return rgb[..., 0], True
            return rgb, False
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}).") from None


def _conform(image: np.ndarray, *, gray: bool, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, 3]) float image -> (C, *size) float32, resized only when its size differs."""
    from PIL import Image

    channels = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    if not gray and channels.shape[0] == 1:
        channels = np.repeat(channels, 3, axis=0)
    if channels.shape[1:] != size:
        channels = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32)).resize(
                        (size[1], size[0]), Image.Resampling.BILINEAR
                    )
                )
                for ch in channels
            ]
        )
    return np.clip(channels, 0.0, 1.0).astype(np.float32)
