"""site_splits with patient ids: patients, not records, are dealt to sites."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.data import ArraySplit
from securefed.data.partition import partition, partition_like
from securefed.errors import DataError
from securefed.fl.planning import seed_for, site_splits


def _split(
    n: int,
    *,
    seed: int,
    patients: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    classes: int = 3,
) -> ArraySplit:
    rng = np.random.default_rng(seed)
    # Encode the record index in the pixels so a site's records can be traced back.
    images = (np.arange(n, dtype=np.float32) / n)[:, None, None, None] * np.ones(
        (1, 1, 2, 2), np.float32
    )
    if patients is None:
        labels = rng.integers(0, classes, n).astype(np.int64)
    else:  # one diagnosis per patient
        ids, inverse = np.unique(patients, return_inverse=True)
        labels = rng.integers(0, classes, ids.size).astype(np.int64)[inverse]
    return ArraySplit(images=images, labels=labels, groups=groups, patients=patients)


def _patients(n_patients: int, *, seed: int) -> np.ndarray:
    """1-6 records per patient, non-contiguous ids, records of a patient scattered."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_patients)
    ids = np.repeat(rng.permutation(5 * n_patients)[:n_patients], sizes)
    return rng.permutation(ids).astype(np.int64)


def _record_index(split: ArraySplit, n: int) -> np.ndarray:
    return np.rint(split.images[:, 0, 0, 0] * n).astype(np.int64)


@pytest.mark.parametrize("spec", ["dirichlet:0.5", "iid", "by-group"])
def test_every_patient_is_at_exactly_one_site_and_every_record_is_placed_once(spec):
    # Prepare: 60 patients in 4 hospitals (a patient's records in one hospital)
    patients = _patients(60, seed=1)
    n = patients.size
    _, codes = np.unique(patients, return_inverse=True)
    groups = (codes % 4).astype(np.int64)
    train = _split(n, seed=2, patients=patients, groups=groups)
    val = _split(30, seed=3, groups=np.arange(30, dtype=np.int64) % 4)
    config = RunConfig(clients=4, partition=spec, seed=7)

    # Execute
    shards = site_splits(config, train=train, val=val)

    # Assert
    placed = np.concatenate([_record_index(site, n) for site, _ in shards])
    assert np.array_equal(np.sort(placed), np.arange(n))
    owners: dict[int, set[int]] = {}
    for k, (site, _) in enumerate(shards):
        assert np.array_equal(site.patients, patients[_record_index(site, n)])
        for pid in site.patients.tolist():
            owners.setdefault(pid, set()).add(k)
    assert len(owners) == 60
    assert all(len(sites) == 1 for sites in owners.values())


@pytest.mark.parametrize("spec", ["dirichlet:0.5", "iid", "by-group"])
def test_without_patients_the_split_is_the_record_level_partition(spec):
    # Prepare
    n = 90
    train = _split(n, seed=2, groups=np.arange(n, dtype=np.int64) % 3)
    val = _split(30, seed=3, groups=np.arange(30, dtype=np.int64) % 3)
    config = RunConfig(clients=3, partition=spec, seed=11)

    # Execute
    shards = site_splits(config, train=train, val=val)

    # Assert: exactly the indices of partition/partition_like with the same seeds
    parts = partition(train.labels, spec=spec, n_sites=3, seed=seed_for(11, 1), groups=train.groups)
    held = partition_like(
        val.labels,
        site_train_labels=[train.labels[p] for p in parts],
        seed=seed_for(11, 2),
        heldout_groups=val.groups,
        site_train_groups=[train.groups[p] for p in parts],
    )
    for (site, site_val), p, h in zip(shards, parts, held, strict=True):
        assert np.array_equal(_record_index(site, n), p)
        assert site.patients is None
        assert np.array_equal(_record_index(site_val, 30), h)


def _hospitals(patients: np.ndarray) -> np.ndarray:
    """A hospital per patient (all of a patient's records in one), 4 hospitals."""
    _, codes = np.unique(patients, return_inverse=True)
    return (codes % 4).astype(np.int64)


