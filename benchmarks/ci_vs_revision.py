"""CI's wall time at a commit of this repository against an earlier revision, on this machine.

Issue 17 asks that CI be "not slower than today" (its main, 90f9aca). CI is ``bash .ci/run``
on a clean clone with ``../shared`` beside it: a fresh virtual environment, the README's test
command, and whatever else that revision's ``.ci/run`` runs. This clones each revision into a
temporary folder next to a link to this checkout's ``../shared``, runs its ``.ci/run`` with
``CI=true``, and times it; the two alternate ``--repeats`` times so that the machine's drift
hits both alike. Each run takes 10–25 minutes on 2 cores: leave the machine otherwise idle.

    python benchmarks/ci_vs_revision.py --revision 90f9aca --against HEAD --repeats 1

Prints each run's wall time, exit status and pytest's summary lines, then the ratio of the
median wall times. Only committed code is measured (``--against`` names a commit).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pytest's last line: "2080 passed, 3 skipped ... in 329.74s", or "1 failed, 761 passed ... in ...".
SUMMARY = re.compile(r"^\d+ (passed|failed|error).* in [\d.]+s")


def run_ci(revision: str, scratch: Path) -> dict[str, object]:
    """Clone ``revision`` beside a link to ``../shared``, run its ``.ci/run``, time it."""
    scratch.mkdir(parents=True)
    repo = scratch / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", revision], check=True)
    (scratch / "shared").symlink_to((ROOT.parent / "shared").resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["CI"] = "true"
    start = time.perf_counter()
    # One stream, in the order it was written: pip's warnings on stderr once buried a failed
    # test's lines under the last 40 of stderr, appended after all of stdout.
    proc = subprocess.run(
        ["bash", ".ci/run"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return {
        "wall_s": wall,
        "rc": proc.returncode,
        "summaries": [line for line in lines if SUMMARY.match(line.strip("= "))],
        # A failed run's reasons (pytest's FAILED/ERROR lines and the last lines) are printed.
        "tail": [*failed, *lines[-40:]] if proc.returncode else [],
    }


def main() -> None:
    """Alternate the two CI runs and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", default="90f9aca")
    parser.add_argument("--against", default="HEAD")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    revisions = [
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", r],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for r in (args.revision, args.against)
    ]
    walls: dict[str, list[float]] = {r: [] for r in revisions}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for revision in revisions:
                row = run_ci(revision, Path(tmp) / f"{i}-{len(walls[revision])}-{revision}")
                walls[revision].append(float(row["wall_s"]))
                print(f"{revision}: {row['wall_s']:.0f} s wall, exit {row['rc']}", flush=True)
                for line in [*row["summaries"], *row["tail"]]:
                    print(f"    {line}", flush=True)
    old, new = revisions
    ratio = statistics.median(walls[new]) / statistics.median(walls[old])
    print(f"median wall, {new} / {old}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
