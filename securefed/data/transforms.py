"""TorchIO preprocessing and training-time augmentation, reproducible per sample and epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from securefed.data.bundle import ArraySplit
from securefed.errors import ConfigError, OptionalDependencyError

if TYPE_CHECKING:
    import torchio as tio

__all__ = [
    "RESCALE_PERCENTILES",
    "AugmentedDataset",
    "augment_transform",
    "foreground_mask",
    "preprocess_transform",
]

#: Intensity percentiles mapped to 0 and 1 by preprocessing; values beyond them are clipped,
#: so a few hot voxels (vessels, artefacts) cannot squeeze the tissue contrast.
RESCALE_PERCENTILES: tuple[float, float] = (0.5, 99.5)

# Spatial augmentation strengths. Modest on purpose: the label maps must stay plausible, and
# DP-SGD already adds noise, so heavy augmentation mostly slows convergence.
_FLIP_P = 0.5
_AFFINE_P = 0.3
_ELASTIC_P = 0.2
_BIAS_P = 0.3
_NOISE_P = 0.3


def _torchio() -> Any:
    try:
        import torchio as tio
    except ImportError as exc:  # pragma: no cover - torchio is a core dependency
        raise OptionalDependencyError(
            "TorchIO is needed for 3D preprocessing and augmentation: pip install torchio."
        ) from exc
    return tio


def foreground_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Voxels brighter than the image minimum, TorchIO's ``masking_method`` for intensities.

    In skull-stripped MR (BraTS) the background is exactly the minimum, so this is the head.
    """
    return tensor > tensor.min()


def preprocess_transform(*, target_shape: Sequence[int]) -> tio.Compose:
    """Deterministic preprocessing of one subject: orientation, size, intensities in [0, 1].

    ``ToCanonical`` (RAS+ orientation), ``Resize`` to ``target_shape`` (linear for images,
    nearest neighbour for label maps, so labels stay integers), ``ZNormalization`` over the
    foreground (:func:`foreground_mask`), ``RescaleIntensity`` of the foreground's
    :data:`RESCALE_PERCENTILES` to (0, 1) with clipping, and a final ``Clamp`` to [0, 1]. The
    output satisfies the :class:`~securefed.data.ArraySplit` invariant (float32 in [0, 1]).

    Args:
        target_shape: Output spatial shape, three positive ints.

    Returns:
        A ``torchio.Compose``.

    Raises:
        ConfigError: ``target_shape`` is not three positive ints.

    """
    shape = _check_shape(target_shape)
    tio = _torchio()
    return tio.Compose(
        [
            tio.ToCanonical(),
            tio.Resize(shape),
            tio.ZNormalization(masking_method=foreground_mask),
            tio.RescaleIntensity(
                out_min_max=(0.0, 1.0),
                percentiles=RESCALE_PERCENTILES,
                masking_method=foreground_mask,
            ),
            tio.Clamp(out_min=0.0, out_max=1.0),
        ]
    )


