"""The synthetic shapes data set: determinism, layout, and learnable-but-not-trivial classes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import RidgeClassifier

from securefed.data import make_synthetic
from securefed.errors import ConfigError


@pytest.fixture(scope="module")
def default_2d():
    return make_synthetic(seed=0)


def _flat(split):
    return split.images.reshape(len(split), -1)


def test_default_layout_is_small_balanced_grayscale_28px(default_2d):
    # Assert
    bundle = default_2d
    assert bundle.train.images.shape == (2400, 1, 28, 28)
    assert (len(bundle.val), len(bundle.test)) == (400, 800)
    assert bundle.class_names == ("disc", "ring", "box", "cross")
    assert bundle.describe()["class_counts"]["train"] == [600] * 4
    assert 0.0 <= float(bundle.train.images.min()) and float(bundle.train.images.max()) <= 1.0
    assert bundle.source.startswith("synthetic(seed=0")


def test_same_seed_same_data_other_seed_other_data(default_2d):
    # Execute
    again = make_synthetic(seed=0)
    other = make_synthetic(seed=1)

    # Assert
    np.testing.assert_array_equal(again.train.images, default_2d.train.images)
    np.testing.assert_array_equal(again.test.labels, default_2d.test.labels)
    assert again.fingerprint == default_2d.fingerprint
    assert other.fingerprint != default_2d.fingerprint
    assert not np.array_equal(other.train.images, default_2d.train.images)


def test_test_split_does_not_depend_on_training_size(default_2d):
    # Execute
    smaller = make_synthetic(seed=0, n_train=100)

    # Assert
    np.testing.assert_array_equal(smaller.test.images, default_2d.test.images)
    np.testing.assert_array_equal(smaller.val.labels, default_2d.val.labels)


def test_pixels_carry_the_class_a_linear_model_beats_chance(default_2d):
    # Prepare
    train, test = default_2d.train, default_2d.test

    # Execute
    model = RidgeClassifier(alpha=10.0).fit(_flat(train), train.labels)
    accuracy = model.score(_flat(test), test.labels)

    # Assert: chance is 0.25; a CNN reaches > 0.9 (checked with the models)
    assert accuracy > 0.6


def test_mean_intensity_alone_does_not_identify_the_class(default_2d):
    # Prepare: the best classifier on binned mean intensity, fit on train
    train_mean = default_2d.train.images.mean(axis=(1, 2, 3))
    test_mean = default_2d.test.images.mean(axis=(1, 2, 3))
    edges = np.quantile(train_mean, np.linspace(0, 1, 21)[1:-1])
    train_bin, test_bin = np.digitize(train_mean, edges), np.digitize(test_mean, edges)
    majority = np.array(
        [
            np.bincount(default_2d.train.labels[train_bin == b], minlength=4).argmax()
            for b in range(20)
        ]
    )

    # Execute
    accuracy = float(np.mean(majority[test_bin] == default_2d.test.labels))

    # Assert
    assert accuracy < 0.5


def test_a_brightness_threshold_cannot_separate_two_classes():
    # Prepare
    bundle = make_synthetic(seed=0, num_classes=2)
    means = bundle.test.images.mean(axis=(1, 2, 3))
    labels = bundle.test.labels

    # Execute: the best threshold in hindsight, in either direction
    order = np.argsort(means)
    zeros_below = np.concatenate([[0], np.cumsum(labels[order] == 0)])
    ones_below = np.concatenate([[0], np.cumsum(labels[order] == 1)])
    above_is_one = (zeros_below + ones_below[-1] - ones_below) / labels.size
    best = max(above_is_one.max(), (1 - above_is_one).max())

    # Assert
    assert best < 0.75


def test_3d_volumes_are_small_and_learnable():
    # Execute
    bundle = make_synthetic(seed=0, spatial_dims=3, n_train=400, n_val=8, n_test=200)
    model = RidgeClassifier(alpha=10.0).fit(_flat(bundle.train), bundle.train.labels)

    # Assert
    assert bundle.train.images.shape == (400, 1, 16, 16, 16)
    assert bundle.spatial_dims == 3 and bundle.name == "synthetic3d"
    assert bundle.class_names == ("sphere", "cube", "shell", "jack")
    assert model.score(_flat(bundle.test), bundle.test.labels) > 0.6


def test_fewer_classes_and_other_sizes():
    # Execute
    bundle = make_synthetic(seed=2, num_classes=2, n_train=20, n_val=4, n_test=6, image_size=20)

    # Assert
    assert bundle.class_names == ("disc", "ring")
    assert bundle.train.images.shape == (20, 1, 20, 20)
    assert set(bundle.test.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"spatial_dims": 4}, "`spatial_dims`"),
        ({"num_classes": 5}, "`num_classes`"),
        ({"num_classes": 1}, "`num_classes`"),
        ({"n_train": 3}, "`n_train`"),
        ({"n_test": 2.5}, "`n_test`"),
        ({"image_size": 8}, "`image_size`"),
        ({"spatial_dims": 3, "image_size": 15}, "at least 16 in 3D"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, expected):
    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        make_synthetic(seed=0, **kwargs)
