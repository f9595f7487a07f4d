"""What the secure-aggregation suite measures: mechanisms, the grid of cells and its rules."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from securefed.config import RING_BITS_RANGE, RunConfig
from securefed.crypto.fixedpoint import FixedPointCodec, choose_ring_bits
from securefed.errors import ConfigError

__all__ = [
    "DEFAULT_CLIP_RANGE",
    "DEFAULT_RING_BITS",
    "FULL_GRID",
    "MECHANISMS",
    "QUICK_GRID",
    "SecureAggGrid",
    "n_dropped",
    "secagg_plus_neighbors",
]

MECHANISMS = ("plain", "mask", "he")
"""Mechanisms of the suite: plaintext baseline, pairwise masking, CKKS (TenSEAL)."""

# Masking is measured as a run gets it by default: read off RunConfig, not retyped, so the
# suite follows the defaults when they change (they did in schema 3.1: 64 -> auto, 1e6 -> 1e5).
_RUN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}
DEFAULT_RING_BITS: int | str = _RUN_DEFAULTS["secagg_ring_bits"]
DEFAULT_CLIP_RANGE: float = _RUN_DEFAULTS["secagg_clip"]


def secagg_plus_neighbors(n_clients: int) -> int | None:
    """SecAgg+ degree for ``n_clients`` sites: ceil(2 log2 n), rounded up to even.

    Bell et al. 2020 need degree O(log n); 2 log2 n is the usual working constant. Returns None
    (complete graph) when that degree would reach n - 1 anyway.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 2:
        raise ConfigError(f"`n_clients` must be an integer of at least 2 (got {n_clients!r}).")
    k = math.ceil(2 * math.log2(n_clients))
    k += k % 2
    return None if k >= n_clients - 1 else k


