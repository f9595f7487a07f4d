"""NIfTI segmentation folders: layouts, TorchIO preprocessing, labels, splits and refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from securefed.data import BRATS_CLASS_NAMES, load_dataset, load_nifti_segmentation
from securefed.data.nifti import holds_nifti
from securefed.errors import ConfigError, DataError

SHAPE = (10, 9, 8)


def _volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A head-like volume (positive inside a box, 0 outside) and a BraTS label map in it."""
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, np.float32)
    image[1:-1, 1:-1, 1:-1] = rng.uniform(100, 200, (SHAPE[0] - 2, SHAPE[1] - 2, SHAPE[2] - 2))
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:7, 3:6, 2:6] = 2
    labels[4:6, 4:5, 3:5] = 4
    labels[4, 4, 3] = 1
    image[labels > 0] += 300  # the tumour is brighter than the tissue
    return image, labels


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _subject(
    folder: Path,
    *,
    seed: int,
    modalities: tuple[str, ...] = ("t1", "flair"),
    prefix: str = "",
    suffix: str = ".nii.gz",
) -> None:
    image, labels = _volume(seed)
    for i, modality in enumerate(modalities):
        _save(folder / f"{prefix}{modality}{suffix}", image * (1 + i))
    _save(folder / f"{prefix}seg{suffix}", labels)


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    root = tmp_path / "brats-mini"
    for s in range(5):
        _subject(root / f"sub-{s:02d}", seed=s)
    return root


@pytest.fixture
def hospital_root(tmp_path: Path) -> Path:
    root = tmp_path / "multi-site"
    for h, hospital in enumerate(("zurich", "boston", "tokyo")):
        for s in range(4):
            _subject(root / hospital / f"case{s}", seed=10 * h + s)
    return root


def test_flat_layout_loads_preprocessed_brats_subjects(flat_root):
    # Execute
    bundle = load_nifti_segmentation(root=flat_root, image_size=(12, 9, 6), seed=0)

    # Assert
    assert bundle.name == "brats-mini" and bundle.task == "segmentation"
    assert bundle.label_convention == "brats" and bundle.class_names == BRATS_CLASS_NAMES
    assert bundle.in_channels == 2 and bundle.image_shape == (12, 9, 6)
    assert sum(len(s) for s in (bundle.train, bundle.val, bundle.test)) == 5
    assert min(len(bundle.val), len(bundle.test)) >= 1
    assert not bundle.has_groups
    every_label = np.concatenate(
        [s.labels.ravel() for s in (bundle.train, bundle.val, bundle.test)]
    )
    assert set(np.unique(every_label).tolist()) == {0, 1, 2, 3}, "4 is remapped to 3"
    images = bundle.train.images
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert (
        images[:, 0][bundle.train.labels > 0].mean() > images[:, 0][bundle.train.labels == 0].mean()
    )


def test_split_depends_only_on_the_seed(flat_root):
    # Execute
    first = load_nifti_segmentation(root=flat_root, image_size=4, seed=1)
    again = load_nifti_segmentation(root=flat_root, image_size=4, seed=1)
    others = {
        load_nifti_segmentation(root=flat_root, image_size=4, seed=s).fingerprint
        for s in range(2, 8)
    }

    # Assert
    assert first.fingerprint == again.fingerprint
    assert len(others - {first.fingerprint}) >= 1
    assert "seed=1" in first.source


def test_hospital_folders_become_groups_and_every_hospital_is_tested(hospital_root):
    # Execute
    bundle = load_nifti_segmentation(root=hospital_root, image_size=4, test_fraction=0.25)

    # Assert
    assert bundle.group_names == ("boston", "tokyo", "zurich")
    assert bundle.test.group_counts() == {0: 1, 1: 1, 2: 1}
    assert sum(bundle.train.group_counts().values()) + len(bundle.val) == 9


def test_brats_style_prefixed_file_names_and_plain_nii(tmp_path):
    # Prepare: BraTS20_Training_001/BraTS20_Training_001_flair.nii ...
    root = tmp_path / "brats"
    for s in range(3):
        name = f"BraTS20_Training_{s:03d}"
        _subject(
            root / name,
            seed=s,
            modalities=("flair", "t2", "t1ce", "t1"),
            prefix=f"{name}_",
            suffix=".nii",
        )

    # Execute
    bundle = load_nifti_segmentation(root=root, image_size=4)
    chosen = load_nifti_segmentation(root=root, image_size=4, modalities=["flair", "t1"])

    # Assert: channels in BraTS order, brightness 1x..4x as written (flair 1x, t1 4x)
    assert bundle.in_channels == 4 and chosen.in_channels == 2
    np.testing.assert_allclose(chosen.train.images[:, 0], bundle.train.images[:, 3], atol=1e-6)
    np.testing.assert_allclose(chosen.train.images[:, 1], bundle.train.images[:, 0], atol=1e-6)


