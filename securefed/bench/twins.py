"""Digital twins: global vs per-site fine-tuned model on each hospital's own held-out data.

The shape of the paper's per-client table (global Dice vs twin Dice) for 3D tumour
segmentation across non-IID hospitals: by default the synthetic ``synthetic-seg`` hospitals
(each with its own scanner gain, contrast, noise, bias field and tumour sizes), one hospital
per site (``by-group``), a 3D UNet, with and without DP. Each cell is a ``securefed train``
run under ``OUT/runs/<cell>``; finished cells are read back, so the suite resumes.

Arms:

* ``fl``: FedAvg from a random initialisation (the paper's setting);
* ``ftl``: federated transfer learning. A UNet pretrained once per suite, without DP, on
  another draw of synthetic-seg (other hospitals, with their own scanner styles: an open
  labelled set no site holds) is the start; its encoder is frozen and the decoder trains
  under DP (Tramèr & Boneh 2021; De et al. 2022: DP-SGD learns far more from few records
  when public pretraining fixes most of the network). Twins fine-tune the same
  trainable part.
* ``ftl-last``: the same with only the decoder's last stage and the 1x1 head trainable
  (``--freeze backbone-except-last``): fewer coordinates share the noise.
* ``ftl-head``: only the 1x1 output convolution trains (``--freeze backbone``, 68 weights for
  4 classes): the global model barely moves from the public one. Its DP twins still take
  about 2x the largest signal in noise, above the bar at which a site warns
  (``securefed.fl.site_runtime.MAX_TWIN_NOISE_RATIO``), and ended below the global model.

``pretrained.json`` holds the pretrained model's own mean Dice on each seed's pooled test
split, before any federated training: what the public data alone gives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from securefed.bench.common import (
    Cell,
    check_pretrain,
    mean_std,
    open_suite,
    pretrain_once,
    run_cells,
    write_atomic,
)
from securefed.config import RunConfig
from securefed.errors import ConfigError

__all__ = ["ARMS", "TwinGrid", "QUICK_TWINS", "REQUIRED_COLUMNS", "run_twin_bench"]

#: The arms a grid may hold.
ARMS = ("fl", "ftl", "ftl-last", "ftl-head")

#: The 3D UNet's encoder (``securefed.models`` ``unet``), frozen by the ``ftl`` arm.
UNET_ENCODER = "conv_0,down_1,down_2,down_3,down_4"

REQUIRED_COLUMNS = ("epsilon", "seed", "client_id", "global_score", "twin_score", "metric")


def _public() -> dict[str, Any]:
    # Another draw (seed 1000: other hospitals, other scanner styles), as large as the
    # federation's training data; public, so pretrained without DP and long enough to fit.
    return {
        "data_options": {"n_train": 108, "n_val": 18, "n_test": 18, "image_size": 32},
        "seed": 1000,
        "epochs": 30,
        "batch_size": 4,
        "lr": 0.05,
    }


@dataclass(frozen=True)
class TwinGrid:
    """What to run.

    Attributes:
        base: RunConfig settings shared by every cell.
        epsilons: Target epsilons; ``None`` is the non-private run.
        seeds: Run seeds.
        arms: Which of :data:`ARMS` run.
        public: How the ``ftl`` arms' start is pretrained (``securefed pretrain`` arguments).
        ftl_freeze: ``--freeze`` of the ``ftl`` arm (the encoder, for the ``unet``).

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
    arms: tuple[str, ...] = ("fl", "ftl")
    public: dict[str, Any] = field(default_factory=_public)
    ftl_freeze: str = UNET_ENCODER

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(
                f"twins arms are {', '.join(ARMS)}, each at most once (got {self.arms!r})"
            )

    def freeze(self, arm: str) -> str | None:
        """The ``--freeze`` of ``arm`` (``None``: the strategy's own)."""
        return {
            "ftl": self.ftl_freeze,
            "ftl-last": "backbone-except-last",
            "ftl-head": "backbone",
        }.get(arm)


QUICK_TWINS = TwinGrid(
    base={
        **TwinGrid().base,
        "data_options": {"n_train": 36, "n_val": 18, "n_test": 18, "image_size": 32},
        "rounds": 3,
        "local_epochs": 1,
        "personalize": 2,
    },
    epsilons=(None,),
    arms=("fl",),
)


