"""FL vs CFL vs FTL (and digital twins) on the same non-IID sites, with and without DP.

Reproduces the shape of the comparison in the federated-transfer-learning literature: the
same private sites train plain federated averaging from scratch (FL), clustered FL (IFCA),
and federated transfer learning from a model pretrained on a declared-public share of the
data (FTL). Every arm uses the same ``--public-fraction`` so the sites hold identical
private data; only FTL touches the public part (through ``securefed pretrain``).

Each cell is a full ``securefed train`` run written to ``OUT/runs/<cell>``; a cell whose run
folder already holds a finished run is read back, not re-run, so the suite resumes.
"""

from __future__ import annotations

import datetime
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefed.bench.common import environment, load_rows, write_atomic, write_rows
from securefed.config import RunConfig
from securefed.errors import ConfigError

__all__ = ["ARMS", "REQUIRED_COLUMNS", "ComparisonGrid", "run_strategy_comparison"]

#: The arms of the comparison: label -> RunConfig changes (``ftl`` arms get the weights).
ARMS: dict[str, dict[str, Any]] = {
    "fl": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "cfl": {"strategy": "cfl", "clusters": 2},
    "ftl": {"strategy": "ftl", "freeze": "backbone"},
    "ftl-all": {"strategy": "ftl", "freeze": "none"},
}

REQUIRED_COLUMNS = (
    "arm",
    "epsilon",
    "seed",
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "convergence_round",
    "convergence_seconds",
    "rounds_to_target",
    "total_seconds",
)


@dataclass(frozen=True)
class ComparisonGrid:
    """What to compare.

    Attributes:
        dataset: MedMNIST name in ``data_dir`` (or ``synthetic``).
        data_dir: Folder of MedMNIST files.
        arms: Arm labels from :data:`ARMS`.
        epsilons: Target epsilons; ``None`` is the non-private run.
        seeds: Run seeds (the public split and the pretrained model stay fixed).
        base: Settings shared by every arm (sites, partition, rounds, ...).
        target_accuracy: "Rounds to target" counts rounds until this accuracy is reached.
        pretrain_epochs: Epochs of pretraining on the public share.

    """

    dataset: str = "pneumoniamnist"
    data_dir: str | None = None
    arms: tuple[str, ...] = ("fl", "cfl", "ftl")
    epsilons: tuple[float | None, ...] = (8.0, None)
    seeds: tuple[int, ...] = (0,)
    base: dict[str, Any] = field(
        default_factory=lambda: {
            "clients": 5,
            "partition": "dirichlet:0.5",
            "rounds": 10,
            "public_fraction": 0.1,
            "device": "auto",
        }
    )
    target_accuracy: float = 0.80
    pretrain_epochs: int = 10

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"unknown arm {unknown[0]!r}; known: {', '.join(ARMS)}")
        if not self.base.get("public_fraction"):
            raise ConfigError("the comparison needs base public_fraction > 0 (FTL's source)")


QUICK = ComparisonGrid(
    base={
        "clients": 3,
        "partition": "dirichlet:0.5",
        "rounds": 4,
        "public_fraction": 0.1,
        "batch_size": 128,
        "device": "auto",
    },
    epsilons=(8.0,),
    pretrain_epochs=3,
)


def _cell_key(arm: str, eps: float | None, seed: int) -> str:
    return f"{arm}-eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}"


def _row_from_run(run: Path, *, arm: str, eps: float | None, seed: int, target: float) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    final, rounds = metrics["final"], metrics["rounds"]
    curve = [r["global"]["accuracy"] for r in rounds]
    reach = next((i + 1 for i, a in enumerate(curve) if a >= target), None)
    conv = metrics.get("convergence") or {}
    return {
        "arm": arm,
        "strategy": metrics.get("strategy"),
        "epsilon": eps,
        "seed": seed,
        "accuracy": final["accuracy"],
        "balanced_accuracy": final["balanced_accuracy"],
        "macro_precision": final["macro_precision"],
        "macro_recall": final["macro_recall"],
        "macro_f1": final["macro_f1"],
        "auc": final.get("auc"),
        "confusion_matrix": final["confusion_matrix"],
        "best_accuracy": metrics["best"]["accuracy"],
        "best_round": metrics["best"]["round"],
        "site_mean_accuracy": rounds[-1].get("site_mean", {}).get("accuracy"),
        "convergence_round": conv.get("round"),
        "convergence_seconds": conv.get("seconds"),
        "rounds_to_target": reach,
        "target_accuracy": target,
        "seconds_to_target": sum(r["seconds"] for r in rounds[:reach]) if reach else None,
        "total_seconds": metrics["total_seconds"],
        "accuracy_curve": curve,
        "epsilon_spent": privacy.get("epsilon"),
        "trainable_parameters": privacy.get("transfer", {}).get("trainable_parameters"),
        "run_dir": str(run),
    }