def test_canonical_orientation_undoes_a_flipped_affine(tmp_path):
    # Prepare: the same subject stored twice, once with the first axis reversed in the file
    # and an affine that says so (x runs right-to-left)
    image, labels = _volume(0)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1
    for s, (img, lab, affine) in enumerate(
        [(image, labels, None), (image[::-1].copy(), labels[::-1].copy(), flip)] * 2
    ):
        _save(tmp_path / "data" / f"s{s}" / "t1.nii.gz", img, affine)
        _save(tmp_path / "data" / f"s{s}" / "seg.nii.gz", lab, affine)

    # Execute
    bundle = load_nifti_segmentation(root=tmp_path / "data", image_size=SHAPE, seed=0)

    # Assert: every subject ends up identical after ToCanonical
    volumes = np.concatenate([bundle.train.labels, bundle.val.labels, bundle.test.labels])
    for volume in volumes[1:]:
        np.testing.assert_array_equal(volume, volumes[0])


@pytest.mark.parametrize(
    ("values", "brats", "convention", "num_classes"),
    [
        ((0, 1, 2), None, None, 3),
        ((0, 1, 2, 3), True, "brats", 4),
        ((0, 1, 2, 4), False, None, 5),
        ((0, 1, 2, 4), None, "brats", 4),
    ],
)
def test_label_conventions(tmp_path, values, brats, convention, num_classes):
    # Prepare
    root = tmp_path / "labels"
    for s in range(3):
        image, _ = _volume(s)
        labels = np.zeros(SHAPE, np.uint8)
        for i, value in enumerate(values):
            labels[2 + i, 2:6, 2:6] = value
        _save(root / f"s{s}" / "t1.nii.gz", image)
        _save(root / f"s{s}" / "seg.nii.gz", labels)

    # Execute
    bundle = load_nifti_segmentation(root=root, image_size=SHAPE, brats=brats)

    # Assert
    assert bundle.label_convention == convention
    assert bundle.num_classes == num_classes


def test_load_dataset_dispatches_nifti_folders_with_their_options(hospital_root, tmp_path):
    # Execute
    bundle = load_dataset(data=hospital_root, seed=2, image_size=4, label_name="seg")

    # Assert
    assert bundle.name == "multi-site" and bundle.task == "segmentation"
    assert holds_nifti(hospital_root) and not holds_nifti(tmp_path / "multi-site" / "..")
    with pytest.raises(ConfigError, match="spatial_dims do not apply to NIfTI folders"):
        load_dataset(data=hospital_root, spatial_dims=3)