@pytest.mark.parametrize("spec", ["dirichlet:0.5", "iid", "by-group"])
def test_held_out_patients_are_dealt_whole_to_one_site(spec):
    # Prepare: train and val patients of 1-6 scattered records each, distinct people.
    # (by-group kept patients whole before too, a patient being in one hospital; it guards
    # that dealing patients keeps each held-out patient with its hospital's site.)
    train_ids = _patients(60, seed=1)
    val_ids = _patients(25, seed=8) + 1000
    train = _split(train_ids.size, seed=2, patients=train_ids, groups=_hospitals(train_ids))
    val = _split(val_ids.size, seed=3, patients=val_ids, groups=_hospitals(val_ids))
    config = RunConfig(clients=4, partition=spec, seed=7)

    # Execute
    shards = site_splits(config, train=train, val=val)

    # Assert: every held-out record is placed once, and each patient at exactly one site
    held = [_record_index(h, val_ids.size) for _, h in shards if h is not None]
    placed = np.concatenate(held)
    assert np.array_equal(np.sort(placed), np.arange(val_ids.size))
    owners: dict[int, set[int]] = {}
    for k, (_, site_val) in enumerate(shards):
        if site_val is None:
            continue
        assert np.array_equal(site_val.patients, val_ids[_record_index(site_val, val_ids.size)])
        for pid in site_val.patients.tolist():
            owners.setdefault(pid, set()).add(k)
    assert len(owners) == 25
    assert all(len(sites) == 1 for sites in owners.values())


def test_a_patient_with_training_records_is_held_out_at_the_site_that_trains_on_them():
    # Prepare: the val split holds more records of 10 training patients, and 10 new patients
    train_ids = _patients(30, seed=1)
    known = np.unique(train_ids)[:10]
    val_ids = np.concatenate([np.repeat(known, 3), np.repeat(np.arange(10) + 1000, 2)])
    val_ids = np.random.default_rng(5).permutation(val_ids).astype(np.int64)
    train = _split(train_ids.size, seed=2, patients=train_ids)
    val = _split(val_ids.size, seed=3, patients=val_ids)
    config = RunConfig(clients=3, partition="dirichlet:0.5", seed=4)

    # Execute
    shards = site_splits(config, train=train, val=val)

    # Assert: no patient id is at two sites, across both splits
    owners: dict[int, set[int]] = {}
    for k, (site, site_val) in enumerate(shards):
        ids = site.patients.tolist() + ([] if site_val is None else site_val.patients.tolist())
        for pid in ids:
            owners.setdefault(pid, set()).add(k)
    assert set(known.tolist()) | set(range(1000, 1010)) <= set(owners)
    assert all(len(sites) == 1 for sites in owners.values())


def test_patient_partition_is_deterministic_and_refuses_fewer_patients_than_sites():
    # Prepare
    patients = _patients(12, seed=4)
    train = _split(patients.size, seed=5, patients=patients)
    val = _split(10, seed=6)
    config = RunConfig(clients=3, partition="dirichlet:0.5", seed=2)

    # Execute
    first = site_splits(config, train=train, val=val)
    again = site_splits(config, train=train, val=val)

    # Assert
    for (a, _), (b, _) in zip(first, again, strict=True):
        assert np.array_equal(a.patients, b.patients) and np.array_equal(a.images, b.images)
    few = _split(8, seed=5, patients=np.array([1, 1, 1, 1, 2, 2, 2, 2], dtype=np.int64))
    with pytest.raises(DataError, match="3 sites but only 2 patients"):
        site_splits(config.replace(partition="iid"), train=few, val=val)


def test_an_infeasible_patient_partition_says_it_counts_patients():
    # Prepare: 3 patients for 3 sites under a near-degenerate Dirichlet: some site gets none
    patients = np.repeat(np.arange(3, dtype=np.int64), 5)
    train = ArraySplit(
        images=np.zeros((15, 1, 2, 2), np.float32),
        labels=np.zeros(15, np.int64),
        patients=patients,
    )
    config = RunConfig(clients=3, partition="dirichlet:0.01", seed=0)

    # Execute / Assert
    with pytest.raises(
        DataError, match=r"partitioning 3 patients \(one row each\): dirichlet:0.01 left a site"
    ):
        site_splits(config, train=train, val=_split(4, seed=1))


@pytest.mark.parametrize("segmentation", [False, True])
def test_the_public_fraction_takes_whole_patients(segmentation):
    """Records released without DP (the declared-public share) never split a patient: its
    other records would otherwise sit in private data with part of the patient already out."""
    from securefed.fl.transfer import public_split

    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    n = patients.size
    # Segmentation: a map per record; classification: one diagnosis per patient.
    labels = rng.integers(0, 2, (n, 4, 4)) if segmentation else rng.integers(0, 2, 40)[patients]
    split = ArraySplit(
        images=np.zeros((n, 1, 4, 4), np.float32),
        labels=labels.astype(np.int64),
        patients=patients.astype(np.int64),
    )
    private, public = public_split(split, fraction=0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([private, public])), np.arange(n))
    assert not set(patients[private]) & set(patients[public])
    assert 4 <= len(set(patients[public])) <= 12
