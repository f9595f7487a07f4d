"""The README's quick start at this checkout against an earlier revision, on this machine.

Issue 17 measured its baseline (44.5 s wall, 2.6 GB peak) on another machine; absolute
seconds move with the host (the same code took 16 s on one VM and 25 s on another). This runs
``securefed train --dp-epsilon 8 --secure-agg`` through the CLI of both, each in a fresh
interpreter and an empty folder, alternating ``--repeats`` times so that the machine's drift
hits both alike: the working tree, and ``--revision`` (default 90f9aca, the main the issue
measured) checked out into a temporary git worktree and put first on ``PYTHONPATH``, with the
same installed packages. Prints each run and the ratio of median wall times.

    python benchmarks/quickstart_vs_revision.py --repeats 2
"""

from __future__ import annotations

import statistics
import sys

from quickstart_scatter_ab import run_quickstart
from worktree import checkouts, comparison_args

ARGV = ["-m", "securefed.cli", "train", "--dp-epsilon", "8", "--secure-agg", "--quiet"]


def main() -> None:
    """Alternate the two quick starts and print the figures."""
    args = comparison_args(__doc__, revision="90f9aca")
    with checkouts(args.revision) as (roots, _):
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
        for _ in range(args.repeats):
            for name, root in roots.items():
                row = run_quickstart([sys.executable, *ARGV], root=root, name=name)
                runs[name].append(row)
                print(
                    f"{name:14s} wall {row['wall_s']:.1f} s, rounds {row['rounds_s']:.1f} s, "
                    f"peak {row['peak_rss_gb']:.2f} GB, accuracy {row['accuracy']:.3f}",
                    flush=True,
                )
    wall = {name: statistics.median(r["wall_s"] for r in rows) for name, rows in runs.items()}
    ratio = wall[args.revision] / wall["this checkout"]
    print(f"median wall, {args.revision} / this checkout: {ratio:.2f}x")


if __name__ == "__main__":
    main()
