"""Transport cost of the Flower runtime: the same run in-process and over Flower on loopback.

For each number of sites, one run with DP (epsilon 8, RDP) and pairwise-masking secure
aggregation on the synthetic shapes, the tiny ``cnn`` on CPU, trained twice in one invocation:

* in-process (``securefed.run.train``): wall time per round, and the masked-input protocol
  bytes each site sent per round;
* over Flower (a real SuperLink and N SuperNodes on 127.0.0.1 with TLS and node authentication,
  :class:`securefed.deploy.local.LocalDeployment`; each site runs its ClientApp in one warm
  executor and gets cores / N torch threads): wall time per round at the server, the wall
  clock of the whole submission (``flwr run`` and the ServerApp's start included),
  securefed payload bytes from and to each site per round, and the loopback interface's
  received bytes over the submission divided by sites and rounds;

and the largest absolute difference between the two runs' final weights.

Usage (from the repository root):

    python benchmarks/deploy_bench.py                        # 3 and 10 sites, 1 round
    python benchmarks/deploy_bench.py --rounds 3 --out bench-out/deploy-r3
    python benchmarks/deploy_bench.py --only 3               # one site count
    python benchmarks/deploy_bench.py --quick --out bench-out/deploy-quick

Writes ``results.json``/``results.csv`` (one row per site count and runtime, with an
``environment`` block) and ``table.md`` into ``--out``; run folders go to ``OUT/runs``. The
deployment (certificates, SuperLink database, logs) lives in ``OUT/work`` and is deleted after
a successful run; after a failure only its ``*.log`` files are kept. A site count whose two rows
are already in ``results.json`` is skipped, so an interrupted invocation resumes.

The sites' start-up (each executor's imports, about 10 s on 2 cores) overlaps the run's
connection and set-up: it is in ``submit_seconds``, not in the round times.

The loopback counter is machine-wide: anything else talking over ``lo`` during the Flower run
(other tests, other deployments) is counted too, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from securefed.bench.common import environment, open_suite, write_atomic, write_rows
from securefed.config import RunConfig
from securefed.errors import DataError, SecureFedError

SUITE = "deploy"
REQUIRED = (
    "sites",
    "rounds",
    "runtime",
    "seconds_per_round",
    "submit_seconds",
    "bytes_per_site_per_round",
    "payload_to_site_per_round",
    "loopback_bytes_per_site_per_round",
    "max_weight_diff",
)
LOOPBACK_LABEL = (
    "loopback bytes per site per round, incl. HTTP/TLS framing and polling, machine-wide counter"
)
#: Generous, so a slow shared machine measures slowness instead of failing a stage.
FIT_TIMEOUT = 600.0
STAGE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 120.0
#: The whole ``flwr run``: connection, every round's fit and protocol stages, and the write-out.
SUBMIT_TIMEOUT = 3600.0


def base_settings(*, rounds: int, quick: bool) -> dict[str, Any]:
    """The fields every cell shares (``clients`` is set per cell).

    The synthetic set's default 2400 training images give 240 per site at 10 sites, several
    Poisson batches of 32 each; ``--quick`` shrinks it for a smoke run.
    """
    base: dict[str, Any] = {
        "dataset": "synthetic",
        # The cnn the documented figures ran (docs/deploy.md); under DP `auto` now builds
        # scatter-linear (rule 3), a far smaller update and round.
        "model": "cnn",
        "rounds": rounds,
        "local_epochs": 1,
        "batch_size": 32,
        "dp_epsilon": 8.0,
        "accountant": "pld",
        "secure_agg": "mask",
        "device": "cpu",
        "seed": 0,
    }
    if quick:
        base["data_options"] = {"n_train": 480, "n_val": 100, "n_test": 200}
    return base


def loopback_rx_bytes() -> int | None:
    """Received bytes of the ``lo`` interface from ``/proc/net/dev`` (None where unreadable)."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()
    except OSError:
        return None
    for line in lines[2:]:
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            try:
                return int(fields.split()[0])
            except (IndexError, ValueError):
                return None
    return None


