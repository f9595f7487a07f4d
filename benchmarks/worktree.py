"""A git revision of this repository checked out beside it, for same-machine comparisons."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def revision_worktree(revision: str, where: Path) -> Iterator[Path]:
    """Check ``revision`` out into a detached git worktree at ``where``; removed afterwards."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), revision],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False
        )


def comparison_args(doc: str, *, revision: str) -> argparse.Namespace:
    """``--repeats`` (default 2) and ``--revision`` (default ``revision``) of a comparison."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--revision", default=revision)
    return parser.parse_args()


@contextmanager
def checkouts(revision: str) -> Iterator[tuple[dict[str, Path], Path]]:
    """``{revision: its worktree, "this checkout": ROOT}`` and a scratch folder, both temporary."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        revision_worktree(revision, Path(tmp) / "old") as old,
    ):
        yield {revision: old, "this checkout": ROOT}, Path(tmp)
