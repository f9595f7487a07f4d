"""The secure-aggregation benchmark suite: files, columns, correct sums, resuming, grid rules."""

from __future__ import annotations

import csv
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securefed.bench.secure_agg import (
    QUICK_GRID,
    REQUIRED_COLUMNS,
    SecureAggGrid,
    run_secure_agg_bench,
    secagg_plus_neighbors,
)
from securefed.config import RunConfig
from securefed.crypto.fixedpoint import FixedPointCodec
from securefed.errors import ConfigError, DataError

TINY = {"n_params": [1000], "n_clients": [3], "dropouts": [0.0, 0.34]}
POSITIVE = ("server_seconds", "bytes_per_client", "expansion", "cell_seconds")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secure_agg")
    path = run_secure_agg_bench(out_dir=out, quick=True, progress=False, grid=TINY)
    return out, path, json.loads(path.read_text())


def _row(rows, mechanism, dropout):
    (row,) = [r for r in rows if r["mechanism"] == mechanism and r["dropout"] == dropout]
    return row


def test_writes_every_output_file(tiny_run):
    # Prepare / Execute: the module fixture ran the tiny grid.
    out, path, rows = tiny_run

    # Assert
    assert path == out / "results.json"
    for name in ("results.csv", "summary.md", "meta.json"):
        assert (out / name).stat().st_size > 0
    for name in ("client_seconds.png", "server_seconds.png", "bytes_per_client.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 6
    assert set(REQUIRED_COLUMNS) <= set(table[0])


def test_rows_have_required_columns_and_positive_finite_costs(tiny_run):
    _, _, rows = tiny_run

    assert {(r["mechanism"], r["dropout"]) for r in rows} == {
        (m, d) for m in ("plain", "mask", "he") for d in (0.0, 0.34)
    }
    for r in rows:
        assert set(REQUIRED_COLUMNS) <= set(r)
        assert r["n_params"] == 1000 and r["n_clients"] == 3
        for key in POSITIVE:
            assert math.isfinite(r[key]) and r[key] > 0, (r["mechanism"], key)
        if r["mechanism"] != "plain":
            assert 0 < r["client_seconds"] <= r["client_seconds_max"] < 60
    for r in (r for r in rows if r["mechanism"] == "mask"):
        assert r["aes_ctr_seconds"] > 0 and r["aes_ctr_prealloc_seconds"] > 0
        # 3 masks (self + 2 peers) of 4-byte words (the default 32-bit ring) + 8 coin bytes.
        assert r["keystream_bytes"] == (1 + 2) * 1001 * 4 + 1001 * 8
        assert r["mask_throughput_ratio"] == pytest.approx(r["aes_ctr_seconds"] / r["mask_seconds"])
        assert r["tenseal_seconds"] is None
    for r in (r for r in rows if r["mechanism"] == "he"):
        assert r["tenseal_seconds"] > 0 and r["tenseal_serialized_seconds"] > 0
        assert r["he_ratio"] == pytest.approx(r["he_seconds"] / r["tenseal_seconds"])
        assert r["aes_ctr_seconds"] is None


def test_secure_sums_match_the_plaintext_sum(tiny_run):
    _, _, rows = tiny_run

    for r in rows:
        assert r["sum_ok"], r["mechanism"]
        assert r["max_abs_error"] <= r["error_bound"]
        if r["mechanism"] == "mask":  # the sum of k encodings is within k quanta
            assert r["error_bound"] == r["n_survivors"] * 2.0 ** -r["frac_bits"]
        else:
            assert r["max_abs_error"] <= 1e-4
    # CKKS is approximate: a zero error would mean the check never saw a decryption.
    assert _row(rows, "he", 0.0)["max_abs_error"] > 0


def test_dropout_leaves_out_one_of_three_sites_and_recovers(tiny_run):
    _, _, rows = tiny_run

    for mechanism in ("plain", "mask", "he"):
        r = _row(rows, mechanism, 0.34)
        assert (r["n_dropped"], r["n_survivors"]) == (1, 2)
    # 2 of 3 survivors: the default threshold 3 must drop to the majority 2 to recover.
    assert _row(rows, "mask", 0.0)["threshold"] == 3
    assert _row(rows, "mask", 0.34)["threshold"] == 2


def test_expansion_is_relative_to_float32(tiny_run):
    _, _, rows = tiny_run

    plain = _row(rows, "plain", 0.0)
    assert plain["bytes_per_client"] == 4 * 1001
    assert plain["expansion"] == 1.0
    # 32-bit ring words plus key and share messages; one 4096-slot ciphertext for 1001 values.
    assert 1 < _row(rows, "mask", 0.0)["expansion"] < 2
    assert _row(rows, "he", 0.0)["expansion"] > 20


def test_summary_prints_both_numbers_of_each_target(tiny_run):
    out, _, _ = tiny_run

    text = (out / "summary.md").read_text()

    assert "## Targets" in text
    assert "TenSEAL encrypt+add+decrypt" in text and ("PASS" in text or "FAIL" in text)
    assert "mask 1e6 params x 10 sites: not in this grid" in text


def test_rerun_skips_finished_cells(tiny_run):
    # Prepare
    out, path, rows = tiny_run
    before = path.read_text()

    # Execute
    again = run_secure_agg_bench(out_dir=out, quick=True, progress=False, grid=TINY)

    # Assert
    assert again == path
    assert path.read_text() == before
    runs = json.loads((out / "meta.json").read_text())["runs"]
    assert [(r["cells_measured"], r["cells_already_present"]) for r in runs[-2:]] == [
        (6, 0),
        (0, 6),
    ]


def test_secagg_plus_cell_with_dropout_and_skipped_he(tmp_path):
    grid = {
        "n_params": [10],
        "n_clients": [30],
        "dropouts": [0.2],
        "mechanisms": ["mask", "he"],
        "he_max_work": 0,
    }

    path = run_secure_agg_bench(out_dir=tmp_path, quick=False, progress=False, grid=grid)

    (row,) = json.loads(path.read_text())
    assert row["mechanism"] == "mask" and row["protocol"] == "SecAgg+"
    assert (row["neighbors"], row["degree"], row["n_dropped"]) == (10, 10, 6)
    assert 2 * row["threshold"] > row["degree"] + 1
    assert row["sum_ok"]
    summary = (tmp_path / "summary.md").read_text()
    assert "- he 10 params x 30 sites, 20% dropout: CKKS work" in summary


def test_unknown_grid_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="n_param"):
        run_secure_agg_bench(out_dir=tmp_path, quick=True, progress=False, grid={"n_param": [1]})
    assert not (tmp_path / "results.json").exists()


