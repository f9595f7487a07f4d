"""``securefed bench``: the benchmark suites."""

from __future__ import annotations

from pathlib import Path

import click

from securefed.cli.options import option
from securefed.config import DEVICES, TEACHERS, TWIN_PRIVACY

__all__ = ["bench"]


@click.group()
def bench() -> None:
    """Benchmark suites; each writes results.json, results.csv and summary.md to --out."""


def _bench_options(default_seeds: str):
    """Options every suite takes: --out, --quick, --seeds, --device."""

    def deco(fn):
        fn = option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)(fn)
        fn = option(
            "--seeds",
            default=None,
            show_default=default_seeds,
            help="Comma-separated seeds; tables show mean ± std over them.",
        )(fn)
        fn = option("--quick", is_flag=True, help="A small grid: minutes on 2 CPU cores.")(fn)
        return option(
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            help="Output folder [default: bench-out/SUITE]; a finished cell there is not rerun.",
        )(fn)

    return deco


def _seeds(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise click.BadParameter("comma-separated integers", param_hint="--seeds") from exc


def _epsilons(text: str) -> tuple[float | None, ...]:
    try:
        return tuple(None if e.strip() == "inf" else float(e) for e in text.split(","))
    except ValueError as exc:
        raise click.BadParameter("comma-separated numbers or inf", param_hint="--epsilons") from exc


def _done(path: Path) -> None:
    click.echo(f"results: {path}\nsummary: {path.parent / 'summary.md'}")


def _medmnist_options(fn):
    """``--data-dir`` and ``--dataset`` of the suites that read MedMNIST."""
    fn = option("--dataset", default="pneumoniamnist", show_default=True, help="Data set name.")(fn)
    return option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        show_default="~/.medmnist",
        help="MedMNIST folder.",
    )(fn)


#: The shared real sets' folder, for suites that read them.
_DATA_DIR = option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default="../shared/data",
    show_default=True,
    help="Folder holding the real sets' .npz files.",
)


@bench.command("secure-agg")
@_bench_options(default_seeds="0 (3 repeats)")
def bench_secure_agg(out, quick, seeds, device) -> None:
    """Cost of masking and CKKS vs plaintext, by model size, sites and dropout.

    Timing cells keep the fastest of their repeats (machine noise, not seed variance):
    --seeds S1,S2,... sets the inputs' seed (the first) and the number of repeats.
    """
    from securefed.bench.secure_agg import run_secure_agg_bench

    grid = None
    if seeds is not None:
        chosen = _seeds(seeds, (0,))
        grid = {"seed": chosen[0], "repeats": len(chosen)}
    out = Path(out or "bench-out/secure-agg")
    _done(run_secure_agg_bench(out_dir=out, quick=quick, progress=True, grid=grid))


@bench.command("privacy-utility")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@_medmnist_options
@option(
    "--epsilons",
    default=None,
    show_default="1,2,4,8,inf",
    help="Comma-separated ε, inf = no DP.",
)
@option("--rounds", type=int, default=None, help="Rounds per run [default: 10; quick 3].")
def bench_privacy_utility(out, quick, seeds, device, data_dir, dataset, epsilons, rounds):
    """ε × {fedavg, ftl} × {none, mask, he}: accuracy, convergence, time, bytes, spent ε."""
    import dataclasses

    from securefed.bench.privacy_utility import (
        QUICK_PU,
        PrivacyUtilityGrid,
        run_privacy_utility,
    )

    grid = QUICK_PU if quick else PrivacyUtilityGrid()
    base = dict(grid.base, device=device)
    if rounds is not None:
        base["rounds"] = rounds
    grid = dataclasses.replace(
        grid,
        dataset=dataset,
        data_dir=data_dir,
        base=base,
        seeds=_seeds(seeds, grid.seeds),
        epsilons=_epsilons(epsilons) if epsilons else grid.epsilons,
    )
    out = Path(out or "bench-out/privacy-utility")
    _done(run_privacy_utility(out_dir=out, grid=grid, progress=True))


@bench.command("scaling")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@option(
    "--sites", default=None, show_default="2,5,10,20,50,100", help="Comma-separated site counts."
)
def bench_scaling(out, quick, seeds, device, sites):
    """2 -> 100 sites at fixed total data: seconds per round and peak memory."""
    import dataclasses

    from securefed.bench.scaling import QUICK_SCALING, ScalingGrid, run_scaling

    grid = QUICK_SCALING if quick else ScalingGrid()
    try:
        site_list = tuple(int(n) for n in sites.split(",")) if sites else grid.sites
    except ValueError as exc:
        raise click.BadParameter("comma-separated integers", param_hint="--sites") from exc
    grid = dataclasses.replace(
        grid,
        sites=site_list,
        seeds=_seeds(seeds, grid.seeds),
        base=dict(grid.base, device=device),
    )
    _done(run_scaling(out_dir=Path(out or "bench-out/scaling"), grid=grid, progress=True))


