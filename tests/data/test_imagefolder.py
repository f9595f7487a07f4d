"""Image-folder loading: layout rules, channel and size handling, carved val, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from securefed.data import load_image_folder
from securefed.errors import ConfigError, DataError


def _write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _make_tree(root: Path, *, splits=("train", "val", "test"), per_class=4, size=(6, 5)) -> Path:
    """Gray PNGs whose pixel value encodes (split, class, index) so order can be checked."""
    for s, split in enumerate(splits):
        for c, cls in enumerate(("benign", "malignant")):
            for i in range(per_class):
                value = 100 * s + 10 * c + i
                _write(root / split / cls / f"{i:02d}.png", Image.new("L", size, color=value))
    return root


def test_grayscale_tree_loads_with_sorted_class_labels_and_exact_pixels(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "study")

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    assert bundle.name == "study"
    assert bundle.class_names == ("benign", "malignant")
    assert bundle.train.images.shape == (8, 1, 5, 6)
    assert bundle.train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    expected = np.array([0, 1, 2, 3, 10, 11, 12, 13], dtype=np.float32) / 255
    np.testing.assert_array_equal(bundle.train.images[:, 0, 0, 0], expected)
    assert bundle.test.images[0, 0, 0, 0] == np.float32(200 / 255)
    assert bundle.source == str(root.resolve())


def test_any_rgb_image_makes_all_rgb_with_gray_replicated(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    _write(root / "train" / "benign" / "zz.jpg", Image.new("RGB", (6, 5), color=(255, 0, 0)))

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    assert bundle.in_channels == 3
    gray = bundle.train.images[0]
    assert np.all(gray[0] == gray[1]) and np.all(gray[1] == gray[2])
    red = bundle.train.images[4]  # sorted: 00..03.png then zz.jpg
    assert red[0].min() > 0.9 and red[1].max() < 0.1


def _gray_palette_image(size: tuple[int, int], value: int) -> Image.Image:
    image = Image.new("P", size, color=0)
    image.putpalette([v for level in range(256) for v in (level, level, level)])
    image.paste(value, (0, 0, *size))
    return image


GRAY_WITH_EXTRA_BANDS = {
    "RGBA": lambda size, v: Image.new("RGBA", size, color=(v, v, v, 255)),
    "RGBA half transparent": lambda size, v: Image.new("RGBA", size, color=(v, v, v, 128)),
    "LA": lambda size, v: Image.new("LA", size, color=(v, 60)),
    "RGB": lambda size, v: Image.new("RGB", size, color=(v, v, v)),
    "P": _gray_palette_image,
}


@pytest.mark.parametrize("kind", sorted(GRAY_WITH_EXTRA_BANDS))
def test_gray_images_with_alpha_or_colour_bands_load_as_one_channel(tmp_path, kind):
    # Prepare
    root = _make_tree(tmp_path / "d")
    make = GRAY_WITH_EXTRA_BANDS[kind]
    _write(root / "train" / "benign" / "scan.png", make((6, 5), 77))

    # Execute
    bundle = load_image_folder(root=root)

    # Assert: alpha is dropped, not composited, so the pixel keeps its value
    assert bundle.in_channels == 1
    index = 4  # after 00..03.png
    np.testing.assert_array_equal(bundle.train.images[index], np.float32(77 / 255))


def test_rgba_gray_beside_sixteen_bit_gray_stays_one_channel(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    _write(root / "val" / "benign" / "a.png", Image.new("RGBA", (6, 5), color=(9, 9, 9, 0)))
    pixels = np.full((5, 6), 40000, dtype=np.uint16)
    _write(root / "test" / "malignant" / "xray.png", Image.fromarray(pixels))

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    assert bundle.in_channels == 1
    assert bundle.val.images[4, 0, 0, 0] == np.float32(9 / 255)  # after 00..03.png


def test_colour_rgba_image_makes_all_rgb_with_alpha_dropped(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    _write(root / "train" / "benign" / "z.png", Image.new("RGBA", (6, 5), color=(200, 0, 0, 0)))

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    assert bundle.in_channels == 3
    red = bundle.train.images[4]
    np.testing.assert_array_equal(red[0], np.float32(200 / 255))
    assert red[1].max() == 0 and red[2].max() == 0


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    pixels = np.full((5, 6), 40000, dtype=np.uint16)
    _write(root / "train" / "benign" / "xray.png", Image.fromarray(pixels))

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    index = 4  # after 00..03.png
    assert bundle.in_channels == 1
    np.testing.assert_allclose(bundle.train.images[index], 40000 / 65535, rtol=1e-6)


def test_nested_patient_folders_and_hidden_files(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    _write(root / "train" / "benign" / "patient7" / "a.png", Image.new("L", (6, 5)))
    (root / "train" / "benign" / ".DS_Store").write_bytes(b"junk")

    # Execute
    bundle = load_image_folder(root=root)

    # Assert
    assert len(bundle.train) == 9


def test_missing_val_is_a_stratified_seeded_holdout_of_train(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d", splits=("train", "test"), per_class=20)

    # Execute
    first = load_image_folder(root=root, seed=5)
    again = load_image_folder(root=root, seed=5)
    other = load_image_folder(root=root, seed=6)

    # Assert
    assert first.describe()["class_counts"]["val"] == [2, 2]
    assert first.describe()["class_counts"]["train"] == [18, 18]
    pool = np.concatenate([first.train.images[:, 0, 0, 0], first.val.images[:, 0, 0, 0]])
    assert sorted(pool.tolist()) == sorted(
        (np.array([10 * c + i for c in range(2) for i in range(20)], np.float32) / 255).tolist()
    )
    assert again.fingerprint == first.fingerprint
    assert other.fingerprint != first.fingerprint
    assert "seed=5" in first.source


def test_image_size_resizes_everything(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    _write(root / "test" / "benign" / "big.png", Image.new("L", (40, 30), color=255))

    # Execute
    bundle = load_image_folder(root=root, image_size=(7, 9))

    # Assert
    assert bundle.image_shape == (7, 9)
    big = bundle.test.images[4]
    np.testing.assert_allclose(big, 1.0, atol=1e-6)


def test_unequal_sizes_without_image_size_name_the_odd_file(tmp_path):
    # Prepare
    root = _make_tree(tmp_path / "d")
    odd = _write(root / "val" / "malignant" / "odd.png", Image.new("L", (8, 8)))

    # Execute / Assert
    with pytest.raises(DataError, match="pass `image_size`") as info:
        load_image_folder(root=root)
    assert str(info.value).startswith(f"{odd}: ")


def _corrupt_image(root: Path) -> Path:
    path = root / "train" / "benign" / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return path


def _stray_file(root: Path) -> Path:
    path = root / "train" / "malignant" / "notes.txt"
    path.write_text("reviewed")
    return path


def _file_at_split_level(root: Path) -> Path:
    path = root / "test" / "loose.png"
    Image.new("L", (6, 5)).save(path)
    return path


def _unknown_test_class(root: Path) -> Path:
    return _write(root / "test" / "cyst" / "0.png", Image.new("L", (6, 5))).parent


def _empty_train_class(root: Path) -> Path:
    path = root / "train" / "cyst"
    path.mkdir()
    return path


def _no_test(root: Path) -> Path:
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / "test").rmdir()
    return root


def _no_train(root: Path) -> Path:
    (root / "train").rename(root / "training")
    return root


def _one_class(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for path in (root / split / "malignant").iterdir():
            path.unlink()
        (root / split / "malignant").rmdir()
    return root / "train"


def _empty_val(root: Path) -> Path:
    for cls in ("benign", "malignant"):
        for path in (root / "val" / cls).iterdir():
            path.unlink()
    return root / "val"


def _float_image(root: Path) -> Path:
    path = root / "train" / "benign" / "float.tif"
    Image.fromarray(np.zeros((5, 6), dtype=np.float32)).save(path)
    return path


BAD_TREES = {
    "corrupt image": (_corrupt_image, "cannot read image"),
    "stray file": (_stray_file, "not a supported image"),
    "file at split level": (_file_at_split_level, "unexpected file"),
    "unknown class in test": (_unknown_test_class, "not a class folder of train/"),
    "empty train class": (_empty_train_class, "contains no images"),
    "no test folder": (_no_test, "no test/ folder"),
    "no train folder": (_no_train, "no train/ folder"),
    "one class": (_one_class, "at least 2"),
    "empty val": (_empty_val, "contains no images"),
    "float image": (_float_image, "mode F"),
}


@pytest.mark.parametrize("case", sorted(BAD_TREES))
def test_bad_trees_give_one_line_data_error_naming_the_path(tmp_path, case):
    # Prepare
    root = _make_tree(tmp_path / "d")
    damage, expected = BAD_TREES[case]
    culprit = damage(root)

    # Execute
    with pytest.raises(DataError) as info:
        load_image_folder(root=root)

    # Assert
    message = str(info.value)
    assert message.startswith(f"{culprit}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_root_is_a_data_error(tmp_path):
    # Execute / Assert
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(root=tmp_path / "absent")


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"image_size": (4, 4, 4)}, {"val_fraction": 1.0}]
)
def test_bad_options_are_config_errors(tmp_path, kwargs):
    # Prepare
    root = _make_tree(tmp_path / "d")

    # Execute / Assert
    with pytest.raises(ConfigError):
        load_image_folder(root=root, **kwargs)