def augment_transform(*, spatial_dims: int = 3) -> tio.Compose:
    """Random training augmentation; apply to training data only, never to held-out data.

    Random flips (p 0.5 per axis; 2D: left-right only), affine scaling (±10%) and rotation
    (±10°; 2D: in-plane only) with p 0.3, elastic deformation (7 control points, at most 2
    voxels) with p 0.2, a multiplicative bias field (coefficients ±0.3) with p 0.3, and
    Gaussian noise (std up to 0.03) with p 0.3. TorchIO interpolates label maps with nearest
    neighbour and leaves them out of the intensity transforms, so labels stay integers.

    2D images are handled as TorchIO's (C, H, W, 1) volumes: the singleton axis is neither
    flipped, rotated out of plane, scaled nor deformed.

    Args:
        spatial_dims: 2 for (C, H, W) images, 3 for (C, D, H, W) volumes.

    Returns:
        A ``torchio.Compose``; it draws from torch's global RNG (see :class:`AugmentedDataset`).

    Raises:
        ConfigError: ``spatial_dims`` is not 2 or 3.

    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"`spatial_dims` must be 2 or 3 (got {spatial_dims!r}).")
    tio = _torchio()
    if spatial_dims == 3:
        spatial = [
            tio.RandomFlip(axes=(0, 1, 2), flip_probability=_FLIP_P),
            tio.RandomAffine(scales=0.1, degrees=10, p=_AFFINE_P),
            tio.RandomElasticDeformation(num_control_points=7, max_displacement=2.0, p=_ELASTIC_P),
        ]
    else:
        spatial = [
            tio.RandomFlip(axes=(1,), flip_probability=_FLIP_P),
            tio.RandomAffine(
                scales=(0.9, 1.1, 0.9, 1.1, 1.0, 1.0), degrees=(0, 0, 0, 0, -10, 10), p=_AFFINE_P
            ),
            # Five points on the singleton axis: TorchIO needs more than 2 * locked_borders.
            tio.RandomElasticDeformation(
                num_control_points=(7, 7, 5), max_displacement=(2.0, 2.0, 0.0), p=_ELASTIC_P
            ),
        ]
    intensity = [
        tio.RandomBiasField(coefficients=0.3, p=_BIAS_P),
        tio.RandomNoise(std=(0.0, 0.03), p=_NOISE_P),
    ]
    return tio.Compose(spatial + intensity)


class AugmentedDataset(Dataset):
    """A torch ``Dataset`` view of a split that applies a TorchIO transform on every access.

    ``dataset[i]`` is ``(image, label)``: a float32 tensor (C, *spatial) clamped back to [0, 1]
    and an int64 tensor of shape () (classification) or (*spatial) (segmentation). The
    transform runs under ``torch.random.fork_rng`` seeded from ``(seed, epoch, i)``, so the
    augmented sample depends only on those three numbers: not on the access order, the
    DataLoader workers or the batch composition (Opacus' Poisson sampling), and the global
    torch RNG is left as it was. Call :meth:`set_epoch` before each epoch for fresh draws;
    with ``persistent_workers`` the workers keep the epoch they were started with.

    Args:
        split: The (training) split.
        transform: A TorchIO transform, e.g. :func:`augment_transform`.
        seed: Augmentation seed.

    """

    def __init__(self, split: ArraySplit, *, transform: Any, seed: int) -> None:
        if not isinstance(split, ArraySplit):
            raise ConfigError(f"`split` must be an ArraySplit (got {type(split).__name__}).")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"`seed` must be a non-negative int (got {seed!r}).")
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self._two_d = split.images.ndim == 4

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation draws ``__getitem__`` returns."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"`epoch` must be a non-negative int (got {epoch!r}).")
        self.epoch = epoch

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the augmented ``(image, label)`` of sample ``index`` for the current epoch."""
        tio = _torchio()
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image = torch.tensor(self.split.images[index])
        label = torch.tensor(self.split.labels[index])
        segmentation = label.ndim > 0
        if self._two_d:  # TorchIO's 2D convention: a trailing singleton depth axis
            image = image[..., None]
            label = label[..., None] if segmentation else label
        images = {"image": tio.ScalarImage(tensor=image)}
        if segmentation:
            images["label"] = tio.LabelMap(tensor=label[None])
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state[0]))
            out = self.transform(tio.Subject(images))
        image = out["image"].data.to(torch.float32).clamp_(0.0, 1.0)
        if segmentation:
            label = out["label"].data[0].round().to(torch.int64)
        if self._two_d:
            image = image[..., 0]
            label = label[..., 0] if segmentation else label
        return image.contiguous(), label.to(torch.int64)


def _check_shape(target_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(target_shape) if isinstance(target_shape, Sequence) else (target_shape,)
    if len(shape) != 3 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ConfigError(f"`target_shape` must be three positive ints (got {target_shape!r}).")
    return (shape[0], shape[1], shape[2])