@bench.command("seeds")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@_medmnist_options
def bench_seeds(out, quick, seeds, device, data_dir, dataset):
    """The paper-style experiments: FL vs CFL vs FTL, and global model vs digital twin."""
    import dataclasses

    from securefed.bench.seeds import run_seeds_suite
    from securefed.bench.strategies import QUICK, ComparisonGrid
    from securefed.bench.twins import QUICK_TWINS, TwinGrid

    chosen = _seeds(seeds, (0,) if quick else (0, 1, 2))
    comparison = QUICK if quick else ComparisonGrid()
    comparison = dataclasses.replace(
        comparison,
        dataset=dataset,
        data_dir=data_dir,
        seeds=chosen,
        base=dict(comparison.base, device=device),
    )
    twins = QUICK_TWINS if quick else TwinGrid()
    twins = dataclasses.replace(twins, seeds=chosen, base=dict(twins.base, device=device))
    out = Path(out or "bench-out/seeds")
    _done(run_seeds_suite(out_dir=out, comparison=comparison, twins=twins, progress=True))


@bench.command("strategies")
@_bench_options(default_seeds="0")
@_medmnist_options
@option(
    "--arms",
    default="fl,cfl,ftl",
    show_default=True,
    help="Comma-separated: fl, fedprox, cfl, ftl (frozen backbone), ftl-last (head and last "
    "block), ftl-all (fine-tune all).",
)
@option("--epsilons", default="8,inf", show_default=True, help="Comma-separated ε; inf = no DP.")
@option("--rounds", type=int, default=None, help="Rounds per run [default: 10; quick 4].")
@option("--model", default=None, help="Model for every arm [default: auto].")
def bench_strategies(out, quick, seeds, device, data_dir, dataset, arms, epsilons, rounds, model):
    """FL vs CFL vs FTL on the same non-IID sites (accuracy, P/R/F1, convergence)."""
    import dataclasses

    from securefed.bench.strategies import QUICK, ComparisonGrid, run_strategy_comparison

    grid = QUICK if quick else ComparisonGrid()
    base = dict(grid.base, device=device)
    if rounds is not None:
        base["rounds"] = rounds
    if model is not None:
        base["model"] = model
    grid = dataclasses.replace(
        grid,
        dataset=dataset,
        data_dir=data_dir,
        arms=tuple(a.strip() for a in arms.split(",")),
        epsilons=_epsilons(epsilons),
        seeds=_seeds(seeds, (0,)),
        base=base,
    )
    out = Path(out or "bench-out/strategies")
    _done(run_strategy_comparison(out_dir=out, grid=grid, progress=True))


@bench.command("twins")
@_bench_options(default_seeds="0")
@option("--epsilons", default="inf,8", show_default=True, help="Comma-separated ε; inf = no DP.")
@option("--model", default=None, help="Segmentation model [default: unet].")
@option(
    "--arms",
    default=None,
    help="Comma-separated: fl (from scratch), ftl (public-pretrained, encoder frozen), "
    "ftl-last (only the last decoder stage trains), ftl-head (only the output layer trains) "
    "[default: fl,ftl; quick: fl].",
)
@option(
    "--twin-privacy",
    type=click.Choice(TWIN_PRIVACY),
    default="dp",
    show_default=True,
    help="Under DP, twins train with DP-SGD in the site's ε (dp) or without DP, staying at the "
    "site (local; docs/twins.md).",
)
def bench_twins(out, quick, seeds, device, epsilons, model, arms, twin_privacy):
    """Digital twins: global vs twin Dice per hospital (3D segmentation, 9 sites)."""
    import dataclasses

    from securefed.bench.twins import QUICK_TWINS, TwinGrid, run_twin_bench

    grid = QUICK_TWINS if quick else TwinGrid()
    base = dict(grid.base, device=device)
    if twin_privacy != "dp":
        # Only when asked, so a suite folder from before the option resumes unchanged.
        base["twin_privacy"] = twin_privacy
    if model is not None:
        base["model"] = model
    other_model = model not in (None, "unet", "auto")
    if arms is None:
        # ftl freezes the unet's encoder by name; other models keep the ftl-last arm.
        chosen = tuple(a if a != "ftl" or not other_model else "ftl-last" for a in grid.arms)
    else:
        chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    if other_model and "ftl" in chosen:
        raise click.UsageError(
            "--arms ftl freezes the unet's encoder; with another --model use fl or ftl-last"
        )
    grid = dataclasses.replace(
        grid, epsilons=_epsilons(epsilons), seeds=_seeds(seeds, (0,)), base=base, arms=chosen
    )
    _done(run_twin_bench(out_dir=Path(out or "bench-out/twins"), grid=grid, progress=True))


