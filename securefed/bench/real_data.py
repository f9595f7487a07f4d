"""FL, CFL and FTL, with and without DP, on every real data set in a data folder.

One strategy comparison (:mod:`securefed.bench.strategies`) per data set, with that set's
site layout, into ``OUT/<set>/``; then ``OUT/results.json`` (every row, tagged ``dataset``)
and one ``OUT/summary.md`` table of mean ± std and min over seeds. Every run uses the
defaults a user gets (model, batch, lr follow the data: docs/defaults.md); only the site
layout and the declared-public share are set here. Cells already run are read back, so the
suite resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from securefed.bench.common import (
    claim_folder,
    is_one_class,
    mean_std_min,
    write_atomic,
    write_rows,
)
from securefed.bench.strategies import ComparisonGrid, run_strategy_comparison
from securefed.errors import ConfigError, DataError

__all__ = ["REAL_SETS", "RealDataGrid", "run_real_data"]

#: The shared real sets and their site layouts (issue #15 and #16's settings).
REAL_SETS: dict[str, dict[str, Any]] = {
    "pneumoniamnist": {"clients": 5, "partition": "dirichlet:0.5"},
    "breastmnist": {"clients": 3, "partition": "dirichlet:0.5"},
    "brain_tumor_mri_96": {"clients": 4, "partition": "dirichlet:0.5"},
}


@dataclass(frozen=True)
class RealDataGrid:
    """What to run.

    Attributes:
        data_dir: Folder holding ``<set>.npz`` for each set.
        sets: Names from :data:`REAL_SETS`.
        arms: Strategy arms (:data:`securefed.bench.strategies.ARMS`); CFL runs only without
            DP (its cluster choice is not private).
        epsilons: Target epsilons; ``None`` is the conventional non-private run.
        seeds: Run seeds.
        base: Settings shared by every run (each set's layout is added).
        pretrain_epochs: Epochs of FTL's pretraining on the declared-public share (``None``:
            `securefed pretrain`'s default, about 1,000 steps).

    """

    data_dir: str
    sets: tuple[str, ...] = tuple(REAL_SETS)
    arms: tuple[str, ...] = ("fl", "cfl", "ftl")
    epsilons: tuple[float | None, ...] = (None, 8.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    base: dict[str, Any] = field(default_factory=lambda: RealDataGrid.default_base())
    pretrain_epochs: int | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.sets if s not in REAL_SETS]
        if unknown:
            raise ConfigError(
                f"unknown real data set {unknown[0]!r}; known: {', '.join(REAL_SETS)}"
            )
        missing = [s for s in self.sets if not (Path(self.data_dir) / f"{s}.npz").is_file()]
        if missing:
            raise DataError(f"{Path(self.data_dir) / (missing[0] + '.npz')}: no such file")

    @staticmethod
    def default_base() -> dict[str, Any]:
        """Shared settings: 10 rounds, 10 % declared public; everything else the default."""
        return {"rounds": 10, "public_fraction": 0.1, "device": "auto"}

    def comparison(self, name: str) -> ComparisonGrid:
        """The strategy comparison for one set."""
        return ComparisonGrid(
            dataset=name,
            data_dir=self.data_dir,
            arms=self.arms,
            epsilons=self.epsilons,
            seeds=self.seeds,
            base={**self.base, **REAL_SETS[name]},
            pretrain_epochs=self.pretrain_epochs,
        )


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (set, ε, arm, model), mean ± std (min) over seeds.

    The model is part of the key: a folder resumed after ``--model auto`` changed its pick
    (or rows from before the model was recorded, shown as ``?``) never averages two
    architectures into one line.
    """
    lines = [
        "| data set | ε | arm | model | seeds | accuracy | balanced acc. | AUC | one-class runs |"
        " seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def key(r: dict[str, Any]) -> tuple[str, float | None, str, str]:
        return r["dataset"], r["epsilon"], r["arm"], r.get("model") or "?"

    def order(k: tuple[str, float | None, str, str]) -> tuple[int, float, str, str]:
        ds, eps, arm, model = k
        rank = list(REAL_SETS).index(ds) if ds in REAL_SETS else len(REAL_SETS)
        return rank, -1.0 if eps is None else eps, arm, model

    for k in sorted({key(r) for r in rows}, key=order):
        ds, eps, arm, model = k
        cell = [r for r in rows if key(r) == k]
        one_class = sum(1 for r in cell if is_one_class(r["confusion_matrix"]))
        lines.append(
            f"| {ds} | {'∞' if eps is None else f'{eps:g}'} | {arm} | {model} | "
            f"{','.join(str(r['seed']) for r in cell)} | "
            f"{mean_std_min([r['accuracy'] for r in cell])} | "
            f"{mean_std_min([r['balanced_accuracy'] for r in cell])} | "
            f"{mean_std_min([r.get('auc') for r in cell])} | {one_class} | "
            f"{sum(r['total_seconds'] for r in cell) / len(cell):.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_real_data(*, out_dir: Path, grid: RealDataGrid, progress: bool = True) -> Path:
    """Run (or resume) every set's comparison; returns the combined ``results.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(
        out,
        suite="real-data",
        grid={
            k: v for k, v in asdict(grid).items() if k in ("data_dir", "base", "pretrain_epochs")
        },
    )
    rows: list[dict[str, Any]] = []
    for name in grid.sets:
        path = run_strategy_comparison(
            out_dir=out / name, grid=grid.comparison(name), progress=progress
        )
        rows += [{"dataset": name, **r} for r in json.loads(path.read_text())]
    write_rows(out, rows)
    text = [
        "# Real data: FL, CFL and FTL with and without DP",
        "",
        f"Shared settings {json.dumps(grid.base)}; site layouts "
        + "; ".join(
            f"{s}: {REAL_SETS[s]['clients']} sites {REAL_SETS[s]['partition']}" for s in grid.sets
        )
        + ". Every other setting is the default (docs/defaults.md). FTL starts from "
        f"`securefed pretrain` on the declared-public {grid.base['public_fraction']:.0%} "
        f"({grid.pretrain_epochs or 'default'} epochs), which no site holds. "
        "CFL runs only without DP. A one-class run predicts a single class for every test image.",
        "",
        summary_table(rows),
        "Per-set details, curves and confusion matrices: `<set>/summary.md`.",
    ]
    write_atomic(out / "summary.md", "\n".join(text) + "\n")
    return out / "results.json"


def quick(grid: RealDataGrid) -> RealDataGrid:
    """A few-minute smoke run: BreastMNIST, one seed, 2 rounds, 1 pretraining epoch."""
    return replace(
        grid,
        sets=("breastmnist",),
        seeds=(0,),
        base={**grid.base, "rounds": 2},
        pretrain_epochs=1,
    )
