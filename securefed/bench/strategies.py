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

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securefed.bench.common import (
    Cell,
    convergence_note,
    curve_convergence,
    mean_std,
    non_iid_sites,
    open_suite,
    pretrained_weights,
    run_cells,
    write_atomic,
    write_rows,
)
from securefed.config import RunConfig
from securefed.errors import ConfigError
from securefed.metrics import CONV_ACC_TOL, CONV_LOSS_TOL, CONV_PATIENCE, CONV_WINDOW

__all__ = ["ARMS", "REQUIRED_COLUMNS", "ComparisonGrid", "run_strategy_comparison"]

#: The arms of the comparison: label -> RunConfig changes (``ftl`` arms get the weights).
ARMS: dict[str, dict[str, Any]] = {
    "fl": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    "cfl": {"strategy": "cfl", "clusters": 2},
    "ftl": {"strategy": "ftl", "freeze": "backbone"},
    "ftl-all": {"strategy": "ftl", "freeze": "none"},
    # The head and the last block: the pretrained early features stay, the last adapts.
    "ftl-last": {"strategy": "ftl", "freeze": "backbone-except-last"},
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
        pretrain_epochs: Epochs of pretraining on the public share (``None``: pretrain's default).
        conv_acc_tol, conv_loss_tol, conv_patience, conv_window: Convergence, recomputed
            from each run's curves by a run's rule
            (:func:`securefed.metrics.detect_convergence`), so every arm is judged alike;
            the defaults are a run's.

    """

    dataset: str = "pneumoniamnist"
    data_dir: str | None = None
    arms: tuple[str, ...] = ("fl", "cfl", "ftl")
    epsilons: tuple[float | None, ...] = (8.0, None)
    seeds: tuple[int, ...] = (0,)
    base: dict[str, Any] = field(default_factory=non_iid_sites)
    target_accuracy: float = 0.80
    pretrain_epochs: int | None = 10
    conv_acc_tol: float = CONV_ACC_TOL
    conv_loss_tol: float = CONV_LOSS_TOL
    conv_patience: int = CONV_PATIENCE
    conv_window: int = CONV_WINDOW

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


def _rows_from_run(
    run: Path, *, arm: str, eps: float | None, seed: int, grid: ComparisonGrid
) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    resolved = json.loads((run / "config.json").read_text()).get("resolved", {})
    final, rounds = metrics["final"], metrics["rounds"]
    target = grid.target_accuracy
    curve = [r["global"]["accuracy"] for r in rounds]
    reach = next((i + 1 for i, a in enumerate(curve) if a >= target), None)
    conv = curve_convergence(
        rounds,
        acc_tol=grid.conv_acc_tol,
        loss_tol=grid.conv_loss_tol,
        patience=grid.conv_patience,
        window=grid.conv_window,
    )
    return [
        {
            "arm": arm,
            "strategy": metrics.get("strategy"),
            # What `--model auto` built: the DP and non-private arms may differ (docs/defaults.md).
            "model": resolved.get("model", {}).get("name"),
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
            "loss_curve": [r["global"]["loss"] for r in rounds],
            "epsilon_spent": privacy.get("epsilon"),
            "trainable_parameters": privacy.get("transfer", {}).get("trainable_parameters"),
            "run_dir": str(run),
        }
    ]


def _summary(out: Path, rows: list[dict[str, Any]], grid: ComparisonGrid) -> None:
    lines = [
        "# FL vs CFL vs FTL",
        "",
        f"Data set `{grid.dataset}`; shared settings {json.dumps(grid.base)}; FTL pretrained "
        f"on the declared-public {grid.base['public_fraction']:.0%} of the training split "
        f"({grid.pretrain_epochs} epochs), which no site holds. Mean ± std over seeds "
        f"{sorted({r['seed'] for r in rows})}. Rounds to target: first round with test "
        f"accuracy >= {grid.target_accuracy}, per seed. "
        + convergence_note(
            acc_tol=grid.conv_acc_tol,
            loss_tol=grid.conv_loss_tol,
            patience=grid.conv_patience,
            window=grid.conv_window,
        ),
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
                    mean_std([r[k] for r in cell], 3 if k != "convergence_round" else 1)
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
                + f" | {mean_std([r['total_seconds'] for r in cell], 1)}"
                + f" | {mean_std([r['epsilon_spent'] for r in cell], 2)} |"
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
        ax.set_ylabel("test accuracy (mean over seeds; band: min-max)")
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
    out, rows = open_suite(
        out_dir, suite="strategies", grid=asdict(grid), required=REQUIRED_COLUMNS
    )
    done = {_cell_key(r["arm"], r["epsilon"], r["seed"]) for r in rows}
    needs_weights = any(ARMS[a]["strategy"] == "ftl" for a in grid.arms)
    pretrained = (
        pretrained_weights(
            out,
            dataset=grid.dataset,
            data_dir=grid.data_dir,
            base=grid.base,
            epochs=grid.pretrain_epochs,
            progress=progress,
        )
        if needs_weights
        else None
    )
    cells = []
    for seed in grid.seeds:
        for eps in grid.epsilons:
            for arm in grid.arms:
                if ARMS[arm]["strategy"] == "cfl" and eps is not None:
                    continue  # IFCA's cluster choice is not DP: CFL runs only without DP
                changes = {**grid.base, **ARMS[arm], "dp_epsilon": eps, "seed": seed}
                if ARMS[arm]["strategy"] == "ftl":
                    changes["pretrained"] = str(pretrained)
                cfg = RunConfig(dataset=grid.dataset, data_dir=grid.data_dir).replace(**changes)
                cells.append(
                    Cell(
                        key=_cell_key(arm, eps, seed),
                        config=cfg,
                        to_rows=partial(_rows_from_run, arm=arm, eps=eps, seed=seed, grid=grid),
                    )
                )
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    write_rows(out, rows)
    _summary(out, rows, grid)
    _plot(out, rows, grid)
    return out / "results.json"
