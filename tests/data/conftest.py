"""Fixtures for data tests: the shared real-data folder and generated MedMNIST-style archives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def _medmnist_arrays(
    *, n: tuple[int, int, int] = (12, 4, 6), shape: tuple[int, ...] = (28, 28), classes: int = 2
) -> dict[str, np.ndarray]:
    """Valid MedMNIST-layout arrays: uint8 images, (N, 1) uint8 labels cycling 0..classes-1."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, size in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (size, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(size) % classes).astype(np.uint8)[:, None]
    return arrays


@pytest.fixture
def medmnist_arrays() -> Callable[..., dict[str, np.ndarray]]:
    """Factory of valid MedMNIST-layout arrays (see ``_medmnist_arrays``)."""
    return _medmnist_arrays


@pytest.fixture
def write_npz(tmp_path: Path) -> Callable[..., Path]:
    """Write arrays to ``tmp_path/<name>``; ``None`` values drop a key from the valid default."""

    def write(name: str = "toy.npz", arrays: dict | None = None, **overrides) -> Path:
        content = _medmnist_arrays() if arrays is None else dict(arrays)
        for key, value in overrides.items():
            if value is None:
                content.pop(key)
            else:
                content[key] = value
        path = tmp_path / name
        with path.open("wb") as handle:
            np.savez(handle, **content)
        return path

    return write
