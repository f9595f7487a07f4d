"""Secure-aggregation cost suite: masking vs CKKS vs plaintext by model size, sites and dropout.

One module per job: :mod:`.grid` (which cells), :mod:`.workload` (each cell's dropped sites and
inputs), :mod:`.measure` (running a cell), :mod:`.store` (result and meta files),
:mod:`.render` (summary and plots) and :mod:`.suite` (the entry point tying them together).
The public names are re-exported here, so ``from securefed.bench.secure_agg import ...`` works as
it did when the suite was one module.
"""

from __future__ import annotations

from securefed.bench.secure_agg.grid import (
    FULL_GRID,
    MECHANISMS,
    QUICK_GRID,
    SecureAggGrid,
    secagg_plus_neighbors,
)
from securefed.bench.secure_agg.store import REQUIRED_COLUMNS
from securefed.bench.secure_agg.suite import run_secure_agg_bench

__all__ = [
    "FULL_GRID",
    "MECHANISMS",
    "QUICK_GRID",
    "REQUIRED_COLUMNS",
    "SecureAggGrid",
    "run_secure_agg_bench",
    "secagg_plus_neighbors",
]
