"""Procedural shape images (2D) and volumes (3D): a quick, learnable, license-free data set."""

from __future__ import annotations

import numpy as np

from securefed.data.bundle import ArraySplit, DatasetBundle
from securefed.errors import ConfigError

__all__ = ["DEFAULT_SIZES", "SHAPES_2D", "SHAPES_3D", "make_synthetic"]

SHAPES_2D: tuple[str, ...] = ("disc", "ring", "box", "cross")
SHAPES_3D: tuple[str, ...] = ("sphere", "cube", "shell", "jack")

#: Default (n_train, n_val, n_test) per spatial_dims; validate.py reads the training size.
DEFAULT_SIZES: dict[int, tuple[int, int, int]] = {2: (2400, 400, 800), 3: (600, 100, 200)}
# validate.py still imports the old private name; remove once it reads DEFAULT_SIZES.
_DEFAULT_SIZES = DEFAULT_SIZES
_DEFAULT_IMAGE_SIZE = {2: 28, 3: 16}
# Smallest sides at which the largest shape still fits with a one-pixel margin.
_MIN_IMAGE_SIZE = {2: 12, 3: 16}


def make_synthetic(
    *,
    seed: int = 0,
    spatial_dims: int = 2,
    num_classes: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    records_per_patient: int = 1,
) -> DatasetBundle:
    """Generate a balanced shape-classification data set, deterministic in ``seed``.

    2D (default 1x28x28, classes disc, ring, box outline, cross) or 3D (default 1x16x16x16,
    classes sphere, cube, hollow shell, "jack" of three axis rods). Each image draws its own
    shape position, size and stroke width, foreground contrast, background level with a
    smooth linear gradient and a broad Gaussian bump, and pixel noise. Contrast and size are
    random per image, so the class is carried by the *shape*, not by mean brightness: a small
    CNN learns it, a threshold on mean intensity does not.

    Each split comes from its own child of ``np.random.SeedSequence(seed)``, so the test set
    does not change when the training size does. Classes are exactly balanced (up to one
    sample) and shuffled.

    With ``records_per_patient`` k > 1 the records come in patients of k consecutive records
    (the last patient of a split may have fewer): a patient has one diagnosis (the same label
    on all its records) and one appearance drawn once per patient (shape size, stroke, position,
    contrast, background), which its records repeat with small per-record jitter (size +-5 %,
    position about half a pixel, contrast and level +-0.02) and their own pixel noise, as
    repeat scans of one patient would. ``patients`` is set in every split, with ids unique
    across splits (a patient is in one split only), and classes are balanced over patients.
    k = 1 (the default) leaves ``patients`` None and the data byte-identical to before.

    Args:
        seed: Generator seed.
        spatial_dims: 2 for images, 3 for volumes.
        num_classes: 2 to 4; the first ``num_classes`` shapes are used (default 4).
        n_train: Training samples (default 2400 in 2D, 600 in 3D).
        n_val: Validation samples (default 400 in 2D, 100 in 3D).
        n_test: Test samples (default 800 in 2D, 200 in 3D).
        image_size: Side length in pixels/voxels (default 28 in 2D, 16 in 3D; at least 12 in
            2D and 16 in 3D).
        records_per_patient: k, records per patient (1: no patient ids). Each split needs
            at least ``num_classes`` patients.

    Returns:
        The data set, with ``source == "synthetic(seed=...)"``.

    Raises:
        ConfigError: An argument is out of range.

    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"`spatial_dims` must be 2 or 3 (got {spatial_dims!r}).")
    shapes = SHAPES_2D if spatial_dims == 2 else SHAPES_3D
    k = len(shapes) if num_classes is None else num_classes
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= len(shapes):
        raise ConfigError(f"`num_classes` must be an int in [2, {len(shapes)}] (got {k!r}).")
    size = _DEFAULT_IMAGE_SIZE[spatial_dims] if image_size is None else image_size
    smallest = _MIN_IMAGE_SIZE[spatial_dims]
    if isinstance(size, bool) or not isinstance(size, int) or size < smallest:
        raise ConfigError(
            f"`image_size` must be an int of at least {smallest} in {spatial_dims}D (got {size!r})."
        )
    per = records_per_patient
    if isinstance(per, bool) or not isinstance(per, int) or per < 1:
        raise ConfigError(f"`records_per_patient` must be a positive int (got {per!r}).")
    defaults = DEFAULT_SIZES[spatial_dims]
    sizes = {}
    for field_name, value, default in zip(
        ("n_train", "n_val", "n_test"), (n_train, n_val, n_test), defaults, strict=True
    ):
        n = default if value is None else value
        if isinstance(n, bool) or not isinstance(n, int) or n < k:
            raise ConfigError(
                f"`{field_name}` must be an int of at least num_classes={k} (got {n!r})."
            )
        if -(-n // per) < k:
            raise ConfigError(
                f"`{field_name}` {n} at records_per_patient={per} gives {-(-n // per)} "
                f"patient(s), fewer than num_classes={k}."
            )
        sizes[field_name] = n

    children = np.random.SeedSequence(seed).spawn(3)
    splits = []
    first_id = 0
    for n, child in zip(sizes.values(), children, strict=True):
        splits.append(
            _make_split(
                n=n,
                k=k,
                size=size,
                spatial_dims=spatial_dims,
                seq=child,
                per_patient=per,
                first_id=first_id,
            )
        )
        first_id += -(-n // per)
    name = "synthetic" if spatial_dims == 2 else "synthetic3d"
    return DatasetBundle(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=k,
        class_names=shapes[:k],
        source=(
            f"synthetic(seed={seed}, spatial_dims={spatial_dims}, image_size={size}"
            + ("" if per == 1 else f", records_per_patient={per}")
            + ")"
        ),
    )


def _make_split(
    *,
    n: int,
    k: int,
    size: int,
    spatial_dims: int,
    seq: np.random.SeedSequence,
    per_patient: int = 1,
    first_id: int = 0,
) -> ArraySplit:
    rng = np.random.default_rng(seq)
    if per_patient == 1:
        # The draws, in their historical order: the data must stay byte-identical.
        params = _draw(rng, n=n, k=k, size=size, spatial_dims=spatial_dims)
        patients = None
    else:
        n_patients = -(-n // per_patient)
        owner = np.arange(n, dtype=np.int64) // per_patient  # record -> patient (0-based)
        drawn = _draw(rng, n=n_patients, k=k, size=size, spatial_dims=spatial_dims)
        params = {name: value[owner] for name, value in drawn.items()}
        params = _jitter(params, rng, size=size, spatial_dims=spatial_dims)
        patients = owner + first_id
    labels = params["labels"]

    axes = np.arange(size, dtype=np.float64)
    grid = np.stack(np.meshgrid(*([axes] * spatial_dims), indexing="ij"))  # (dims, *spatial)
    expand = (slice(None),) + (None,) * spatial_dims
    center = params["center"]
    offsets = [grid[d][None] - center[:, d][expand] for d in range(spatial_dims)]
    mask = _render(
        labels, offsets, params["r"][expand], params["w"][expand], spatial_dims=spatial_dims
    )

    # Background: level + linear gradient + broad bump; all per-image random so that mean
    # intensity cannot identify the class.
    direction = params["direction"]
    gradient = params["gradient"][expand] * sum(
        direction[:, d][expand] * (grid[d][None] / (size - 1) - 0.5) for d in range(spatial_dims)
    )
    bump_center = params["bump_center"]
    bump_sq = sum((grid[d][None] - bump_center[:, d][expand]) ** 2 for d in range(spatial_dims))
    bump_width = params["bump_width"][expand] * size
    bump = params["bump"][expand] * np.exp(-bump_sq / (2 * bump_width**2))
    noise = rng.uniform(0.02, 0.08, n)[expand] * rng.standard_normal(mask.shape)

    level, contrast = params["level"][expand], params["contrast"][expand]
    images = np.clip(level + gradient + bump + contrast * mask + noise, 0.0, 1.0)
    return ArraySplit(images=images[:, None].astype(np.float32), labels=labels, patients=patients)


def _draw(
    rng: np.random.Generator, *, n: int, k: int, size: int, spatial_dims: int
) -> dict[str, np.ndarray]:
    """Draw ``n`` images' (or patients') label and appearance, all but the pixel noise."""
    labels = rng.permutation(np.arange(n, dtype=np.int64) % k)
    scale = size / 28.0 if spatial_dims == 2 else size / 16.0
    # Shape geometry, in pixels: radius / half-side r, stroke width w.
    r = rng.uniform(0.16, 0.32, n) * size
    w = rng.uniform(1.6, 2.6, n) * scale
    margin = r + w / 2 + 1.0
    center = rng.uniform(margin[:, None], size - 1 - margin[:, None], (n, spatial_dims))
    level = rng.uniform(0.0, 0.35, n)
    direction = rng.normal(size=(n, spatial_dims))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    gradient = rng.uniform(0.0, 0.2, n)
    bump_center = rng.uniform(0, size - 1, (n, spatial_dims))
    bump_width = rng.uniform(0.25, 0.5, n)
    bump = rng.uniform(-0.15, 0.15, n)
    contrast = rng.uniform(0.25, 0.65, n)
    return {
        "labels": labels,
        "r": r,
        "w": w,
        "center": center,
        "level": level,
        "direction": direction,
        "gradient": gradient,
        "bump_center": bump_center,
        "bump_width": bump_width,
        "bump": bump,
        "contrast": contrast,
    }


def _jitter(
    params: dict[str, np.ndarray], rng: np.random.Generator, *, size: int, spatial_dims: int
) -> dict[str, np.ndarray]:
    """Per-record variation around a patient's appearance: small, so a patient stays alike."""
    n = params["labels"].shape[0]
    out = dict(params)
    out["r"] = params["r"] * rng.uniform(0.95, 1.05, n)
    margin = out["r"] + params["w"] / 2 + 1.0
    moved = params["center"] + rng.normal(0.0, 0.5, (n, spatial_dims))
    out["center"] = np.clip(moved, margin[:, None], size - 1 - margin[:, None])
    out["contrast"] = params["contrast"] + rng.uniform(-0.02, 0.02, n)
    out["level"] = np.clip(params["level"] + rng.uniform(-0.02, 0.02, n), 0.0, None)
    return out


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    # Anti-aliased inside-ness: 1 well inside, 0 well outside, linear over one pixel.
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _radius(offsets: list[np.ndarray]) -> np.ndarray:
    return np.sqrt(sum(o**2 for o in offsets))


