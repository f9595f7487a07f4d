"""Non-finite pixels are refused at load time, naming the loader or file, split and count.

A NaN or infinite pixel would turn a site's DP update into NaN; the refusal must say where
the bad values are, whichever loader produced them.
"""

from __future__ import annotations

import numpy as np
import pytest

from securefed.data import ArraySplit, DatasetBundle, load_dataset, registry
from securefed.errors import DataError


def _images(n: int, spatial: tuple[int, ...], *, bad: dict[tuple[int, ...], float]) -> np.ndarray:
    images = np.full((n, 1, *spatial), 0.5, np.float32)
    for where, value in bad.items():
        images[where] = value
    return images


def _classification(val_images: np.ndarray) -> DatasetBundle:
    def split(images: np.ndarray) -> ArraySplit:
        return ArraySplit(images=images, labels=(np.arange(len(images)) % 2).astype(np.int64))

    clean = _images(4, (3, 3), bad={})
    return DatasetBundle(
        name="toy",
        train=split(clean),
        val=split(val_images),
        test=split(clean),
        num_classes=2,
        class_names=("a", "b"),
        source="in memory",
    )


def _segmentation(val_volumes: np.ndarray) -> DatasetBundle:
    def split(volumes: np.ndarray) -> ArraySplit:
        labels = np.zeros((len(volumes), *volumes.shape[2:]), np.int64)
        labels[:, 0, 0, 0] = 1
        return ArraySplit(images=volumes, labels=labels)

    clean = _images(2, (2, 3, 3), bad={})
    return DatasetBundle(
        name="toy-seg",
        train=split(clean),
        val=split(val_volumes),
        test=split(clean),
        num_classes=2,
        class_names=("background", "tumour"),
        source="in memory",
        task="segmentation",
    )


@pytest.fixture
def loaders(monkeypatch):
    """A private loader registry, so these loaders do not leak into other tests."""
    monkeypatch.setattr(registry, "_LOADERS", {})
    return registry


@pytest.mark.parametrize(
    ("name", "make"),
    [
        # Classification images: one NaN and one +Inf in two records of the val split.
        (
            "nan-images",
            lambda: _classification(
                _images(4, (3, 3), bad={(1, 0, 0, 0): np.nan, (3, 0, 2, 2): np.inf})
            ),
        ),
        # Segmentation volumes (N, C, D, H, W): -Inf and NaN in one volume.
        (
            "nan-volumes",
            lambda: _segmentation(
                _images(2, (2, 3, 3), bad={(1, 0, 0, 0, 0): -np.inf, (1, 0, 1, 2, 2): np.nan})
            ),
        ),
    ],
)
def test_a_registered_loader_with_non_finite_pixels_is_refused_naming_it(loaders, name, make):
    # Prepare
    loaders.register_dataset(name)(lambda seed=0: make())

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(name=name)

    # Assert: one line naming the data set, how many values and where the first one is
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--dataset {name!r}: ")
    assert "2 non-finite value(s)" in message
    assert "first record 1" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_npz_with_non_finite_pixels_is_refused_naming_file_split_and_count(tmp_path, bad):
    # Prepare: float images in [0, 1] except three values in the val split
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.random((n, 5, 5), dtype=np.float32)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    arrays["val_images"][0, 1, 1] = bad
    arrays["val_images"][2, :2, 0] = bad
    path = tmp_path / "floats.npz"
    np.savez(path, **arrays)

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(data=path)

    # Assert
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: `val_images` holds 3 non-finite value(s)")


def test_finite_float_pixels_still_load(loaders):
    # Prepare: the refusal must not catch clean float data
    loaders.register_dataset("clean-floats")(
        lambda seed=0: _classification(_images(4, (3, 3), bad={}))
    )

    # Execute
    bundle = load_dataset(name="clean-floats")

    # Assert
    assert bundle.val.images.dtype == np.float32
    assert np.isfinite(bundle.val.images).all()