def _cell_key(arm: str, eps: float | None, seed: int) -> str:
    # The fl arm keeps the key it had before arms existed, so older suites resume.
    prefix = "" if arm == "fl" else f"{arm}-"
    return f"{prefix}eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}"


def _rows_from_run(run: Path, *, arm: str, eps: float | None, seed: int) -> list[dict[str, Any]]:
    metrics = json.loads((run / "metrics.json").read_text())
    privacy = json.loads((run / "privacy.json").read_text())
    primary = metrics["primary_metric"]
    eps_by_site = {c["client_id"]: c["epsilon"] for c in privacy["clients"]}
    rows = []
    for r in metrics.get("personalization") or []:
        rows.append(
            {
                "arm": arm,
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
                # Tumour vs background over all voxels: a model that predicts no tumour scores
                # 0 here, while its mean Dice still counts classes absent from a volume as 1.
                "global_test_voxel_f1": metrics["final"].get("voxel_f1"),
                "total_seconds": metrics["total_seconds"],
                "run_dir": str(run),
            }
        )
    return rows


def _arm_of(row: dict[str, Any]) -> str:
    return row.get("arm", "fl")  # rows written before arms existed are fl rows


def _summary(
    out: Path, rows: list[dict[str, Any]], grid: TwinGrid, zero_shot: dict[str, Any] | None
) -> None:
    metric = rows[0]["metric"] if rows else "mean_dice"
    lines = [
        "# Digital twins: global vs twin per site",
        "",
        f"Settings: {json.dumps(grid.base)}. Each site's twin is the served model fine-tuned "
        f"for {grid.base.get('personalize')} epoch(s) on the site's own data "
        + (
            "(under DP without noise, `--twin-privacy local`: the twin stays at the site, and "
            "its metric is the site's one release outside ε)"
            if grid.base.get("twin_privacy") == "local"
            else "(with DP-SGD when DP is on, accounted in the site's ε)"
        )
        + f"; both are scored on the site's held-out data. Metric: {metric}.",
        "",
    ]
    if zero_shot is not None:
        scores = [v.get(metric) for v in zero_shot["by_seed"].values()]
        f1 = [v.get("voxel_f1") for v in zero_shot["by_seed"].values()]
        lines += [
            f"ftl arms start from a UNet pretrained without DP on public data "
            f"({json.dumps(grid.public)}); frozen: `{grid.ftl_freeze}` (ftl), "
            "`backbone-except-last` (ftl-last), `backbone` (ftl-head). That model alone, "
            f"before any federated training, on the pooled test split: {metric} "
            f"{mean_std(scores)}, voxel F1 {mean_std([v for v in f1 if v is not None])}.",
            "",
        ]
    for arm in grid.arms:
        for eps in grid.epsilons:
            cell = [r for r in rows if r["epsilon"] == eps and _arm_of(r) == arm]
            if not cell:
                continue
            label = "∞ (no DP)" if eps is None else f"{eps:g}"
            lines += [
                f"## {arm}, ε = {label}",
                "",
                f"| site | held-out | global {metric} | twin {metric} | gain |",
                "|---|---|---|---|---|",
            ]
            for cid in sorted({r["client_id"] for r in cell}):
                rs = [r for r in cell if r["client_id"] == cid]
                lines.append(
                    f"| {cid} | {rs[0]['num_heldout']} "
                    f"| {mean_std([r['global_score'] for r in rs])}"
                    f" | {mean_std([r['twin_score'] for r in rs])}"
                    f" | {mean_std([r['gain'] for r in rs])} |"
                )
            # By the run's own gain: a local twin's is against the global figure rounded as
            # the twin's is (two decimals), so a tie is not read as a win.
            wins = sum(r["gain"] is not None and r["gain"] >= 0 for r in cell)
            runs = {r["run_dir"]: r for r in cell}.values()
            f1 = [v for r in runs if (v := r.get("global_test_voxel_f1")) is not None]
            lines += [
                f"| **mean** | | **{mean_std([r['global_score'] for r in cell])}** | "
                f"**{mean_std([r['twin_score'] for r in cell])}** | "
                f"**{mean_std([r['gain'] for r in cell])}** |",
                "",
                f"Twin ≥ global on {wins} of {len(cell)} site-runs; global model on the pooled "
                f"test split: {mean_std([r['global_test_score'] for r in runs])}"
                + (f", voxel F1 {mean_std(f1)}" if f1 else "")
                + ".",
                "",
            ]
    lines += ["![global vs twin](twins.png)", ""]
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