@bench.command("real-data")
@_bench_options(default_seeds="0,1,2")
@_DATA_DIR
@option(
    "--sets",
    default="pneumoniamnist,breastmnist,brain_tumor_mri_96",
    show_default=True,
    help="Comma-separated data sets (file names without .npz).",
)
@option("--arms", default="fl,cfl,ftl", show_default=True, help="Comma-separated arms.")
@option("--epsilons", default="inf,8", show_default=True, help="Comma-separated ε; inf = no DP.")
def bench_real_data(out, quick, seeds, device, data_dir, sets, arms, epsilons):
    """FL, CFL and FTL × {no DP, ε} on real data sets, with default settings, over seeds."""
    from securefed.bench.real_data import RealDataGrid, run_real_data
    from securefed.bench.real_data import quick as quick_grid

    grid = RealDataGrid(
        data_dir=data_dir,
        sets=tuple(s.strip() for s in sets.split(",")),
        arms=tuple(a.strip() for a in arms.split(",")),
        epsilons=_epsilons(epsilons),
        seeds=_seeds(seeds, (0, 1, 2)),
        base={**RealDataGrid.default_base(), "device": device},
    )
    if quick:
        grid = quick_grid(grid)
    _done(run_real_data(out_dir=Path(out or "bench-out/real-data"), grid=grid, progress=True))


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1", param_hint=flag)


@bench.command("training")
@option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder [default: bench-out/training]; a finished row there is not rerun.",
)
@option("--quick", is_flag=True, help="2 repeats of 2-step rounds: minutes on 2 CPU cores.")
@option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@option(
    "--models",
    default="cnn,resnet-small,resnet18,unet",
    show_default=True,
    help="Comma-separated: cnn (28 px, batch 256 and 64), resnet-small (64 px, batch 64), "
    "resnet18 (64 px, batch 16), unet (3D, 32^3, batch 2).",
)
@option(
    "--repeats",
    type=int,
    default=None,
    show_default="5; quick 2",
    help="Measured DP and plain rounds per model (alternating, after one warm-up each).",
)
@option("--steps", type=int, default=None, show_default="4; quick 2", help="Steps per round.")
@option("--batch", type=int, default=None, show_default="per model", help="Batch for every model.")
@option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="Torch CPU threads of the step measurements (0: torch's default).",
)
@option("--skip-quickstart", is_flag=True, help="Do not run the quick start.")
@option(
    "--quickstart-rounds",
    type=int,
    default=None,
    show_default="10, the CLI's",
    help="Rounds of the quick start.",
)
def bench_training(
    out, quick, device, models, repeats, steps, batch, threads, skip_quickstart, quickstart_rounds
):
    """DP-SGD step vs plain step, samples/s, peak RSS, accounting; the quick start's wall time.

    Each model runs in its own process through SiteTrainer.train_round (DP plan vs none),
    on synthetic tensors; the quick start runs the real CLI in a child process.
    """
    import dataclasses

    from securefed.bench.training import (
        QUICK_TRAINING,
        TrainingGrid,
        default_workloads,
        run_training_bench,
    )

    for value, flag in ((repeats, "--repeats"), (steps, "--steps"), (batch, "--batch")):
        _positive(value, flag)
    _positive(quickstart_rounds, "--quickstart-rounds")
    if threads < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--threads")
    grid = QUICK_TRAINING if quick else TrainingGrid()
    grid = dataclasses.replace(
        grid,
        workloads=default_workloads(tuple(m.strip() for m in models.split(",")), batch),
        device=device,
        repeats=repeats or grid.repeats,
        steps=steps or grid.steps,
        threads=threads or None,
        quickstart=not skip_quickstart,
        quickstart_rounds=quickstart_rounds,
    )
    _done(run_training_bench(out_dir=Path(out or "bench-out/training"), grid=grid, progress=True))


