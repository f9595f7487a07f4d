"""``securefed bench privacy-unit``: what patient-level DP costs against record-level DP.

Every cell is a full ``securefed train`` run on synthetic data whose records come in patients
of ``k`` (``--data-option records_per_patient=k``: a patient's images share its appearance
and its diagnosis). Arms, at each target ε:

* ``record``: record-level DP-SGD at ε, the default. Per patient it guarantees only what
  group privacy gives: ``(k ε, k e^{(k-1) ε} δ)``, no guarantee at all once that δ passes 1.
* ``patient``: ``--privacy-unit patient`` at ε: Poisson sampling over patients, each
  patient's mean gradient clipped. ε per patient.
* ``record-eps/k``: record-level at ε/k, the record-level way to a per-patient ε (group
  privacy: ``(ε, k e^{(k-1) ε/k} δ)``).
* ``no-dp``: the non-private baseline (once per seed).

Rows hold the final accuracy and AUC, the ε the run's report claims, the per-patient
``(ε, δ)`` that claim implies, and the wall time. Finished cells are skipped on a re-run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securefed.bench.common import Cell, mean_std, open_suite, run_cells, write_atomic
from securefed.config import RunConfig
from securefed.errors import ConfigError

__all__ = ["ARMS", "QUICK_UNIT", "REQUIRED_COLUMNS", "UnitGrid", "per_patient", "run_privacy_unit"]

#: The arms a grid may hold.
ARMS = ("record", "patient", "record-eps/k", "no-dp")

REQUIRED_COLUMNS = (
    "arm",
    "privacy_unit",
    "epsilon",
    "seed",
    "records_per_patient",
    "accuracy",
    "auc",
    "epsilon_spent",
    "patient_epsilon",
    "patient_delta",
    "total_seconds",
)


def _base() -> dict[str, Any]:
    # The README quick start's federation (3 IID sites, 10 rounds), on patient-grouped data.
    return {"clients": 3, "rounds": 10, "secure_agg": "mask"}


@dataclass(frozen=True)
class UnitGrid:
    """The grid.

    Attributes:
        records_per_patient: k, records of every synthetic patient.
        n_train: Training records (``n_train / k`` patients).
        epsilons: Target ε values of the DP arms.
        arms: Which of :data:`ARMS` run.
        seeds: Run seeds.
        base: Shared RunConfig settings.

    """

    records_per_patient: int = 4
    n_train: int = 2400
    epsilons: tuple[float, ...] = (8.0,)
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    base: dict[str, Any] = field(default_factory=_base)

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise ConfigError(f"privacy-unit arms are {', '.join(ARMS)} (got {bad[0]!r})")
        if self.records_per_patient < 2:
            raise ConfigError("records_per_patient must be at least 2 (1 is record-level)")
        if not self.seeds or not self.epsilons:
            raise ConfigError("at least one seed and one ε are needed")

    def cells(self) -> list[tuple[str, float | None, int]]:
        """(arm, target ε, seed) of every cell; ``no-dp`` once per seed."""
        out = []
        for seed in self.seeds:
            for arm in self.arms:
                if arm == "no-dp":
                    out.append((arm, None, seed))
                else:
                    out += [(arm, eps, seed) for eps in self.epsilons]
        return out


QUICK_UNIT = UnitGrid(n_train=600, seeds=(0,), base={"clients": 2, "rounds": 3})


def per_patient(*, unit: str | None, epsilon: float | None, delta: float | None, k: int):
    """The ``(ε, δ)`` a run's claim gives one patient of ``k`` records (group privacy).

    Patient-level: the claim itself. Record-level: ``(k ε, k e^{(k-1) ε} δ)`` (Dwork and Roth,
    Theorem 2.2 for pure DP, with the δ of its approximate-DP form); a δ of 1 or more is no
    guarantee, reported as ``inf`` ε.
    """
    if epsilon is None or delta is None:
        return None, None
    if unit == "patient":
        return epsilon, delta
    group_delta = k * math.exp((k - 1) * epsilon) * delta
    if group_delta >= 1:
        return math.inf, 1.0
    return k * epsilon, group_delta


def _config(arm: str, eps: float | None, seed: int, grid: UnitGrid) -> RunConfig:
    k = grid.records_per_patient
    options = {"records_per_patient": k, "n_train": grid.n_train}
    target = {"record": eps, "patient": eps, "record-eps/k": None if eps is None else eps / k}
    return RunConfig(
        **grid.base,
        seed=seed,
        data_options=options,
        dp_epsilon=target.get(arm),
        privacy_unit="patient" if arm == "patient" else "record",
    )


def _key(arm: str, eps: float | None, seed: int) -> str:
    label = "inf" if eps is None else f"{eps:g}"
    return f"{arm.replace('/', '-')}-eps{label}-seed{seed}"


def _rows(run: Path, *, arm: str, eps: float | None, seed: int, k: int) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    final = metrics["final"]
    spent = privacy.get("epsilon")
    p_eps, p_delta = per_patient(
        unit=privacy.get("privacy_unit"), epsilon=spent, delta=privacy.get("delta"), k=k
    )
    return [
        {
            "arm": arm,
            "privacy_unit": privacy.get("privacy_unit"),
            "epsilon": eps,
            "seed": seed,
            "records_per_patient": k,
            "accuracy": final["accuracy"],
            "balanced_accuracy": final.get("balanced_accuracy"),
            "auc": final.get("auc"),
            "epsilon_spent": spent,
            "patient_epsilon": None if p_eps is None or math.isinf(p_eps) else p_eps,
            "patient_guarantee": p_eps is not None and not math.isinf(p_eps),
            "patient_delta": p_delta,
            "total_seconds": metrics["total_seconds"],
            "run_dir": str(run),
        }
    ]


def _summary(rows: list[dict[str, Any]], grid: UnitGrid) -> str:
    k = grid.records_per_patient
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Patient-level vs record-level DP",
        "",
        f"Synthetic data, {grid.n_train} training records in patients of k = {k} "
        f"(`--data-option records_per_patient={k}`), settings `{json.dumps(grid.base)}`; "
        f"mean ± std over seeds {seeds}. Per-patient (ε, δ) of a record-level claim by group "
        "privacy: (k ε, k e^((k-1) ε) δ); `none` where that δ reaches 1.",
        "",
        "| arm | target ε | ε claimed (unit) | per-patient ε (δ) | accuracy | AUC | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, eps in sorted({(r["arm"], r["epsilon"]) for r in rows}, key=_order):
        cell = [r for r in rows if r["arm"] == arm and r["epsilon"] == eps]
        spent = [r["epsilon_spent"] for r in cell]
        unit = cell[0]["privacy_unit"] or "-"
        if arm == "no-dp":
            patient = "none"
        elif not all(r["patient_guarantee"] for r in cell):
            patient = "none (δ ≥ 1)"
        else:
            patient = (
                f"{max(r['patient_epsilon'] for r in cell):.2f} "
                f"({max(r['patient_delta'] for r in cell):.1e})"
            )
        lines.append(
            f"| {arm} | {'∞' if eps is None else f'{eps:g}'} | "
            f"{mean_std(spent, 2) if unit != '-' else '∞'} ({unit}) | {patient} | "
            f"{mean_std([r['accuracy'] for r in cell])} | {mean_std([r['auc'] for r in cell])} | "
            f"{mean_std([r['total_seconds'] for r in cell], 1)} |"
        )
    return "\n".join(lines) + "\n"


def _order(item: tuple[str, float | None]) -> tuple[int, float]:
    arm, eps = item
    return ARMS.index(arm), -1.0 if eps is None else eps


def run_privacy_unit(*, out_dir: Path, grid: UnitGrid, progress: bool = True) -> Path:
    """Run (or resume) the grid; returns the path of ``results.json``."""
    out, rows = open_suite(
        out_dir, suite="privacy-unit", grid=asdict(grid), required=REQUIRED_COLUMNS
    )
    done = {_key(r["arm"], r["epsilon"], r["seed"]) for r in rows}
    cells = [
        Cell(
            key=_key(arm, eps, seed),
            config=_config(arm, eps, seed, grid),
            to_rows=partial(_rows, arm=arm, eps=eps, seed=seed, k=grid.records_per_patient),
        )
        for arm, eps, seed in grid.cells()
    ]
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    write_atomic(out / "summary.md", _summary(rows, grid))
    return out / "results.json"
