"""The FL/CFL/FTL comparison and the digital-twin suite: files, columns, resumability."""

import dataclasses
import json
import math

import pytest

from securefed.bench.strategies import ARMS, QUICK, REQUIRED_COLUMNS, run_strategy_comparison
from securefed.bench.twins import QUICK_TWINS, run_twin_bench
from securefed.bench.twins import REQUIRED_COLUMNS as TWIN_COLUMNS
from securefed.errors import ConfigError
from tests.conftest import write_small_npz


@pytest.mark.slow
def test_strategy_comparison_writes_consistent_results_and_resumes(tmp_path):
    write_small_npz(tmp_path / "tiny.npz")
    grid = dataclasses.replace(
        QUICK,
        dataset="tiny",
        data_dir=str(tmp_path),
        arms=("fl", "ftl"),
        base={**QUICK.base, "rounds": 2, "batch_size": 32, "accountant": "pld", "device": "cpu"},
        pretrain_epochs=1,
    )
    out = tmp_path / "bench"
    path = run_strategy_comparison(out_dir=out, grid=grid, progress=False)
    rows = json.loads(path.read_text())
    assert {r["arm"] for r in rows} == {"fl", "ftl"}
    for r in rows:
        assert all(c in r for c in REQUIRED_COLUMNS)
        assert 0 <= r["accuracy"] <= 1 and math.isfinite(r["total_seconds"])
        assert r["epsilon_spent"] <= r["epsilon"] + 1e-6
        assert len(r["accuracy_curve"]) == 2
        assert sum(map(sum, r["confusion_matrix"])) > 0
    ftl = next(r for r in rows if r["arm"] == "ftl")
    fl = next(r for r in rows if r["arm"] == "fl")
    assert ftl["trainable_parameters"] < fl["trainable_parameters"]
    for name in ("results.csv", "summary.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| 8 | ftl |" in (out / "summary.md").read_text()
    # a second call finds every cell done: nothing is re-run, nothing duplicated
    mtime = (out / "runs" / "fl-eps8-seed0" / "privacy.json").stat().st_mtime
    run_strategy_comparison(out_dir=out, grid=grid, progress=False)
    assert len(json.loads(path.read_text())) == len(rows)
    assert (out / "runs" / "fl-eps8-seed0" / "privacy.json").stat().st_mtime == mtime


def test_unknown_arm_is_a_config_error():
    with pytest.raises(ConfigError, match="known: "):
        dataclasses.replace(QUICK, arms=("fl", "magic"))
    assert {"fl", "cfl", "ftl"} <= set(ARMS)


@pytest.mark.slow
def test_twin_bench_reports_global_and_twin_per_site(tmp_path):
    grid = dataclasses.replace(
        QUICK_TWINS,
        base={
            **QUICK_TWINS.base,
            "data_options": {"n_train": 18, "n_val": 9, "n_test": 6, "image_size": 16,
                             "n_groups": 3},
            "clients": 3,
            "rounds": 1,
            "personalize": 1,
            "device": "cpu",
        },
    )  # fmt: skip
    path = run_twin_bench(out_dir=tmp_path, grid=grid, progress=False)
    rows = json.loads(path.read_text())
    assert sorted(r["client_id"] for r in rows) == [0, 1, 2]
    for r in rows:
        assert all(c in r for c in TWIN_COLUMNS)
        assert r["metric"] == "mean_dice"
        assert 0 <= r["global_score"] <= 1 and 0 <= r["twin_score"] <= 1
        assert r["gain"] == pytest.approx(r["twin_score"] - r["global_score"])
    assert (tmp_path / "twins.png").stat().st_size > 0
    assert "global mean_dice" in (tmp_path / "summary.md").read_text()
