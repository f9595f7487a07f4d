"""What ``benchmarks/mask_spread.py`` says the run-to-run spread of masking comes from.

Masking rounds each site's weighted update to the ring's fixed-point quantum with fresh coins.
At today's defaults (32-bit ring, clip range 1e5) that step is far coarser than a float32 ulp,
so the benchmark and the docs must not call the difference "one ulp".
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from securefed.config import RunConfig
from securefed.crypto.fixedpoint import FixedPointCodec

ROOT = Path(__file__).resolve().parents[2]


def _default_codec(sites: int) -> FixedPointCodec:
    config = RunConfig(clients=sites, secure_agg="mask")
    return FixedPointCodec(
        ring_bits=config.resolved_ring_bits, clip_range=config.secagg_clip, n_summands=sites
    )


def test_two_maskings_of_one_update_differ_by_the_quantum_not_a_float32_ulp():
    # Prepare: 3 sites of 800 records, each sending n_i u_i (u_i ~ N(0, 0.01^2)), as
    # mask_spread's default 2400-image federation does.
    codec = _default_codec(3)
    n_i = 800
    rng = np.random.default_rng(0)
    updates = [n_i * rng.normal(0.0, 0.01, 20_000) for _ in range(3)]

    # Execute: the FedAvg average twice, each site rounding with fresh coins each time
    def average() -> np.ndarray:
        total = sum(codec.decode(codec.encode(u)[0]) for u in updates)
        return total / (3 * n_i)

    spread = float(np.max(np.abs(average() - average())))

    # Assert: within the codec's bound k q / sum(n_i) (each site's two roundings differ by 0
    # or one quantum, so over many coordinates the bound is reached; the slack is float64's
    # own rounding), and well above a float32 ulp of a typical weight (0.05), which is what
    # the benchmark's docstring used to claim.
    assert spread <= codec.error_bound()["sum_max"] / (3 * n_i) * (1 + 1e-9)
    assert spread > 10 * float(np.spacing(np.float32(0.05)))


def test_the_benchmark_and_docs_state_the_quantum_of_the_defaults():
    # Prepare
    codec = _default_codec(3)
    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / "mask_spread.py").read_text()))
    benchmarks_md = (ROOT / "docs" / "benchmarks.md").read_text()

    # Assert: the docstring quotes the default ring's quantum, and nobody calls it one ulp
    assert f"q = 2^-{codec.frac_bits}" in doc
    assert "one-ulp" not in doc
    assert "one-ulp difference" not in benchmarks_md
