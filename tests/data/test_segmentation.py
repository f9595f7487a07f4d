"""Synthetic BraTS-like volumes: layout, determinism, anatomy, contrasts and hospital styles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from securefed.data import BRATS_CLASS_NAMES, make_synthetic_segmentation
from securefed.errors import ConfigError
from securefed.seg_metrics import segmentation_metrics


@pytest.fixture(scope="module")
def bundle():
    return make_synthetic_segmentation(seed=0)


def test_default_bundle_layout(bundle):
    # Assert
    assert bundle.task == "segmentation" and bundle.label_convention == "brats"
    assert bundle.class_names == BRATS_CLASS_NAMES and bundle.num_classes == 4
    assert [len(bundle.train), len(bundle.val), len(bundle.test)] == [36, 9, 18]
    assert bundle.train.images.shape == (36, 4, 32, 32, 32)
    assert bundle.train.labels.shape == (36, 32, 32, 32)
    assert bundle.group_names == tuple(f"hospital-{g}" for g in range(9))
    for split in (bundle.train, bundle.val, bundle.test):
        assert set(split.group_counts().values()) == {len(split) // 9}, "hospitals are even"
    counts = bundle.describe()["class_counts"]["train"]
    assert counts[0] == counts[2] == 36, "every volume has background and oedema"
    assert min(counts[1], counts[3]) >= 18, "most have necrosis and an enhancing rim"


def test_same_seed_same_data_and_test_split_independent_of_train_size(bundle):
    # Execute
    again = make_synthetic_segmentation(seed=0)
    other = make_synthetic_segmentation(seed=1)
    fewer = make_synthetic_segmentation(seed=0, n_train=18)

    # Assert
    assert again.fingerprint == bundle.fingerprint
    assert other.fingerprint != bundle.fingerprint
    np.testing.assert_array_equal(fewer.test.images, bundle.test.images)
    np.testing.assert_array_equal(fewer.test.labels, bundle.test.labels)


def test_tumour_compartments_nest_like_brats(bundle):
    # Prepare
    labels = np.concatenate([bundle.train.labels, bundle.val.labels, bundle.test.labels])

    # Execute: one-voxel dilations of the tumour core and of the necrosis
    for label_map in labels:
        core = np.isin(label_map, (1, 3))
        necrosis = label_map == 1
        around_core = ndimage.binary_dilation(core) & ~core
        around_necrosis = ndimage.binary_dilation(necrosis) & ~necrosis

        # Assert: oedema surrounds the core; the core is never next to healthy tissue
        assert core.any() and label_map.max() >= 2
        assert np.all(label_map[around_core] == 2)
        if (label_map == 3).any():  # with an enhancing rim, the necrosis sits inside it
            assert np.all(np.isin(label_map[around_necrosis], (1, 3)))


def test_some_tumours_have_no_enhancing_rim(bundle):
    # Execute
    has_et = (bundle.train.labels == 3).reshape(len(bundle.train), -1).any(axis=1)

    # Assert
    assert 0 < has_et.sum() < len(bundle.train)


def test_modalities_show_the_textbook_contrasts(bundle):
    # Prepare
    images, labels = bundle.train.images, bundle.train.labels
    t1ce, t2, flair = images[:, 1], images[:, 2], images[:, 3]
    brain = images[:, 0] > 0.2  # the head, not the dark background

    # Execute
    def mean(channel, mask):
        return float(channel[mask].mean())

    # Assert: enhancing rim bright on T1ce, oedema bright on FLAIR, necrosis bright on T2
    assert mean(t1ce, labels == 3) > mean(t1ce, labels == 2) + 0.2
    assert mean(flair, labels == 2) > mean(flair, brain & (labels == 0)) + 0.2
    assert mean(t2, labels == 1) > mean(t2, brain & (labels == 0)) + 0.2
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_each_hospital_has_a_recognisable_acquisition_style(bundle):
    # Prepare: per-volume intensity statistics per modality
    def stats(split):
        x = split.images.reshape(len(split), split.images.shape[1], -1)
        return np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)

    train, test = stats(bundle.train), stats(bundle.test)
    centroids = np.stack([train[bundle.train.groups == g].mean(axis=0) for g in range(9)])

    # Execute: nearest hospital centroid
    guess = ((test[:, None] - centroids) ** 2).sum(axis=2).argmin(axis=1)

    # Assert: far above the 1/9 of chance
    assert np.mean(guess == bundle.test.groups) >= 0.8


def _fit_voxel_classifier(x: np.ndarray, y: np.ndarray) -> list[tuple]:
    """Gaussian class-conditional (QDA) per-voxel classifier over the modality intensities."""
    model = []
    for c in range(4):
        z = x[y == c]
        cov = np.cov(z.T) + 1e-4 * np.eye(x.shape[1])
        model.append((z.mean(axis=0), np.linalg.inv(cov), np.linalg.slogdet(cov)[1], len(z)))
    total = sum(m[3] for m in model)
    return [(mu, prec, logdet, np.log(n / total)) for mu, prec, logdet, n in model]


def _predict(model: list[tuple], x: np.ndarray) -> np.ndarray:
    scores = [
        -0.5 * np.einsum("...i,ij,...j->...", x - mu, prec, x - mu) - 0.5 * logdet + prior
        for mu, prec, logdet, prior in model
    ]
    return np.argmax(np.stack(scores, axis=-1), axis=-1)


def test_a_hospitals_own_model_beats_the_pooled_one_there():
    # Prepare: the non-IID property digital twins rely on, with the Bayes-style voxel
    # classifier standing in for a network (3 test volumes per hospital)
    data = make_synthetic_segmentation(seed=0, n_test=27)
    train_x = np.moveaxis(data.train.images, 1, -1).reshape(len(data.train), -1, 4)
    test_x = np.moveaxis(data.test.images, 1, -1).reshape(len(data.test), -1, 4)
    train_y = data.train.labels.reshape(len(data.train), -1)
    test_y = data.test.labels
    pooled = _fit_voxel_classifier(train_x.reshape(-1, 4), train_y.reshape(-1))

    # Execute
    gains = []
    for g in range(9):
        mine, theirs = data.train.groups == g, data.test.groups == g
        local = _fit_voxel_classifier(train_x[mine].reshape(-1, 4), train_y[mine].reshape(-1))
        scores = [
            segmentation_metrics(
                y_true=test_y[theirs],
                y_pred=_predict(m, test_x[theirs]).reshape(test_y[theirs].shape),
                num_classes=4,
            )["mean_dice"]
            for m in (local, pooled)
        ]
        gains.append(scores[0] - scores[1])

    # Assert
    assert np.mean(gains) > 0.05
    assert sum(g > 0 for g in gains) >= 6


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n_train": 8}, r"`n_train` must be an int at least 9 \(n_groups=9\)"),
        ({"n_val": 0}, "`n_val` must be an int at least 1"),
        ({"image_size": 12}, "`image_size` must be an int at least 16"),
        ({"modalities": 5}, r"`modalities` must be an int in \[1, 4\]"),
        ({"n_groups": True}, "`n_groups` must be an int at least 1"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, expected):
    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        make_synthetic_segmentation(**kwargs)


def test_fewer_modalities_keep_the_first_channels():
    # Execute
    small = make_synthetic_segmentation(
        seed=3, n_train=2, n_val=1, n_test=1, n_groups=2, image_size=16, modalities=2
    )

    # Assert
    assert small.train.images.shape == (2, 2, 16, 16, 16)
    assert small.in_channels == 2 and small.image_shape == (16, 16, 16)
