"""``securefed bench privacy-audit``: empirical epsilon (one-run canary audit) against the claim.

For each data set and target epsilon, one site trains with DP-SGD, calibrated as a run
calibrates it (:func:`~securefed.dp.accounting.calibrate_noise`, replace-one PLD), with ``K``
white-box gradient canaries inserted (:mod:`securefed.dp.empirical`). Each row holds the
analytical epsilon the ledger gives and eps_emp, the lower bound the canaries' guesses prove
at 95 % confidence. ``inf`` trains the same DP-SGD with noise multiplier 0 (clipping and
Poisson sampling, no noise): what the audit sees without DP.

What to expect (``docs/benchmarks.md``): eps_emp rises with epsilon, stays below the
analytical epsilon at every point, and is clearly positive without noise, where it is limited
only by the number of canaries.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from securefed.bench.common import environment, mean_std, open_suite, write_atomic, write_rows
from securefed.dp.accounting import (
    ACCOUNTANT,
    calibrate_noise,
    sample_rate,
    site_delta,
    steps_per_epoch,
)
from securefed.dp.empirical import CONFIDENCE, AuditedSiteTrainer, GradientCanaries
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.noise import NoiseSource, SecretNoise
from securefed.dp.trainer import DPPlan

__all__ = ["QUICK_AUDIT", "REQUIRED_COLUMNS", "AuditGrid", "audit_site", "run_privacy_audit"]

#: Columns every row has.
REQUIRED_COLUMNS = (
    "dataset",
    "epsilon",
    "epsilon_spent",
    "eps_emp",
    "canaries",
    "guesses",
    "correct",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "seed",
)


def audit_site(
    *,
    dataset: Dataset,
    model: nn.Module,
    epsilon: float | None,
    canaries: int,
    epochs: int,
    batch_size: int,
    lr: float = 0.5,
    max_grad_norm: float = 1.0,
    momentum: float = 0.0,
    device: torch.device | None = None,
    confidence: float = CONFIDENCE,
    mechanism_noise: Callable[[], NoiseSource] = SecretNoise,
) -> dict[str, Any]:
    """Train one site with DP-SGD and ``canaries`` gradient canaries; return the audit.

    Args:
        dataset: The site's records (``(x, y)`` pairs).
        model: A fresh, Opacus-compatible model (trained in place).
        epsilon: Target epsilon; ``None`` trains with noise multiplier 0.
        canaries: K.
        epochs: Local epochs (one trainer round each, as a site's rounds are).
        batch_size: B; q = 1 / ceil(n / B).
        lr: SGD learning rate.
        max_grad_norm: C.
        momentum: SGD momentum.
        device: Where the site trains (CPU by default).
        confidence: Of eps_emp.
        mechanism_noise: Makes each round's mechanism randomness (Poisson coins and noise). A
            test replaces it to plant a bug (e.g. no noise) the audit must catch; nothing a
            user sets reaches it.

    Returns:
        ``epsilon_spent`` (the ledger's analytical epsilon; ``None`` without noise),
        ``eps_emp``, guesses, sigma, q, steps, delta and seconds.

    """
    n = len(dataset)  # type: ignore[arg-type]
    q = sample_rate(num_samples=n, batch_size=batch_size)
    steps = epochs * steps_per_epoch(num_samples=n, batch_size=batch_size)
    delta = site_delta(num_samples=n)
    sigma = (
        0.0
        if epsilon is None
        else calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps)
    )
    plan = DPPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        max_grad_norm=max_grad_norm,
        planned_steps=steps,
        delta=delta,
        accountant=ACCOUNTANT,
    )
    audit = GradientCanaries(count=canaries)
    trainer = AuditedSiteTrainer(
        canaries=audit,
        client_id=0,
        dataset=dataset,
        plan=plan,
        ledger=PrivacyLedger(),
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        device=device or torch.device("cpu"),
    )
    start = time.perf_counter()
    for r in range(1, epochs + 1):
        # A fresh copy per round, as a site gets the global weights; the model carries on.
        local = trainer.train_round(
            model=copy.deepcopy(model),
            round_index=r,
            epochs=1,
            generator=torch.Generator().manual_seed(r),  # unused under DP
            noise=mechanism_noise(),
        )
        model.load_state_dict(local.state)
    seconds = time.perf_counter() - start
    result = audit.result(delta=delta, confidence=confidence)
    spent = None if epsilon is None else trainer.epsilon()
    return {
        "epsilon_spent": spent,
        "eps_emp": result.eps_emp,
        "canaries": result.canaries,
        "guesses": result.guesses,
        "correct": result.correct,
        "confidence": result.confidence,
        "delta": delta,
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps": audit.steps,
        "seconds": seconds,
        "method": result.method,
    }


@dataclass(frozen=True)
class AuditGrid:
    """What to run.

    Attributes:
        datasets: ``synthetic`` and/or a MedMNIST-layout name read from ``data_dir``.
        data_dir: Folder with ``<name>.npz`` for the real sets.
        epsilons: Target epsilons; ``None`` is DP-SGD without noise.
        seeds: Seeds of the data subset and model initialisation (the canaries and the
            mechanism never use them).
        site_size: Records of the audited site (the first n of the training split).
        canaries: K.
        epochs: Local epochs (rounds of one epoch each).
        batch_size: B.
        lr: Learning rate.
        max_grad_norm: C.
        device: ``auto``, ``cpu`` or ``cuda``.

    """

    datasets: tuple[str, ...] = ("synthetic", "pneumoniamnist")
    data_dir: str = "../shared/data"
    epsilons: tuple[float | None, ...] = (1.0, 4.0, 8.0, None)
    seeds: tuple[int, ...] = (0, 1, 2)
    site_size: int = 1000
    canaries: int = 1000
    epochs: int = 10
    batch_size: int = 100
    lr: float = 0.5
    max_grad_norm: float = 1.0
    device: str = "cpu"


#: CI-sized: one seed, a 500-record site, 4 epochs.
QUICK_AUDIT = AuditGrid(seeds=(0,), site_size=500, canaries=500, epochs=4)


def _load(name: str, data_dir: str, n: int, seed: int) -> tuple[TensorDataset, int, int]:
    """The first ``n`` training records of a set (shuffled by ``seed``): data, channels, K."""
    if name == "synthetic":
        from securefed.data.synthetic import make_synthetic

        bundle = make_synthetic(seed=seed, n_train=n, n_val=10, n_test=10)
    else:
        from securefed.data.medmnist import load_medmnist_npz

        bundle = load_medmnist_npz(path=Path(data_dir) / f"{name}.npz")
    x = torch.tensor(bundle.train.images)
    y = torch.tensor(bundle.train.labels).long().flatten()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(x[order].float(), y[order]), int(x.shape[1]), int(y.max()) + 1


def _model(channels: int, classes: int, seed: int) -> nn.Module:
    from securefed.models import ModelSpec, build_model

    torch.manual_seed(seed)
    spec = ModelSpec(in_channels=channels, num_classes=classes, spatial_dims=2)
    return build_model(name="cnn", spec=spec).module


def run_privacy_audit(*, out_dir: Path, grid: AuditGrid, progress: bool = True) -> Path:
    """Run the grid (resuming finished cells); returns the path of ``results.json``."""
    from tqdm.auto import tqdm

    from securefed.fl.planning import resolve_device

    varying = ("epsilons", "seeds", "datasets", "device")
    fixed = {k: v for k, v in asdict(grid).items() if k not in varying}
    out, rows = open_suite(
        out_dir, suite="privacy-audit", grid={"base": fixed}, required=REQUIRED_COLUMNS
    )
    done = {(r["dataset"], r["epsilon"], r["seed"]) for r in rows}
    cells = [
        (d, e, s)
        for d in grid.datasets
        for s in grid.seeds
        for e in grid.epsilons
        if (d, e, s) not in done
    ]
    env = environment()
    device = resolve_device(grid.device)
    for d, e, s in tqdm(cells, desc="audits", disable=not progress):
        data, channels, classes = _load(d, grid.data_dir, grid.site_size, s)
        row = audit_site(
            dataset=data,
            model=_model(channels, classes, s),
            epsilon=e,
            canaries=grid.canaries,
            epochs=grid.epochs,
            batch_size=grid.batch_size,
            lr=grid.lr,
            max_grad_norm=grid.max_grad_norm,
            device=device,
        )
        row.update(dataset=d, epsilon=e, seed=s, device=str(device), environment=env)
        rows.append(row)
        write_rows(out, rows)
    write_rows(out, rows)
    write_atomic(out / "summary.md", _summary(rows, grid))
    return out / "results.json"


def _fmt(x: float | None) -> str:
    return "∞ (no noise)" if x is None else f"{x:g}"


def _summary(rows: list[dict[str, Any]], grid: AuditGrid) -> str:
    lines = [
        "# Empirical privacy audit (one run, white-box gradient canaries)",
        "",
        f"One site of {grid.site_size} records, {grid.epochs} epochs at B = {grid.batch_size}, "
        f"C = {grid.max_grad_norm}, {grid.canaries} Dirac gradient canaries (coins ±1 from "
        "the site's secret randomness). eps_emp is a lower bound at "
        f"{CONFIDENCE:.0%} confidence (Steinke, Nasr & Jagielski 2023, delta included); the "
        "analytical epsilon is the ledger's replace-one PLD figure. A lower bound below the "
        "claim is consistent with it; one above it refutes it.",
        "",
    ]
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["epsilon"]), []).append(r)
    lines += [
        "| data set | target ε | analytical ε | eps_emp, mean ± std over seeds | largest eps_emp "
        "| eps_emp ≤ analytical ε | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (d, e), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], math.inf if kv[0][1] is None else kv[0][1])
    ):
        emp = [r["eps_emp"] for r in group]
        spent = [r["epsilon_spent"] for r in group]
        below = (
            "n/a (no claim)"
            if e is None
            else ("yes" if all(x <= y for x, y in zip(emp, spent)) else "**NO**")
        )
        lines.append(
            f"| {d} | {_fmt(e)} | {mean_std(spent)} | {mean_std(emp)} | {max(emp):.3f} "
            f"| {below} | {len(group)} |"
        )
    lines += [
        "",
        "Per seed:",
        "",
        "| data set | target ε | analytical ε | eps_emp | correct / guesses | σ | q | steps "
        "| seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r["dataset"],
            math.inf if r["epsilon"] is None else r["epsilon"],
            r["seed"],
        ),
    ):
        spent = "∞" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        lines.append(
            f"| {r['dataset']} | {_fmt(r['epsilon'])} | {spent} | {r['eps_emp']:.3f} "
            f"| {r['correct']} / {r['guesses']} | {r['noise_multiplier']:.3f} "
            f"| {r['sample_rate']:.4g} | {r['steps']} | {r['seed']} |"
        )
    return "\n".join(lines) + "\n"
