"""The paper-style experiments over seeds: FL vs CFL vs FTL, and global model vs digital twin.

Runs the strategy comparison into ``OUT/comparison`` and the digital-twin suite into
``OUT/twins``, then writes ``OUT/results.json`` (both parts' rows, tagged ``part``) and one
``OUT/summary.md`` holding both summaries.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from securefed.bench.common import claim_folder, write_atomic, write_rows
from securefed.bench.strategies import ComparisonGrid, run_strategy_comparison
from securefed.bench.twins import TwinGrid, run_twin_bench

__all__ = ["run_seeds_suite"]


def _relink(markdown: str, folder: str) -> str:
    """Point a part's image links into its sub-folder; demote its headings one level."""
    markdown = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", rf"![\1]({folder}/\2)", markdown)
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


def run_seeds_suite(
    *, out_dir: Path, comparison: ComparisonGrid, twins: TwinGrid, progress: bool = True
) -> Path:
    """Run (or resume) both parts; returns the path of the combined ``results.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, suite="seeds", grid={})
    parts = {
        "comparison": run_strategy_comparison(
            out_dir=out / "comparison", grid=comparison, progress=progress
        ),
        "twins": run_twin_bench(out_dir=out / "twins", grid=twins, progress=progress),
    }
    rows = []
    for name, path in parts.items():
        rows += [{"part": name, **r} for r in json.loads(path.read_text())]
    write_rows(out, rows)
    text = ["# Paper-style experiments over seeds", ""]
    for name in parts:
        text += [_relink((out / name / "summary.md").read_text(), name), ""]
    write_atomic(out / "summary.md", "\n".join(text))
    return out / "results.json"
