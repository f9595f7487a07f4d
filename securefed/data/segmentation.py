"""Synthetic multi-modal brain-tumour volumes from non-IID hospitals (BraTS-like labels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from securefed.data.bundle import ArraySplit, DatasetBundle
from securefed.errors import ConfigError

__all__ = [
    "BRATS_CLASS_NAMES",
    "BRATS_MODALITIES",
    "BRATS_REGIONS",
    "make_synthetic_segmentation",
]

#: Class names of the ``"brats"`` label convention, in label order (BraTS label 4 -> 3).
BRATS_CLASS_NAMES: tuple[str, ...] = (
    "background",
    "necrotic / non-enhancing tumour core",
    "peritumoural oedema",
    "enhancing tumour",
)

#: The BraTS evaluation regions as sets of labels of the ``"brats"`` convention.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "et": (3,),  # enhancing tumour
    "tc": (1, 3),  # tumour core
    "wt": (1, 2, 3),  # whole tumour
}

#: The four BraTS MR sequences, in the channel order the generator (and BraTS) uses.
BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

# Tissue intensities per modality (rows, BRATS_MODALITIES order) and tissue (columns: white
# matter, grey matter, necrosis, oedema, enhancing rim). They mimic the textbook contrasts:
# enhancing rim bright on T1ce, oedema bright on T2 and FLAIR, necrosis dark on T1/T1ce.
_TISSUE = np.array(
    [
        [0.62, 0.48, 0.22, 0.38, 0.44],  # t1
        [0.58, 0.45, 0.18, 0.40, 0.88],  # t1ce
        [0.30, 0.44, 0.78, 0.72, 0.52],  # t2
        [0.36, 0.44, 0.48, 0.84, 0.62],  # flair
    ],
    dtype=np.float32,
)
_WM, _GM, _NECROSIS, _OEDEMA, _ENHANCING = range(5)

_MIN_IMAGE_SIZE = 16
# Satellite blobs around the main tumour blob: the whole tumour is their union, as in MONAI's
# create_test_image_3d, which keeps the shapes irregular but cheap to draw.
_N_BLOBS = 3


@dataclass(frozen=True)
class _SiteStyle:
    """One hospital's acquisition style, fixed for the data set (arrays indexed by modality)."""

    gain: np.ndarray  # (M,) intensity scale
    offset: np.ndarray  # (M,) intensity offset
    contrast: np.ndarray  # (M,) multiplies each tissue's difference from grey matter
    noise: float  # std of additive Gaussian noise
    bias: float  # strength of the smooth multiplicative bias field
    bias_direction: np.ndarray  # (3,) unit vector of the field's gradient
    tumour_scale: float  # median whole-tumour radius, as a fraction of the half-width
    p_no_enhancing: float  # share of tumours without an enhancing rim (lower-grade)