@bench.command("privacy-audit")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@_DATA_DIR
@option(
    "--sets",
    default="synthetic,pneumoniamnist",
    show_default=True,
    help="Comma-separated data sets: synthetic and/or .npz names in --data-dir.",
)
@option("--epsilons", default="1,4,8,inf", show_default=True, help="Comma-separated ε; inf = σ 0.")
@option("--canaries", type=int, default=None, help="Gradient canaries [default: 1000; quick 500].")
def bench_privacy_audit(out, quick, seeds, device, data_dir, sets, epsilons, canaries):
    """Empirical ε (one-run gradient-canary audit, 95 %) against the analytical ε, per ε."""
    import dataclasses

    from securefed.bench.privacy_audit import QUICK_AUDIT, AuditGrid, run_privacy_audit

    grid = QUICK_AUDIT if quick else AuditGrid()
    grid = dataclasses.replace(
        grid,
        datasets=tuple(s.strip() for s in sets.split(",")),
        data_dir=data_dir,
        epsilons=_epsilons(epsilons),
        seeds=_seeds(seeds, grid.seeds),
        canaries=grid.canaries if canaries is None else canaries,
        device=device,
    )
    out = Path(out or "bench-out/privacy-audit")
    _done(run_privacy_audit(out_dir=out, grid=grid, progress=True))


@bench.command("privacy-unit")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@option("--epsilons", default="8", show_default=True, help="Comma-separated target ε.")
@option(
    "--records-per-patient",
    type=click.IntRange(min=2),
    default=4,
    show_default=True,
    help="k: records of each synthetic patient.",
)
def bench_privacy_unit(out, quick, seeds, device, epsilons, records_per_patient):
    """Patient-level vs record-level DP at the same ε, on synthetic patients of k records."""
    import dataclasses

    from securefed.bench.privacy_unit import QUICK_UNIT, UnitGrid, run_privacy_unit

    grid = QUICK_UNIT if quick else UnitGrid()
    eps = _epsilons(epsilons)
    if any(e is None for e in eps):
        raise click.BadParameter(
            "finite ε only (the no-dp arm is the ∞ row)", param_hint="--epsilons"
        )
    grid = dataclasses.replace(
        grid,
        records_per_patient=records_per_patient,
        epsilons=eps,
        seeds=_seeds(seeds, grid.seeds),
        base={**grid.base, "device": device},
    )
    _done(run_privacy_unit(out_dir=Path(out or "bench-out/privacy-unit"), grid=grid, progress=True))


@bench.command("semi-supervised")
@_bench_options(default_seeds="0,1,2 (quick: 0)")
@option("--epsilons", default="inf,8", show_default=True, help="Comma-separated ε; inf = no DP.")
@option(
    "--fractions",
    default=None,
    show_default="0.1,0.25,1 (quick: 0.25,1)",
    help="Comma-separated labelled fractions in (0, 1].",
)
@option("--pseudo-threshold", type=float, default=0.9, show_default=True, help="Teacher-student's.")
@option(
    "--unlabelled-weight", type=float, default=0.1, show_default=True, help="Teacher-student's."
)
@option(
    "--image-size",
    type=click.IntRange(min=16),
    default=16,
    show_default=True,
    help="Side of the cubic volumes, the sites' and the teacher's (32: a GPU's size).",
)
@option(
    "--teacher-volumes",
    type=click.IntRange(min=3),
    default=None,
    help="Public labelled volumes the teacher is pretrained on [default: 108; quick too].",
)
@option(
    "--teacher",
    "teacher_mode",
    type=click.Choice(TEACHERS),
    default="fixed",
    show_default=True,
    help="Teacher-student's: the pretrained teacher every round, or the round's global model.",
)
def bench_semi_supervised(
    out,
    quick,
    seeds,
    device,
    epsilons,
    fractions,
    pseudo_threshold,
    unlabelled_weight,
    image_size,
    teacher_volumes,
    teacher_mode,
):
    """Teacher-student vs supervised-only at labelled fractions F (3D segmentation, 3 sites)."""
    import dataclasses

    from securefed.bench.semi_supervised import QUICK_SEMI, SemiGrid, run_semi_supervised

    grid = QUICK_SEMI if quick else SemiGrid()
    try:
        fracs = (
            grid.fractions if fractions is None else tuple(float(f) for f in fractions.split(","))
        )
    except ValueError as exc:
        raise click.BadParameter("comma-separated numbers", param_hint="--fractions") from exc
    grid = dataclasses.replace(
        grid,
        fractions=fracs,
        epsilons=_epsilons(epsilons),
        seeds=_seeds(seeds, grid.seeds),
        base={
            **grid.base,
            "device": device,
            "data_options": {**grid.base["data_options"], "image_size": image_size},
        },
        teacher={
            **grid.teacher,
            "data_options": {
                **grid.teacher["data_options"],
                "image_size": image_size,
                **({} if teacher_volumes is None else {"n_train": teacher_volumes}),
            },
        },
        pseudo_threshold=pseudo_threshold,
        unlabelled_weight=unlabelled_weight,
        teacher_mode=teacher_mode,
    )
    _done(
        run_semi_supervised(
            out_dir=Path(out or "bench-out/semi-supervised"), grid=grid, progress=True
        )
    )