def test_foreign_results_file_is_not_overwritten(tmp_path):
    (tmp_path / "results.json").write_text('{"rows": []}')

    with pytest.raises(DataError, match="list of rows"):
        run_secure_agg_bench(out_dir=tmp_path, quick=True, progress=False, grid=TINY)

    assert (tmp_path / "results.json").read_text() == '{"rows": []}'


@pytest.mark.parametrize(
    "field, value",
    [
        ("dropouts", [1.0]),
        ("mechanisms", ["fhe"]),
        ("n_clients", [1]),
        ("repeats", 0),
        ("repeat_budget_seconds", -1.0),
    ],
)
def test_grid_rejects_invalid_values(field, value):
    with pytest.raises(ConfigError, match=field):
        SecureAggGrid(**{"n_params": [10], "n_clients": [3], field: value})


def test_quick_grid_includes_masking_at_1e6_params_and_10_sites():
    cells = set(QUICK_GRID.cells())

    assert ("mask", 10, 1_000_000, 0.0) in cells
    assert QUICK_GRID.skip_reason("mask", 10, 1_000_000) is None


@pytest.mark.parametrize("n, k", [(3, None), (10, 8), (30, 10), (100, 14)])
def test_secagg_plus_degree(n, k):
    assert secagg_plus_neighbors(n) == k


