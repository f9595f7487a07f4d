"""``securefed report``: re-render a run's or a benchmark suite's summary, plus one HTML page.

The HTML page is self-contained (plots embedded as base64 PNG) so it can be attached to a
review. The Markdown it is made from is securefed's own (headings, paragraphs, lists, tables,
images, inline code, bold), so a small converter is enough and no extra package is needed.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from securefed.errors import DataError

__all__ = ["markdown_to_html", "render_report"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
    "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}"
)


_BULLET = r"^\s*[-*] "
_BLOCK = r"^(#|\||\s*[-*] )"


def _inline(text: str, folder: Path) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)

    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = folder / src
        if path.suffix.lower() == ".png" and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f'<img alt="{alt}" src="data:image/png;base64,{data}">'
        return f'<img alt="{alt}" src="{src}">'

    out = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)


def markdown_to_html(markdown: str, *, folder: Path, title: str) -> str:
    """Convert securefed's summary Markdown to a standalone HTML page."""
    body: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := re.match(r"^(#{1,6}) (.*)", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2), folder)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            head, *rest = rows
            cells_html = "".join(f"<th>{_inline(c, folder)}</th>" for c in head)
            body.append(f"<table><tr>{cells_html}</tr>")
            for r in rest:
                body.append("<tr>" + "".join(f"<td>{_inline(c, folder)}</td>" for c in r) + "</tr>")
            body.append("</table>")
        elif re.match(_BULLET, line):
            body.append("<ul>")
            while i < len(lines) and re.match(_BULLET, lines[i]):
                item = re.sub(_BULLET, "", lines[i])
                body.append(f"<li>{_inline(item, folder)}</li>")
                i += 1
            body.append("</ul>")
        else:
            para = []
            while (
                i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||\s*[-*] )", lines[i])
            ):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(para), folder)}</p>")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _rerender(folder: Path) -> str:
    """Re-write summary.md from the folder's JSON files; return what the folder holds."""
    if (folder / "privacy.json").is_file():
        from securefed.dp.report import read_json
        from securefed.report.summary import write_summary

        write_summary(
            folder,
            config=read_json(folder / "config.json"),
            metrics=read_json(folder / "metrics.json"),
            privacy=read_json(folder / "privacy.json"),
        )
        return "run"
    suite_file = folder / "suite.json"
    suite = json.loads(suite_file.read_text()).get("suite") if suite_file.is_file() else None
    if suite == "privacy-utility":
        from securefed.bench.privacy_utility import PrivacyUtilityGrid, render

        grid = json.loads(suite_file.read_text())["grid"]
        render(folder, PrivacyUtilityGrid(**_tuples(grid)))
    elif suite == "scaling":
        from securefed.bench.scaling import ScalingGrid, render

        grid = json.loads(suite_file.read_text())["grid"]
        render(folder, ScalingGrid(**_tuples(grid)))
    return suite or "benchmark"


def _tuples(grid: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in grid.items()}


def render_report(folder: Path) -> tuple[Path, Path]:
    """Re-render ``summary.md`` (where its data allow) and write ``report.html`` beside it.

    Args:
        folder: A run folder (holds privacy.json) or a benchmark output folder (holds
            results.json and summary.md).

    Returns:
        Paths of summary.md and report.html.

    Raises:
        DataError: The folder is neither, or its files cannot be read.

    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if not (folder / "privacy.json").is_file() and not (folder / "results.json").is_file():
        raise DataError(
            f"{folder}: neither a run (privacy.json) nor a benchmark output (results.json)"
        )
    kind = _rerender(folder)
    summary = folder / "summary.md"
    if not summary.is_file():
        raise DataError(f"{folder}: no summary.md to render (re-run the suite to write it)")
    page = markdown_to_html(
        summary.read_text(), folder=folder, title=f"securefed {kind}: {folder.name}"
    )
    out = folder / "report.html"
    out.write_text(page)
    return summary, out
