"""Privacy budget vs utility vs time: ε × strategy × secure aggregation on non-IID sites.

Every cell is a full ``securefed train`` run (``OUT/runs/<cell>``), read back into one row
per cell and seed: utility (final and best accuracy, balanced accuracy, macro F1, AUC),
convergence (rounds and seconds), cost (seconds per round split into local training,
protection and aggregation; bytes sent per site) and privacy (ε spent by every site, from
the run's privacy report). Finished cells are skipped when the suite is run again.
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
    convergence_note,
    curve_convergence,
    load_rows,
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

__all__ = ["PrivacyUtilityGrid", "QUICK_PU", "REQUIRED_COLUMNS", "run_privacy_utility"]

REQUIRED_COLUMNS = (
    "strategy",
    "secure_agg",
    "epsilon",
    "seed",
    "accuracy",
    "best_accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auc",
    "convergence_round",
    "convergence_seconds",
    "seconds_per_round",
    "train_seconds_per_round",
    "protection_seconds_per_round",
    "aggregation_seconds_per_round",
    "bytes_per_site",
    "epsilon_per_site",
    "epsilon_spent",
)


@dataclass(frozen=True)
class PrivacyUtilityGrid:
    """The grid.

    Attributes:
        dataset: Data set name (MedMNIST in ``data_dir``, or ``synthetic``).
        data_dir: MedMNIST folder.
        epsilons: Target ε values; ``None`` is the non-private run (ε = ∞).
        strategies: ``fedavg`` and/or ``ftl`` (FTL starts from weights pretrained on the
            declared-public share; every cell uses the same public fraction, so every
            strategy trains on the same private sites).
        secure: Secure aggregation modes.
        he_epsilons: ε values at which ``he`` cells run (CKKS is the slow one; ``None`` in
            the tuple is ε = ∞). Cells outside are listed as skipped in the summary.
        seeds: Run seeds.
        base: Shared RunConfig settings.
        pretrain_epochs: Epochs of FTL pretraining.
        conv_acc_tol, conv_loss_tol, conv_patience, conv_window: Convergence rule applied to
            every cell's curves (a run's rule and defaults:
            :func:`securefed.metrics.detect_convergence`).

    """

    dataset: str = "pneumoniamnist"
    data_dir: str | None = None
    epsilons: tuple[float | None, ...] = (1.0, 2.0, 4.0, 8.0, None)
    strategies: tuple[str, ...] = ("fedavg", "ftl")
    secure: tuple[str, ...] = ("none", "mask", "he")
    he_epsilons: tuple[float | None, ...] = (8.0,)
    seeds: tuple[int, ...] = (0, 1, 2)
    base: dict[str, Any] = field(default_factory=non_iid_sites)
    pretrain_epochs: int = 10
    conv_acc_tol: float = CONV_ACC_TOL
    conv_loss_tol: float = CONV_LOSS_TOL
    conv_patience: int = CONV_PATIENCE
    conv_window: int = CONV_WINDOW

    def __post_init__(self) -> None:
        bad = [s for s in self.strategies if s not in ("fedavg", "ftl")]
        if bad:
            raise ConfigError(f"privacy-utility strategies are fedavg and ftl (got {bad[0]!r})")
        bad = [m for m in self.secure if m not in ("none", "mask", "he")]
        if bad:
            raise ConfigError(f"secure aggregation modes are none, mask, he (got {bad[0]!r})")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")

    def cells(self) -> list[tuple[str, str, float | None, int]]:
        """(strategy, secure_agg, epsilon, seed) of every cell that runs."""
        return [
            (st, mode, eps, seed)
            for seed in self.seeds
            for eps in self.epsilons
            for st in self.strategies
            for mode in self.secure
            if mode != "he" or eps in self.he_epsilons
        ]


QUICK_PU = PrivacyUtilityGrid(
    epsilons=(1.0, 8.0, None),
    base={
        "clients": 3,
        "partition": "dirichlet:0.5",
        "rounds": 3,
        "local_epochs": 1,
        "public_fraction": 0.1,
        "device": "auto",
    },
    seeds=(0,),
    pretrain_epochs=3,
)


def _key(strategy: str, mode: str, eps: float | None, seed: int) -> str:
    return f"{strategy}-{mode}-eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}"


def _mean(xs: list[float]) -> float:
    return float(statistics.mean(xs)) if xs else 0.0


def _rows(
    run: Path, *, strategy: str, mode: str, eps: float | None, seed: int, grid: PrivacyUtilityGrid
) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    rounds, final = metrics["rounds"], metrics["final"]
    acc = [r["global"]["accuracy"] for r in rounds]
    conv = curve_convergence(
        rounds,
        acc_tol=grid.conv_acc_tol,
        loss_tol=grid.conv_loss_tol,
        patience=grid.conv_patience,
        window=grid.conv_window,
    )
    sent = [b for r in rounds for b in r["bytes_per_client"].values()]
    eps_sites = [c["epsilon"] for c in privacy["clients"]]
    return [
        {
            "strategy": strategy,
            "secure_agg": mode,
            "epsilon": eps,
            "seed": seed,
            "accuracy": final["accuracy"],
            "best_accuracy": metrics["best"]["accuracy"],
            "balanced_accuracy": final["balanced_accuracy"],
            "macro_f1": final["macro_f1"],
            "auc": final.get("auc"),
            "convergence_round": conv.get("round"),
            "convergence_seconds": conv.get("seconds"),
            "seconds_per_round": _mean([r["seconds"] for r in rounds]),
            "train_seconds_per_round": _mean([r["timing"]["local_training"] for r in rounds]),
            "protection_seconds_per_round": _mean([r["timing"]["protection"] for r in rounds]),
            "aggregation_seconds_per_round": _mean([r["timing"]["aggregation"] for r in rounds]),
            "evaluation_seconds_per_round": _mean([r["timing"]["evaluation"] for r in rounds]),
            "bytes_per_site": _mean(sent),
            "epsilon_per_site": eps_sites,
            "epsilon_spent": privacy.get("epsilon"),
            "total_seconds": metrics["total_seconds"],
            "accuracy_curve": acc,
            "run_dir": str(run),
        }
    ]


def _eps_label(eps: float | None) -> str:
    return "∞" if eps is None else f"{eps:g}"


def _summary(out: Path, rows: list[dict[str, Any]], grid: PrivacyUtilityGrid) -> None:
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Privacy budget vs utility vs time",
        "",
        f"Data set `{grid.dataset}`; shared settings `{json.dumps(grid.base)}`; mean ± std over "
        f"seeds {seeds}. FTL is pretrained on the declared-public "
        f"{grid.base.get('public_fraction', 0):.0%} of the training split, which no site holds "
        "(every cell sets it aside, so all cells train on the same private sites). "
        f"CKKS (`he`) runs only at ε ∈ {{{', '.join(_eps_label(e) for e in grid.he_epsilons)}}}. "
        + convergence_note(
            acc_tol=grid.conv_acc_tol,
            loss_tol=grid.conv_loss_tol,
            patience=grid.conv_patience,
            window=grid.conv_window,
        ),
        "",
        "## Utility",
        "",
        "| strategy | secure agg | ε | ε spent (max site) | accuracy | best | balanced acc. | "
        "macro F1 | AUC | conv. round | conv. seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["secure_agg"], r["epsilon"]), []).append(r)
    order = sorted(
        groups,
        key=lambda k: (
            k[0],
            ("none", "mask", "he").index(k[1]),
            float("inf") if k[2] is None else k[2],
        ),
    )
    for k in order:
        g = groups[k]
        lines.append(
            f"| {k[0]} | {k[1]} | {_eps_label(k[2])} | "
            f"{mean_std([r['epsilon_spent'] for r in g], 2)} | "
            + " | ".join(
                mean_std([r[c] for r in g])
                for c in ("accuracy", "best_accuracy", "balanced_accuracy", "macro_f1", "auc")
            )
            + f" | {mean_std([r['convergence_round'] for r in g], 1)}"
            f" | {mean_std([r['convergence_seconds'] for r in g], 1)} |"
        )
    lines += [
        "",
        "## Cost per round",
        "",
        "| strategy | secure agg | ε | seconds / round | local training | protection | "
        "aggregation | bytes sent per site |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in order:
        g = groups[k]
        lines.append(
            f"| {k[0]} | {k[1]} | {_eps_label(k[2])} | "
            + " | ".join(
                mean_std([r[c] for r in g], 2)
                for c in (
                    "seconds_per_round",
                    "train_seconds_per_round",
                    "protection_seconds_per_round",
                    "aggregation_seconds_per_round",
                )
            )
            + f" | {_mean([r['bytes_per_site'] for r in g]) / 1e6:.3f} MB |"
        )
    gaps = _secure_vs_plain(rows)
    lines += [
        "",
        "## Consistency",
        "",
        f"- ε spent ≤ target in every cell: {all(_within(r) for r in rows)}.",
        "- Largest |accuracy(secure) − accuracy(plaintext)| for the same strategy, ε and seed: "
        + (f"{max(gaps):.4f} over {len(gaps)} pairs." if gaps else "no pairs."),
        "",
        "![accuracy vs ε](accuracy_vs_epsilon.png)",
        "",
        "![convergence](convergence.png)",
        "",
        "![time per round](time_breakdown.png)",
        "",
    ]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _order(key: tuple) -> tuple:
    strategy, mode, eps = key
    return (strategy, ("none", "mask", "he").index(mode), float("inf") if eps is None else eps)


def _within(row: dict[str, Any]) -> bool:
    if row["epsilon"] is None:
        return row["epsilon_spent"] is None
    return row["epsilon_spent"] is not None and row["epsilon_spent"] <= row["epsilon"] + 1e-6


def _secure_vs_plain(rows: list[dict[str, Any]]) -> list[float]:
    plain = {(r["strategy"], r["epsilon"], r["seed"]): r for r in rows if r["secure_agg"] == "none"}
    return [
        abs(r["accuracy"] - plain[(r["strategy"], r["epsilon"], r["seed"])]["accuracy"])
        for r in rows
        if r["secure_agg"] != "none" and (r["strategy"], r["epsilon"], r["seed"]) in plain
    ]


def _plots(out: Path, rows: list[dict[str, Any]], grid: PrivacyUtilityGrid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    finite = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    inf_x = (max(finite) * 2.5) if finite else 1.0

    def x_of(e: float | None) -> float:
        return inf_x if e is None else e

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for st in grid.strategies:
        plain = [r for r in rows if r["strategy"] == st and r["secure_agg"] == "none"]
        eps = sorted({r["epsilon"] for r in plain}, key=lambda e: x_of(e))
        if not eps:
            continue
        mean = [np.mean([r["accuracy"] for r in plain if r["epsilon"] == e]) for e in eps]
        std = [np.std([r["accuracy"] for r in plain if r["epsilon"] == e]) for e in eps]
        ax.errorbar([x_of(e) for e in eps], mean, yerr=std, marker="o", capsize=4, label=st)
    ax.set_xscale("log")
    ticks = finite + ([inf_x] if any(r["epsilon"] is None for r in rows) else [])
    ax.set_xticks(ticks, [f"{t:g}" for t in finite] + (["∞"] if len(ticks) > len(finite) else []))
    ax.set_xlabel("target ε per site (δ as in each report; log scale)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy (no secure agg.)")
    ax.set_title(f"Accuracy vs privacy budget — {grid.dataset}")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for st in grid.strategies:
        for eps in grid.epsilons:
            curves = [
                r["accuracy_curve"]
                for r in rows
                if r["strategy"] == st and r["secure_agg"] == "none" and r["epsilon"] == eps
            ]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            ax.plot(
                np.arange(1, n + 1),
                arr.mean(0),
                "--" if st == "ftl" else "-",
                marker=".",
                label=f"{st}, ε={_eps_label(eps)}",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Convergence")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    plt.close(fig)

    keys = sorted(
        {(r["strategy"], r["secure_agg"]) for r in rows},
        key=lambda k: (k[0], ("none", "mask", "he").index(k[1])),
    )
    parts = (
        ("train_seconds_per_round", "local training"),
        ("protection_seconds_per_round", "protection (encode/mask/encrypt)"),
        ("aggregation_seconds_per_round", "aggregation (unmask/decrypt)"),
        ("evaluation_seconds_per_round", "evaluation"),
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bottom = np.zeros(len(keys))
    for col, label in parts:
        vals = np.array(
            [np.mean([r[col] for r in rows if (r["strategy"], r["secure_agg"]) == k]) for k in keys]
        )
        ax.bar(range(len(keys)), vals, bottom=bottom, label=label)
        bottom += vals
    ax.set_xticks(range(len(keys)), [f"{a}\n{b}" for a, b in keys])
    ax.set_ylabel("seconds per round (mean over ε and seeds)")
    ax.set_title("Where a round's time goes")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_breakdown.png", dpi=120)
    plt.close(fig)


def render(out: Path, grid: PrivacyUtilityGrid) -> None:
    """(Re)write summary.md and the plots from ``results.json``."""
    rows = load_rows(out / "results.json", required=REQUIRED_COLUMNS, suite="privacy-utility")
    if rows:
        _summary(out, rows, grid)
        _plots(out, rows, grid)


def run_privacy_utility(*, out_dir: Path, grid: PrivacyUtilityGrid, progress: bool = True) -> Path:
    """Run (or resume) the grid; write results.json/.csv, summary.md and plots.

    Returns:
        The path of ``results.json``.

    """
    out, rows = open_suite(
        out_dir, suite="privacy-utility", grid=asdict(grid), required=REQUIRED_COLUMNS
    )
    done = {_key(r["strategy"], r["secure_agg"], r["epsilon"], r["seed"]) for r in rows}
    pretrained = (
        pretrained_weights(
            out,
            dataset=grid.dataset,
            data_dir=grid.data_dir,
            base=grid.base,
            epochs=grid.pretrain_epochs,
            progress=progress,
        )
        if "ftl" in grid.strategies
        else None
    )
    cells = []
    for st, mode, eps, seed in grid.cells():
        changes: dict[str, Any] = {
            **grid.base,
            "strategy": st,
            "secure_agg": mode,
            "dp_epsilon": eps,
            "seed": seed,
        }
        if st == "ftl":
            changes["pretrained"] = str(pretrained)
        cells.append(
            Cell(
                key=_key(st, mode, eps, seed),
                config=RunConfig(dataset=grid.dataset, data_dir=grid.data_dir).replace(**changes),
                to_rows=partial(_rows, strategy=st, mode=mode, eps=eps, seed=seed, grid=grid),
            )
        )
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    write_rows(out, rows)
    render(out, grid)
    return out / "results.json"
