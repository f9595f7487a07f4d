"""Digital twins: global vs per-site fine-tuned model on each hospital's own held-out data.

The shape of the paper's per-client table (global Dice vs twin Dice) for 3D tumour
segmentation across non-IID hospitals: by default the synthetic ``synthetic-seg`` hospitals
(each with its own scanner gain, contrast, noise, bias field and tumour sizes), one hospital
per site (``by-group``), a 3D UNet, with and without DP. Each cell is a ``securefed train``
run under ``OUT/runs/<cell>``; finished cells are read back, so the suite resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securefed.bench.common import Cell, mean_std, open_suite, run_cells, write_atomic
from securefed.config import RunConfig

__all__ = ["TwinGrid", "QUICK_TWINS", "REQUIRED_COLUMNS", "run_twin_bench"]

REQUIRED_COLUMNS = ("epsilon", "seed", "client_id", "global_score", "twin_score", "metric")


@dataclass(frozen=True)
class TwinGrid:
    """What to run.

    Attributes:
        base: RunConfig settings shared by every cell.
        epsilons: Target epsilons; ``None`` is the non-private run.
        seeds: Run seeds.

    """

    base: dict[str, Any] = field(
        default_factory=lambda: {
            "dataset": "synthetic-seg",
            "data_options": {"n_train": 108, "n_val": 36, "n_test": 36, "image_size": 32},
            "model": "unet",
            "clients": 9,
            "partition": "by-group",
            "rounds": 8,
            "local_epochs": 2,
            "batch_size": 4,
            "lr": 0.1,
            "momentum": 0.9,
            "personalize": 3,
            "personalize_lr": 0.05,
            "device": "auto",
        }
    )
    epsilons: tuple[float | None, ...] = (None, 8.0)
    seeds: tuple[int, ...] = (0,)


QUICK_TWINS = TwinGrid(
    base={
        **TwinGrid().base,
        "data_options": {"n_train": 36, "n_val": 18, "n_test": 18, "image_size": 32},
        "rounds": 3,
        "local_epochs": 1,
        "personalize": 2,
    },
    epsilons=(None,),
)


def _cell_key(eps: float | None, seed: int) -> str:
    return f"eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}"


def _rows_from_run(run: Path, *, eps: float | None, seed: int) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    primary = metrics["primary_metric"]
    eps_by_site = {c["client_id"]: c["epsilon"] for c in privacy["clients"]}
    rows = []
    for r in metrics.get("personalization") or []:
        rows.append(
            {
                "epsilon": eps,
                "seed": seed,
                "client_id": r["client_id"],
                "metric": primary,
                "num_heldout": r["num_heldout"],
                "global_score": r["global_" + primary],
                "twin_score": r["twin_" + primary],
                "gain": r["twin_gain"],
                "epsilon_spent": eps_by_site.get(r["client_id"]),
                "global_test_score": metrics["final"][primary],
                "total_seconds": metrics["total_seconds"],
                "run_dir": str(run),
            }
        )
    return rows


def _summary(out: Path, rows: list[dict[str, Any]], grid: TwinGrid) -> None:
    metric = rows[0]["metric"] if rows else "score"
    lines = [
        "# Digital twins: global vs twin per site",
        "",
        f"Settings: {json.dumps(grid.base)}. Each site's twin is the served model fine-tuned "
        f"for {grid.base.get('personalize')} epoch(s) on the site's own data (with DP-SGD "
        "when DP is on, accounted in the site's ε); both are scored on the site's held-out "
        f"data. Metric: {metric}.",
        "",
    ]
    for eps in grid.epsilons:
        cell = [r for r in rows if r["epsilon"] == eps]
        if not cell:
            continue
        label = "∞ (no DP)" if eps is None else f"{eps:g}"
        lines += [
            f"## ε = {label}",
            "",
            f"| site | held-out | global {metric} | twin {metric} | gain |",
            "|---|---|---|---|---|",
        ]
        for cid in sorted({r["client_id"] for r in cell}):
            rs = [r for r in cell if r["client_id"] == cid]
            lines.append(
                f"| {cid} | {rs[0]['num_heldout']} | {mean_std([r['global_score'] for r in rs])}"
                f" | {mean_std([r['twin_score'] for r in rs])}"
                f" | {mean_std([r['gain'] for r in rs])} |"
            )
        wins = sum(r["twin_score"] >= r["global_score"] for r in cell)
        lines += [
            f"| **mean** | | **{mean_std([r['global_score'] for r in cell])}** | "
            f"**{mean_std([r['twin_score'] for r in cell])}** | "
            f"**{mean_std([r['gain'] for r in cell])}** |",
            "",
            f"Twin ≥ global on {wins} of {len(cell)} site-runs; global model on the pooled "
            f"test split: {mean_std([r['global_test_score'] for r in cell])}.",
            "",
        ]
    lines += ["![global vs twin](twins.png)", ""]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict[str, Any]], grid: TwinGrid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    eps_list = [e for e in grid.epsilons if any(r["epsilon"] == e for r in rows)]
    fig, axes = plt.subplots(1, len(eps_list), figsize=(6 * len(eps_list), 4), squeeze=False)
    for ax, eps in zip(axes[0], eps_list):
        cell = [r for r in rows if r["epsilon"] == eps]
        sites = sorted({r["client_id"] for r in cell})
        g = [np.mean([r["global_score"] for r in cell if r["client_id"] == s]) for s in sites]
        t = [np.mean([r["twin_score"] for r in cell if r["client_id"] == s]) for s in sites]
        x = np.arange(len(sites))
        ax.bar(x - 0.2, g, width=0.4, label="global model")
        ax.bar(x + 0.2, t, width=0.4, label="digital twin")
        ax.set_xticks(x, [str(s) for s in sites])
        ax.set_xlabel("site (hospital)")
        ax.set_ylabel(f"{cell[0]['metric']} on the site's held-out data")
        ax.set_ylim(0, 1)
        ax.set_title(f"ε = {'∞ (no DP)' if eps is None else f'{eps:g}'}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "twins.png", dpi=120)
    plt.close(fig)


def run_twin_bench(*, out_dir: Path, grid: TwinGrid, progress: bool = True) -> Path:
    """Run (or resume) every cell; write results.json/.csv, summary.md and twins.png.

    Returns:
        The path of ``results.json``.

    """
    out, rows = open_suite(out_dir, suite="twins", grid=asdict(grid), required=REQUIRED_COLUMNS)
    done = {_cell_key(r["epsilon"], r["seed"]) for r in rows}
    cells = [
        Cell(
            key=_cell_key(eps, seed),
            config=RunConfig().replace(**grid.base, dp_epsilon=eps, seed=seed),
            to_rows=partial(_rows_from_run, eps=eps, seed=seed),
        )
        for seed in grid.seeds
        for eps in grid.epsilons
    ]
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    _summary(out, rows, grid)
    _plot(out, rows, grid)
    return out / "results.json"
