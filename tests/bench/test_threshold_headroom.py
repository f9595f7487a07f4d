"""benchmarks/threshold_headroom.py rebuilds a finished run's model and its applied threshold."""

from __future__ import annotations

import pytest

from tests.bench.conftest import load_benchmark


def test_the_rebuilt_model_scores_what_the_run_recorded(
    tmp_path,
):
    from securefed.config import RunConfig
    from securefed.run import train

    config = RunConfig(
        dataset="synthetic",
        data_options={"n_train": 240, "n_val": 40, "n_test": 80, "num_classes": 2},
        clients=2,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        dp_epsilon=8.0,
        device="cpu",
    )
    run = train(config, out_dir=tmp_path / "run", progress=False)
    row = load_benchmark("threshold_headroom").headroom(run)
    # The offsets undone and applied again give the recorded model back: otherwise every
    # other column would score some other threshold than the one the run used.
    assert row["applied"] == pytest.approx(row["recorded"])
    assert set(row) == {"auc", "recorded", "t=0", "applied", "LDA", "train-bal", "test-bal"}
    assert all(0 <= v <= 1 for v in row.values())
