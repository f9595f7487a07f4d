"""A securefed command with securefed's glibc settings and with glibc's defaults, alternating.

Why: :mod:`securefed.allocator` sets glibc's mmap and trim thresholds when a command starts,
so that a training step reuses the memory the previous one freed instead of mapping and
zero-filling it again. This runs the same command (the README's quick start by default) in
fresh processes, ``--pairs`` times each way, alternating so that a busy machine affects both,
and prints each run's wall time, its seconds of rounds (metrics.json ``total_seconds``), peak
RSS, minor page faults and system CPU time (the child's ``wait4`` usage).

    python benchmarks/malloc_tuning.py --pairs 2
    python benchmarks/malloc_tuning.py --pairs 1 -- --rounds 20
    python benchmarks/malloc_tuning.py --pairs 1 -- --max-physical-batch-size 100000
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

QUICK_START = ["train", "--dp-epsilon", "8", "--secure-agg"]


def run_once(args: list[str], malloc: str) -> dict:
    """One fresh ``securefed`` process in an empty folder; its times, memory and faults."""
    env = dict(os.environ)
    env.pop("SECUREFED_MALLOC", None)
    if malloc == "system":
        env["SECUREFED_MALLOC"] = "system"
    with tempfile.TemporaryDirectory() as folder:
        # stderr to a file, not a pipe: a long run's progress would fill a pipe nobody reads
        # while wait4 waits, and both would wait for good.
        log = Path(folder) / "stderr.txt"
        start = time.perf_counter()
        with log.open("wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "securefed.cli", *args],
                cwd=folder,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err = log.read_text(errors="replace").strip()
            raise SystemExit(f"securefed exited {proc.returncode}: {err[-300:]}")
        rounds = None
        for metrics in Path(folder).glob("runs/*/metrics.json"):
            rounds = json.loads(metrics.read_text()).get("total_seconds")
    return {
        "malloc": malloc,
        "wall_s": wall,
        "rounds_s": rounds,
        "peak_rss_gb": usage.ru_maxrss / 1e6,  # KiB on Linux
        "minor_faults": usage.ru_minflt,
        "system_s": usage.ru_stime,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the pairs and print one line per run and the medians per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("extra", nargs="*", help="after --: flags added to the quick start")
    args = parser.parse_args(argv)
    command = QUICK_START + args.extra
    print("securefed " + " ".join(command))
    rows = []
    for _ in range(args.pairs):
        for malloc in ("tuned", "system"):
            row = run_once(command, malloc)
            rows.append(row)
            print(
                f"{malloc:7s} wall {row['wall_s']:6.1f} s  rounds {row['rounds_s'] or 0:6.1f} s  "
                f"peak RSS {row['peak_rss_gb']:.3f} GB  minor faults {row['minor_faults']:>9d}  "
                f"system {row['system_s']:5.1f} s"
            )
    for malloc in ("tuned", "system"):
        mine = [r for r in rows if r["malloc"] == malloc]
        print(
            f"median {malloc:7s} wall {statistics.median(r['wall_s'] for r in mine):6.1f} s  "
            f"rounds {statistics.median(r['rounds_s'] or 0 for r in mine):6.1f} s  "
            f"peak RSS {statistics.median(r['peak_rss_gb'] for r in mine):.3f} GB"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
