"""Site partitioning: coverage invariants, determinism, skew, and held-out assignment."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.data import available_partitioners, parse_partitioner, partition, partition_like
from securefed.data.partition import (
    ByGroupPartitioner,
    ByLabelPartitioner,
    DirichletPartitioner,
    IIDPartitioner,
    stratified_holdout,
)
from securefed.errors import ConfigError, DataError


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "a sample is missing or assigned twice"
    assert np.array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices are sorted and unique"


labels_strategy = st.integers(1, 6).flatmap(
    lambda k: st.lists(st.integers(0, k - 1), min_size=1, max_size=300).map(
        lambda xs: np.array(xs, dtype=np.int64)
    )
)
spec_strategy = st.one_of(
    st.just("iid"),
    st.floats(0.05, 20.0).map(lambda a: f"dirichlet:{a}"),
    st.integers(1, 6).map(lambda k: f"by-label:{k}"),
)


@settings(max_examples=150, deadline=None)
@given(
    labels=labels_strategy,
    spec=spec_strategy,
    n_sites=st.integers(1, 8),
    seed=st.integers(0, 2**63 - 1),
    min_size=st.integers(1, 3),
)
def test_every_sample_lands_in_exactly_one_non_empty_site(labels, spec, n_sites, seed, min_size):
    # Execute
    try:
        parts = partition(labels, spec=spec, n_sites=n_sites, seed=seed, min_size=min_size)
    except DataError:
        # Infeasible requests must be refused, never half-done; IID is feasible whenever
        # there are enough samples, so it may only fail for that reason.
        assert not (spec == "iid" and n_sites * min_size <= labels.size)
        return

    # Assert
    assert len(parts) == n_sites
    _assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= min_size


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "by-label:2"])
def test_same_seed_same_split_other_seed_other_split(spec):
    # Prepare
    labels = np.repeat(np.arange(4), 50)

    # Execute
    first = partition(labels, spec=spec, n_sites=4, seed=11)
    again = partition(labels, spec=spec, n_sites=4, seed=11)
    other = partition(labels, spec=spec, n_sites=4, seed=12)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_mix_classes():
    # Prepare
    labels = np.repeat(np.arange(2), 500)

    # Execute
    parts = partition(labels, spec="iid", n_sites=3, seed=0)

    # Assert
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for part in parts:
        assert 0.4 < labels[part].mean() < 0.6


def _mean_label_skew(labels: np.ndarray, parts: list[np.ndarray], k: int) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    overall = np.bincount(labels, minlength=k) / labels.size
    distances = []
    for part in parts:
        mix = np.bincount(labels[part], minlength=k) / part.size
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_small_dirichlet_alpha_skews_labels_more_than_large_alpha():
    # Prepare
    labels = np.repeat(np.arange(10), 200)

    # Execute
    skewed = partition(labels, spec="dirichlet:0.1", n_sites=5, seed=3)
    mild = partition(labels, spec="dirichlet:100", n_sites=5, seed=3)

    # Assert
    assert _mean_label_skew(labels, skewed, 10) > 0.4
    assert _mean_label_skew(labels, mild, 10) < 0.1


def test_by_label_gives_each_site_at_most_k_classes_and_covers_all():
    # Prepare
    labels = np.repeat(np.arange(10), 30)

    # Execute
    parts = partition(labels, spec="by-label:2", n_sites=7, seed=1)

    # Assert
    _assert_exact_cover(parts, labels.size)
    for part in parts:
        assert len(np.unique(labels[part])) <= 2


def test_by_label_with_k_equal_to_classes_gives_every_site_every_class():
    # Prepare
    labels = np.repeat(np.arange(3), 30)

    # Execute
    parts = partition(labels, spec="by-label:3", n_sites=3, seed=1)

    # Assert
    for part in parts:
        assert np.bincount(labels[part], minlength=3).tolist() == [10, 10, 10]


@pytest.mark.parametrize(
    ("labels", "spec", "n_sites", "expected"),
    [
        (np.arange(3), "iid", 4, "Cannot give 4 sites"),
        (np.repeat(np.arange(10), 5), "by-label:2", 4, "covers at most 8 of the 10"),
        (np.repeat(np.arange(2), 5), "by-label:3", 2, "needs at least 3 classes"),
        (np.repeat(np.arange(2), 10), "dirichlet:0.001", 10, "use a larger alpha or fewer sites"),
    ],
)
def test_infeasible_partitions_are_data_errors(labels, spec, n_sites, expected):
    # Execute / Assert
    with pytest.raises(DataError, match=expected):
        partition(labels, spec=spec, n_sites=n_sites, seed=0)


def test_by_label_reports_a_site_starved_by_shared_classes():
    # Prepare: class 1 has one sample but is dealt to two sites
    labels = np.array([0] * 10 + [1])

    # Execute / Assert
    with pytest.raises(DataError, match="by-label:1 left site"):
        partition(labels, spec="by-label:1", n_sites=4, seed=0)


def test_min_size_is_respected_by_dirichlet():
    # Prepare
    labels = np.repeat(np.arange(3), 40)

    # Execute
    parts = partition(labels, spec="dirichlet:0.3", n_sites=4, seed=2, min_size=15)

    # Assert
    assert min(p.size for p in parts) >= 15


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("kmeans", "must be one of iid, dirichlet:ALPHA, by-label:K"),
        ("dirichlet", "positive ALPHA"),
        ("dirichlet:-1", "positive ALPHA"),
        ("dirichlet:abc", "positive ALPHA"),
        ("dirichlet:inf", "positive ALPHA"),
        ("by-label:0", "positive integer K"),
        ("by-label:1.5", "positive integer K"),
        ("iid:3", "takes no argument"),
    ],
)
def test_bad_specs_are_config_errors(spec, expected):
    # Execute / Assert
    with pytest.raises(ConfigError, match=expected):
        parse_partitioner(spec)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n_sites": 0}, ConfigError),
        ({"min_size": 0}, ConfigError),
        ({"labels": np.array([0.5, 1.0])}, DataError),
        ({"labels": np.array([], dtype=np.int64)}, DataError),
        ({"labels": np.array([0, -1])}, DataError),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error):
    # Prepare
    call = {"labels": np.arange(10) % 2, "spec": "iid", "n_sites": 2, "seed": 0} | kwargs

    # Execute / Assert
    with pytest.raises(error):
        partition(**call)


def test_registry_names_and_parsed_objects():
    # Execute / Assert
    assert available_partitioners() == ("iid", "dirichlet", "by-label", "by-group")
    assert parse_partitioner(" iid ") == IIDPartitioner()
    assert parse_partitioner("dirichlet:0.5") == DirichletPartitioner(alpha=0.5)
    assert parse_partitioner("by-label:2") == ByLabelPartitioner(classes_per_site=2)
    assert parse_partitioner("by-group") == ByGroupPartitioner()


def test_partition_like_follows_each_sites_training_mix():
    # Prepare: site 0 trains on class 0 only; site 1 on 1:3 of class 0:1; site 2 on class 1
    site_train = [
        np.zeros(30, dtype=np.int64),
        np.array([0] * 10 + [1] * 30),
        np.ones(30, dtype=np.int64),
    ]
    heldout = np.array([0] * 40 + [1] * 60)

    # Execute
    parts = partition_like(heldout, site_train_labels=site_train, seed=0)

    # Assert: class 0 goes 3:1:0 (30, 10), class 1 goes 0:1:1 (30, 30)
    counts = [np.bincount(heldout[p], minlength=2).tolist() for p in parts]
    assert counts == [[30, 0], [10, 30], [0, 30]]
    _assert_exact_cover(parts, heldout.size)


def test_partition_like_skips_untrained_classes_and_allows_empty_sites():
    # Prepare
    site_train = [np.array([0, 0, 0]), np.array([1])]
    heldout = np.array([0, 0, 2, 2, 2])

    # Execute
    parts = partition_like(heldout, site_train_labels=site_train, seed=0)

    # Assert
    assert parts[0].tolist() == [0, 1]
    assert parts[1].size == 0 and parts[1].dtype == np.int64


@settings(max_examples=100, deadline=None)
@given(
    heldout=st.lists(st.integers(0, 3), min_size=0, max_size=120),
    site_train=st.lists(
        st.lists(st.integers(0, 3), min_size=0, max_size=60), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**32),
)
def test_partition_like_counts_are_the_rounded_quotas(heldout, site_train, seed):
    # Prepare
    heldout = np.array(heldout, dtype=np.int64)
    train = [np.array(t, dtype=np.int64) for t in site_train]
    train_counts = np.stack([np.bincount(t, minlength=4) for t in train])

    # Execute
    parts = partition_like(heldout, site_train_labels=train, seed=seed)
    again = partition_like(heldout, site_train_labels=train, seed=seed)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size, "each held-out sample goes to at most one site"
    for cls in range(4):
        n_cls = int(np.sum(heldout == cls))
        weights = train_counts[:, cls]
        got = np.array([np.sum(heldout[p] == cls) for p in parts])
        if weights.sum() == 0:
            assert got.sum() == 0
            continue
        quota = n_cls * weights / weights.sum()
        assert got.sum() == n_cls
        assert np.all(got >= np.floor(quota)) and np.all(got <= np.ceil(quota))


def test_stratified_holdout_takes_the_fraction_of_every_class():
    # Prepare
    labels = np.array([0] * 50 + [1] * 20 + [2] * 1)

    # Execute
    kept, held = stratified_holdout(labels, fraction=0.1, seed=0)

    # Assert
    assert np.bincount(labels[held], minlength=3).tolist() == [5, 2, 0]
    _assert_exact_cover([kept, held], labels.size)


# -- acquisition groups and segmentation label maps ------------------------------------------


def test_by_group_deals_sorted_groups_round_robin_to_sites():
    # Prepare: groups 3, 7, 9, 12 with 2, 3, 1, 4 samples, shuffled order
    groups = np.array([7, 12, 3, 7, 12, 9, 12, 3, 7, 12])
    labels = np.zeros(groups.size, dtype=np.int64)

    # Execute
    parts = partition(labels, spec="by-group", n_sites=3, seed=0, groups=groups)
    other_seed = partition(labels, spec="by-group", n_sites=3, seed=99, groups=groups)

    # Assert: sorted groups (3, 7, 9, 12) -> sites 0, 1, 2, 0
    assert [sorted(set(groups[p].tolist())) for p in parts] == [[3, 12], [7], [9]]
    _assert_exact_cover(parts, groups.size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, other_seed, strict=True))


def test_by_group_accepts_segmentation_label_maps():
    # Prepare
    maps = np.zeros((6, 2, 2, 2), dtype=np.int64)
    groups = np.array([0, 1, 2, 0, 1, 2])

    # Execute
    parts = partition(maps, spec="by-group", n_sites=3, seed=0, groups=groups)

    # Assert
    assert [p.tolist() for p in parts] == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"groups": None}, ConfigError, "needs the acquisition group"),
        ({"n_sites": 4}, DataError, "2 group\\(s\\), fewer than the 4 sites"),
        ({"min_size": 4}, DataError, "left site 1 with 3 sample\\(s\\)"),
        ({"groups": np.array([0, 1, 0])}, DataError, "one group per sample"),
        ({"groups": np.array([0, 1, 0, 1, -1, 0, 0, 0])}, DataError, "non-negative"),
        ({"spec": "by-group:2"}, ConfigError, "takes no argument"),
    ],
)
def test_by_group_refusals(kwargs, error, expected):
    # Prepare: group 0 has 5 samples, group 1 has 3
    call = {
        "labels": np.zeros(8, dtype=np.int64),
        "spec": "by-group",
        "n_sites": 2,
        "seed": 0,
        "groups": np.array([0, 1, 0, 1, 1, 0, 0, 0]),
    } | kwargs

    # Execute / Assert
    with pytest.raises(error, match=expected):
        partition(**call)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 40),
    n_sites=st.integers(1, 6),
    seed=st.integers(0, 2**32),
    spatial=st.sampled_from([(2,), (2, 3), (1, 2, 2)]),
)
def test_iid_splits_label_maps_by_sample(n, n_sites, seed, spatial):
    # Prepare
    maps = np.zeros((n, *spatial), dtype=np.int64)

    # Execute
    try:
        parts = partition(maps, spec="iid", n_sites=n_sites, seed=seed)
    except DataError:
        assert n_sites > n
        return

    # Assert: the split is over the N samples, never over voxels
    _assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("spec", ["dirichlet:0.5", "by-label:1"])
def test_class_skew_partitioners_refuse_label_maps(spec):
    # Prepare
    maps = np.zeros((10, 4, 4), dtype=np.int64)

    # Execute / Assert
    with pytest.raises(ConfigError, match="needs per-sample class labels; use iid or by-group"):
        partition(maps, spec=spec, n_sites=2, seed=0)


def test_partition_like_sends_each_heldout_sample_to_the_site_of_its_group():
    # Prepare: by-group training split of groups 0..3 over 2 sites (0, 2 -> site 0; 1, 3 -> 1)
    train_groups = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    parts = partition(train_groups, spec="by-group", n_sites=2, seed=0, groups=train_groups)
    heldout_groups = np.array([3, 2, 1, 0, 4, 0])

    # Execute: group 4 trains nowhere, so it goes to no site
    held = partition_like(
        np.zeros((6, 3, 3), dtype=np.int64),
        site_train_labels=[np.zeros((p.size, 3, 3), dtype=np.int64) for p in parts],
        seed=0,
        heldout_groups=heldout_groups,
        site_train_groups=[train_groups[p] for p in parts],
    )

    # Assert
    assert [h.tolist() for h in held] == [[1, 3, 5], [0, 2]]


def test_partition_like_groups_take_precedence_over_class_labels():
    # Prepare: classes would send sample 0 to site 1, its group sends it to site 0
    held = partition_like(
        np.array([1]),
        site_train_labels=[np.array([0, 0]), np.array([1, 1])],
        seed=0,
        heldout_groups=np.array([5]),
        site_train_groups=[np.array([5, 5]), np.array([6, 6])],
    )

    # Assert
    assert [h.tolist() for h in held] == [[0], []]


def test_partition_like_deals_label_maps_in_proportion_to_site_sizes():
    # Prepare: sites of 10, 30 and 60 training volumes; 50 held-out volumes
    site_train = [np.zeros((n, 2, 2), dtype=np.int64) for n in (10, 30, 60)]
    heldout = np.zeros((50, 2, 2), dtype=np.int64)

    # Execute
    held = partition_like(heldout, site_train_labels=site_train, seed=4)
    again = partition_like(heldout, site_train_labels=site_train, seed=4)

    # Assert
    assert [h.size for h in held] == [5, 15, 30]
    _assert_exact_cover(held, 50)
    assert all(np.array_equal(a, b) for a, b in zip(held, again, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"heldout_groups": np.array([0, 1])}, ConfigError, "must be given together"),
        (
            {
                "heldout_groups": np.array([0]),
                "site_train_groups": [np.array([0]), np.array([1])],
            },
            DataError,
            "`heldout_groups` must hold one group per sample",
        ),
        (
            {"heldout_groups": np.array([0, 1]), "site_train_groups": [np.array([0, 1])]},
            ConfigError,
            "one array per site",
        ),
    ],
)
def test_partition_like_rejects_inconsistent_groups(kwargs, error, expected):
    # Prepare
    call = {
        "labels_heldout": np.array([0, 1]),
        "site_train_labels": [np.array([0]), np.array([1])],
        "seed": 0,
    } | kwargs

    # Execute / Assert
    with pytest.raises(error, match=expected):
        partition_like(**call)
