"""Public neighbourhood graphs of SecAgg+ (Bell et al. 2020): who masks with, and shares to, whom.

Construction. The sites that advertised keys are sorted, shuffled by a Fisher-Yates permutation
driven by AES-CTR keyed with HKDF(public round seed, "neighbour-graph", round), and placed on a
ring; each site is joined to the ``degree // 2`` nearest sites on either side (a Harary
circulant graph). For an odd requested degree k the site opposite on the ring is added when the
number of sites is even (k-regular); when both are odd no k-regular graph exists and k + 1 is
used. A requested degree of at least n - 1, or ``None``, gives the complete graph, i.e. classic
SecAgg (Bonawitz et al. 2017). The graph is public: the server announces the seed after all keys
are advertised, and every site recomputes the same graph.

Why a random ring: a circulant graph of degree k is k-connected, so fewer than k dropouts can
never disconnect it. The shuffle spreads sites at random only for a server that follows the
protocol: the seed is the server's, and the graph depends on nothing else but the sites and
the round, so a malicious server can try seeds offline until chosen sites are a victim's
neighbours. Collusion tolerance is therefore counted against colluders anywhere in the
federation, not only among a site's neighbours (docs/secure-aggregation.md).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from securefed.crypto.kdf import KeyPurpose, derive_key
from securefed.crypto.prg import KeystreamPRG
from securefed.errors import ConfigError

__all__ = [
    "GRAPH_SEED_BYTES",
    "NeighbourGraph",
    "build_graph",
    "complete_graph",
    "effective_degree",
]

GRAPH_SEED_BYTES = 32


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected graph over site ids with no self-loops.

    Attributes:
        sites: Sorted site ids.
        adjacency: site -> frozenset of its neighbours (read-only).

    """

    sites: tuple[int, ...]
    adjacency: Mapping[int, frozenset[int]]

    def __post_init__(self) -> None:
        if list(self.sites) != sorted(set(self.sites)):
            raise ConfigError("graph `sites` must be sorted and distinct.")
        if set(self.adjacency) != set(self.sites):
            raise ConfigError("graph `adjacency` must have exactly one entry per site.")
        for site, peers in self.adjacency.items():
            if site in peers:
                raise ConfigError(f"graph has a self-loop at site {site}.")
            for peer in peers:
                if peer not in self.adjacency or site not in self.adjacency[peer]:
                    raise ConfigError(f"graph edge {site}-{peer} is not symmetric.")
        frozen = {s: frozenset(self.adjacency[s]) for s in self.sites}
        object.__setattr__(self, "adjacency", MappingProxyType(frozen))

    def neighbours(self, site: int) -> frozenset[int]:
        """Open neighbourhood of ``site`` (its peers, excluding itself)."""
        try:
            return self.adjacency[site]
        except KeyError:
            raise ConfigError(f"site {site} is not in the graph.") from None

    def neighbourhood(self, site: int) -> frozenset[int]:
        """Return the closed neighbourhood N[site]: its peers and itself (its share holders)."""
        return self.neighbours(site) | {site}

    @property
    def degree(self) -> int:
        """Largest number of neighbours of any site."""
        return max((len(p) for p in self.adjacency.values()), default=0)

    @property
    def is_complete(self) -> bool:
        """Whether every pair of sites is joined (classic SecAgg)."""
        return all(len(p) == len(self.sites) - 1 for p in self.adjacency.values())

    def components(self, subset: Iterable[int]) -> list[frozenset[int]]:
        """Return the connected components of the subgraph induced by ``subset``, largest first."""
        remaining = set(subset)
        unknown = remaining - set(self.sites)
        if unknown:
            raise ConfigError(f"sites {sorted(unknown)} are not in the graph.")
        parts = []
        while remaining:
            start = min(remaining)
            seen, frontier = {start}, [start]
            while frontier:
                node = frontier.pop()
                for peer in self.adjacency[node]:
                    if peer in remaining and peer not in seen:
                        seen.add(peer)
                        frontier.append(peer)
            remaining -= seen
            parts.append(frozenset(seen))
        return sorted(parts, key=lambda c: (-len(c), min(c)))

    def is_connected(self, subset: Iterable[int]) -> bool:
        """Whether the subgraph induced by ``subset`` is connected (True if it is empty)."""
        return len(self.components(subset)) <= 1


def effective_degree(*, n_sites: int, neighbors: int | None) -> int:
    """Degree of every site in :func:`build_graph` for ``n_sites`` sites.

    Args:
        n_sites: Number of sites in the graph (>= 1).
        neighbors: Requested degree k, or None for the complete graph.

    Returns:
        n - 1 for the complete graph; otherwise k, or k + 1 when k and n are both odd.

    """
    if n_sites < 1:
        raise ConfigError(f"`n_sites` must be at least 1 (got {n_sites}).")
    if neighbors is None or neighbors >= n_sites - 1:
        return n_sites - 1
    if neighbors < 2:
        raise ConfigError(f"`neighbors` must be at least 2 (got {neighbors}).")
    if neighbors % 2 == 1 and n_sites % 2 == 1:
        return neighbors + 1
    return neighbors


def complete_graph(*, sites: Collection[int]) -> NeighbourGraph:
    """Every site joined to every other (classic SecAgg)."""
    ordered = tuple(sorted(set(sites)))
    everyone = frozenset(ordered)
    return NeighbourGraph(sites=ordered, adjacency={s: everyone - {s} for s in ordered})


def build_graph(
    *, sites: Collection[int], neighbors: int | None, seed: bytes, round_index: int
) -> NeighbourGraph:
    """Build the public SecAgg+ graph of a round (construction in the module docstring).

    Args:
        sites: Site ids that advertised keys this round.
        neighbors: Requested degree k (>= 2), or None for the complete graph.
        seed: 32 public random bytes announced by the server.
        round_index: Training round (binds the permutation to the round).

    Returns:
        The graph; identical for every party given the same inputs.

    Raises:
        ConfigError: On a bad seed or degree.

    """
    if len(seed) != GRAPH_SEED_BYTES:
        raise ConfigError(f"graph `seed` must be {GRAPH_SEED_BYTES} bytes (got {len(seed)}).")
    ordered = sorted(set(sites))
    n = len(ordered)
    degree = effective_degree(n_sites=n, neighbors=neighbors)
    if degree >= n - 1:
        return complete_graph(sites=ordered)
    key = derive_key(
        secret=seed,
        purpose=KeyPurpose.NEIGHBOUR_GRAPH,
        round_index=round_index,
        first=0,
        second=0,
    )
    ring = _shuffle(ordered, KeystreamPRG(key))
    offsets = set(range(1, degree // 2 + 1))
    if degree % 2 == 1:
        offsets.add(n // 2)
    adjacency: dict[int, set[int]] = {s: set() for s in ordered}
    for position, site in enumerate(ring):
        for offset in offsets:
            peer = ring[(position + offset) % n]
            adjacency[site].add(peer)
            adjacency[peer].add(site)
    return NeighbourGraph(
        sites=tuple(ordered), adjacency={s: frozenset(p) for s, p in adjacency.items()}
    )


def _shuffle(items: list[int], stream: KeystreamPRG) -> list[int]:
    """Fisher-Yates with rejection sampling: every permutation equally likely."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            draw = int.from_bytes(stream.read(8), "little")
            if draw < limit:
                break
        j = draw % bound
        out[i], out[j] = out[j], out[i]
    return out