def make_synthetic_segmentation(
    *,
    seed: int = 0,
    n_train: int = 36,
    n_val: int = 9,
    n_test: int = 18,
    image_size: int = 32,
    modalities: int = 4,
    n_groups: int = 9,
) -> DatasetBundle:
    """Generate BraTS-like multi-modal tumour volumes from ``n_groups`` non-IID hospitals.

    Each sample is a ``modalities`` x S x S x S volume (channels in the order T1, T1ce, T2,
    FLAIR; the first ``modalities`` are kept) and a label map in the ``"brats"`` convention:
    0 background, 1 necrotic core, 2 oedema, 3 enhancing tumour. The head is an ellipsoid of
    white and grey matter with an irregular boundary; the tumour is a union of spherical blobs
    (as in MONAI's ``create_test_image_3d``) whose nested shrunken copies form the core and
    its necrotic centre, so enhancing tumour lies inside the core and the core inside the
    oedema, as in BraTS. Some tumours have no enhancing rim.

    Every sample belongs to a hospital (its group, recorded in ``ArraySplit.groups``), dealt
    evenly and shuffled within each split. Each hospital has its own acquisition style: per
    modality gain, offset and tissue contrast, noise level, bias-field strength and direction,
    and tumour size distribution and grade mix. The sites are therefore non-IID in the way
    real scanners are: a model fine-tuned on one hospital fits that hospital better than a
    model shared by all. Intensities are not normalised per subject, so the hospital style
    stays visible, and are clipped to [0, 1].

    The hospital styles come from one child of ``np.random.SeedSequence(seed)`` and each split
    from its own child, so the test set does not change when the training size does.

    Args:
        seed: Generator seed.
        n_train: Training samples, at least ``n_groups`` (every hospital trains).
        n_val: Validation samples, at least 1.
        n_test: Test samples, at least 1.
        image_size: Side S of the cubic volumes, at least 16.
        modalities: Number of channels, 1 to 4.
        n_groups: Number of hospitals, at least 1.

    Returns:
        A segmentation bundle with ``label_convention == "brats"``, groups and group names
        ``hospital-0`` ... and ``source == "synthetic-seg(seed=..., ...)"``.

    Raises:
        ConfigError: An argument is out of range.

    """
    _check_int("n_groups", n_groups, low=1)
    _check_int("n_train", n_train, low=n_groups, why=f"n_groups={n_groups}")
    _check_int("n_val", n_val, low=1)
    _check_int("n_test", n_test, low=1)
    _check_int("image_size", image_size, low=_MIN_IMAGE_SIZE)
    _check_int("modalities", modalities, low=1, high=len(BRATS_MODALITIES))

    style_seq, *split_seqs = np.random.SeedSequence(seed).spawn(4)
    styles = _site_styles(np.random.default_rng(style_seq), n_groups=n_groups)
    splits = [
        _make_split(
            n=n, size=image_size, modalities=modalities, styles=styles, rng=np.random.default_rng(q)
        )
        for n, q in zip((n_train, n_val, n_test), split_seqs, strict=True)
    ]
    return DatasetBundle(
        name="synthetic-seg",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=len(BRATS_CLASS_NAMES),
        class_names=BRATS_CLASS_NAMES,
        source=(
            f"synthetic-seg(seed={seed}, image_size={image_size}, modalities={modalities}, "
            f"n_groups={n_groups})"
        ),
        task="segmentation",
        label_convention="brats",
        group_names=tuple(f"hospital-{g}" for g in range(n_groups)),
    )


def _check_int(
    name: str, value: object, *, low: int, high: int | None = None, why: str = ""
) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        reason = f" ({why})" if why else ""
        raise ConfigError(f"`{name}` must be an int {bound}{reason} (got {value!r}).")


def _site_styles(rng: np.random.Generator, *, n_groups: int) -> list[_SiteStyle]:
    styles = []
    m = len(BRATS_MODALITIES)
    for _ in range(n_groups):
        direction = rng.normal(size=3)
        styles.append(
            _SiteStyle(
                gain=rng.uniform(0.75, 1.25, m).astype(np.float32),
                offset=rng.uniform(0.0, 0.12, m).astype(np.float32),
                contrast=rng.uniform(0.55, 1.35, m).astype(np.float32),
                noise=float(rng.uniform(0.01, 0.07)),
                bias=float(rng.uniform(0.0, 0.3)),
                bias_direction=(direction / np.linalg.norm(direction)).astype(np.float32),
                tumour_scale=float(rng.uniform(0.3, 0.52)),
                p_no_enhancing=float(rng.uniform(0.0, 0.3)),
            )
        )
    return styles


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    # Partial-volume inside-ness: 1 well inside, 0 well outside, linear over one voxel.
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _smooth_field(
    rng: np.random.Generator, coords: np.ndarray, *, n: int, waves: int = 3
) -> np.ndarray:
    """(n, V) smooth random fields in [-1, 1] over the voxels: a few low-frequency plane waves."""
    freq = (rng.uniform(0.5, 2.0, (n, waves, 1)) * np.pi).astype(np.float32)
    direction = rng.normal(size=(n, waves, 3))
    direction = (direction / np.linalg.norm(direction, axis=2, keepdims=True)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, waves, 1)).astype(np.float32)
    # coords: (3, V) in [-1, 1]; projections (n, waves, V)
    proj = np.einsum("nwd,dv->nwv", direction, coords)
    return (np.cos(freq * proj + phase).sum(axis=1) / waves).astype(np.float32)


