"""Scaling: 2 -> 100 simulated sites at a fixed total amount of data.

What grows with the number of sites at fixed data: per-site fixed costs (a model copy, an
Opacus engine, accounting, evaluation), and the secure-aggregation protocol (pairwise keys,
Shamir shares; SecAgg+ neighbourhoods from 30 sites keep it O(n log n)). Each cell trains in
its own interpreter so its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securefed.bench.common import (
    Cell,
    load_rows,
    mean_std,
    open_suite,
    run_cells,
    write_atomic,
    write_rows,
)
from securefed.config import RunConfig
from securefed.errors import ConfigError

__all__ = ["ScalingGrid", "QUICK_SCALING", "REQUIRED_COLUMNS", "run_scaling"]

REQUIRED_COLUMNS = (
    "sites",
    "secure_agg",
    "seed",
    "seconds_per_round",
    "train_seconds_per_round",
    "protection_seconds_per_round",
    "aggregation_seconds_per_round",
    "peak_rss_mib",
    "bytes_per_site",
)


@dataclass(frozen=True)
class ScalingGrid:
    """The grid.

    Attributes:
        sites: Numbers of sites.
        secure: Secure aggregation modes.
        seeds: Run seeds.
        base: Shared settings; ``data_options.n_train`` is the fixed total training data.
        secagg_plus_from: From this many sites masking uses SecAgg+ with ~2 log2(n)
            neighbours (the full graph's O(n^2) work is what SecAgg+ exists to avoid).

    """

    sites: tuple[int, ...] = (2, 5, 10, 20, 50, 100)
    secure: tuple[str, ...] = ("none", "mask")
    seeds: tuple[int, ...] = (0, 1, 2)
    base: dict[str, Any] = field(
        default_factory=lambda: {
            "dataset": "synthetic",
            "data_options": {"n_train": 2400, "n_val": 400, "n_test": 400},
            "partition": "iid",
            "rounds": 2,
            "local_epochs": 1,
            "batch_size": 16,
            "lr": 0.5,
            "dp_epsilon": 8.0,
            "accountant": "pld",
            # The benchmark reports sites' sizes: its synthetic sites disclose them.
            "disclose_site_sizes": True,
            "device": "auto",
        }
    )
    secagg_plus_from: int = 30

    def __post_init__(self) -> None:
        n = (self.base.get("data_options") or {}).get("n_train", 2400)
        if max(self.sites) > n:
            raise ConfigError(f"{max(self.sites)} sites need at least as many samples (have {n})")
        if min(self.sites) < 2:
            raise ConfigError("scaling needs at least 2 sites per cell")


QUICK_SCALING = ScalingGrid(sites=(2, 5, 10), seeds=(0,))


def _neighbors(n: int, grid: ScalingGrid) -> int | None:
    from securefed.bench.secure_agg import secagg_plus_neighbors

    return secagg_plus_neighbors(n) if n >= grid.secagg_plus_from else None


def _key(n: int, mode: str, seed: int) -> str:
    return f"sites{n}-{mode}-seed{seed}"


def _rows(run: Path, *, n: int, mode: str, seed: int) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    res = json.loads((run / "resources.json").read_text())
    rounds = metrics["rounds"]

    def mean(xs: list[float]) -> float:
        return float(statistics.mean(xs)) if xs else 0.0

    sent = [b for r in rounds for b in r["bytes_per_client"].values()]
    return [
        {
            "sites": n,
            "secure_agg": mode,
            "seed": seed,
            "samples_per_site": metrics["rounds"][0]["clients"][0]["num_train_samples"],
            "seconds_per_round": mean([r["seconds"] for r in rounds]),
            "train_seconds_per_round": mean([r["timing"]["local_training"] for r in rounds]),
            "protection_seconds_per_round": mean([r["timing"]["protection"] for r in rounds]),
            "aggregation_seconds_per_round": mean([r["timing"]["aggregation"] for r in rounds]),
            "evaluation_seconds_per_round": mean([r["timing"]["evaluation"] for r in rounds]),
            "peak_rss_mib": res["peak_rss_mib"],
            "bytes_per_site": mean(sent),
            "accuracy": metrics["final"]["accuracy"],
            "run_dir": str(run),
        }
    ]


def _summary(out: Path, rows: list[dict[str, Any]], grid: ScalingGrid) -> None:
    total = (grid.base.get("data_options") or {}).get("n_train")
    lines = [
        "# Scaling with the number of sites (fixed total data)",
        "",
        f"Settings `{json.dumps(grid.base)}`: {total} training samples in all, split evenly. "
        f"Masking switches to SecAgg+ from {grid.secagg_plus_from} sites. Mean ± std over seeds "
        f"{sorted({r['seed'] for r in rows})}; peak memory is the max RSS of the training "
        "process (one interpreter per cell).",
        "",
        "| sites | secure agg | samples/site | s/round | local training | protection | "
        "aggregation | evaluation | peak RSS (MiB) | bytes/site | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["sites"], r["secure_agg"]) for r in rows})
    for n, mode in keys:
        g = [r for r in rows if r["sites"] == n and r["secure_agg"] == mode]
        lines.append(
            f"| {n} | {mode} | {g[0]['samples_per_site']} | "
            + " | ".join(
                mean_std([r[c] for r in g], 2)
                for c in (
                    "seconds_per_round",
                    "train_seconds_per_round",
                    "protection_seconds_per_round",
                    "aggregation_seconds_per_round",
                    "evaluation_seconds_per_round",
                )
            )
            + f" | {mean_std([r['peak_rss_mib'] for r in g], 0)}"
            + f" | {statistics.mean(r['bytes_per_site'] for r in g) / 1e6:.3f} MB"
            + f" | {mean_std([r['accuracy'] for r in g])} |"
        )
    lines += ["", "![seconds per round](scaling_time.png)", "", "![memory](scaling_memory.png)", ""]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _plots(out: Path, rows: list[dict[str, Any]], grid: ScalingGrid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    for col, name, ylabel in (
        ("seconds_per_round", "scaling_time.png", "seconds per round (log)"),
        ("peak_rss_mib", "scaling_memory.png", "peak RSS of the run, MiB (log)"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for mode in grid.secure:
            ns = sorted({r["sites"] for r in rows if r["secure_agg"] == mode})
            if not ns:
                continue
            vals = [
                [r[col] for r in rows if r["sites"] == n and r["secure_agg"] == mode] for n in ns
            ]
            ax.errorbar(
                ns,
                [np.mean(v) for v in vals],
                yerr=[np.std(v) for v in vals],
                marker="o",
                capsize=3,
                label=f"secure agg: {mode}",
            )
        if col == "seconds_per_round":
            ns = sorted({r["sites"] for r in rows if r["secure_agg"] == "mask"})
            if ns:
                cost = [
                    np.mean(
                        [
                            r["protection_seconds_per_round"] + r["aggregation_seconds_per_round"]
                            for r in rows
                            if r["sites"] == n and r["secure_agg"] == "mask"
                        ]
                    )
                    for n in ns
                ]
                ax.plot(ns, cost, "--", marker="s", label="mask: protection + aggregation only")
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        sites = sorted({r["sites"] for r in rows})
        ax.set_xticks(sites, [str(n) for n in sites])
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("number of sites (log; total data fixed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def render(out: Path, grid: ScalingGrid) -> None:
    """(Re)write summary.md and the plots from ``results.json``."""
    rows = load_rows(out / "results.json", required=REQUIRED_COLUMNS, suite="scaling")
    if rows:
        _summary(out, rows, grid)
        _plots(out, rows, grid)


def run_scaling(*, out_dir: Path, grid: ScalingGrid, progress: bool = True) -> Path:
    """Run (or resume) the grid; write results.json/.csv, summary.md and plots."""
    out, rows = open_suite(out_dir, suite="scaling", grid=asdict(grid), required=REQUIRED_COLUMNS)
    done = {_key(r["sites"], r["secure_agg"], r["seed"]) for r in rows}
    cells = []
    for seed in grid.seeds:
        for n in grid.sites:
            for mode in grid.secure:
                extra = {"secagg_neighbors": _neighbors(n, grid)} if mode == "mask" else {}
                cfg = RunConfig().replace(
                    **grid.base, clients=n, secure_agg=mode, seed=seed, **extra
                )
                cells.append(
                    Cell(
                        key=_key(n, mode, seed),
                        config=cfg,
                        to_rows=partial(_rows, n=n, mode=mode, seed=seed),
                        isolated=True,
                    )
                )
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    write_rows(out, rows)
    render(out, grid)
    return out / "results.json"
