"""`securefed bench real-data`: the quick grid runs end to end on a real set and its table
counts one-class runs and shows the worst seed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from securefed.bench.real_data import RealDataGrid, summary_table
from securefed.errors import ConfigError, DataError


def _row(ds, eps, arm, seed, acc, confusion):
    return {
        "dataset": ds,
        "epsilon": eps,
        "arm": arm,
        "seed": seed,
        "accuracy": acc,
        "balanced_accuracy": 0.5,
        "auc": 0.7,
        "confusion_matrix": confusion,
        "total_seconds": 10.0,
    }


def test_table_shows_min_and_counts_one_class_runs():
    rows = [
        _row("breastmnist", 8.0, "fl", 0, 0.731, [[0, 42], [0, 114]]),  # one class
        _row("breastmnist", 8.0, "fl", 1, 0.80, [[20, 22], [9, 105]]),
        _row("breastmnist", None, "fl", 0, 0.85, [[30, 12], [11, 103]]),
    ]
    table = summary_table(rows)
    lines = table.splitlines()
    # The non-private row comes first, then ε = 8 with its worst seed and one one-class run.
    assert lines[2].startswith("| breastmnist | ∞ | fl | ? | 0 |")
    assert "(min 0.731)" in lines[3] and lines[3].split("|")[9].strip() == "1"


def test_rows_of_two_models_never_share_a_line():
    # A folder resumed after `--model auto` changed its pick keeps both architectures apart.
    rows = [
        {
            **_row("brain_tumor_mri_96", 8.0, "fl", 0, 0.60, [[5, 1], [1, 5]]),
            "model": "resnet-small",
        },
        {
            **_row("brain_tumor_mri_96", 8.0, "fl", 1, 0.74, [[5, 1], [1, 5]]),
            "model": "scatter-linear",
        },
    ]
    lines = summary_table(rows).splitlines()[2:]
    assert len(lines) == 2
    assert "| resnet-small | 0 |" in lines[0] and "| scatter-linear | 1 |" in lines[1]


def test_unknown_or_missing_sets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown real data set 'cifar'"):
        RealDataGrid(data_dir=str(tmp_path), sets=("cifar",))
    with pytest.raises(DataError, match="breastmnist.npz: no such file"):
        RealDataGrid(data_dir=str(tmp_path), sets=("breastmnist",))


def test_quick_grid_runs_on_real_data(tmp_path, shared_data_dir):
    from securefed.cli import cli

    out = tmp_path / "bench"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "real-data",
            "--quick",
            "--data-dir",
            str(shared_data_dir),
            "--arms",
            "fl,ftl",
            "--epsilons",
            "inf,8",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert {(r["dataset"], r["arm"], r["epsilon"]) for r in rows} == {
        ("breastmnist", arm, eps) for arm in ("fl", "ftl") for eps in (None, 8.0)
    }
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| breastmnist | 8 | ftl | cnn |" in summary
    # The defaults resolved from the data: at 28 px, scatter-linear under DP from scratch; the
    # small CNN without DP, and for FTL (the public backbone's architecture).
    models = {(r["arm"], r["epsilon"]): r["model"] for r in rows}
    assert models == {
        ("fl", None): "cnn",
        ("fl", 8.0): "scatter-linear",
        ("ftl", None): "cnn",
        ("ftl", 8.0): "cnn",
    }
    for run in (out / "breastmnist" / "runs").iterdir():
        config = json.loads((run / "config.json").read_text())
        assert config["resolved"]["model"]["name"] in {"cnn", "scatter-linear"}