def _chebyshev(offsets: list[np.ndarray]) -> np.ndarray:
    return np.maximum.reduce([np.abs(o) for o in offsets])


def _ball(offsets: list[np.ndarray], r: np.ndarray, w: np.ndarray) -> np.ndarray:
    return _soft(r - _radius(offsets))


def _sphere_outline(offsets: list[np.ndarray], r: np.ndarray, w: np.ndarray) -> np.ndarray:
    return _soft(w / 2 - np.abs(_radius(offsets) - r))


def _box_outline(offsets: list[np.ndarray], r: np.ndarray, w: np.ndarray) -> np.ndarray:
    return _soft(w / 2 - np.abs(_chebyshev(offsets) - r))


def _solid_cube(offsets: list[np.ndarray], r: np.ndarray, w: np.ndarray) -> np.ndarray:
    # Shrunk so that a cube and a sphere of the same r have similar volumes.
    return _soft(0.85 * r - _chebyshev(offsets))


def _axis_rods(offsets: list[np.ndarray], r: np.ndarray, w: np.ndarray) -> np.ndarray:
    # A plus sign in 2D, three orthogonal rods (a "jack") in 3D.
    rods = []
    for axis, along in enumerate(offsets):
        across = np.sqrt(sum(o**2 for d, o in enumerate(offsets) if d != axis))
        rods.append(np.minimum(_soft(w / 2 - across), _soft(r - np.abs(along))))
    return np.maximum.reduce(rods)


_RENDERERS = {
    2: (_ball, _sphere_outline, _box_outline, _axis_rods),
    3: (_ball, _solid_cube, _sphere_outline, _axis_rods),
}


def _render(
    labels: np.ndarray,
    offsets: list[np.ndarray],
    r: np.ndarray,
    w: np.ndarray,
    *,
    spatial_dims: int,
) -> np.ndarray:
    mask = np.empty(offsets[0].shape)
    for cls, renderer in enumerate(_RENDERERS[spatial_dims]):
        rows = labels == cls
        if rows.any():
            mask[rows] = renderer([o[rows] for o in offsets], r[rows], w[rows])
    return mask