def _rounds(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.json"
    try:
        rounds = json.loads(path.read_text())["rounds"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: no readable `rounds` list ({exc})") from exc
    if not rounds:
        raise DataError(f"{path}: `rounds` is empty")
    return rounds


def _mean_per_site(rounds: list[dict[str, Any]], pick: Any) -> float | None:
    """Mean over rounds of the mean over sites of a ``{site: bytes}`` record field."""
    per_round = []
    for r in rounds:
        values = pick(r)
        if values:
            per_round.append(statistics.mean(float(v) for v in values.values()))
    return statistics.mean(per_round) if per_round else None


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two ``model.safetensors`` files, tensor by tensor.

    Raises:
        DataError: The files do not hold the same tensor names and shapes.

    """
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        raise DataError(f"{a} and {b} hold different tensors ({sorted(wa.keys() ^ wb.keys())})")
    worst = 0.0
    for name, ta in wa.items():
        tb = wb[name]
        if ta.shape != tb.shape:
            shapes = f"{tuple(ta.shape)} and {tuple(tb.shape)}"
            raise DataError(f"{a} and {b}: `{name}` has shapes {shapes}")
        if ta.numel():
            worst = max(worst, float((ta.double() - tb.double()).abs().max()))
    return worst


def run_in_process(config: RunConfig, run: Path) -> dict[str, Any]:
    """Train ``config`` in this process; its per-round time and protocol bytes per site."""
    from securefed.run import train

    start = time.perf_counter()
    train(config, out_dir=run, progress=False)
    wall = time.perf_counter() - start
    rounds = _rounds(run)
    return {
        "runtime": "in-process",
        "seconds_per_round": statistics.mean(float(r["seconds"]) for r in rounds),
        "submit_seconds": None,
        "total_seconds": wall,
        "bytes_per_site_per_round": _mean_per_site(rounds, lambda r: r.get("bytes_per_client")),
        "payload_to_site_per_round": None,
        "loopback_bytes_per_site_per_round": None,
    }


def run_flower(config: RunConfig, run: Path, *, work: Path) -> dict[str, Any]:
    """Run ``config`` over a fresh local Flower deployment in ``work``; times and byte counts.

    Raises:
        SecureFedError: The deployment or the run failed (``work``'s logs tell why).

    """
    from securefed.deploy.local import LocalDeployment

    sites = config.clients
    start = time.perf_counter()
    with LocalDeployment(work, sites=sites, tls=True, node_auth=True, shard=True) as dep:
        started = time.perf_counter() - start
        rx_before = loopback_rx_bytes()
        submit_start = time.perf_counter()
        dep.submit(
            config,
            out=run,
            timeout=SUBMIT_TIMEOUT,
            fit_timeout=FIT_TIMEOUT,
            stage_timeout=STAGE_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
        )
        submit_seconds = time.perf_counter() - submit_start
        rx_after = loopback_rx_bytes()
    rounds = _rounds(run)
    loopback = (
        (rx_after - rx_before) / sites / len(rounds)
        if rx_before is not None and rx_after is not None
        else None
    )
    return {
        "runtime": "flower",
        "seconds_per_round": statistics.mean(float(r["seconds"]) for r in rounds),
        "submit_seconds": submit_seconds,
        "deploy_start_seconds": started,
        "total_seconds": time.perf_counter() - start,
        "bytes_per_site_per_round": _mean_per_site(
            rounds, lambda r: (r.get("transport") or {}).get("payload_bytes_from_site")
        ),
        "payload_to_site_per_round": _mean_per_site(
            rounds, lambda r: (r.get("transport") or {}).get("payload_bytes_to_site")
        ),
        "loopback_bytes_per_site_per_round": loopback,
        "loopback_bytes_label": LOOPBACK_LABEL,
    }


def _keep_logs_only(work: Path) -> None:
    """After a failure: drop the certificates, keys and database, keep the processes' logs."""
    if not work.exists():
        return
    for path in sorted(work.rglob("*"), reverse=True):
        if path.is_file() and path.suffix != ".log":
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def bench_sites(out: Path, *, sites: int, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Both runtimes for one site count, and how far apart their final weights are."""
    config = RunConfig.from_dict({**base, "clients": sites})
    runs = out / "runs"
    local_run = runs / f"in-process-sites{sites}"
    flower_run = runs / f"flower-sites{sites}"
    work = out / "work" / f"sites{sites}"
    # Rows are written only when both runs finished, so folders here are from a broken attempt.
    for stale in (local_run, flower_run, work):
        if stale.exists():
            shutil.rmtree(stale)
    print(f"[deploy] {sites} sites: in-process", file=sys.stderr, flush=True)
    local = run_in_process(config, local_run)
    print(f"[deploy] {sites} sites: flower on loopback", file=sys.stderr, flush=True)
    try:
        flower = run_flower(config, flower_run, work=work)
    except BaseException:
        _keep_logs_only(work)
        print(f"[deploy] failed; logs kept in {work}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(work)
    diff = max_weight_diff(local_run / "model.safetensors", flower_run / "model.safetensors")
    rows = []
    for measured in (local, flower):
        rows.append(
            {
                "sites": sites,
                "rounds": config.rounds,
                **measured,
                "max_weight_diff": diff,
                "run_folder": str(local_run if measured is local else flower_run),
            }
        )
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _kib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024:.1f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per site count, both runtimes and the Flower/in-process time ratio."""
    lines = [
        "| sites | rounds | runtime | s/round | flower / in-process | submit s | "
        "KiB from site/round | KiB to site/round | loopback KiB/site/round | max weight diff |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sites in sorted({r["sites"] for r in rows}):
        group = {r["runtime"]: r for r in rows if r["sites"] == sites}
        local = group.get("in-process")
        for runtime in ("in-process", "flower"):
            r = group.get(runtime)
            if r is None:
                continue
            ratio = (
                r["seconds_per_round"] / local["seconds_per_round"]
                if local and local["seconds_per_round"]
                else None
            )
            lines.append(
                f"| {sites} | {r['rounds']} | {runtime} | {_fmt(r['seconds_per_round'])} | "
                f"{_fmt(ratio) if runtime == 'flower' else '1.00'} | "
                f"{_fmt(r['submit_seconds'])} | {_kib(r['bytes_per_site_per_round'])} | "
                f"{_kib(r['payload_to_site_per_round'])} | "
                f"{_kib(r['loopback_bytes_per_site_per_round'])} | "
                f"{r['max_weight_diff']:.3g} |"
            )
    lines += [
        "",
        "s/round: mean of the round records' `seconds` (the server's wall time per round). "
        "submit s: wall clock of the whole Flower submission, process starts included.",
        "KiB from site: in-process, the masked-input protocol bytes each site sent; Flower, "
        "securefed payload bytes (HTTP/TLS framing not counted). Loopback: "
        f"{LOOPBACK_LABEL}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/deploy"))
    parser.add_argument("--rounds", type=int, default=1, help="rounds per run (default 1)")
    parser.add_argument(
        "--only",
        type=int,
        action="append",
        metavar="SITES",
        help="run only this site count (repeatable; default 3 and 10)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 sites on a 480-image training set (smoke run)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    sites = tuple(args.only) if args.only else ((3,) if args.quick else (3, 10))
    if min(sites) < 2:
        parser.error(f"--only must be at least 2 sites (got {min(sites)})")
    base = base_settings(rounds=args.rounds, quick=args.quick)
    try:
        out, rows = open_suite(
            args.out, suite=SUITE, grid={"sites": list(sites), "base": base}, required=REQUIRED
        )
        env = environment()
        for n in sites:
            if {r["runtime"] for r in rows if r["sites"] == n} >= {"in-process", "flower"}:
                print(f"[deploy] {n} sites: already in {out}", file=sys.stderr)
                continue
            rows = [r for r in rows if r["sites"] != n]
            for row in bench_sites(out, sites=n, base=base):
                row.update(environment=env, date=datetime.date.today().isoformat())
                rows.append(row)
            write_rows(out, rows)
            write_atomic(out / "table.md", render_table(rows))
        work = out / "work"
        if work.exists() and not any(work.iterdir()):
            work.rmdir()
    except SecureFedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_atomic(out / "table.md", render_table(rows))
    print(render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