def _pretrained(out: Path, grid: ComparisonGrid, progress: bool) -> Path:
    from securefed.fl.pretrain import pretrain

    path = out / "pretrained" / "model.safetensors"
    if path.exists():
        return path
    model = grid.base.get("model", "cnn")
    return pretrain(
        out=path.parent,
        dataset=grid.dataset,
        data_dir=grid.data_dir,
        model=model,
        public_fraction=float(grid.base["public_fraction"]),
        public_seed=int(grid.base.get("public_seed", 0)),
        epochs=grid.pretrain_epochs,
        device=grid.base.get("device", "auto"),
        progress=progress,
    )


def _fmt(values: Sequence[float | None], digits: int = 3) -> str:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _summary(out: Path, rows: list[dict[str, Any]], grid: ComparisonGrid) -> None:
    lines = [
        "# FL vs CFL vs FTL",
        "",
        f"Data set `{grid.dataset}`; shared settings {json.dumps(grid.base)}; FTL pretrained "
        f"on the declared-public {grid.base['public_fraction']:.0%} of the training split "
        f"({grid.pretrain_epochs} epochs), which no site holds. Mean ± std over seeds "
        f"{sorted({r['seed'] for r in rows})}. Rounds to target: first round with test "
        f"accuracy >= {grid.target_accuracy}.",
        "",
        "| ε | arm | accuracy | best | macro P | macro R | macro F1 | AUC | conv. round |"
        " rounds to target | seconds | ε spent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for eps in grid.epsilons:
        for arm in grid.arms:
            cell = [r for r in rows if r["arm"] == arm and r["epsilon"] == eps]
            if not cell:
                continue
            lines.append(
                f"| {'∞' if eps is None else f'{eps:g}'} | {arm} | "
                + " | ".join(
                    _fmt([r[k] for r in cell], 3 if k != "convergence_round" else 1)
                    for k in (
                        "accuracy",
                        "best_accuracy",
                        "macro_precision",
                        "macro_recall",
                        "macro_f1",
                        "auc",
                        "convergence_round",
                    )
                )
                + " | "
                + ", ".join(str(r["rounds_to_target"] or "never") for r in cell)
                + f" | {_fmt([r['total_seconds'] for r in cell], 1)}"
                + f" | {_fmt([r['epsilon_spent'] for r in cell], 2)} |"
            )
    lines += ["", "Confusion matrices (rows: true class, columns: predicted), first seed:", ""]
    for r in rows:
        if r["seed"] == min(x["seed"] for x in rows):
            eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
            lines.append(f"- ε={eps} {r['arm']}: `{r['confusion_matrix']}`")
    lines += ["", "![accuracy per round](curves.png)", ""]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict[str, Any]], grid: ComparisonGrid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1, len(grid.epsilons), figsize=(5.5 * len(grid.epsilons), 4), squeeze=False
    )
    for ax, eps in zip(axes[0], grid.epsilons):
        for arm in grid.arms:
            curves = [r["accuracy_curve"] for r in rows if r["arm"] == arm and r["epsilon"] == eps]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            x = np.arange(1, n + 1)
            ax.plot(x, arr.mean(0), marker="o", label=arm)
            if len(curves) > 1:
                ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.15)
        ax.axhline(grid.target_accuracy, color="grey", ls=":", lw=1, label="target")
        ax.set_title(f"ε = {'∞ (no DP)' if eps is None else f'{eps:g}'}")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def run_strategy_comparison(*, out_dir: Path, grid: ComparisonGrid, progress: bool = True) -> Path:
    """Run (or resume) every cell of ``grid``; write results.json/.csv, summary.md, curves.png.

    Returns:
        The path of ``results.json``.

    """
    from securefed.fl.run import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out / "results.json", required=REQUIRED_COLUMNS, suite="strategies")
    done = {_cell_key(r["arm"], r["epsilon"], r["seed"]) for r in rows}
    pretrained = (
        _pretrained(out, grid, progress)
        if any(ARMS[a]["strategy"] == "ftl" for a in grid.arms)
        else None
    )
    env = environment()
    cells = [(a, e, s) for s in grid.seeds for e in grid.epsilons for a in grid.arms]
    for i, (arm, eps, seed) in enumerate(cells, 1):
        key = _cell_key(arm, eps, seed)
        if key in done:
            continue
        run = out / "runs" / key
        if not (run / "privacy.json").exists():
            changes = {**grid.base, **ARMS[arm], "dp_epsilon": eps, "seed": seed}
            if ARMS[arm]["strategy"] == "ftl":
                changes["pretrained"] = str(pretrained)
            cfg = RunConfig(dataset=grid.dataset, data_dir=grid.data_dir).replace(**changes)
            if progress:
                print(f"[{i}/{len(cells)}] {key}", file=sys.stderr, flush=True)
            train(cfg, out_dir=run, progress=progress)
        row = _row_from_run(run, arm=arm, eps=eps, seed=seed, target=grid.target_accuracy)
        row.update(environment=env, date=datetime.date.today().isoformat())
        rows.append(row)
        write_rows(out, rows)  # after every cell: an interruption loses at most one cell
    write_rows(out, rows)
    _summary(out, rows, grid)
    _plot(out, rows, grid)
    return out / "results.json"
