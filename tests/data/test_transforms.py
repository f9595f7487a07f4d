"""TorchIO preprocessing and the reproducible augmented dataset (2D classification, 3D seg)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio
from torch.utils.data import DataLoader

from securefed.data import ArraySplit, make_synthetic, make_synthetic_segmentation
from securefed.data.transforms import (
    AugmentedDataset,
    augment_transform,
    preprocess_transform,
)
from securefed.errors import ConfigError


@pytest.fixture(scope="module")
def seg_split() -> ArraySplit:
    return make_synthetic_segmentation(
        seed=0, n_train=4, n_val=1, n_test=1, n_groups=2, image_size=16, modalities=2
    ).train


def test_preprocessing_resizes_and_rescales_robustly_to_unit_range():
    # Prepare: background 0, foreground 1..1000 and one hot voxel of 1e6 (an artefact)
    rng = np.random.default_rng(0)
    data = np.zeros((1, 20, 20, 20), np.float32)
    data[0, 2:18, 2:18, 2:18] = rng.uniform(1, 1000, (16, 16, 16))
    data[0, 10, 10, 10] = 1e6
    labels = np.zeros((1, 20, 20, 20), np.int64)
    labels[0, 5:15, 5:15, 5:15] = 3
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=torch.from_numpy(data)),
        label=tio.LabelMap(tensor=torch.from_numpy(labels)),
    )

    # Execute
    out = preprocess_transform(target_shape=(10, 12, 8))(subject)

    # Assert: the artefact is clipped instead of squeezing the tissue into a sliver near 0
    image, label = out["image"].data.numpy(), out["label"].data.numpy()
    assert image.shape == (1, 10, 12, 8) and label.shape == (1, 10, 12, 8)
    assert image.min() >= 0.0 and image.max() <= 1.0
    foreground = image[0, 2:8, 2:10, 2:6]
    assert 0.3 < float(np.median(foreground)) < 0.7
    assert set(np.unique(label).tolist()) == {0, 3}, "nearest neighbour keeps labels integer"


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 0), (8, 8, 8.0), 8])
def test_preprocessing_needs_three_positive_ints(shape):
    # Execute / Assert
    with pytest.raises(ConfigError, match="`target_shape` must be three positive ints"):
        preprocess_transform(target_shape=shape)


def test_augmentation_needs_2_or_3_dims():
    # Execute / Assert
    with pytest.raises(ConfigError, match="`spatial_dims` must be 2 or 3"):
        augment_transform(spatial_dims=1)


def test_segmentation_items_keep_types_ranges_and_label_values(seg_split):
    # Prepare
    dataset = AugmentedDataset(seg_split, transform=augment_transform(), seed=0)
    allowed = set(np.unique(seg_split.labels).tolist())

    # Execute
    items = [dataset[i] for i in range(len(dataset))]

    # Assert
    for image, label in items:
        assert image.dtype == torch.float32 and image.shape == (2, 16, 16, 16)
        assert label.dtype == torch.int64 and label.shape == (16, 16, 16)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert set(torch.unique(label).tolist()) <= allowed


def test_spatial_augmentation_moves_image_and_label_together():
    # Prepare: an image that *is* its label map (0 or 1 for labels 0 or 3), so both must
    # deform alike; linear interpolation of the labels would create 1s and 2s at the edge
    labels = np.zeros((3, 16, 16, 16), np.int64)
    labels[:, 4:12, 3:9, 5:13] = 3
    split = ArraySplit(images=(labels[:, None] / 3).astype(np.float32), labels=labels)
    dataset = AugmentedDataset(split, transform=augment_transform(), seed=5)

    # Execute
    agreement, values = [], set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            image, label = dataset[i]
            agreement.append(float(((image[0] > 0.5) == (label == 3)).float().mean()))
            values.update(torch.unique(label).tolist())

    # Assert
    assert min(agreement) > 0.95
    assert values == {0, 3}


def test_items_depend_only_on_seed_epoch_and_index(seg_split):
    # Prepare
    transform = augment_transform()
    dataset = AugmentedDataset(seg_split, transform=transform, seed=3)
    twin = AugmentedDataset(seg_split, transform=transform, seed=3)
    other_seed = AugmentedDataset(seg_split, transform=transform, seed=4)
    rng_before = torch.random.get_rng_state()

    # Execute: the twin is read in reverse order, after unrelated draws
    forward = [dataset[i] for i in range(4)]
    torch.rand(10)
    backward = [twin[i] for i in reversed(range(4))][::-1]
    rng_after_reads = torch.random.get_rng_state()
    dataset.set_epoch(1)
    next_epoch = [dataset[i] for i in range(4)]
    different_seed = [other_seed[i] for i in range(4)]

    # Assert
    for (a_img, a_lab), (b_img, b_lab) in zip(forward, backward, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(forward, next_epoch, strict=True))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(forward, different_seed, strict=True))
    torch.random.set_rng_state(rng_before)
    torch.rand(10)
    assert torch.equal(torch.random.get_rng_state(), rng_after_reads), "global RNG untouched"


def test_classification_2d_items_keep_shape_and_label():
    # Prepare
    split = make_synthetic(seed=0, n_train=8, n_val=4, n_test=4).train
    dataset = AugmentedDataset(split, transform=augment_transform(spatial_dims=2), seed=0)

    # Execute
    items = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        items.extend((i, *dataset[i]) for i in range(len(dataset)))

    # Assert
    for i, image, label in items:
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        assert label.shape == () and label.dtype == torch.int64
        assert int(label) == int(split.labels[i])
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    changed = [not np.allclose(image.numpy(), split.images[i]) for i, image, _ in items]
    assert 0 < sum(changed), "augmentation happens"


def test_dataloader_batches_augmented_volumes(seg_split):
    # Prepare
    dataset = AugmentedDataset(seg_split, transform=augment_transform(), seed=0)

    # Execute
    images, labels = next(iter(DataLoader(dataset, batch_size=2)))

    # Assert
    assert images.shape == (2, 2, 16, 16, 16) and labels.shape == (2, 16, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"seed": -1}, "`seed` must be a non-negative int"),
        ({"split": "x"}, "must be an ArraySplit"),
    ],
)
def test_augmented_dataset_rejects_bad_arguments(seg_split, kwargs, expected):
    # Prepare
    call = {"split": seg_split, "transform": augment_transform(), "seed": 0} | kwargs
    split = call.pop("split")

    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        AugmentedDataset(split, **call)
    with pytest.raises(IndexError):
        AugmentedDataset(seg_split, transform=augment_transform(), seed=0)[4]