def _make_split(
    *,
    n: int,
    size: int,
    modalities: int,
    styles: list[_SiteStyle],
    rng: np.random.Generator,
) -> ArraySplit:
    half = size / 2.0
    axis = (np.arange(size, dtype=np.float32) + 0.5) / half - 1.0  # voxel centres in (-1, 1)
    coords = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1)  # (3, V)
    groups = rng.permutation(np.arange(n, dtype=np.int64) % len(styles))

    # Head: an ellipsoid whose boundary and white-matter core wobble smoothly.
    semi = rng.uniform(0.78, 0.92, (n, 3, 1)).astype(np.float32)
    head_centre = rng.uniform(-0.03, 0.03, (n, 3, 1)).astype(np.float32)
    rho = np.sqrt((((coords[None] - head_centre) / semi) ** 2).sum(axis=1))  # (n, V)
    wobble = _smooth_field(rng, coords, n=n)
    brain = _soft((1.0 + 0.04 * wobble - rho) * half * 0.85)
    white = _soft((0.62 + 0.1 * _smooth_field(rng, coords, n=n) - rho) * half * 0.85)

    # Tumour: main blob well inside the brain plus satellites; the core and necrotic centre
    # are the same blobs shrunk, so the compartments nest by construction.
    scale = np.array([styles[g].tumour_scale for g in groups], dtype=np.float32)
    r_main = np.clip(scale * np.exp(rng.normal(0, 0.18, n)), 0.2, 0.58).astype(np.float32)
    centre_dir = rng.normal(size=(n, 3))
    centre_dir /= np.linalg.norm(centre_dir, axis=1, keepdims=True)
    centre_dist = rng.uniform(0.0, 1.0, (n, 1)) * (0.62 - r_main[:, None]).clip(0.04)
    centre = (head_centre[:, :, 0] + centre_dir * centre_dist).astype(np.float32)  # (n, 3)
    offsets = rng.normal(size=(n, _N_BLOBS, 3))
    offsets /= np.linalg.norm(offsets, axis=2, keepdims=True)
    offsets *= rng.uniform(0.3, 0.6, (n, _N_BLOBS, 1)) * r_main[:, None, None]
    offsets[:, 0] = 0.0
    radii = r_main[:, None] * np.concatenate(
        [np.ones((n, 1)), rng.uniform(0.5, 0.8, (n, _N_BLOBS - 1))], axis=1
    )  # (n, blobs)
    blob_centres = (centre[:, None] + offsets).astype(np.float32)  # (n, blobs, 3)
    dist = np.sqrt(
        ((coords[None, None] - blob_centres[..., None]) ** 2).sum(axis=2)
    )  # (n, blobs, V)
    core_ratio = rng.uniform(0.62, 0.8, (n, 1))
    necrotic_ratio = rng.uniform(0.55, 0.8, (n, 1))
    no_rim = rng.random(n) < np.array([styles[g].p_no_enhancing for g in groups])

    def region(r: np.ndarray) -> np.ndarray:
        r = r[..., None].astype(np.float32)
        return np.minimum(_soft((r - dist).max(axis=1) * half), brain)

    # At least 1.5 voxels of oedema around the core and of rim around the necrosis, so every
    # compartment stays visible at coarse resolution; a blob too small for that has no core.
    margin = 1.5 / half
    core_radii = np.minimum(radii * core_ratio, radii - margin)
    necrotic_radii = np.where(
        no_rim[:, None], core_radii, np.minimum(core_radii * necrotic_ratio, core_radii - margin)
    )
    oedema = region(radii)
    core = region(core_radii)
    necrosis = region(necrotic_radii)

    labels = np.zeros((n, coords.shape[1]), dtype=np.int64)
    labels[oedema > 0.5] = 2
    labels[core > 0.5] = 3
    labels[necrosis > 0.5] = 1

    images = np.empty((n, modalities, coords.shape[1]), dtype=np.float32)
    texture = 0.03 * _smooth_field(rng, coords, n=n, waves=4)
    for i, g in enumerate(groups):
        st = styles[g]
        bias = np.exp(st.bias * (st.bias_direction @ coords))  # (V,)
        for m in range(modalities):
            tissue = st.contrast[m] * (_TISSUE[m] - _TISSUE[m, _GM]) + _TISSUE[m, _GM]
            value = tissue[_GM] + (tissue[_WM] - tissue[_GM]) * white[i] + texture[i]
            value += (tissue[_OEDEMA] - value) * oedema[i]
            value += (tissue[_ENHANCING] - value) * core[i]
            value += (tissue[_NECROSIS] - value) * necrosis[i]
            signal = st.gain[m] * bias * brain[i] * value + st.offset[m]
            images[i, m] = signal + st.noise * rng.standard_normal(signal.shape, np.float32)
    np.clip(images, 0.0, 1.0, out=images)

    spatial = (size, size, size)
    return ArraySplit(
        images=images.reshape(n, modalities, *spatial),
        labels=labels.reshape(n, *spatial),
        groups=groups,
    )
