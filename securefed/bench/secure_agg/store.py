"""The suite's files: result rows (``results.json``/``.csv``) and the run log ``meta.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securefed.bench.common import load_rows, write_atomic, write_rows

__all__ = ["REQUIRED_COLUMNS", "cell_key", "load_results", "update_meta", "write_results"]

REQUIRED_COLUMNS = (
    "mechanism",
    "n_clients",
    "n_params",
    "dropout",
    "client_seconds",
    "server_seconds",
    "bytes_per_client",
    "aes_ctr_seconds",
    "tenseal_seconds",
)
"""Columns every row of ``results.json`` carries (None where a reference does not apply)."""


def cell_key(row: Mapping[str, Any]) -> tuple[str, int, int, float]:
    """The (mechanism, n_clients, n_params, dropout) a row measured, as the grid names it."""
    return (
        str(row["mechanism"]),
        int(row["n_clients"]),
        int(row["n_params"]),
        round(float(row["dropout"]), 6),
    )


def load_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a previous run at ``path`` (none if missing); refuses another suite's file."""
    return load_rows(path, required=REQUIRED_COLUMNS, suite="secure-agg")


def write_results(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Write every row to ``results.json`` and ``results.csv`` in ``out_dir``."""
    write_rows(out_dir, rows)


def update_meta(out_dir: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the run log in ``meta.json`` (started afresh if unreadable)."""
    path = out_dir / "meta.json"
    meta: dict[str, Any] = {"suite": "secure-agg", "runs": []}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("runs"), list):
                meta = loaded
        except (OSError, json.JSONDecodeError):
            pass
    meta["runs"].append(record)
    write_atomic(path, json.dumps(meta, indent=1) + "\n")