def _break(root: Path, case: str) -> str:
    """Damage a valid flat layout in one way; return the text the error must contain."""
    subject = root / "sub-01"
    if case == "missing modality":
        (subject / "flair.nii.gz").unlink()
        return f"{subject / 'flair.nii.gz'}: missing modality 'flair'"
    if case == "missing label":
        (subject / "seg.nii.gz").unlink()
        return f"{subject / 'seg.nii.gz'}: missing label map"
    if case == "shape mismatch":
        _save(subject / "flair.nii.gz", np.ones((4, 4, 4), np.float32))
        return f"{subject / 'flair.nii.gz'}: shape (4, 4, 4) differs"
    if case == "corrupt file":
        (subject / "t1.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        return f"{subject / 't1.nii.gz'}: cannot read NIfTI file"
    if case == "non-integer labels":
        _save(subject / "seg.nii.gz", np.full(SHAPE, 0.5, np.float32))
        return f"{subject / 'seg.nii.gz'}: label map holds non-integer values"
    if case == "label out of range":
        _save(subject / "seg.nii.gz", np.full(SHAPE, 255, np.uint8))
        return f"{subject / 'seg.nii.gz'}: label 255 is out of range"
    if case == "negative label":
        _save(subject / "seg.nii.gz", np.full(SHAPE, -1, np.int16))
        return f"{subject / 'seg.nii.gz'}: label -1 is out of range"
    if case == "constant image":
        _save(subject / "t1.nii.gz", np.zeros(SHAPE, np.float32))
        return f"{subject / 't1.nii.gz'}: the image is constant"
    if case == "four-dimensional file":
        _save(subject / "t1.nii.gz", np.ones((*SHAPE, 2), np.float32))
        return f"{subject / 't1.nii.gz'}: holds 2 volumes"
    if case == "affine mismatch":
        image, _ = _volume(1)
        _save(subject / "t1.nii.gz", image, np.diag([2.0, 2.0, 2.0, 1.0]))
        return f"{subject / 't1.nii.gz'}: its voxel-to-world affine differs"
    if case == "non-finite values":
        image, _ = _volume(1)
        image[0, 0, 0] = np.nan
        _save(subject / "t1.nii.gz", image)
        return f"{subject / 't1.nii.gz'}: contains NaN"
    if case == "mixed layouts":
        _subject(root / "hospital" / "case0", seed=9)
        return "mixes subject folders"
    if case == "file at the root":
        _save(root / "t1.nii.gz", np.ones(SHAPE, np.float32))
        return f"{root / 't1.nii.gz'}: NIfTI file directly in the data folder"
    if case == "empty subject in a hospital":
        _subject(root / "hospital" / "case0", seed=9)
        (root / "hospital" / "case1").mkdir()
        for s in range(5):
            (root / f"sub-{s:02d}").rename(root / "hospital" / f"sub-{s:02d}")
        return f"{root / 'hospital' / 'case1'}: subject folder holds no .nii"
    if case == "duplicate modality":
        _save(subject / "t1.nii", np.ones(SHAPE, np.float32))
        return f"{subject / 't1.nii.gz'}: duplicates t1.nii"
    raise AssertionError(case)


BREAKAGES = [
    "missing modality",
    "missing label",
    "shape mismatch",
    "corrupt file",
    "non-integer labels",
    "label out of range",
    "negative label",
    "constant image",
    "four-dimensional file",
    "affine mismatch",
    "non-finite values",
    "mixed layouts",
    "file at the root",
    "empty subject in a hospital",
    "duplicate modality",
]


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_folders_are_data_errors_naming_the_file(flat_root, case):
    # Prepare
    expected = _break(flat_root, case)

    # Execute / Assert
    with pytest.raises(DataError) as info:
        load_nifti_segmentation(root=flat_root, image_size=4)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_brats_labels_are_checked_when_brats_is_forced(flat_root):
    # Prepare: subject 1 uses label 3 for enhancing tumour while the others use 4
    image, labels = _volume(1)
    labels[labels == 4] = 3
    _save(flat_root / "sub-01" / "seg.nii.gz", labels)
    _save(flat_root / "sub-02" / "seg.nii.gz", np.full(SHAPE, 5, np.uint8))

    # Execute / Assert
    with pytest.raises(DataError, match="sub-02/seg.nii.gz: label 5 is not a BraTS label"):
        load_nifti_segmentation(root=flat_root, image_size=4, brats=True)
    _save(flat_root / "sub-02" / "seg.nii.gz", labels)
    with pytest.raises(DataError, match="mix BraTS label 4 and label 3"):
        load_nifti_segmentation(root=flat_root, image_size=4, brats=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"image_size": (4, 4)}, ConfigError, "`image_size` must be a positive int or three"),
        ({"val_fraction": 0.0}, ConfigError, r"`val_fraction` must be in \(0, 1\)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, ConfigError, "must be below 1"),
        ({"modalities": "t1"}, ConfigError, "`modalities` must be distinct modality names"),
        ({"modalities": ["t1", "seg"]}, ConfigError, "excluding the label map"),
        ({"brats": "yes"}, ConfigError, "`brats` must be True, False or None"),
        ({"label_name": "mask"}, DataError, "mask.nii.gz: missing label map"),
    ],
)
def test_bad_arguments(flat_root, kwargs, error, expected):
    # Execute / Assert
    with pytest.raises(error, match=expected):
        load_nifti_segmentation(root=flat_root, **kwargs)


def test_too_few_subjects_or_no_folder(tmp_path):
    # Prepare
    _subject(tmp_path / "two" / "a", seed=0)
    _subject(tmp_path / "two" / "b", seed=1)

    # Execute / Assert
    with pytest.raises(DataError, match="found 2 subject\\(s\\); need at least 3"):
        load_nifti_segmentation(root=tmp_path / "two", image_size=4)
    with pytest.raises(DataError, match="no such folder"):
        load_nifti_segmentation(root=tmp_path / "absent")


