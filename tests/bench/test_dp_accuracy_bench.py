"""benchmarks/dp_accuracy.py: a one-class model is flagged, and the table shows the worst seed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.conftest import load_benchmark


def _bench():
    return load_benchmark("dp_accuracy")


def _run(folder: Path, *, accuracy: float, confusion: list[list[int]], model: str = "cnn") -> Path:
    folder.mkdir(parents=True)
    config = {"resolved": {"model": {"name": model}}}
    (folder / "config.json").write_text(json.dumps(config))
    final = {
        "accuracy": accuracy,
        "auc": 0.9,
        "balanced_accuracy": 0.5,
        "macro_f1": 0.4,
        "confusion_matrix": confusion,
    }
    metrics = {
        "final": final,
        "rounds": [{"decision_calibration": {"applied": False}}],
        "final_fairness": {"worst_site": {"client_id": 1, "value": 0.7}},
        "total_seconds": 12.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_one_class_model_is_flagged_and_the_table_shows_the_worst_seed(tmp_path):
    bench = _bench()
    one = bench._row(
        _run(tmp_path / "a", accuracy=0.625, confusion=[[0, 234], [0, 390]]), seed=1, epsilon=8.0
    )
    two = bench._row(
        _run(tmp_path / "b", accuracy=0.85, confusion=[[200, 34], [60, 330]]), seed=2, epsilon=8.0
    )
    assert one["one_class"] and not two["one_class"]
    assert one["worst_site_accuracy"] == 0.7 and one["calibrated"] is False
    text = bench.table([one, two])
    assert "| 8 | cnn | 1,2 |" in text
    assert "(min 0.625)" in text  # the worst seed is shown, not only the mean
    assert text.rstrip().endswith("| 1 |")  # one of the two runs called one class


def test_options_reach_every_run_as_json_values():
    bench = _bench()
    assert bench._option("lr_schedule=cosine") == ("lr_schedule", "cosine")
    assert bench._option("rounds=3") == ("rounds", 3)
    import pytest

    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        bench._option("cosine")


def test_runs_of_two_models_are_never_averaged_into_one_row(tmp_path):
    # `--model auto` changed its pick at 28 px (rule 3): a folder holding older runs must show
    # two rows, not one mean over two models.
    bench = _bench()
    old = bench._row(
        _run(tmp_path / "a", accuracy=0.62, confusion=[[0, 234], [0, 390]]), seed=0, epsilon=8.0
    )
    new = bench._row(
        _run(tmp_path / "b", accuracy=0.8, confusion=[[9, 1], [2, 8]], model="scatter-linear"),
        seed=1,
        epsilon=8.0,
    )
    assert (old["model"], new["model"]) == ("cnn", "scatter-linear")
    text = bench.table([old, new])
    assert "| 8 | cnn | 0 |" in text and "| 8 | scatter-linear | 1 |" in text
