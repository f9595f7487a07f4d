"""The benchmark suites of issue #5 in CI-sized grids: files, columns, consistency, resuming."""

import dataclasses
import json
import math

import pytest

from securefed.bench.privacy_utility import REQUIRED_COLUMNS as PU_COLUMNS
from securefed.bench.privacy_utility import PrivacyUtilityGrid, run_privacy_utility
from securefed.bench.scaling import REQUIRED_COLUMNS as SCALING_COLUMNS
from securefed.bench.scaling import ScalingGrid, run_scaling
from securefed.errors import ConfigError, DataError
from securefed.report.html import render_report
from tests.conftest import write_small_npz

_TINY_BASE = {
    "clients": 3,
    "partition": "iid",
    "rounds": 2,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.5,
    "accountant": "pld",
    "public_fraction": 0.2,
    "device": "cpu",
    # Secure and plaintext runs are compared: the same DP noise in both.
    "reproducible_noise": True,
}


@pytest.fixture(scope="module")
def pu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pu")
    write_small_npz(tmp / "tiny.npz")
    grid = PrivacyUtilityGrid(
        dataset="tiny",
        data_dir=str(tmp),
        epsilons=(8.0, None),
        he_epsilons=(8.0,),
        seeds=(0,),
        base=_TINY_BASE,
        pretrain_epochs=1,
    )
    out = tmp / "bench"
    path = run_privacy_utility(out_dir=out, grid=grid, progress=False)
    return grid, out, json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.integration
def test_privacy_utility_rows_are_complete_finite_and_within_budget(pu_run):
    grid, out, rows = pu_run
    assert len(rows) == len(grid.cells()) == 2 * 2 * 2 + 2  # he only at eps 8
    for r in rows:
        assert all(c in r for c in PU_COLUMNS)
        for c in ("accuracy", "balanced_accuracy", "macro_f1", "seconds_per_round"):
            assert math.isfinite(r[c]), c
        assert r["bytes_per_site"] > 0
        if r["epsilon"] is None:
            assert r["epsilon_spent"] is None
        else:
            assert all(e <= r["epsilon"] + 1e-6 for e in r["epsilon_per_site"])
            assert max(r["epsilon_per_site"]) == pytest.approx(r["epsilon_spent"])
        if r["secure_agg"] == "none":
            assert r["protection_seconds_per_round"] == 0
        else:
            assert r["protection_seconds_per_round"] > 0
    for name in ("results.csv", "summary.md", "accuracy_vs_epsilon.png", "convergence.png",
                 "time_breakdown.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
@pytest.mark.integration
def test_privacy_utility_secure_and_plaintext_accuracy_agree(pu_run):
    _, _, rows = pu_run
    plain = {(r["strategy"], r["epsilon"], r["seed"]): r for r in rows if r["secure_agg"] == "none"}
    pairs = [(r, plain[(r["strategy"], r["epsilon"], r["seed"])]) for r in rows
             if r["secure_agg"] != "none"]  # fmt: skip
    assert len(pairs) == 6
    for secure, p in pairs:
        # same seed, same DP noise; masking's quantum and CKKS noise do not flip predictions
        assert abs(secure["accuracy"] - p["accuracy"]) <= 0.01
        if secure["secure_agg"] == "he":
            assert secure["bytes_per_site"] > 5 * p["bytes_per_site"]


@pytest.mark.slow
@pytest.mark.integration
def test_privacy_utility_resumes_without_rerunning_or_losing_rows(pu_run):
    grid, out, rows = pu_run
    stamps = {p: p.stat().st_mtime for p in (out / "runs").glob("*/privacy.json")}
    # an interruption after a run finished but before its row was saved
    (out / "results.json").write_text(json.dumps(rows[:-1]))
    again = json.loads(run_privacy_utility(out_dir=out, grid=grid, progress=False).read_text())
    assert len(again) == len(rows)
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/privacy.json")} == stamps


@pytest.mark.slow
@pytest.mark.integration
def test_report_renders_html_with_embedded_plots_for_a_suite(pu_run):
    _, out, _ = pu_run
    (out / "summary.md").unlink()  # re-rendered from results.json
    summary, page = render_report(out)
    assert summary.is_file()
    text = page.read_text()
    assert "<table>" in text and text.count("data:image/png;base64,") == 3


def test_report_refuses_a_folder_that_is_neither_run_nor_suite(tmp_path):
    with pytest.raises(DataError, match="neither a run"):
        render_report(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        render_report(tmp_path / "missing")


def test_privacy_utility_grid_rejects_unknown_strategies():
    with pytest.raises(ConfigError, match="fedavg and ftl"):
        PrivacyUtilityGrid(strategies=("cfl",))


@pytest.mark.slow
@pytest.mark.integration
def test_scaling_records_time_and_memory_per_site_count(tmp_path):
    grid = dataclasses.replace(
        ScalingGrid(),
        sites=(2, 4),
        secure=("mask",),
        seeds=(0,),
        base={**ScalingGrid().base, "data_options": {"n_train": 120, "n_val": 40, "n_test": 40},
              "rounds": 1, "batch_size": 16, "device": "cpu"},
    )  # fmt: skip
    rows = json.loads(run_scaling(out_dir=tmp_path, grid=grid, progress=False).read_text())
    assert sorted((r["sites"], r["secure_agg"]) for r in rows) == [(2, "mask"), (4, "mask")]
    for r in rows:
        assert all(c in r for c in SCALING_COLUMNS)
        assert 50 < r["peak_rss_mib"] < 8000
        assert r["samples_per_site"] == 120 // r["sites"]
    assert (tmp_path / "scaling_time.png").stat().st_size > 0
    assert "| 4 | mask |" in (tmp_path / "summary.md").read_text()


def test_a_folder_of_other_settings_is_refused_before_any_cell_is_reused(tmp_path):
    from securefed.bench.common import claim_folder

    claim_folder(tmp_path, suite="scaling", grid={"base": {"rounds": 2}, "seeds": [0]})
    # more seeds extend the same results: fine
    claim_folder(tmp_path, suite="scaling", grid={"base": {"rounds": 2}, "seeds": [0, 1]})
    with pytest.raises(ConfigError, match="another `base`"):
        claim_folder(tmp_path, suite="scaling", grid={"base": {"rounds": 3}, "seeds": [0]})
    with pytest.raises(ConfigError, match="'scaling' suite"):
        claim_folder(tmp_path, suite="twins", grid={})
