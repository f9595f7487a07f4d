"""Shared fixtures: real data from ../shared/data, and small fast run configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository; missing data fails in CI and skips elsewhere."""
    path = SHARED_DATA_DIR
    if not (path / "pneumoniamnist.npz").is_file():
        reason = f"shared data not found at {path} (expected pneumoniamnist.npz)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def write_small_npz(
    path: Path, *, n_train: int = 240, n_val: int = 60, n_test: int = 80, seed: int = 0
):
    """A tiny MedMNIST-layout file (uint8 28x28, labels (N, 1)) built from the synthetic set."""
    import numpy as np

    from securefed.data.synthetic import make_synthetic

    b = make_synthetic(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    arrays = {}
    for split in ("train", "val", "test"):
        s = getattr(b, split)
        arrays[f"{split}_images"] = np.round(s.images[:, 0] * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = s.labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def small_npz(tmp_path) -> Path:
    """Path of a tiny 4-class MedMNIST-layout .npz file."""
    return write_small_npz(tmp_path / "tiny.npz")


@pytest.fixture
def small_config(small_npz):
    """A fast DP configuration over ``small_npz`` (3 sites, 2 rounds)."""
    from securefed.config import RunConfig

    return RunConfig(
        data=str(small_npz),
        clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        lr=0.5,
        dp_epsilon=8.0,
        device="cpu",
        accountant="pld",
    )