@given(st.integers(min_value=2, max_value=100_000))
def test_secagg_plus_degree_is_even_and_logarithmic(n):
    k = secagg_plus_neighbors(n)

    if k is None:
        assert math.ceil(2 * math.log2(n)) >= n - 2
    else:
        assert k % 2 == 0 and 2 * math.log2(n) <= k < 2 * math.log2(n) + 2 and k < n - 1


MASK_ONLY = {"n_params": [100], "n_clients": [3], "dropouts": [0.0], "mechanisms": ["mask"]}


def test_masking_is_measured_with_the_ring_and_clip_range_a_run_gets_by_default(tiny_run):
    # Prepare: what `securefed train --secure-agg mask --clients 3` resolves to
    out, _, rows = tiny_run
    run = RunConfig(clients=3, secure_agg="mask")
    codec = FixedPointCodec(
        ring_bits=run.resolved_ring_bits, clip_range=run.secagg_clip, n_summands=3
    )

    # Assert: the rows record that ring (30 bits since config schema 3.12, 32 since 3.1, not
    # the former 64)
    for r in (r for r in rows if r["mechanism"] == "mask"):
        assert (r["ring_bits"], r["clip_range"]) == (run.resolved_ring_bits, run.secagg_clip)
        assert (r["ring_bits"], r["frac_bits"]) == (30, codec.frac_bits)
    assert SecureAggGrid(n_params=[10], n_clients=[3]).ring_bits == run.secagg_ring_bits
    summary = (out / "summary.md").read_text()
    assert "Masking's ring: auto (30-bit for 3 sites), clip range 100000 (a run's defaults" in (
        summary
    )


def test_the_former_64_bit_ring_at_clip_1e6_is_still_measurable(tmp_path):
    # Execute
    grid = {**MASK_ONLY, "ring_bits": 64, "clip_range": 1e6}
    path = run_secure_agg_bench(out_dir=tmp_path, quick=True, progress=False, grid=grid)

    # Assert: 8-byte words, and the fractional bits of the former default
    (row,) = json.loads(path.read_text())
    assert (row["ring_bits"], row["clip_range"]) == (64, 1e6)
    assert row["frac_bits"] == FixedPointCodec(ring_bits=64, clip_range=1e6, n_summands=3).frac_bits
    assert row["keystream_bytes"] == (1 + 2) * 101 * 8 + 101 * 8
    assert row["sum_ok"]
    assert "(not a run's defaults)" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("recorded", [True, False])
def test_resuming_into_masking_rows_of_another_ring_is_refused(tmp_path, recorded):
    """Rows of the former 64-bit ring must not pass for the default ring's on a resume."""
    # Prepare: a finished 64-bit run; without `recorded`, as written before rows named the ring
    grid = {**MASK_ONLY, "ring_bits": 64, "clip_range": 1e6}
    path = run_secure_agg_bench(out_dir=tmp_path, quick=True, progress=False, grid=grid)
    if not recorded:
        rows = json.loads(path.read_text())
        for r in rows:
            del r["ring_bits"], r["clip_range"]
        path.write_text(json.dumps(rows))
    before = path.read_text()

    # Execute / Assert
    with pytest.raises(
        ConfigError, match="1 masking rows were measured with a 64-bit ring at clip"
    ):
        run_secure_agg_bench(out_dir=tmp_path, quick=True, progress=False, grid=MASK_ONLY)
    assert path.read_text() == before


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"ring_bits": 7}, "ring_bits"),
        ({"ring_bits": "32"}, "ring_bits"),
        ({"clip_range": 0.0}, "clip_range"),
        # 100 sites at clip 1e8 cannot be summed in a 32-bit ring at all
        ({"ring_bits": 32, "clip_range": 1e8, "n_clients": [100]}, "does not fit a 32-bit"),
    ],
)
def test_grid_rejects_an_impossible_ring(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SecureAggGrid(**{"n_params": [10], "n_clients": [3], **overrides})
