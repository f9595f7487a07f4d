"""`securefed pretrain` on a user's own data: loader options and its held-out report."""

from __future__ import annotations

import json

from tests.conftest import write_image_folder
from tests.test_cli import _assert_one_line_error, securefed


def test_pretrain_passes_data_options_to_the_loader(tmp_path):
    # Prepare
    data = write_image_folder(tmp_path / "folder", odd_size=(20, 18))
    out = tmp_path / "pre"

    # Execute
    proc = securefed(
        "pretrain", "--data", data, "--data-option", "image_size=16", "--epochs", "1",
        "--batch-size", "8", "--device", "cpu", "--quiet", "--out", out,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "pretrain.json").read_text())
    assert info["source"]["dataset"]["image_shape"] == [16, 16]
    assert info["source"]["data_options"] == {"image_size": 16}


def test_pretrain_refuses_an_unknown_data_option_with_one_line(tmp_path):
    # Prepare
    data = write_image_folder(tmp_path / "folder", odd_size=(20, 18))

    # Execute
    proc = securefed(
        "pretrain", "--data", data, "--data-option", "n_train=5", "--quiet",
        "--out", tmp_path / "pre",
    )  # fmt: skip

    # Assert
    assert proc.returncode == 2
    _assert_one_line_error(proc, "n_train", "image folders")


def test_pretrain_prints_its_held_out_figures_and_warns_at_chance(tmp_path):
    # Prepare: flat gray images in both classes, which no model can tell apart
    data = write_image_folder(tmp_path / "folder", signal=False)

    # Execute
    proc = securefed(
        "pretrain", "--data", data, "--epochs", "1", "--batch-size", "8", "--device", "cpu",
        "--quiet", "--out", tmp_path / "pre",
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip()
    assert summary.count("\n") == 0, summary
    assert "val accuracy 0.500, balanced accuracy 0.500, AUC" in summary
    assert "(majority class 0.500); test accuracy" in summary
    assert "warning: pretrain: no better than chance on val" in proc.stderr
    info = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert [w for w in info["warnings"] if "on test" in w]
