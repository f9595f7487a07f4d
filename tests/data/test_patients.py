"""Patient ids in the data layer: ArraySplit.patients and how every loader reads them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from securefed.data import ArraySplit, DatasetBundle, load_dataset
from securefed.data.synthetic import make_synthetic
from securefed.errors import ConfigError, DataError
from tests.data.test_dataset import _bundle, _split

# --- ArraySplit / DatasetBundle -------------------------------------------------------------


def test_units_group_records_by_ascending_patient_id_and_subset_carries_ids():
    # Prepare: non-contiguous ids, records of one patient scattered
    patients = np.array([30, 7, 30, 12, 7, 30], dtype=np.int64)
    split = _split(6, patients=patients)

    # Execute
    units = split.units()
    sub = split.subset(indices=np.array([5, 1, 3]))

    # Assert
    assert [u.tolist() for u in units] == [[1, 4], [3], [0, 2, 5]]
    assert all(u.dtype == np.int64 for u in units)
    assert split.patient_count() == 3
    assert sub.patients.tolist() == [30, 7, 12]
    assert not split.patients.flags.writeable


def test_without_patients_every_record_is_its_own_unit():
    # Execute
    split = _split(4)

    # Assert
    assert split.patients is None
    assert split.patient_count() == 4
    assert [u.tolist() for u in split.units()] == [[0], [1], [2], [3]]
    assert split.subset(indices=np.array([2, 0])).patients is None


@pytest.mark.parametrize(
    ("patients", "expected"),
    [
        (np.array([0, 1, 2], dtype=np.int64), "one entry per sample"),
        (np.array([0, 1, 2, 3, 4, -1], dtype=np.int64), "non-negative"),
        (np.arange(6, dtype=np.int32), "int64"),
        (np.zeros((6, 1), dtype=np.int64), "1-D"),
    ],
)
def test_array_split_rejects_malformed_patients(patients, expected):
    # Execute / Assert
    with pytest.raises(DataError, match=expected):
        _split(6, patients=patients)


def test_fingerprint_covers_patients_and_is_unchanged_without_them():
    # Prepare
    plain = _bundle()
    ids = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)
    regrouped = np.array([0, 1, 1, 2, 2, 0], dtype=np.int64)

    def with_ids(p: np.ndarray) -> DatasetBundle:
        return _bundle(
            train=ArraySplit(images=plain.train.images, labels=plain.train.labels, patients=p)
        )

    # Execute
    a, b, a_again = with_ids(ids), with_ids(regrouped), with_ids(ids.copy())

    # Assert: the old layout (no patients line) still gives the plain fingerprint
    digest = hashlib.sha256(b"securefed.dataset.fingerprint.v1\n")
    for name in ("train", "val", "test"):
        split = getattr(plain, name)
        for array_name, array, dtype in (
            ("images", split.images, "<f4"),
            ("labels", split.labels, "<i8"),
        ):
            digest.update(
                f"{name}/{array_name}:{dtype}:{','.join(map(str, array.shape))}\n".encode()
            )
            digest.update(array.astype(dtype).tobytes())
    assert plain.fingerprint == digest.hexdigest()
    assert len({plain.fingerprint, a.fingerprint, b.fingerprint}) == 3
    assert a_again.fingerprint == a.fingerprint


def test_bundle_allows_patients_on_train_alone_but_not_on_val_alone():
    # Execute
    train_only = _bundle(train=_split(6, seed=1, patients=np.array([0, 0, 1, 1, 2, 2])))

    # Assert
    assert train_only.has_patients and not _bundle().has_patients
    summary = train_only.describe()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["patient_counts"] == {"train": 3, "val": None, "test": None}
    assert _bundle().describe()["patient_counts"] is None
    with pytest.raises(DataError, match="val record patients but `train` does not"):
        _bundle(val=_split(4, seed=2, patients=np.arange(4)))


# --- .npz and MedMNIST by name ------------------------------------------------------------


def test_npz_reads_integer_patient_ids_per_split(write_npz):
    # Prepare: train has 12 records of 4 patients (non-contiguous ids); val has ids, test not
    path = write_npz(
        train_patient_ids=np.repeat([40, 11, 25, 90], 3),
        val_patient_ids=np.array([[5], [5], [6], [6]]),  # (N, 1) is accepted like labels
    )

    # Execute
    bundle = load_dataset(data=path, group_by="patient_ids")

    # Assert: codes rank the ids of all splits (5, 6, 11, 25, 40, 90), one code per id
    assert bundle.train.patients.tolist() == [4] * 3 + [2] * 3 + [3] * 3 + [5] * 3
    assert bundle.val.patients.tolist() == [0, 0, 1, 1]
    assert bundle.test.patients is None
    assert bundle.train.patient_count() == 4
    assert bundle.fingerprint != load_dataset(data=path).fingerprint


def test_npz_maps_string_ids_to_the_same_code_in_every_split(write_npz):
    # Prepare
    names = np.array(["p-b", "p-a", "p-c"] * 4)
    path = write_npz(
        train_patient_ids=names,
        test_patient_ids=np.array(["p-a", "p-z", "p-z", "p-b", "p-c", "p-a"]),
    )

    # Execute
    bundle = load_dataset(data=path, group_by="patient_ids")

    # Assert
    train, test = bundle.train.patients.tolist(), bundle.test.patients.tolist()
    code = {n: c for n, c in zip(names.tolist(), train, strict=True)}
    assert len(set(code.values())) == 3
    assert test[0] == code["p-a"] and test[3] == code["p-b"] and test[4] == code["p-c"]
    assert test[1] == test[2] not in code.values()


def test_npz_missing_train_ids_names_the_file_and_the_keys_present(write_npz):
    # Prepare
    path = write_npz(val_patient_ids=np.arange(4))

    # Execute / Assert
    with pytest.raises(DataError, match=r"toy\.npz.*no `train_patient_ids`.*found: test_images"):
        load_dataset(data=path, group_by="patient_ids")


def test_npz_patient_ids_of_the_wrong_length_or_kind_are_refused(write_npz, tmp_path):
    # Prepare
    short = write_npz("short.npz", train_pid=np.arange(11))
    floats = write_npz("floats.npz", train_pid=np.linspace(0, 1, 12))

    # Execute / Assert
    with pytest.raises(DataError, match=r"short\.npz: `train_pid` has shape \(11,\)"):
        load_dataset(data=short, group_by="pid")
    with pytest.raises(DataError, match=r"floats\.npz.*integers or strings"):
        load_dataset(data=floats, group_by="pid")
    with pytest.raises(ConfigError, match="names the id arrays by KEY"):
        load_dataset(data=short, group_by="regex:(x)")


def test_medmnist_by_name_reads_patient_ids(write_npz, tmp_path):
    # Prepare
    write_npz("breastmnist.npz", train_patient_ids=np.repeat(np.arange(6), 2))

    # Execute
    bundle = load_dataset(name="breastmnist", data_dir=tmp_path, group_by="patient_ids")

    # Assert
    assert bundle.train.patient_count() == 6
    assert [u.tolist() for u in bundle.train.units()][:2] == [[0, 1], [2, 3]]


# --- image folders ------------------------------------------------------------------------


def _tree(root: Path, *, splits=("train", "val", "test"), patients=3, per_patient=2) -> Path:
    """Gray PNGs named ``pat<P>_img<I>.png``; patient P's images all in one class."""
    for s, split in enumerate(splits):
        for c, cls in enumerate(("benign", "malignant")):
            for p in range(patients):
                for i in range(per_patient):
                    path = root / split / cls / f"pat{s}{c}{p}_img{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("L", (5, 4), color=10 * p + i).save(path)
    return root


