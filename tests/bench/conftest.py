"""Fixtures shared by the suite tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def grid_of(monkeypatch):
    """``grid_of(module, runner)``: replace a suite's runner; returns the dict it fills.

    The CLI test then checks the grid the command built, without training anything: the
    replacement records the grid and writes an empty results file, as a finished suite does.
    """

    def install(module: Any, runner: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def capture(*, out_dir: Path, grid: Any, progress: bool) -> Path:
            seen["grid"] = grid
            out_dir.mkdir(parents=True)
            (out_dir / "results.json").write_text("[]")
            return out_dir / "results.json"

        monkeypatch.setattr(module, runner, capture)
        return seen

    return install


def load_benchmark(name: str) -> Any:
    """A script of ``benchmarks/`` (not a package) imported as a module, for its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
