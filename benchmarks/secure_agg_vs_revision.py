"""Masking's cost at this checkout against an earlier revision, on this machine, alternating.

Schema 3.12 packs each masked value in k bits (30 for 3 sites, 31 for 10 at the default clip
range) instead of a whole 32-bit word: fewer bytes, a little more work at the site (packing)
and at the server (unpacking). The cost checks of ``securefed bench secure-agg --quick`` are
noisy on a shared 2-core machine, so this runs them for the working tree and for
``--revision`` (default d363ae9, the last commit with the 32-bit default ring; checked out into
a temporary git worktree and put first on ``PYTHONPATH``, same installed packages), alternating
``--repeats`` times, and prints the 1e6-parameter, 10-site masking lines of each run.

    python benchmarks/secure_agg_vs_revision.py --repeats 2
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worktree import checkouts, comparison_args


def _bench(root: Path, out: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "securefed.cli", "bench", "secure-agg", "--quick", "--out"]
    res = subprocess.run(
        [*cmd, str(out)], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return [line for line in res.stdout.splitlines() if line.startswith("mask 1e6")]


def main() -> None:
    """Alternate the two benches and print their masking lines."""
    args = comparison_args(__doc__, revision="d363ae9")
    with checkouts(args.revision) as (roots, tmp):
        for i in range(args.repeats):
            for name, root in roots.items():
                for line in _bench(root, tmp / f"{name.replace(' ', '_')}_{i}"):
                    print(f"{name} #{i + 1}: {line}", flush=True)


if __name__ == "__main__":
    main()