def _ids_of(bundle: DatasetBundle, split: str) -> list[int]:
    return getattr(bundle, split).patients.tolist()


def test_image_folder_regex_reads_the_patient_from_the_file_name(tmp_path):
    # Prepare
    root = _tree(tmp_path / "study")

    # Execute
    bundle = load_dataset(data=root, group_by=r"regex:^(pat\d+)_")
    named = load_dataset(data=root, group_by=r"regex:(?P<patient>pat\d+)_(img)\d")

    # Assert: 6 patients of 2 images per split, no id shared across splits
    for split in ("train", "val", "test"):
        assert getattr(bundle, split).patient_count() == 6
        assert all(u.size == 2 for u in getattr(bundle, split).units())
    assert not set(_ids_of(bundle, "train")) & set(_ids_of(bundle, "test"))
    assert _ids_of(named, "train") == _ids_of(bundle, "train")


def test_image_folder_regex_refuses_unmatched_names_and_two_groups(tmp_path):
    # Prepare
    root = _tree(tmp_path / "study")
    stray = root / "test" / "benign" / "scan.png"
    Image.new("L", (5, 4)).save(stray)

    # Execute / Assert
    with pytest.raises(DataError, match=r"scan\.png: name 'scan' does not match"):
        load_dataset(data=root, group_by=r"regex:^(pat\d+)_")
    with pytest.raises(ConfigError, match="exactly one capture group"):
        load_dataset(data=root, group_by=r"regex:^(pat)(\d+)")
    with pytest.raises(ConfigError, match="regex:PATTERN"):
        load_dataset(data=root, group_by="patient_ids")