def _plot(out: Path, rows: list[dict[str, Any]], grid: TwinGrid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        (arm, eps)
        for arm in grid.arms
        for eps in grid.epsilons
        if any(r["epsilon"] == eps and _arm_of(r) == arm for r in rows)
    ]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (arm, eps) in zip(axes[0], panels):
        cell = [r for r in rows if r["epsilon"] == eps and _arm_of(r) == arm]
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
        ax.set_title(f"{arm}, ε = {'∞ (no DP)' if eps is None else f'{eps:g}'}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "twins.png", dpi=120)
    plt.close(fig)


def _zero_shot(out: Path, grid: TwinGrid, weights: Path) -> dict[str, Any]:
    """The pretrained model's own figures on each seed's pooled test split (no training)."""
    import torch

    from securefed.data.dataset import load_dataset
    from securefed.fl.planning import resolve_device
    from securefed.fl.tasks import build_task
    from securefed.models import ModelSpec, build_model
    from securefed.models.transfer import load_pretrained

    path = out / "pretrained.json"
    done = json.loads(path.read_text()) if path.exists() else {"by_seed": {}}
    for seed in grid.seeds:
        if str(seed) in done["by_seed"]:
            continue
        dev = resolve_device(grid.base.get("device", "auto"))
        bundle = load_dataset(
            name=grid.base["dataset"], seed=seed, **dict(grid.base.get("data_options") or {})
        )
        built = build_model(
            name=grid.base["model"],
            spec=ModelSpec(
                in_channels=bundle.in_channels,
                num_classes=bundle.num_classes,
                spatial_dims=bundle.spatial_dims,
                task=bundle.task,
                image_shape=tuple(bundle.image_shape),
            ),
        )
        load_pretrained(built.module, path=weights, head_prefixes=built.head_prefixes)
        task = build_task(
            name=bundle.task,
            num_classes=bundle.num_classes,
            label_convention=getattr(bundle, "label_convention", None),
        )
        with torch.no_grad():
            res = task.evaluate(model=built.module.to(dev), split=bundle.test, device=dev)
        done["by_seed"][str(seed)] = {k: res.get(k) for k in (*task.headline, "voxel_f1")}
    write_atomic(path, json.dumps(done, indent=2) + "\n")
    return done


def run_twin_bench(*, out_dir: Path, grid: TwinGrid, progress: bool = True) -> Path:
    """Run (or resume) every cell; write results.json/.csv, summary.md and twins.png.

    Returns:
        The path of ``results.json``.

    """
    # Before the folder is claimed: a refused pretrain leaves it as it was.
    if any(arm != "fl" for arm in grid.arms):
        check_pretrain(Path(out_dir) / "pretrained", base=grid.base, settings=grid.public)
    out, rows = open_suite(out_dir, suite="twins", grid=asdict(grid), required=REQUIRED_COLUMNS)
    done = {_cell_key(_arm_of(r), r["epsilon"], r["seed"]) for r in rows}
    weights = zero_shot = None
    if any(arm != "fl" for arm in grid.arms):
        weights = pretrain_once(
            out / "pretrained", base=grid.base, settings=grid.public, progress=progress
        )
        zero_shot = _zero_shot(out, grid, weights)

    def config(arm: str, eps: float | None, seed: int) -> RunConfig:
        cfg = RunConfig().replace(**grid.base, dp_epsilon=eps, seed=seed)
        if arm == "fl":
            return cfg
        return cfg.replace(strategy="ftl", pretrained=str(weights), freeze=grid.freeze(arm))

    cells = [
        Cell(
            key=_cell_key(arm, eps, seed),
            config=config(arm, eps, seed),
            to_rows=partial(_rows_from_run, arm=arm, eps=eps, seed=seed),
        )
        for seed in grid.seeds
        for arm in grid.arms
        for eps in grid.epsilons
    ]
    rows = run_cells(out=out, cells=cells, rows=rows, done=done, progress=progress)
    _summary(out, rows, grid, zero_shot)
    _plot(out, rows, grid)
    return out / "results.json"
