"""`securefed pretrain` on a user's own data: loader options and its held-out report."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.test_cli import _assert_one_line_error, securefed


def _image_folder(root: Path, *, odd_size: tuple[int, int] | None = (20, 18)) -> Path:
    """Two classes told apart by brightness, in 16x16 images (one of ``odd_size`` if given)."""
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for c, cls in enumerate(("dark", "bright")):
            for i in range(n):
                path = root / split / cls / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("L", (16, 16), color=30 + 180 * c + i).save(path)
    if odd_size is not None:
        Image.new("L", odd_size, color=40).save(root / "train" / "dark" / "odd.png")
    return root


def test_pretrain_passes_data_options_to_the_loader(tmp_path):
    # Prepare
    data = _image_folder(tmp_path / "folder")
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
    data = _image_folder(tmp_path / "folder")

    # Execute
    proc = securefed(
        "pretrain", "--data", data, "--data-option", "n_train=5", "--quiet",
        "--out", tmp_path / "pre",
    )  # fmt: skip

    # Assert
    assert proc.returncode == 2
    _assert_one_line_error(proc, "n_train", "image folders")