def _write_csv(
    path: Path, root: Path, *, skip: str | None = None, extra: str | None = None
) -> Path:
    rows = ["file,patient"]
    for image in sorted(root.rglob("*.png")):
        rel = image.relative_to(root).as_posix()
        if rel != skip:
            rows.append(f"{rel},{image.stem.split('_')[0][-1]}")  # patient = last digit
    if extra:
        rows.append(f"{extra},p9")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_image_folder_csv_maps_one_id_string_to_one_code_in_every_split(tmp_path):
    # Prepare: the CSV names patients 0, 1, 2 in every split and class (shared ids on purpose)
    root = _tree(tmp_path / "study")
    table = _write_csv(tmp_path / "patients.csv", root)

    # Execute
    bundle = load_dataset(data=root, group_by=str(table))

    # Assert
    assert bundle.train.patient_count() == 3
    assert set(_ids_of(bundle, "train")) == set(_ids_of(bundle, "val")) == {0, 1, 2}
    first_train = bundle.train.units()[0].tolist()
    assert len(first_train) == 4  # patient "0": 2 images in each of 2 classes


def test_image_folder_csv_refuses_an_unlisted_image_and_a_row_without_image(tmp_path):
    # Prepare
    root = _tree(tmp_path / "study")
    unlisted = _write_csv(tmp_path / "a.csv", root, skip="val/benign/pat101_img1.png")
    stray = _write_csv(tmp_path / "b.csv", root, extra="train/benign/gone.png")

    # Execute / Assert
    with pytest.raises(DataError, match=r"pat101_img1\.png: not listed in .*a\.csv"):
        load_dataset(data=root, group_by=str(unlisted))
    with pytest.raises(DataError, match=r"b\.csv: lists train/benign/gone\.png, which is not"):
        load_dataset(data=root, group_by=str(stray))


def test_image_folder_carves_val_by_patient(tmp_path):
    # Prepare: no val/ folder; 10 patients of 3 images per class
    root = _tree(tmp_path / "study", splits=("train", "test"), patients=10, per_patient=3)

    # Execute
    bundle = load_dataset(data=root, group_by=r"regex:^(pat\d+)_", seed=4, val_fraction=0.3)

    # Assert: no patient on both sides, whole patients moved, classes kept in both
    train, val = set(_ids_of(bundle, "train")), set(_ids_of(bundle, "val"))
    assert train and val and not train & val
    assert len(bundle.val) == 3 * len(val) and len(bundle.train) == 3 * len(train)
    assert set(bundle.val.labels.tolist()) == {0, 1}
    assert "by patient" in bundle.source


# --- NIfTI folders ------------------------------------------------------------------------


def _nifti_subject(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.zeros((8, 8, 8), np.float32)
    image[1:-1, 1:-1, 1:-1] = rng.uniform(100, 200, (6, 6, 6))
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[3:6, 3:6, 3:6] = 1
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image + 300.0 * labels, np.eye(4)), str(folder / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / "seg.nii.gz"))


def test_nifti_subjects_are_one_patient_each_by_default(tmp_path):
    # Prepare
    root = tmp_path / "mri"
    for s in range(5):
        _nifti_subject(root / f"sub-{s:02d}", seed=s)

    # Execute
    bundle = load_dataset(data=root, image_size=8, seed=0)

    # Assert: ids 0..4 over all splits, each split with one record per patient
    ids = sorted(_ids_of(bundle, "train") + _ids_of(bundle, "val") + _ids_of(bundle, "test"))
    assert ids == [0, 1, 2, 3, 4]
    assert bundle.train.patient_count() == len(bundle.train)


