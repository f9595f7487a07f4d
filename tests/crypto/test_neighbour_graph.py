"""Tests for the public SecAgg+ neighbourhood graph."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.crypto.graph import (
    NeighbourGraph,
    build_graph,
    complete_graph,
    effective_degree,
)
from securefed.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=3, max_value=40), data=st.data())
def test_graph_is_regular_symmetric_and_shared_by_everyone(n, data):
    # Prepare
    k = data.draw(st.integers(min_value=2, max_value=n + 2))
    sites = data.draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    seed = os.urandom(32)

    # Execute
    graph = build_graph(sites=sites, neighbors=k, seed=seed, round_index=7)
    again = build_graph(sites=list(reversed(sites)), neighbors=k, seed=seed, round_index=7)

    # Assert
    degree = effective_degree(n_sites=n, neighbors=k)
    assert graph == again
    assert graph.sites == tuple(sorted(sites))
    assert all(len(graph.neighbours(s)) == degree for s in sites)
    assert all(u in graph.neighbours(v) for u in sites for v in graph.neighbours(u))
    assert graph.is_connected(sites)
    assert degree in (k, k + 1, n - 1)


def test_seed_and_round_change_the_graph():
    # Prepare
    sites = range(30)
    seed = os.urandom(32)

    # Execute
    base = build_graph(sites=sites, neighbors=4, seed=seed, round_index=0)
    other_seed = build_graph(sites=sites, neighbors=4, seed=os.urandom(32), round_index=0)
    other_round = build_graph(sites=sites, neighbors=4, seed=seed, round_index=1)

    # Assert
    assert base.adjacency != other_seed.adjacency
    assert base.adjacency != other_round.adjacency


def test_none_or_large_degree_gives_the_complete_graph():
    # Prepare
    sites = [3, 1, 4, 9]

    # Execute
    graphs = [
        build_graph(sites=sites, neighbors=k, seed=bytes(32), round_index=0) for k in (None, 3, 8)
    ]

    # Assert
    assert all(g == complete_graph(sites=sites) for g in graphs)
    assert all(g.is_complete for g in graphs)


def test_effective_degree_rounds_up_when_no_regular_graph_exists():
    # Execute / Assert
    assert effective_degree(n_sites=10, neighbors=3) == 3
    assert effective_degree(n_sites=11, neighbors=3) == 4
    assert effective_degree(n_sites=11, neighbors=4) == 4
    assert effective_degree(n_sites=5, neighbors=None) == 4
    with pytest.raises(ConfigError, match="at least 2"):
        effective_degree(n_sites=10, neighbors=1)


def test_components_of_a_cycle_split_when_two_far_apart_sites_leave():
    # Prepare: degree 2 is a single random cycle.
    graph = build_graph(sites=range(8), neighbors=2, seed=os.urandom(32), round_index=0)
    a = 0
    far = next(s for s in range(1, 8) if s not in graph.neighbours(a))

    # Execute
    parts = graph.components(set(range(8)) - {a, far})

    # Assert
    assert len(parts) == 2
    assert sum(len(p) for p in parts) == 6
    assert not graph.is_connected(set(range(8)) - {a, far})


def test_graph_validation_rejects_asymmetric_or_bad_inputs():
    # Execute / Assert
    with pytest.raises(ConfigError, match="not symmetric"):
        NeighbourGraph(sites=(0, 1), adjacency={0: frozenset({1}), 1: frozenset()})
    with pytest.raises(ConfigError, match="self-loop"):
        NeighbourGraph(sites=(0,), adjacency={0: frozenset({0})})
    with pytest.raises(ConfigError, match="32 bytes"):
        build_graph(sites=range(5), neighbors=2, seed=b"short", round_index=0)
