"""The data model (ArraySplit, DatasetBundle, fingerprint) and the load_dataset dispatcher."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from securefed.data import ArraySplit, DatasetBundle, available_datasets, load_dataset
from securefed.errors import ConfigError, DataError


def _split(
    n: int = 6,
    *,
    shape: tuple[int, ...] = (1, 4, 4),
    seed: int = 0,
    patients: np.ndarray | None = None,
) -> ArraySplit:
    rng = np.random.default_rng(seed)
    images = rng.random((n, *shape), dtype=np.float32)
    labels = (np.arange(n) % 2).astype(np.int64)
    return ArraySplit(images=images, labels=labels, patients=patients)


def _bundle(**overrides) -> DatasetBundle:
    fields = {
        "name": "toy",
        "train": _split(6, seed=1),
        "val": _split(4, seed=2),
        "test": _split(2, seed=3),
        "num_classes": 2,
        "class_names": ("a", "b"),
        "source": "test",
    }
    fields.update(overrides)
    return DatasetBundle(**fields)


BAD_SPLITS = {
    "float64 images": (np.zeros((2, 1, 3, 3)), np.zeros(2, np.int64), "float32"),
    "3-D images": (np.zeros((2, 3, 3), np.float32), np.zeros(2, np.int64), "(N, C, H, W)"),
    "int32 labels": (np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.int32), "int64"),
    "length mismatch": (np.zeros((2, 1, 3, 3), np.float32), np.zeros(3, np.int64), "same length"),
    "empty": (np.zeros((0, 1, 3, 3), np.float32), np.zeros(0, np.int64), "at least one"),
    "above one": (np.full((2, 1, 3, 3), 1.5, np.float32), np.zeros(2, np.int64), "[0, 1]"),
    "nan": (np.full((2, 1, 3, 3), np.nan, np.float32), np.zeros(2, np.int64), "finite"),
    "negative label": (np.zeros((2, 1, 3, 3), np.float32), np.array([0, -1]), "non-negative"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPLITS))
def test_array_split_rejects_malformed_arrays(case):
    # Prepare
    images, labels, expected = BAD_SPLITS[case]

    # Execute / Assert
    with pytest.raises(DataError) as info:
        ArraySplit(images=images, labels=labels)
    assert expected in str(info.value)


def test_array_split_is_read_only_but_leaves_the_callers_array_writable():
    # Prepare
    images = np.zeros((2, 1, 3, 3), np.float32)

    # Execute
    split = ArraySplit(images=images, labels=np.array([0, 1]))

    # Assert
    with pytest.raises(ValueError, match="read-only"):
        split.images[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        split.labels[0] = 1
    images[0, 0, 0, 0] = 0.5  # the caller's own array is untouched by the freeze


def test_subset_and_class_counts():
    # Prepare
    split = _split(6)

    # Execute
    sub = split.subset(indices=np.array([1, 3, 4]))

    # Assert
    assert sub.labels.tolist() == [1, 1, 0]
    np.testing.assert_array_equal(sub.images, split.images[[1, 3, 4]])
    assert split.class_counts(num_classes=3).tolist() == [3, 3, 0]


def test_to_torch_yields_float_image_and_int64_label_copies():
    # Prepare
    split = _split(3)

    # Execute
    dataset = split.to_torch()
    image, label = dataset[1]
    image.fill_(0.0)

    # Assert
    assert len(dataset) == 3
    assert image.dtype == torch.float32 and image.shape == (1, 4, 4)
    assert label.dtype == torch.int64 and int(label) == 1
    assert float(split.images[1].sum()) > 0  # the fingerprinted data were not altered


def test_bundle_derives_shape_fields():
    # Execute
    bundle = _bundle()

    # Assert
    assert (bundle.in_channels, bundle.spatial_dims, bundle.image_shape) == (1, 2, (4, 4))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"val": _split(4, shape=(1, 5, 4))}, "per-sample shape"),
        ({"num_classes": 1, "class_names": ("a",)}, "at least 2 classes"),
        ({"class_names": ("a",)}, "`class_names` must be 2 strings"),
        (
            {"test": ArraySplit(images=np.zeros((1, 1, 4, 4), np.float32), labels=np.array([2]))},
            r"`test` labels must be in \[0, 2\)",
        ),
        ({"name": ""}, "`name`"),
    ],
)
def test_bundle_rejects_inconsistent_splits(overrides, expected):
    # Execute / Assert
    with pytest.raises(DataError, match=expected):
        _bundle(**overrides)


def test_fingerprint_follows_the_documented_byte_layout():
    # Prepare
    bundle = _bundle()

    # Execute: recompute from the docstring's description, independently of the code
    digest = hashlib.sha256(b"securefed.dataset.fingerprint.v1\n")
    for name in ("train", "val", "test"):
        split = getattr(bundle, name)
        for array_name, array, dtype in (
            ("images", split.images, "<f4"),
            ("labels", split.labels, "<i8"),
        ):
            shape = ",".join(map(str, array.shape))
            digest.update(f"{name}/{array_name}:{dtype}:{shape}\n".encode())
            digest.update(array.astype(dtype).tobytes())

    # Assert
    assert bundle.fingerprint == digest.hexdigest()


def test_fingerprint_changes_with_one_pixel_or_one_label():
    # Prepare
    base = _bundle()
    images = np.array(base.test.images)
    images[0, 0, 0, 0] = np.nextafter(images[0, 0, 0, 0], np.float32(1))
    labels = np.array(base.test.labels)
    labels[[0, 1]] = labels[[1, 0]]

    # Execute
    pixel = _bundle(test=ArraySplit(images=images, labels=base.test.labels))
    label = _bundle(test=ArraySplit(images=base.test.images, labels=labels))
    same = _bundle()

    # Assert
    assert len({base.fingerprint, pixel.fingerprint, label.fingerprint}) == 3
    assert same.fingerprint == base.fingerprint


def test_describe_is_json_ready_and_complete():
    # Execute
    summary = _bundle().describe()

    # Assert
    assert json.loads(json.dumps(summary)) == summary
    assert summary["sizes"] == {"train": 6, "val": 4, "test": 2}
    assert summary["class_counts"] == {"train": [3, 3], "val": [2, 2], "test": [1, 1]}
    assert summary["image_shape"] == [4, 4]
    assert summary["fingerprint"] == _bundle().fingerprint
    assert summary["class_names"] == ["a", "b"]
    assert summary["source"] == "test"


def test_load_dataset_defaults_to_synthetic_with_options():
    # Execute
    bundle = load_dataset(seed=3, n_train=40, n_val=8, n_test=8)

    # Assert
    assert bundle.name == "synthetic"
    assert len(bundle.train) == 40
    assert "seed=3" in bundle.source


def test_load_dataset_reads_a_named_medmnist_file_from_data_dir(write_npz, tmp_path):
    # Prepare
    write_npz("pneumoniamnist.npz")

    # Execute
    bundle = load_dataset(name="pneumoniamnist", data_dir=tmp_path)

    # Assert
    assert bundle.name == "pneumoniamnist"
    assert bundle.class_names == ("normal", "pneumonia")


def test_load_dataset_reads_an_npz_path_named_after_the_file(write_npz):
    # Prepare
    path = write_npz("bloodmnist.npz", arrays=None)

    # Execute
    bundle = load_dataset(data=str(path))

    # Assert
    assert bundle.name == "bloodmnist"
    assert bundle.num_classes == 8


def test_load_dataset_reads_an_image_folder(tmp_path):
    # Prepare
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "pets" / split / cls
            folder.mkdir(parents=True)
            for i in range(10):
                Image.new("L", (5, 5), color=i).save(folder / f"{i}.png")

    # Execute
    bundle = load_dataset(data=tmp_path / "pets", seed=1, image_size=4)

    # Assert
    assert bundle.name == "pets"
    assert bundle.class_names == ("cat", "dog")
    assert bundle.image_shape == (4, 4)
    assert len(bundle.train) + len(bundle.val) == 20


def test_num_classes_must_match_classes_the_data_define(tmp_path):
    # Prepare: an image folder's classes are its folder names
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "pets" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("L", (5, 5), color=i).save(folder / f"{i}.png")

    # Execute / Assert
    assert load_dataset(data=tmp_path / "pets", num_classes=2, image_size=4).num_classes == 2
    with pytest.raises(DataError, match="`--num-classes` is 3 but the data have 2 classes"):
        load_dataset(data=tmp_path / "pets", num_classes=3, image_size=4)
    # synthetic data take it as the generator's class count
    assert load_dataset(num_classes=2, n_train=12, n_val=6, n_test=6).num_classes == 2


def test_missing_named_dataset_is_a_data_error_naming_the_path(tmp_path):
    # Execute / Assert
    with pytest.raises(DataError, match="never downloads") as info:
        load_dataset(name="organamnist", data_dir=tmp_path)
    assert str(tmp_path / "organamnist.npz") in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"name": "../etc/passwd"}, ConfigError, "`name` must be"),
        ({"name": "synthetic", "colour": True}, ConfigError, "colour do not apply"),
        ({"name": "pneumoniamnist", "image_size": 8}, ConfigError, "accepted: none"),
        ({"data": "/nonexistent/folder"}, DataError, "/nonexistent/folder: no such file"),
    ],
)
def test_load_dataset_rejects_bad_requests(kwargs, error, expected):
    # Execute / Assert
    with pytest.raises(error, match=expected):
        load_dataset(**kwargs)


def test_load_dataset_rejects_a_file_that_is_neither_folder_nor_npz(tmp_path):
    # Prepare
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"DICM")

    # Execute / Assert
    with pytest.raises(DataError, match="expected a folder of images or a .npz file"):
        load_dataset(data=path)


def test_available_datasets_lists_synthetic_and_single_label_medmnist():
    # Execute
    names = available_datasets()

    # Assert
    assert names[0] == "synthetic"
    assert {"pneumoniamnist", "organmnist3d"} <= set(names)
    assert "chestmnist" not in names  # multi-label, unsupported


# -- segmentation label maps and acquisition groups ------------------------------------------


def _seg_split(
    n: int = 4, *, shape: tuple[int, ...] = (2, 3, 3, 3), seed: int = 0, groups: bool = True
) -> ArraySplit:
    rng = np.random.default_rng(seed)
    return ArraySplit(
        images=rng.random((n, *shape), dtype=np.float32),
        labels=rng.integers(0, 3, (n, *shape[1:])).astype(np.int64),
        groups=(np.arange(n) % 2).astype(np.int64) if groups else None,
    )


def _seg_bundle(**overrides) -> DatasetBundle:
    fields = {
        "name": "toy-seg",
        "train": _seg_split(4, seed=1),
        "val": _seg_split(2, seed=2),
        "test": _seg_split(2, seed=3),
        "num_classes": 3,
        "class_names": ("bg", "a", "b"),
        "source": "test",
        "task": "segmentation",
    }
    fields.update(overrides)
    return DatasetBundle(**fields)


BAD_SEG_SPLITS = {
    "label map of wrong shape": (
        np.zeros((2, 1, 3, 3), np.float32),
        np.zeros((2, 3, 4), np.int64),
        None,
        "spatial shape",
    ),
    "groups of wrong length": (
        np.zeros((2, 1, 3, 3), np.float32),
        np.zeros(2, np.int64),
        np.zeros(3, np.int64),
        "one entry per sample",
    ),
    "int32 groups": (
        np.zeros((2, 1, 3, 3), np.float32),
        np.zeros(2, np.int64),
        np.zeros(2, np.int32),
        "`groups` must be None or a 1-D int64",
    ),
    "negative group": (
        np.zeros((2, 1, 3, 3), np.float32),
        np.zeros(2, np.int64),
        np.array([0, -1]),
        "non-negative",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SEG_SPLITS))
def test_array_split_rejects_malformed_label_maps_and_groups(case):
    # Prepare
    images, labels, groups, expected = BAD_SEG_SPLITS[case]

    # Execute / Assert
    with pytest.raises(DataError, match=expected):
        ArraySplit(images=images, labels=labels, groups=groups)


def test_segmentation_split_subsets_groups_and_counts_classes_per_sample():
    # Prepare: sample 0 holds classes {0, 2}, sample 1 only {0}, sample 2 {0, 1, 2}
    labels = np.zeros((3, 2, 2), np.int64)
    labels[0, 0, 0] = 2
    labels[2, 0, 0], labels[2, 1, 1] = 1, 2
    split = ArraySplit(
        images=np.zeros((3, 1, 2, 2), np.float32), labels=labels, groups=np.array([5, 7, 5])
    )

    # Execute
    sub = split.subset(indices=np.array([2, 1]))

    # Assert
    assert split.task == "segmentation" and _split().task == "classification"
    assert split.class_counts(num_classes=4).tolist() == [3, 1, 2, 0]
    assert split.group_counts() == {5: 2, 7: 1}
    assert sub.groups.tolist() == [5, 7]
    np.testing.assert_array_equal(sub.labels, labels[[2, 1]])
    with pytest.raises(ValueError, match="read-only"):
        split.groups[0] = 1


def test_segmentation_to_torch_yields_label_maps():
    # Prepare
    split = _seg_split(3)

    # Execute
    image, label = split.to_torch()[2]

    # Assert
    assert image.shape == (2, 3, 3, 3)
    assert label.dtype == torch.int64 and label.shape == (3, 3, 3)
    np.testing.assert_array_equal(label.numpy(), split.labels[2])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"task": "classification"}, r"task 'classification' needs labels of shape \(N,\)"),
        ({"task": "detection"}, "`task` must be one of"),
        ({"val": _seg_split(2, seed=2, groups=False)}, "either every split has `groups`"),
        ({"label_convention": "brats"}, "'brats' needs a segmentation task with 4 classes"),
        ({"label_convention": "kits"}, "`label_convention` must be None or one of brats"),
        ({"group_names": ("h0",)}, "`group_names` must be strings naming every group id up to 1"),
    ],
)
def test_segmentation_bundle_rejects_inconsistent_fields(overrides, expected):
    # Execute / Assert
    with pytest.raises(DataError, match=expected):
        _seg_bundle(**overrides)


def test_segmentation_task_rejects_class_labels():
    # Execute / Assert
    with pytest.raises(DataError, match=r"needs labels of shape \(N, \*spatial\)"):
        _bundle(task="segmentation")


def test_segmentation_fingerprint_follows_the_documented_byte_layout():
    # Prepare
    bundle = _seg_bundle(label_convention=None)

    # Execute: the task line, then images, labels, groups per split
    digest = hashlib.sha256(b"securefed.dataset.fingerprint.v1\n")
    digest.update(b"task:segmentation;label_convention:none\n")
    for name in ("train", "val", "test"):
        split = getattr(bundle, name)
        for array_name, array, dtype in (
            ("images", split.images, "<f4"),
            ("labels", split.labels, "<i8"),
            ("groups", split.groups, "<i8"),
        ):
            shape = ",".join(map(str, array.shape))
            digest.update(f"{name}/{array_name}:{dtype}:{shape}\n".encode())
            digest.update(array.astype(dtype).tobytes())

    # Assert
    assert bundle.fingerprint == digest.hexdigest()


def test_fingerprint_binds_groups_but_not_group_names():
    # Prepare
    base = _seg_bundle()
    regrouped = ArraySplit(
        images=base.test.images, labels=base.test.labels, groups=base.test.groups[::-1].copy()
    )

    # Execute
    moved = _seg_bundle(test=regrouped)
    named = _seg_bundle(group_names=("north", "south"))

    # Assert
    assert moved.fingerprint != base.fingerprint
    assert named.fingerprint == base.fingerprint


def test_groups_change_a_classification_fingerprint():
    # Prepare: the same arrays, once without and once with groups
    plain = _bundle()
    splits = {
        s: ArraySplit(
            images=getattr(plain, s).images,
            labels=getattr(plain, s).labels,
            groups=np.zeros(len(getattr(plain, s)), np.int64),
        )
        for s in ("train", "val", "test")
    }

    # Execute
    grouped = _bundle(**splits)

    # Assert
    assert grouped.fingerprint != plain.fingerprint
    assert grouped.has_groups and not plain.has_groups


def test_segmentation_describe_reports_task_convention_and_groups():
    # Execute
    summary = _seg_bundle(group_names=("north", "south")).describe()

    # Assert
    assert json.loads(json.dumps(summary)) == summary
    assert summary["task"] == "segmentation"
    assert summary["label_convention"] is None
    assert summary["group_names"] == ["north", "south"]
    assert summary["group_counts"] == {
        "train": {"0": 2, "1": 2},
        "val": {"0": 1, "1": 1},
        "test": {"0": 1, "1": 1},
    }
    assert summary["image_shape"] == [3, 3, 3]
    assert len(summary["class_counts"]["train"]) == 3
    assert _bundle().describe()["group_counts"] is None


def test_load_dataset_builds_synthetic_segmentation_with_options():
    # Execute
    bundle = load_dataset(
        name="synthetic-seg",
        seed=2,
        n_train=4,
        n_val=2,
        n_test=2,
        image_size=16,
        modalities=2,
        n_groups=2,
    )

    # Assert
    assert bundle.task == "segmentation" and bundle.label_convention == "brats"
    assert bundle.train.images.shape == (4, 2, 16, 16, 16)
    assert "seed=2" in bundle.source
    assert "synthetic-seg" in available_datasets()
    with pytest.raises(ConfigError, match="spatial_dims do not apply to synthetic-seg"):
        load_dataset(name="synthetic-seg", spatial_dims=3)