def test_nifti_regex_merges_sessions_and_carves_by_patient(tmp_path):
    # Prepare: 6 patients with 2 sessions each
    root = tmp_path / "mri"
    for p in range(6):
        for session in (1, 2):
            _nifti_subject(root / f"sub-{p:02d}_ses-{session}", seed=10 * p + session)

    # Execute
    bundles = [
        load_dataset(data=root, image_size=8, seed=seed, group_by=r"regex:^(sub-\d+)")
        for seed in range(4)
    ]

    # Assert: 6 patients, both sessions of a patient always in the same split
    for bundle in bundles:
        per_split = [set(_ids_of(bundle, s)) for s in ("train", "val", "test")]
        assert sum(len(ids) for ids in per_split) == 6
        assert not (per_split[0] & per_split[1] or per_split[0] & per_split[2])
        assert not per_split[1] & per_split[2]
        assert all(
            u.size == 2 for s in ("train", "val", "test") for u in getattr(bundle, s).units()
        )
    with pytest.raises(DataError, match=r"sub-00_ses-1: name 'sub-00_ses-1' does not match"):
        load_dataset(data=root, image_size=8, group_by=r"regex:^(patient-\d+)")


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_patients_share_label_and_look_alike():
    # Execute
    bundle = load_dataset(
        name="synthetic", seed=2, n_train=120, n_val=24, n_test=24, records_per_patient=4
    )

    # Assert: 30 patients of 4 records, one label each, ids unique across splits
    train = bundle.train
    units = train.units()
    assert len(units) == 30 and all(u.size == 4 for u in units)
    assert all(np.unique(train.labels[u]).size == 1 for u in units)
    assert not set(train.patients.tolist()) & set(bundle.val.patients.tolist())
    assert not set(bundle.val.patients.tolist()) & set(bundle.test.patients.tolist())
    # Alike: the mean intensity varies far less within a patient than across patients
    means = train.images.reshape(len(train), -1).mean(axis=1)
    within = np.mean([means[u].var() for u in units])
    across = np.var([means[u].mean() for u in units])
    assert within < 0.1 * across


def test_synthetic_default_keeps_its_fingerprint_and_has_no_patients():
    # Prepare: the fingerprint before patient ids existed
    before = "c80fda7cd8e08d9ba9ac46e6ed159efc62f4f0e14d097ed540df91cb3b9bca0a"

    # Execute
    default = load_dataset(seed=3, n_train=40, n_val=8, n_test=8, num_classes=2)
    explicit = make_synthetic(seed=3, n_train=40, n_val=8, n_test=8, num_classes=2)

    # Assert
    assert default.fingerprint == before
    assert (
        make_synthetic(
            seed=3, n_train=40, n_val=8, n_test=8, num_classes=2, records_per_patient=1
        ).fingerprint
        == explicit.fingerprint
        == before
    )
    assert default.train.patients is None and not default.has_patients


def test_synthetic_refuses_group_by_and_too_few_patients():
    # Execute / Assert
    with pytest.raises(ConfigError, match="--group-by does not apply to synthetic data"):
        load_dataset(seed=0, n_train=8, n_val=4, n_test=4, group_by="patient_ids")
    with pytest.raises(ConfigError, match="fewer than num_classes=4"):
        load_dataset(seed=0, n_train=40, n_val=8, n_test=8, records_per_patient=4)
    with pytest.raises(ConfigError, match="--group-by does not apply to synthetic-seg"):
        load_dataset(name="synthetic-seg", group_by="regex:(x)")


def test_registered_loaders_refuse_group_by_but_may_set_patients():
    # Prepare: a loader that sets patient ids itself
    from securefed.data.registry import register_dataset

    @register_dataset("patients-toy")
    def toy(seed: int = 0) -> DatasetBundle:
        return _bundle(train=_split(6, seed=1, patients=np.array([3, 3, 1, 1, 2, 2])))

    # Execute
    bundle = load_dataset(name="patients-toy")

    # Assert
    assert bundle.train.patient_count() == 3
    with pytest.raises(ConfigError, match="--group-by does not apply to the registered"):
        load_dataset(name="patients-toy", group_by="patient_ids")


def test_string_ids_that_differ_only_in_white_space_or_unicode_form_are_one_patient():
    from securefed.data.patients import encode_ids

    codes = encode_ids(
        {"train": np.array(["P1", " P1", "pe\u0301", "p\u00e9"]), "val": np.array(["P1 "])},
        source="t",
    )
    assert codes["train"].tolist()[0] == codes["train"].tolist()[1] == codes["val"][0]
    assert codes["train"][2] == codes["train"][3]
    assert codes["train"][0] != codes["train"][2]
