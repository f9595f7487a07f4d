"""`securefed bench training` in a tiny configuration: rows, sane values, resuming, the CLI.

Not timed: the figures only have to be positive, finite and consistent with each other.
"""

import json
import math
import os

import pytest
from click.testing import CliRunner

from securefed.bench.training import (
    REQUIRED_COLUMNS,
    STEP_COLUMNS,
    TrainingGrid,
    default_workloads,
    run_training_bench,
)
from securefed.cli import cli
from securefed.errors import ConfigError

_TINY = ["--models", "cnn", "--batch", "4", "--repeats", "1", "--steps", "2", "--device", "cpu"]


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["bench", "training", *args], terminal_width=100)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    # A relative --out, as the README's commands give it: the measurements run in child
    # processes whose working folder is another one.
    here = os.getcwd()
    os.chdir(root)
    try:
        result = _invoke(*_TINY, "--skip-quickstart", "--out", "bench")
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    out = root / "bench"
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_tiny_run_writes_a_step_row_with_sane_figures(tiny_run):
    out, rows = tiny_run
    assert [r["kind"] for r in rows] == ["step"]  # one workload, no quick start
    row = rows[0]
    for column in (*REQUIRED_COLUMNS, *STEP_COLUMNS, "environment", "date"):
        assert column in row, column
    assert (row["model"], row["batch_size"], row["device"]) == ("cnn", 4, "cpu")
    assert row["max_physical_batch_size"] == 64  # what a CPU run gets by default
    assert row["input_shape"] == [1, 28, 28]
    for column in STEP_COLUMNS:
        value = row[column]
        if isinstance(value, float):
            assert math.isfinite(value), column
    for column in ("ratio_best", "ratio_median", "dp_samples_per_second",
                   "plain_samples_per_second", "calibration_seconds",
                   "accounting_seconds_per_round"):  # fmt: skip
        assert row[column] > 0, column
    assert 0 < row["accounting_share"] < 1
    # The process held torch, the model and the data before any step; a round's peak is at
    # least that (in MiB: a KiB or byte mix-up would break it), and well under a few GiB.
    for mode in ("dp", "plain"):
        assert 100 < row["setup_rss_mib"] <= row[f"{mode}_peak_rss_mib"] + 1 < 4096, mode
    # Two DP rounds (warm-up + 1) of a plan calibrated for 10: some of the budget, not all.
    assert row["dp_rounds_after"] == 2
    assert 0 < row["epsilon_after"] < 8.0
    assert row["num_parameters"] > 10_000
    assert (out / "results.csv").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| cnn | 28x28 | 4 | cpu |" in summary


@pytest.mark.slow
def test_a_finished_row_is_not_measured_again_and_other_settings_are_refused(tiny_run):
    out, rows = tiny_run
    logs = sorted(p.name for p in (out / "logs").iterdir())
    again = _invoke(*_TINY, "--skip-quickstart", "--out", str(out))
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text()) == rows
    assert sorted(p.name for p in (out / "logs").iterdir()) == logs
    other = _invoke(*_TINY[:-4], "--steps", "3", "--device", "cpu", "--skip-quickstart",
                    "--out", str(out))  # fmt: skip
    assert other.exit_code != 0
    assert isinstance(other.exception, ConfigError)
    assert "another `base`" in str(other.exception)


def test_help_lists_the_documented_options():
    result = _invoke("--help")
    assert result.exit_code == 0, result.output
    for flag in ("--out", "--quick", "--device", "--models", "--repeats", "--steps", "--batch",
                 "--threads", "--skip-quickstart", "--quickstart-rounds"):  # fmt: skip
        assert f"  {flag}" in result.output, flag


def test_unknown_model_and_bad_counts_are_refused_in_one_line(tmp_path):
    result = _invoke("--models", "cnn,vgg", "--out", str(tmp_path / "b"))
    assert result.exit_code != 0
    assert "vgg" in str(result.exception or result.output)
    assert not (tmp_path / "b").exists()
    bad = _invoke("--repeats", "0", "--out", str(tmp_path / "c"))
    assert bad.exit_code == 2 and "--repeats" in bad.output
    with pytest.raises(ConfigError):
        TrainingGrid(workloads=default_workloads(("cnn",)), steps=0)


def test_workloads_cover_the_models_the_issue_names():
    keys = [w.key for w in default_workloads(("cnn", "resnet-small", "resnet18", "unet"))]
    assert keys == [
        "cnn-28px-b256",
        "cnn-28px-b64",
        "resnet-small-64px-b64",
        "resnet18-64px-b16",
        "unet-32^3-b2",
    ]
    assert [w.batch_size for w in default_workloads(("cnn",), batch=8)] == [8]


@pytest.mark.slow
@pytest.mark.integration
def test_quick_start_row_through_the_real_cli(tmp_path):
    grid = TrainingGrid(
        workloads=(), device="cpu", repeats=1, steps=1, quickstart_rounds=1, threads=1
    )
    rows = json.loads(run_training_bench(out_dir=tmp_path, grid=grid, progress=False).read_text())
    qs = next(r for r in rows if r["kind"] == "quickstart")
    acct = next(r for r in rows if r["kind"] == "accounting")
    assert qs["rounds"] == 1 and qs["wall_seconds"] > 0 and qs["peak_rss_mib"] > 100
    assert 0 <= qs["accuracy"] <= 1
    # The run's ε also covers the decision calibration's release; DP-SGD's alone is below it.
    assert 0 < acct["epsilon_after"] <= qs["epsilon"] <= qs["target_epsilon"]
    assert 0 < acct["quickstart_share"] < 1
