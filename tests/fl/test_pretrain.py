"""`securefed pretrain`'s own held-out report: figures on val and test, and its warnings."""

from __future__ import annotations

import json

import pytest

from securefed.fl.pretrain import (
    RISING_EPOCHS,
    chance_warnings,
    overfitting_warning,
    pretrain,
)
from tests.conftest import write_image_folder


def _pretrain(tmp_path, *, signal: bool, epochs: int) -> dict:
    data = write_image_folder(tmp_path / "data", signal=signal)
    path = pretrain(
        out=tmp_path / "pre",
        data=str(data),
        epochs=epochs,
        batch_size=8,
        device="cpu",
        progress=False,
    )
    return json.loads((path.parent / "pretrain.json").read_text())


def test_a_model_that_learns_reports_its_figures_and_no_warning(tmp_path):
    # Execute
    info = _pretrain(tmp_path, signal=True, epochs=3)

    # Assert
    assert info["schema_version"] == "2.0"
    assert info["warnings"] == []
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert all(h["num_samples"] == 16 for h in info["history"])  # the val split, per epoch
    for split in ("val", "test"):
        figures = info["heldout"][split]
        assert figures["accuracy"] > 0.9 and figures["balanced_accuracy"] > 0.9, figures
        assert figures["auc"] > 0.9
        assert figures["majority_class_accuracy"] == 0.5
        assert figures["chance_balanced_accuracy"] == 0.5
    assert info["final"] == info["heldout"]["test"]


def test_a_model_that_cannot_learn_is_flagged_as_chance_on_val_and_test(tmp_path):
    # Execute: every image is the same gray, whatever its class
    info = _pretrain(tmp_path, signal=False, epochs=1)

    # Assert
    assert info["heldout"]["val"]["balanced_accuracy"] == 0.5
    joined = "\n".join(info["warnings"])
    assert "no better than chance on val: balanced accuracy 0.500 <= 1/K + 0.02" in joined
    assert "no better than chance on test: accuracy 0.500 <= majority-class accuracy" in joined


@pytest.mark.parametrize(
    "figures, fires",
    [
        ({"accuracy": 0.74, "balanced_accuracy": 0.5, "majority_class_accuracy": 0.74}, 2),
        ({"accuracy": 0.80, "balanced_accuracy": 0.51, "majority_class_accuracy": 0.74}, 1),
        ({"accuracy": 0.70, "balanced_accuracy": 0.60, "majority_class_accuracy": 0.74}, 1),
        ({"accuracy": 0.85, "balanced_accuracy": 0.80, "majority_class_accuracy": 0.74}, 0),
    ],
)
def test_chance_is_either_bar(figures, fires):
    # Execute
    warnings = chance_warnings(split="val", metrics=figures, num_classes=2)

    # Assert
    assert len(warnings) == fires, warnings


@pytest.mark.parametrize(
    "losses, fires",
    [
        ([1.0, 0.6, 0.7, 0.8, 0.9], True),  # rose in each of the last three epochs
        ([1.0, 0.6, 0.7, 0.65, 0.9], False),  # one fall in between
        ([0.6, 0.7, 0.8, 0.9], True),
        ([0.7, 0.8, 0.9], False),  # too few epochs to tell
        ([1e-6, 2e-6, 3e-6, 4e-6], True),
        ([0.5, 0.5001, 0.5002, 0.5003], False),  # float noise, not a trend
    ],
)
def test_overfitting_is_a_rise_in_each_of_the_last_epochs(losses, fires):
    # Execute
    warning = overfitting_warning(losses)

    # Assert
    assert (warning is not None) == fires
    if fires:
        assert f"rose in each of the last {RISING_EPOCHS} epochs" in warning


def test_unset_epochs_aim_for_about_a_thousand_steps():
    from securefed.fl.pretrain import default_epochs

    # 514 public images in batches of 64: 9 steps an epoch, so 112 epochs.
    assert default_epochs(num_samples=514, batch_size=64) == 112
    assert default_epochs(num_samples=100_000, batch_size=64) == 10  # at least 10
    assert default_epochs(num_samples=10, batch_size=64) == 200  # at most 200
