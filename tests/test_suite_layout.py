"""The test commands themselves: `pytest -q` is the fast suite, `-m integration` the long runs.

`.ci/run` runs both, one after the other, each in 2 worker processes (pytest-xdist). pytest
exits 5 when a selection collects no test, so each must select something whatever extras are
installed.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_run_leaves_out_integration_tests_and_the_marker_is_registered(pytestconfig):
    addopts = " ".join(pytestconfig.getini("addopts"))
    assert "-m not integration" in addopts
    assert "--strict-markers" in addopts  # a misspelt marker fails instead of running
    assert any(m.startswith("integration:") for m in pytestconfig.getini("markers"))


def test_ci_runs_the_readme_command_verbatim_then_the_integration_tests():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = 'pip install "torch==2.13.0" -e ".[test]" && pytest -q -n 2 --dist loadfile'
    integration = "pytest -q -n 2 --dist loadfile -m integration"
    assert readme in (ROOT / "README.md").read_text().splitlines()
    assert readme in lines
    assert integration in lines
    assert lines.index(readme) < lines.index(integration)


def test_integration_tests_exist_without_optional_extras():
    # A module that skips on a missing import (flwr) could leave `-m integration` with nothing.
    marked = [
        p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.integration" in p.read_text()
    ]
    assert any("importorskip" not in p.read_text() for p in marked), marked