def _unlabelled_root(tmp_path: Path, *, labelled: int = 4, unlabelled: int = 3) -> Path:
    """``labelled`` subjects with a label map, then ``unlabelled`` ones without."""
    root = tmp_path / "semi"
    for s in range(labelled):
        _subject(root / f"sub-{s:02d}", seed=s)
    for s in range(labelled, labelled + unlabelled):
        _subject(root / f"sub-{s:02d}", seed=s)
        (root / f"sub-{s:02d}" / "seg.nii.gz").unlink()
    return root


def test_subject_without_label_map_is_refused_naming_the_option(tmp_path):
    # Setup
    root = _unlabelled_root(tmp_path, unlabelled=1)

    # Execute / Assert
    with pytest.raises(DataError, match=r"sub-04.*missing label map.*unlabelled=true"):
        load_nifti_segmentation(root=root, image_size=8)


def test_unlabelled_option_reads_subjects_without_label_map_as_training_records(tmp_path):
    # Setup
    root = _unlabelled_root(tmp_path, labelled=4, unlabelled=3)

    # Execute: through the dispatcher, as --data-option unlabelled=true reaches it
    bundle = load_dataset(data=root, seed=0, image_size=8, unlabelled=True)

    # Assert: all 3 unlabelled subjects train, with zero maps and False flags
    train = bundle.train
    assert train.labelled is not None and train.unlabelled_count == 3
    assert not np.any(train.labels[~train.labelled])
    assert np.all(train.labels[train.labelled].reshape(int(train.labelled.sum()), -1).max(1) > 0)
    assert bundle.val.unlabelled_count == 0 and bundle.test.unlabelled_count == 0
    assert sum(len(s) for s in (bundle.train, bundle.val, bundle.test)) == 7
    assert bundle.label_convention == "brats"  # read from the labelled subjects
    assert "3 unlabelled" in bundle.source


@pytest.mark.parametrize("seed", range(6))
def test_unlabelled_subjects_are_never_carved_into_held_out_splits(tmp_path, seed):
    # Setup: hospitals, and patients of two sessions, one of them unlabelled
    root = tmp_path / "hosp"
    for h, hospital in enumerate(("a", "b")):
        for p in range(3):
            _subject(root / hospital / f"p{h}{p}_s1", seed=10 * h + p)
            _subject(root / hospital / f"p{h}{p}_s2", seed=10 * h + p + 5)
        (root / hospital / f"p{h}0_s2" / "seg.nii.gz").unlink()

    # Execute
    bundle = load_nifti_segmentation(
        root=root, image_size=8, seed=seed, unlabelled=True, group_by=r"regex:^(p\d+)_"
    )

    # Assert: both unlabelled sessions, and their patients' labelled ones, train
    assert bundle.train.unlabelled_count == 2
    assert bundle.val.labelled.all() and bundle.test.labelled.all()
    unlabelled_patients = set(bundle.train.patients[~bundle.train.labelled].tolist())
    for held in (bundle.val, bundle.test):
        assert not unlabelled_patients & set(held.patients.tolist())


def test_too_few_labelled_subjects_to_hold_out_is_one_data_error(tmp_path):
    # Setup
    root = _unlabelled_root(tmp_path, labelled=2, unlabelled=3)

    # Execute / Assert
    with pytest.raises(DataError, match=r"2 labelled subject\(s\).*at least 3"):
        load_nifti_segmentation(root=root, image_size=8, unlabelled=True)


def test_unlabelled_option_leaves_a_fully_labelled_bundle_and_fingerprint_unchanged(flat_root):
    # Execute
    plain = load_nifti_segmentation(root=flat_root, image_size=8, seed=1)
    opted = load_nifti_segmentation(root=flat_root, image_size=8, seed=1, unlabelled=True)

    # Assert
    assert opted.train.labelled is None
    assert opted.fingerprint == plain.fingerprint
    assert opted.source == plain.source


def test_unlabelled_option_must_be_a_bool(flat_root):
    with pytest.raises(ConfigError, match="unlabelled must be true or false"):
        load_nifti_segmentation(root=flat_root, image_size=8, unlabelled="yes")


def test_an_unlabelled_subject_checks_its_modalities_against_the_first(tmp_path):
    # Setup: the unlabelled subject's flair is on another grid
    root = _unlabelled_root(tmp_path, unlabelled=1)
    _save(root / "sub-04" / "flair.nii.gz", np.ones((6, 6, 6), np.float32))

    # Execute / Assert
    with pytest.raises(DataError, match=r"sub-04/flair.nii.gz: shape .* the first modality's"):
        load_nifti_segmentation(root=root, image_size=8, unlabelled=True)
