"""The README's quick start with securefed's batched scattering against kymatio's own loop.

Why: under DP `--model auto` trains `scatter-linear`, whose first round scatters every image.
This runs ``securefed train --dp-epsilon 8 --secure-agg`` through the real CLI, each in a
fresh interpreter and an empty folder, alternating two variants ``--repeats`` times: ``batched``
(the code as it is) and ``kymatio`` (every image through kymatio's ``ScatteringTorch2D`` loop,
the code before the batched transform: ``securefed.models.scatter._chunk`` forced to 1, which
is the path images too large for the batched budget take). Alternating keeps the machine's
drift out of the ratio. Prints wall seconds, the run's own seconds of rounds and of round 1,
peak RSS and accuracy for each run.

    python benchmarks/quickstart_scatter_ab.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI with the variant's scattering path (argv[1]).
_CHILD = (
    "import sys\n"
    "import securefed.models.scatter as scatter\n"
    "if sys.argv[1] == 'kymatio':\n"
    "    scatter._chunk = lambda *_: 1\n"
    "sys.argv = ['securefed', 'train', '--dp-epsilon', '8', '--secure-agg', '--quiet']\n"
    "from securefed.cli import main\n"
    "main()\n"
)


def _one(variant: str) -> dict[str, float]:
    return run_quickstart([sys.executable, "-c", _CHILD, variant], root=ROOT, name=variant)


def run_quickstart(argv: list[str], *, root: Path, name: str) -> dict[str, float]:
    """One quick start: ``argv`` in a fresh interpreter and empty folder, ``root`` first on
    its path; its wall seconds, the run's own seconds, peak RSS and accuracy."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=folder,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"{name} run failed: {proc.stderr.read()[-500:]}")
        metrics = json.loads(next(Path(folder).glob("runs/*/metrics.json")).read_text())
    return {
        "wall_s": wall,
        "rounds_s": metrics["total_seconds"],
        "round1_s": metrics["rounds"][0]["seconds"],
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # KiB on Linux
        "accuracy": metrics["final"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"kymatio": [], "batched": []}
    for _ in range(args.repeats):
        for variant in runs:
            row = _one(variant)
            runs[variant].append(row)
            print(
                f"{variant:8s} wall {row['wall_s']:.1f} s, rounds {row['rounds_s']:.1f} s, "
                f"round 1 {row['round1_s']:.1f} s, peak {row['peak_rss_gb']:.2f} GB, "
                f"accuracy {row['accuracy']:.3f}",
                flush=True,
            )
    ratio = statistics.median(r["wall_s"] for r in runs["kymatio"]) / statistics.median(
        r["wall_s"] for r in runs["batched"]
    )
    print(f"median wall, kymatio / batched: {ratio:.2f}x")


if __name__ == "__main__":
    main()
