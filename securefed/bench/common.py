"""What every benchmark suite shares: machine description, atomic writes, resumable rows."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from securefed.errors import DataError

__all__ = ["environment", "load_rows", "write_atomic", "write_rows"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _openssl_version() -> str | None:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except (ImportError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """Package versions and machine description stored with every result row."""
    return {
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "torch_version": _version("torch"),
        "opacus_version": _version("opacus"),
        "cryptography_version": _version("cryptography"),
        "openssl_version": _openssl_version(),
        "tenseal_version": _version("tenseal"),
        "securefed_version": _version("securefed"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_rows(path: Path, *, required: tuple[str, ...], suite: str) -> list[dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) run of a suite, or [] when there is none.

    Raises:
        DataError: The file exists but is not a list of this suite's rows.

    """
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not readable JSON ({exc}); move it away or use another --out."
        ) from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} must be a JSON list of rows; move it away or use another --out.")
    missing = [c for r in rows for c in required if c not in r]
    if missing:
        raise DataError(f"{path} has rows without `{missing[0]}`; not a {suite} result file.")
    return rows


def write_rows(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``results.json`` (a list of rows) and ``results.csv`` (union of columns)."""
    write_atomic(out_dir / "results.json", json.dumps(rows, indent=1) + "\n")
    columns: list[str] = []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                k: "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v)
                for k, v in r.items()
            }
        )
    write_atomic(out_dir / "results.csv", buffer.getvalue())
