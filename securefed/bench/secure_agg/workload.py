"""The work of one cell: which sites drop, the threshold that recovers them, the inputs."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from securefed.bench.secure_agg.grid import SecureAggGrid, n_dropped
from securefed.crypto.graph import GRAPH_SEED_BYTES, build_graph
from securefed.crypto.secagg import SecAggConfig, default_threshold
from securefed.errors import ConfigError, DropoutRecoveryError

__all__ = ["ROUND_INDEX", "DropoutPlan", "make_inputs", "plan_dropout", "reference_sum"]

# Distinct random input vectors kept in memory per cell; sites beyond it reuse one of them (the
# cost of masking or encrypting does not depend on the values, only the sum check does).
_INPUT_POOL_BYTES = 512 * 2**20
_MAX_DROPOUT_DRAWS = 200
# Every repeat is a fresh deployment (fresh keys) of round 1: the SecAgg+ graph, and so the
# recoverable dropout pattern, depends on the round, and repeats must measure the same work.
ROUND_INDEX = 1


@dataclass(frozen=True)
class DropoutPlan:
    """Who drops in one cell, and the masking parameters that let the round recover."""

    dropped: tuple[int, ...]
    threshold: int | None
    neighbors: int | None
    graph_seed: bytes
    redraws: int


def plan_dropout(grid: SecureAggGrid, *, n_clients: int, dropout: float) -> DropoutPlan:
    """Choose the dropped sites (seeded) and the masking threshold that can recover them.

    The threshold is the default min(m, floor(2m/3) + 1) unless the drawn dropouts leave some
    neighbourhood with fewer surviving share holders; then it is lowered to the survivors of
    the worst neighbourhood, never below a strict majority of m (the protocol's floor). A draw
    that no majority threshold can recover, or that disconnects the SecAgg+ survivors, is
    redrawn and counted: such a round would abort (DropoutRecoveryError), not cost time.
    """
    neighbors = grid.neighbors(n_clients)
    # The graph seed is public in the protocol; fixing it only makes reruns measure one graph.
    graph_seed = hashlib.sha256(f"securefed-bench-graph/{grid.seed}/{n_clients}".encode()).digest()
    graph_seed = graph_seed[:GRAPH_SEED_BYTES]
    sites = list(range(n_clients))
    graph = build_graph(sites=sites, neighbors=neighbors, seed=graph_seed, round_index=ROUND_INDEX)
    m = SecAggConfig(n_clients=n_clients, neighbors=neighbors).neighbourhood_size
    default = default_threshold(neighbourhood_size=m)
    n_drop = n_dropped(dropout, n_clients)
    if n_drop >= n_clients:
        raise ConfigError(f"`dropouts` value {dropout} drops all {n_clients} sites.")
    rng = random.Random(f"securefed-bench-dropout/{grid.seed}/{n_clients}/{dropout}")
    for draw in range(_MAX_DROPOUT_DRAWS):
        dropped = tuple(sorted(rng.sample(sites, n_drop)))
        survivors = set(sites) - set(dropped)
        support = min(len(graph.neighbourhood(s) & survivors) for s in sites)
        threshold = min(default, support)
        if 2 * threshold > m and graph.is_connected(survivors):
            return DropoutPlan(dropped, threshold, neighbors, graph_seed, draw)
    raise DropoutRecoveryError(
        f"no draw of {n_drop} dropped sites out of {n_clients} in {_MAX_DROPOUT_DRAWS} tries "
        f"is recoverable with neighbourhoods of {m}; raise `secagg_plus_from` or lower dropout."
    )


def make_inputs(*, n_clients: int, dim: int, seed: int) -> tuple[dict[int, np.ndarray], int]:
    """Per site ``[n_i u_i, n_i]`` with u_i ~ N(0, 0.01^2) and n_i uniform in [100, 1000].

    Returns the inputs and how many distinct vectors back them (sites share vectors beyond
    ``_INPUT_POOL_BYTES``).
    """
    rng = np.random.default_rng([seed, n_clients, dim])
    distinct = max(2, min(n_clients, _INPUT_POOL_BYTES // (8 * dim)))
    pool = []
    for _ in range(distinct):
        n_i = float(rng.integers(100, 1001))
        v = rng.normal(0.0, 1e-2, size=dim)
        v *= n_i
        v[-1] = n_i
        pool.append(v)
    return {s: pool[s % distinct] for s in range(n_clients)}, distinct


def reference_sum(
    inputs: Mapping[int, np.ndarray], survivors: Sequence[int]
) -> tuple[np.ndarray, float]:
    """Exact-order float64 sum of the survivors and the largest coordinate of sum |x_i|."""
    total = np.zeros_like(inputs[survivors[0]])
    magnitude = np.zeros_like(total)
    for s in survivors:
        total += inputs[s]
        magnitude += np.abs(inputs[s])
    return total, float(magnitude.max())
