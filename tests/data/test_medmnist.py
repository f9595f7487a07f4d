"""MedMNIST .npz loading: layouts, class names, every bad-input case, and the real file."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.data import load_dataset
from securefed.data.medmnist import MEDMNIST_CLASS_NAMES, load_medmnist, load_medmnist_npz
from securefed.errors import DataError


def test_grayscale_2d_becomes_nchw_float_in_unit_range(write_npz, medmnist_arrays):
    # Prepare
    arrays = medmnist_arrays()
    arrays["train_images"][0] = 255
    arrays["train_images"][1] = 0
    path = write_npz("toy.npz", arrays=arrays)

    # Execute
    bundle = load_medmnist_npz(path=path)

    # Assert
    assert bundle.train.images.shape == (12, 1, 28, 28)
    assert bundle.train.images.dtype == np.float32
    assert np.all(bundle.train.images[0] == 1.0)
    assert np.all(bundle.train.images[1] == 0.0)
    np.testing.assert_allclose(
        bundle.val.images[:, 0], arrays["val_images"].astype(np.float32) / 255, rtol=0, atol=0
    )
    assert bundle.train.labels.dtype == np.int64
    assert bundle.train.labels.tolist() == [0, 1] * 6
    assert (bundle.name, bundle.num_classes, bundle.class_names) == ("toy", 2, ("0", "1"))
    assert (bundle.in_channels, bundle.spatial_dims, bundle.image_shape) == (1, 2, (28, 28))
    assert bundle.source == str(path.resolve())


def test_rgb_is_moved_to_channels_first_keeping_channel_order(write_npz, medmnist_arrays):
    # Prepare
    arrays = medmnist_arrays(shape=(8, 8, 3))
    arrays["train_images"][:] = 0
    arrays["train_images"][0, :, :, 2] = 255  # pure blue

    # Execute
    bundle = load_medmnist_npz(path=write_npz(arrays=arrays))

    # Assert
    assert bundle.train.images.shape == (12, 3, 8, 8)
    assert np.all(bundle.train.images[0, 2] == 1.0)
    assert np.all(bundle.train.images[0, :2] == 0.0)


def test_volumes_of_3d_sets_get_one_channel(write_npz, medmnist_arrays):
    # Prepare: a "3d" name keeps a last axis of 3 from being read as RGB
    arrays = medmnist_arrays(shape=(6, 5, 3), classes=2)
    path = write_npz("nodulemnist3d.npz", arrays=arrays)

    # Execute
    bundle = load_medmnist_npz(path=path)

    # Assert
    assert bundle.train.images.shape == (12, 1, 6, 5, 3)
    assert bundle.spatial_dims == 3
    assert bundle.class_names == ("benign", "malignant")


def test_size_suffixed_3d_archives_are_volumes_through_load_dataset(write_npz, medmnist_arrays):
    # Prepare: MedMNIST+ 64-pixel naming; a last axis of 3 must still be depth, not RGB
    arrays = medmnist_arrays(shape=(4, 4, 3), classes=3)
    path = write_npz("fracturemnist3d_64.npz", arrays=arrays)

    # Execute
    bundle = load_dataset(data=path)

    # Assert
    assert bundle.name == "fracturemnist3d_64"
    assert bundle.train.images.shape == (12, 1, 4, 4, 3)
    assert bundle.task == "classification" and bundle.spatial_dims == 3
    assert bundle.num_classes == 3 and bundle.class_names[0] == "buckle rib fracture"


def test_flat_labels_and_float_images_are_accepted(write_npz, medmnist_arrays):
    # Prepare
    arrays = medmnist_arrays(classes=3)
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:, 0].astype(np.int32)
        arrays[f"{split}_images"] = arrays[f"{split}_images"].astype(np.float64) / 255

    # Execute
    bundle = load_medmnist_npz(path=write_npz(arrays=arrays))

    # Assert
    assert bundle.num_classes == 3
    assert bundle.train.labels.tolist() == [0, 1, 2] * 4
    np.testing.assert_allclose(bundle.test.images[:, 0], arrays["test_images"], atol=1e-7)


def test_known_set_uses_published_class_names_and_count(write_npz, medmnist_arrays):
    # Prepare: only labels 0..2 occur, but OCTMNIST has 4 classes; a size suffix is ignored
    path = write_npz("octmnist_64.npz", arrays=medmnist_arrays(classes=3))

    # Execute
    bundle = load_medmnist_npz(path=path)

    # Assert
    assert bundle.name == "octmnist_64"
    assert bundle.num_classes == 4
    assert bundle.class_names == MEDMNIST_CLASS_NAMES["octmnist"]


def test_load_medmnist_finds_file_by_name_in_data_dir(write_npz, tmp_path):
    # Prepare
    write_npz("breastmnist.npz")

    # Execute
    bundle = load_medmnist(name="breastmnist", data_dir=tmp_path)

    # Assert
    assert bundle.class_names == ("malignant", "normal, benign")


def test_missing_file_says_where_it_looked_and_that_nothing_is_downloaded(tmp_path):
    # Execute
    with pytest.raises(DataError) as info:
        load_medmnist(name="dermamnist", data_dir=tmp_path)

    # Assert
    message = str(info.value)
    assert str(tmp_path / "dermamnist.npz") in message
    assert "never downloads" in message
    assert "\n" not in message


BAD_ARRAY_CASES = {
    "missing keys": ({"val_labels": None, "test_images": None}, "missing keys val_labels"),
    "multi-label": (
        {"train_labels": np.zeros((12, 14), dtype=np.uint8)},
        "multi-label targets are not supported",
    ),
    "images 2-D": ({"train_images": np.zeros((12, 28), dtype=np.uint8)}, "`train_images`"),
    "images 5-D": ({"train_images": np.zeros((12, 2, 2, 2, 2), dtype=np.uint8)}, "(12, 2,"),
    "val shape differs": ({"val_images": np.zeros((4, 27, 28), dtype=np.uint8)}, "`val_images`"),
    "length mismatch": (
        {"test_labels": np.zeros((5, 1), dtype=np.uint8)},
        "`test_labels` has 5 labels but `test_images` has 6 images",
    ),
    "negative label": (
        {"train_labels": np.array([[0], [1], [-1]] * 4, dtype=np.int64)},
        "negative labels",
    ),
    "float labels": ({"val_labels": np.zeros((4, 1), dtype=np.float32)}, "integer labels"),
    "labels 3-D": ({"val_labels": np.zeros((4, 1, 1), dtype=np.uint8)}, "expected (N,) or (N, 1)"),
    "empty split": (
        {
            "val_images": np.zeros((0, 28, 28), dtype=np.uint8),
            "val_labels": np.zeros((0, 1), dtype=np.uint8),
        },
        "split `val` is empty",
    ),
    "int32 images": ({"test_images": np.zeros((6, 28, 28), dtype=np.int32)}, "dtype int32"),
    "val and valid keys": (
        {"valid_images": np.zeros((4, 28, 28), dtype=np.uint8)},
        "holds both val_images, val_labels and valid_images; keep one naming",
    ),
    "valid images of the wrong shape": (
        {
            "val_images": None,
            "val_labels": None,
            "valid_images": np.zeros((4, 27, 28), dtype=np.uint8),
            "valid_labels": np.zeros((4, 1), dtype=np.uint8),
        },
        "`valid_images` has shape (4, 27, 28)",
    ),
    "float images above 1": (
        {"test_images": np.full((6, 28, 28), 3.0, dtype=np.float32)},
        "outside [0, 1]",
    ),
    "single class": (
        {
            f"{s}_labels": np.zeros((n, 1), dtype=np.uint8)
            for s, n in zip(("train", "val", "test"), (12, 4, 6), strict=True)
        },
        "at least 2 classes",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARRAY_CASES))
def test_malformed_arrays_give_one_line_data_error_naming_the_file(write_npz, case):
    # Prepare
    overrides, expected = BAD_ARRAY_CASES[case]
    path = write_npz(**overrides)

    # Execute
    with pytest.raises(DataError) as info:
        load_medmnist_npz(path=path)

    # Assert
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_valid_keys_are_read_as_the_validation_split(write_npz, medmnist_arrays):
    # Prepare
    arrays = medmnist_arrays()
    renamed = {k.replace("val_", "valid_"): v for k, v in arrays.items()}
    plain, valid = write_npz("plain.npz", arrays), write_npz("valid.npz", renamed)

    # Execute
    expected, bundle = load_medmnist_npz(path=plain), load_medmnist_npz(path=valid)

    # Assert
    assert bundle.fingerprint == expected.fingerprint
    assert len(bundle.val) == len(arrays["val_labels"])


def test_label_beyond_a_known_sets_classes_is_rejected(write_npz, medmnist_arrays):
    # Prepare: PneumoniaMNIST has 2 classes
    arrays = medmnist_arrays(classes=3)
    path = write_npz("pneumoniamnist.npz", arrays=arrays)

    # Execute
    with pytest.raises(DataError) as info:
        load_medmnist_npz(path=path)

    # Assert
    assert str(path) in str(info.value)
    assert "must be in [0, 2)" in str(info.value)


def _with_label(arrays, split, label):
    arrays[f"{split}_labels"] = arrays[f"{split}_labels"].copy()
    arrays[f"{split}_labels"][0] = label
    return arrays


def test_a_stray_training_label_is_refused_not_turned_into_extra_classes(
    write_npz, medmnist_arrays
):
    # Prepare: a binary set with one 7 among its training labels (it used to give 8 classes)
    path = write_npz("mine.npz", arrays=_with_label(medmnist_arrays(), "train", 7))

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(data=path)

    # Assert: one line naming the file, the split and the label
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "`train_labels`" in message and "label 7" in message
    assert "\n" not in message


@pytest.mark.parametrize("split", ["val", "test"])
def test_a_held_out_label_outside_the_training_classes_is_refused(
    write_npz, medmnist_arrays, split
):
    # Prepare: one stray 5 in a held-out split (it used to give 6 classes)
    path = write_npz("mine.npz", arrays=_with_label(medmnist_arrays(), split, 5))

    # Execute
    with pytest.raises(DataError) as info:
        load_dataset(data=path)

    # Assert
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert f"`{split}_labels` must be in [0, 2)" in message and "label 5" in message


def test_path_and_name_loading_apply_the_same_rule(write_npz, medmnist_arrays, tmp_path):
    # Prepare: the same unknown-named file, by path and by name from a data folder
    path = write_npz("mine.npz", arrays=_with_label(medmnist_arrays(), "test", 5))

    # Execute
    errors = []
    for kwargs in ({"data": path}, {"name": "mine", "data_dir": tmp_path}):
        with pytest.raises(DataError) as info:
            load_dataset(**kwargs)
        errors.append(str(info.value))

    # Assert
    assert errors[0] == errors[1]


def test_declared_class_names_fix_the_class_count(write_npz, medmnist_arrays):
    # Prepare: 3 declared classes, only 0 and 1 present in the data
    names = np.array(["cat", "dog", "bird"])
    path = write_npz("mine.npz", arrays={**medmnist_arrays(), "class_names": names})

    # Execute
    bundle = load_dataset(data=path)

    # Assert
    assert (bundle.num_classes, bundle.class_names) == (3, ("cat", "dog", "bird"))
    # ... and a label beyond them is refused
    bad = {**_with_label(medmnist_arrays(), "val", 3), "class_names": names}
    with pytest.raises(DataError, match=r"`val_labels` must be in \[0, 3\).*class_names"):
        load_dataset(data=write_npz("bad.npz", arrays=bad))


def test_num_classes_fixes_the_class_count_of_an_undeclared_file(write_npz, medmnist_arrays):
    # Prepare: a binary-looking file whose third class is absent from this sample
    path = write_npz("mine.npz", arrays=medmnist_arrays())

    # Execute
    bundle = load_dataset(data=path, num_classes=3)

    # Assert
    assert (bundle.num_classes, bundle.class_names) == (3, ("0", "1", "2"))
    with pytest.raises(DataError, match=r"\[0, 2\) \(`--num-classes` 2\).*label 7"):
        load_dataset(
            data=write_npz("b.npz", arrays=_with_label(medmnist_arrays(), "train", 7)),
            num_classes=2,
        )
    # a declaration and a different --num-classes disagree
    with pytest.raises(DataError, match="`--num-classes` is 5"):
        load_dataset(name="pneumoniamnist", data=path, num_classes=5)


def test_class_names_must_be_strings(write_npz, medmnist_arrays):
    path = write_npz("mine.npz", arrays={**medmnist_arrays(), "class_names": np.arange(2)})
    with pytest.raises(DataError, match="`class_names` must be a 1-D array"):
        load_dataset(data=path)


def test_object_arrays_are_refused_without_unpickling(write_npz, medmnist_arrays):
    # Prepare: np.savez pickles object arrays; loading them would execute arbitrary code
    arrays = medmnist_arrays()
    arrays["train_labels"] = np.array([object()] * 12, dtype=object)
    path = write_npz(arrays=arrays)

    # Execute
    with pytest.raises(DataError) as info:
        load_medmnist_npz(path=path)

    # Assert
    assert str(info.value) == f"{path}: `train_labels` contains pickled objects; refusing to load."


def test_text_file_is_not_an_npz(tmp_path):
    # Prepare
    path = tmp_path / "notes.npz"
    path.write_text("patient list\n")

    # Execute / Assert
    with pytest.raises(DataError, match="not an .npz archive") as info:
        load_medmnist_npz(path=path)
    assert str(path) in str(info.value)


def test_npy_file_is_not_an_npz(tmp_path):
    # Prepare
    path = tmp_path / "array.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))

    # Execute / Assert
    with pytest.raises(DataError, match="single .npy array"):
        load_medmnist_npz(path=path)


def test_truncated_archive_is_reported_corrupt(write_npz):
    # Prepare
    path = write_npz()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    # Execute / Assert
    with pytest.raises(DataError, match="corrupt .npz archive") as info:
        load_medmnist_npz(path=path)
    assert str(info.value).startswith(f"{path}: ")


def test_flipped_bytes_inside_a_member_are_reported_corrupt(write_npz):
    # Prepare: np.savez stores members uncompressed, so the CRC check catches the flip
    path = write_npz()
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(DataError, match="corrupt .npz archive") as info:
        load_medmnist_npz(path=path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.shared_data
def test_real_pneumoniamnist_matches_provenance(shared_data_dir):
    # Execute
    bundle = load_medmnist(name="pneumoniamnist", data_dir=shared_data_dir)

    # Assert: split sizes and class counts from ../shared/data/PROVENANCE.md
    summary = bundle.describe()
    assert summary["sizes"] == {"train": 4708, "val": 524, "test": 624}
    assert summary["class_counts"] == {
        "train": [1214, 3494],
        "val": [135, 389],
        "test": [234, 390],
    }
    assert bundle.class_names == ("normal", "pneumonia")
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(bundle.train.images.min()) < float(bundle.train.images.max()) <= 1.0
