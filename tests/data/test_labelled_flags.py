"""ArraySplit.labelled: validation, subsets, the fingerprint and held-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.data import ArraySplit
from securefed.errors import DataError
from tests.data.test_dataset import _bundle, _split


def _flagged(flags: np.ndarray, *, seed: int = 1) -> ArraySplit:
    plain = _split(len(flags), seed=seed)
    return ArraySplit(images=plain.images, labels=plain.labels, labelled=flags)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (np.ones(6, dtype=np.int64), "1-D bool"),
        (np.ones((6, 1), dtype=bool), "1-D bool"),
        ([True] * 6, "1-D bool"),
        (np.ones(5, dtype=bool), "one entry per sample"),
    ],
)
def test_malformed_labelled_flags_are_refused(flags, expected):
    plain = _split(6)
    with pytest.raises(DataError, match=expected):
        ArraySplit(images=plain.images, labels=plain.labels, labelled=flags)


def test_subset_carries_the_flags_read_only():
    # Setup
    split = _flagged(np.array([True, False, True, True, False, True]))

    # Execute
    sub = split.subset(indices=np.array([4, 0, 1]))

    # Assert
    assert sub.labelled.tolist() == [False, True, False]
    assert sub.unlabelled_count == 2 and _split(3).unlabelled_count == 0
    assert not sub.labelled.flags.writeable


def test_fingerprint_covers_flags_only_when_present():
    # Setup
    plain = _bundle()
    all_true = _bundle(train=_flagged(np.ones(6, dtype=bool)))
    one_off = _bundle(train=_flagged(np.array([True] * 5 + [False])))
    again = _bundle(train=_flagged(np.array([True] * 5 + [False])))

    # Assert: same arrays, flags or not, or different flags: different digests
    assert len({plain.fingerprint, all_true.fingerprint, one_off.fingerprint}) == 3
    assert again.fingerprint == one_off.fingerprint


@pytest.mark.parametrize("split", ["val", "test"])
def test_held_out_split_with_an_unlabelled_record_is_refused(split):
    held = _flagged(np.array([True, False, True, True]), seed=2)
    with pytest.raises(DataError, match=rf"`{split}` holds 1 unlabelled record"):
        _bundle(**{split: held})


def test_describe_counts_classes_of_labelled_records_and_the_unlabelled_ones():
    # Setup: labels alternate 0, 1; records 1 and 3 (both class 1) unlabelled
    flags = np.array([True, False, True, False, True, True])

    # Execute
    summary = _bundle(train=_flagged(flags)).describe()

    # Assert
    assert summary["unlabelled_count"] == 2
    assert summary["class_counts"]["train"] == [3, 1]
    assert "unlabelled_count" not in _bundle().describe()
