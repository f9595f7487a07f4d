"""``securefed train`` and ``securefed pretrain``.

``train``'s RunConfig options are generated (:mod:`securefed.cli.options`); only the options
that are not settings of the run (``--config``, ``--no-dp``, ``--out``, ``--quiet``,
``--resume``) are written here. ``deploy run`` takes the same ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from securefed.cli.options import (
    config_from_flags,
    data_options_from_flag,
    field_option,
    option,
    run_config_options,
)
from securefed.config import DEVICES, FUSIONS, TASKS

__all__ = [
    "CONFIG_OPTION",
    "NO_DP_OPTION",
    "exit_if_nothing_applied",
    "pretrain",
    "run_line",
    "train",
]

#: ``--config``: the settings file the flags override (train and deploy run).
CONFIG_OPTION = option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help="Read settings from a JSON file (e.g. a run's config.json); flags override it.",
)
#: ``--no-dp``: a second way to say ``--dp-epsilon inf``, listed right after it.
NO_DP_OPTION = option(
    "--no-dp", is_flag=True, help="Non-private baseline (same as --dp-epsilon inf)."
)


@click.command()
@CONFIG_OPTION
@run_config_options(after={"dp_epsilon": [NO_DP_OPTION]})
@option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    show_default="runs/<timestamp>",
    help="Output folder.",
)
@option("--quiet", "-q", is_flag=True, help="No progress bars.")
@option(
    "--resume",
    "resume",
    type=click.Path(file_okay=False),
    default=None,
    show_default="none",
    help="Continue an interrupted run from its last complete round (the RUN.partial-* folder "
    "it left); other options must be the run's own or left out.",
)
def train(config_file, no_dp, out, quiet, data_option, resume, **flags) -> None:
    """Train one model across simulated sites with DP-SGD and secure aggregation.

    \b
    Exit codes:
      0    trained
      1    no round was applied (files written; the model is the untrained initial one)
      2    bad input: one line naming the flag, checked before anything slow starts
      130  interrupted (Ctrl-C): the completed rounds are kept for --resume
    """  # noqa: D301 (click's \b keeps a paragraph as written)
    from securefed.validate import validate_inputs

    base = None
    if resume:
        from securefed.run import resume_config

        base = resume_config(Path(resume))
    config = config_from_flags(config_file, no_dp, data_option, flags, base=base)
    validate_inputs(config)  # milliseconds; before the training stack is even imported
    from securefed.run import RunInterrupted
    from securefed.run import train as run_train

    try:
        run_dir = run_train(
            config,
            out_dir=Path(out) if out else None,
            progress=not quiet,
            resume=Path(resume) if resume else None,
        )
    except RunInterrupted as exc:
        # One line, exit 130 (as a shell reports SIGINT); click would print only "Aborted".
        click.echo(str(exc), err=True)
        sys.exit(130)
    exit_if_nothing_applied(run_dir)
    click.echo(run_line(run_dir))


def exit_if_nothing_applied(run_dir: Path) -> None:
    """Exit 1 with one line when no round changed the model; warn when some did not.

    A run whose every round aborted (e.g. too few sites left to unmask) still writes its
    files, so the user can see what happened, but its model is the untrained initial one
    and its sites spent privacy: a script must not read it as a result.
    """
    import json

    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    failed = [r for r in rounds if not r.get("applied", True)]
    if not failed:
        return
    first = failed[0]
    why = f"round {first['round']}: {str(first.get('error') or 'not applied').rstrip('.')}"
    if len(failed) < len(rounds):
        click.echo(
            f"warning: {len(failed)} of {len(rounds)} rounds were not applied ({why})", err=True
        )
        return
    dp = json.loads((run_dir / "privacy.json").read_text()).get("dp")
    click.echo(
        f"error: no round was applied ({why}); {run_dir} holds the untrained initial model"
        + (", and the sites' privacy budget was spent" if dp else ""),
        err=True,
    )
    sys.exit(1)


def run_line(run_dir: Path) -> str:
    """The one line a finished run prints: scores, privacy, secure aggregation, time."""
    import json

    privacy = json.loads((run_dir / "privacy.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    f = metrics["final"]
    eps = privacy["epsilon"]
    dp = (
        f"ε={eps:.2f} (target {privacy['target_epsilon']}, δ={privacy['delta']:.1e})"
        if privacy["dp"]
        else "no DP"
    )
    if metrics.get("task", "classification") == "segmentation":
        scores = f"mean Dice {f['mean_dice']:.3f}, mean IoU {f['mean_iou']:.3f}"
    else:
        auc = f"{f['auc']:.3f}" if f.get("auc") is not None else "n/a"
        scores = f"accuracy {f['accuracy']:.3f}, macro F1 {f['macro_f1']:.3f}, AUC {auc}"
    twins = metrics["rounds"][-1].get("site_mean", {}) if metrics["rounds"] else {}
    primary = metrics.get("primary_metric", "accuracy")
    twin = (
        f", sites {twins[primary]:.3f} -> twins {twins['twin_' + primary]:.3f}"
        if twins.get("twin_" + primary) is not None
        else ""
    )
    return (
        f"{run_dir}: {scores}{twin}, {dp}, secure-agg {privacy['secure_aggregation']}, "
        f"strategy {metrics.get('strategy', 'fedavg')}, {metrics['total_seconds']:.1f} s"
    )


@click.command()
@option("--dataset", default="synthetic", show_default=True, help="Public source data set.")
@option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="MedMNIST folder.",
)
@option(
    "--data",
    type=click.Path(),
    default=None,
    show_default="none (use --dataset)",
    help="A data folder or .npz file.",
)
@field_option("data_options")
@option(
    "--model",
    default="auto",
    show_default=True,
    help="Model to pretrain; auto picks it from the data as `train` does.",
)
@option(
    "--public-fraction",
    type=float,
    default=0.0,
    show_default=True,
    help="Pretrain on only this declared-public share of the training split (0: all of it, "
    "for a data set no site holds).",
)
@option("--public-seed", type=int, default=0, show_default=True, help="Public split seed.")
@option(
    "--epochs",
    type=int,
    default=None,
    show_default="enough for about 1,000 steps, 10 to 200",
    help="Training epochs (lr follows a cosine schedule to 0 over them).",
)
@option("--batch-size", type=int, default=64, show_default=True, help="Batch size.")
@option("--lr", type=float, default=0.05, show_default=True, help="SGD learning rate.")
@option("--seed", type=int, default=0, show_default=True, help="Init and shuffle seed.")
@option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@option("--fusion", type=click.Choice(FUSIONS), default="early", show_default=True)
@option(
    "--task",
    type=click.Choice(TASKS),
    default="auto",
    show_default=True,
    help="The data set's task, checked (segmentation: a teacher for --strategy teacher-student).",
)
@option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pretrain(out, quiet, data_option, **options) -> None:
    """Pretrain on public data (no DP, no privacy cost) for `train --strategy ftl`.

    Writes OUT/model.safetensors (with provenance metadata) and OUT/pretrain.json, with the
    model's figures on the validation and test splits; warns on stderr when it does no better
    than chance or its validation loss kept rising.
    """
    import json

    from securefed.fl.pretrain import pretrain as run_pretrain

    if not 0 <= options["public_fraction"] < 1:
        raise click.BadParameter("must be in [0, 1)", param_hint="--public-fraction")
    path = run_pretrain(
        out=Path(out),
        progress=not quiet,
        data_options=data_options_from_flag(data_option),
        **options,
    )
    info = json.loads((path.parent / "pretrain.json").read_text())
    for warning in info["warnings"]:
        click.echo(f"warning: pretrain: {warning}", err=True)
    held = "; ".join(
        f"{split} {_pretrain_scores(figures)}" for split, figures in info["heldout"].items()
    )
    click.echo(
        f"{path}: {info['source']['public_samples']} public samples; {held}; no privacy cost"
    )


def _pretrain_scores(figures: dict) -> str:
    """``accuracy 0.91, balanced accuracy 0.88, AUC 0.95 (majority class 0.74)``."""
    if "majority_class_accuracy" not in figures:  # segmentation: its headline figures
        return ", ".join(
            f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float) and k != "loss"
        )
    auc = "n/a" if figures.get("auc") is None else f"{figures['auc']:.3f}"
    return (
        f"accuracy {figures['accuracy']:.3f}, balanced accuracy "
        f"{figures['balanced_accuracy']:.3f}, AUC {auc} "
        f"(majority class {figures['majority_class_accuracy']:.3f})"
    )