def _int_tuple(name: str, values: Any, minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"`{name}` must be a non-empty sequence of integers (got {values!r}).")
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ConfigError(f"`{name}` values must be integers >= {minimum} (got {v!r}).")
        out.append(int(v))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class SecureAggGrid:
    """The cells of one secure-aggregation benchmark run, validated on construction.

    Attributes:
        n_params: Model sizes (the vector sent is ``n_params + 1`` long: ``[n_i u_i, n_i]``).
        n_clients: Numbers of invited sites (>= 2).
        dropouts: Fractions of sites that drop after sharing keys and before uploading
            (``round(fraction * n)`` sites, half up), in [0, 1).
        mechanisms: Subset of :data:`MECHANISMS`.
        secagg_plus_from: Masking uses the complete graph (classic SecAgg) below this many
            sites and SecAgg+ with :func:`secagg_plus_neighbors` from it on.
        he_max_work: CKKS cells with ``n_clients * n_params`` above this are skipped (CKKS cost,
            and that of its two TenSEAL references, grows with that product).
        repeats: Most times a cell is run; the run with the least total time is kept (the
            least disturbed one on a shared machine).
        repeat_budget_seconds: No further repeat starts once a cell has used this many
            seconds, so large cells run once.
        single_core: Pin the process to one CPU core for the run (Linux only).
        seed: Seed of the simulated inputs, the dropped sites and the public SecAgg+ graph
            seed, so that reruns measure the same work.
        ring_bits: Masking's ring, 8 to 64 bits or ``auto`` (resolved per site count as a run
            resolves ``--secagg-ring-bits``); default: RunConfig's default.
        clip_range: Masking's fixed-point clip range (``--secagg-clip``); default:
            RunConfig's. ``ring_bits=64, clip_range=1e6`` measures masking as it was before
            config schema 3.1.

    """

    n_params: tuple[int, ...]
    n_clients: tuple[int, ...]
    dropouts: tuple[float, ...] = (0.0, 0.2)
    mechanisms: tuple[str, ...] = MECHANISMS
    secagg_plus_from: int = 30
    he_max_work: int = 21_000_000
    repeats: int = 3
    repeat_budget_seconds: float = 10.0
    single_core: bool = True
    seed: int = 0
    ring_bits: int | str = DEFAULT_RING_BITS
    clip_range: float = DEFAULT_CLIP_RANGE

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_params", _int_tuple("n_params", self.n_params, 1))
        object.__setattr__(self, "n_clients", _int_tuple("n_clients", self.n_clients, 2))
        drops = self.dropouts
        if isinstance(drops, (str, bytes)) or not isinstance(drops, Sequence) or not drops:
            raise ConfigError(f"`dropouts` must be a non-empty sequence (got {drops!r}).")
        clean = []
        for d in drops:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
                raise ConfigError(f"`dropouts` values must be fractions in [0, 1) (got {d!r}).")
            clean.append(round(float(d), 6))
        object.__setattr__(self, "dropouts", tuple(sorted(set(clean))))
        mechs = self.mechanisms
        if isinstance(mechs, str) or not isinstance(mechs, Sequence) or not mechs:
            raise ConfigError(f"`mechanisms` must be a non-empty sequence (got {mechs!r}).")
        unknown = [m for m in mechs if m not in MECHANISMS]
        if unknown:
            raise ConfigError(
                f"`mechanisms` has unknown names {unknown}; known: {', '.join(MECHANISMS)}."
            )
        object.__setattr__(self, "mechanisms", tuple(m for m in MECHANISMS if m in mechs))
        budget = self.repeat_budget_seconds
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
            raise ConfigError(f"`repeat_budget_seconds` must be a number >= 0 (got {budget!r}).")
        for name in ("secagg_plus_from", "he_max_work", "repeats", "seed"):
            value = getattr(self, name)
            low = {"secagg_plus_from": 2, "repeats": 1}.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"`{name}` must be an integer >= {low} (got {value!r}).")
        if not isinstance(self.single_core, bool):
            raise ConfigError(f"`single_core` must be true or false (got {self.single_core!r}).")
        low, high = RING_BITS_RANGE
        if self.ring_bits != "auto" and not (
            isinstance(self.ring_bits, int)
            and not isinstance(self.ring_bits, bool)
            and low <= self.ring_bits <= high
        ):
            raise ConfigError(
                f"`ring_bits` must be auto or an integer from {low} to {high} "
                f"(got {self.ring_bits!r})."
            )
        clip = self.clip_range
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ConfigError(f"`clip_range` must be a positive number (got {clip!r}).")
        object.__setattr__(self, "clip_range", float(clip))
        if "mask" in self.mechanisms:
            for n in self.n_clients:  # a ring that cannot hold the sum fails now, not mid-run
                FixedPointCodec(
                    ring_bits=self.mask_ring_bits(n), clip_range=self.clip_range, n_summands=n
                )

    def mask_ring_bits(self, n_clients: int) -> int:
        """The ring masking uses for ``n_clients`` sites (``auto`` resolved as a run does).

        Raises:
            ConfigError: ``auto`` and no ring meets the tolerance at this clip range.

        """
        if self.ring_bits != "auto":
            return int(self.ring_bits)
        # As RunConfig.resolved_ring_bits: the full complement of sites, at least 2.
        return choose_ring_bits(clip_range=self.clip_range, n_summands=max(2, n_clients))

    def neighbors(self, n_clients: int) -> int | None:
        """SecAgg+ degree for ``n_clients`` sites, or None for the complete graph."""
        if n_clients < self.secagg_plus_from:
            return None
        return secagg_plus_neighbors(n_clients)

    def cells(self) -> Iterator[tuple[str, int, int, float]]:
        """All (mechanism, n_clients, n_params, dropout), grouped by size for input reuse."""
        for n_params in self.n_params:
            for n_clients in self.n_clients:
                for dropout in self.dropouts:
                    for mechanism in self.mechanisms:
                        yield mechanism, n_clients, n_params, dropout

    def skip_reason(self, mechanism: str, n_clients: int, n_params: int) -> str | None:
        """Why a cell of the grid is not measured, or None if it is."""
        if mechanism == "he" and n_clients * n_params > self.he_max_work:
            return (
                f"CKKS work n_clients x n_params = {n_clients * n_params:.3g} exceeds "
                f"he_max_work = {self.he_max_work:.3g}"
            )
        return None


FULL_GRID = SecureAggGrid(
    n_params=(10_000, 100_000, 1_000_000, 7_000_000),
    n_clients=(3, 10, 30, 100),
)
"""The issue's grid: 1e4-7e6 parameters (7e6 ~ DenseNet-121), 3-100 sites, 0 % and 20 % dropout.

CKKS runs only where n_clients x n_params <= 2.1e7 (up to 7e6 x 3, 1e6 x 10, 1e5 x 100): its cost
is linear in that product, about 7 us per site-coordinate for ours plus the two TenSEAL references
on one core, so one 7e6 x 10 cell alone would take about 9 minutes. Extrapolated from the quick
grid, the full grid takes 20-30 minutes on one core of a 2-core AMD EPYC and needs about 8 GiB of
memory (the plaintext baseline stacks 100 inputs of 7e6 float64)."""

QUICK_GRID = SecureAggGrid(
    n_params=(10_000, 1_000_000),
    n_clients=(3, 10),
    he_max_work=3_000_000,
)
"""``--quick``: 1e4 and 1e6 parameters x 3 and 10 sites (includes masking at 1e6 x 10)."""


def n_dropped(fraction: float, n_clients: int) -> int:
    """Sites a dropout ``fraction`` of ``n_clients`` removes: round(fraction x n), half up."""
    return int(math.floor(fraction * n_clients + 0.5))
