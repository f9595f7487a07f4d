"""The ``securefed`` command line: a thin click layer over the library."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import click

from securefed.config import (
    ACCOUNTANTS,
    DEVICES,
    FUSIONS,
    LEGACY_ACCOUNTANTS,
    PERSONALIZE_WHEN,
    SCHEDULES,
    SECURE_AGG_MODES,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    TASKS,
    RunConfig,
)
from securefed.errors import SecureFedError

__all__ = ["main", "cli"]

_DEFAULTS = RunConfig()


class _Epsilon(click.ParamType):
    """A positive float, or ``inf`` for no DP."""

    name = "EPS|inf"

    def convert(self, value, param, ctx):  # noqa: D102
        if isinstance(value, float):
            return value
        try:
            eps = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'inf'", param, ctx)
        if math.isnan(eps) or eps <= 0:
            self.fail(f"must be positive or 'inf' (got {value})", param, ctx)
        return eps


class _Option(click.Option):
    """An option whose shown default may differ from its parse-time default.

    `train`'s options parse to None so that a ``--config`` file can supply the value, so
    click's own ``show_default=True`` would show nothing: ``show_default=<RunConfig default>``
    shows that value instead, as ``[default: 3]`` (click would print a string as ``(3)``).
    Needs click >= 8.2 (``Option.get_help_extra``).
    """

    def get_help_extra(self, ctx: click.Context):  # noqa: D102
        extra = super().get_help_extra(ctx)
        shown = self.show_default
        if shown is not None and not isinstance(shown, bool):
            extra["default"] = _shown(shown)
        return extra


def _shown(value) -> str:
    """A default as a user would type it: 'inf', '1e-05', 'none', '60,40,40,60'."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _option(*names: str, **kwargs):
    """``click.option`` with :class:`_Option`: ``show_default=<value>`` prints that value."""
    return click.option(*names, cls=_Option, **kwargs)


def _partition_help() -> str:
    return (
        "How training data is split across sites: iid | dirichlet:ALPHA | by-label:K | "
        "by-group (one hospital group per site, e.g. synthetic-seg)."
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="securefed")
def cli() -> None:
    """securefed: federated learning for medical imaging with DP-SGD and secure aggregation.

    Every run writes config.json, metrics.json (+ .csv), privacy.json, model.safetensors and
    summary.md with plots; `securefed audit RUN_DIR` re-checks its privacy claims.
    """


@cli.command()
@_option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help="Read settings from a JSON file (e.g. a run's config.json); flags override it.",
)
@_option(
    "--dataset",
    default=None,
    show_default=_DEFAULTS.dataset,
    help="'synthetic' (offline default), a MedMNIST v2 name, read from DATA_DIR/NAME.npz, or "
    "module:function returning a DatasetBundle (see securefed.register_dataset).",
)
@_option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="Folder with MedMNIST .npz files. Nothing is downloaded.",
)
@_option(
    "--data",
    type=click.Path(),
    default=None,
    show_default="none (use --dataset)",
    help="An image-folder tree (train/<class>/*.png, optional val/, test/) or a .npz file.",
)
@_option(
    "--data-option",
    "data_option",
    multiple=True,
    metavar="KEY=VALUE",
    show_default="none",
    help="Loader option, repeatable: e.g. --data-option n_train=108 --data-option "
    "image_size=32 (synthetic-seg), image_size=64 (NIfTI).",
)
@_option(
    "--num-classes",
    type=int,
    default=None,
    show_default="largest training label + 1",
    help="Number of classes K of an .npz that declares none (no `class_names` array); any "
    "label outside [0, K) is refused.",
)
@_option(
    "--model",
    default=None,
    show_default=_DEFAULTS.model,
    help="Model from the registry: cnn, densenet121, resnet18 (classification); unet, "
    "vit-unet (segmentation); or module:function building an nn.Module from a ModelSpec.",
)
@_option(
    "--clients", type=int, default=None, show_default=_DEFAULTS.clients, help="Number of sites."
)
@_option("--partition", default=None, show_default=_DEFAULTS.partition, help=_partition_help())
@_option(
    "--rounds", type=int, default=None, show_default=_DEFAULTS.rounds, help="Federated rounds."
)
@_option(
    "--local-epochs",
    type=int,
    default=None,
    show_default=_DEFAULTS.local_epochs,
    help="Local epochs per round.",
)
@_option(
    "--batch-size",
    type=int,
    default=None,
    show_default=_DEFAULTS.batch_size,
    help="Expected batch size (DP: Poisson sampling rate 1/ceil(n/B)).",
)
@_option(
    "--max-physical-batch-size",
    type=click.IntRange(min=1),
    default=None,
    show_default="whole batch",
    help="Run at most N records through the model at once; a larger batch is split and its "
    "gradients accumulated into the same single DP step (same privacy, less memory).",
)
@_option(
    "--lr", type=float, default=None, show_default=_DEFAULTS.lr, help="Local SGD learning rate."
)
@_option(
    "--momentum",
    type=float,
    default=None,
    show_default=_DEFAULTS.momentum,
    help="Local SGD momentum.",
)
@_option(
    "--client-fraction",
    type=float,
    default=None,
    show_default=_DEFAULTS.client_fraction,
    help="Fraction of sites sampled per round (not used as privacy amplification).",
)
@_option(
    "--dp-epsilon",
    type=_Epsilon(),
    default=None,
    show_default=_DEFAULTS.dp_epsilon,
    help="Target ε per site over the whole run; 'inf' for the non-private baseline.",
)
@_option("--no-dp", is_flag=True, help="Non-private baseline (same as --dp-epsilon inf).")
@_option(
    "--dp-delta",
    type=float,
    default=None,
    show_default="1e-5",
    help="Largest δ a site may use; each site lowers it to at most 1/(10 n) for its own size n.",
)
@_option(
    "--max-grad-norm",
    type=float,
    default=None,
    show_default=_DEFAULTS.max_grad_norm,
    help="Per-sample gradient clipping bound C.",
)
@_option(
    "--accountant",
    type=click.Choice(ACCOUNTANTS + LEGACY_ACCOUNTANTS),
    default=None,
    show_default=_DEFAULTS.accountant,
    help="Accountant for calibration and reporting: dp_accounting PLD, replace-one adjacency "
    "(Opacus' prv/rdp/gdp account add/remove neighbours and are refused).",
)
@_option(
    "--disclose-site-sizes/--keep-site-sizes",
    "disclose_site_sizes",
    default=None,
    show_default="keep",
    help="Write each site's training-set size and class counts into the run's files, or keep "
    "them at the sites.",
)
@_option(
    "--secure-agg",
    type=click.Choice(SECURE_AGG_MODES),
    is_flag=False,
    flag_value="mask",
    default=None,
    show_default=_DEFAULTS.secure_agg,
    help="Secure aggregation: none | mask (pairwise masking; the bare flag) | he (CKKS).",
)
@_option(
    "--secagg-threshold",
    type=int,
    default=None,
    show_default="2/3 majority",
    help="Masking: Shamir threshold t within a neighbourhood.",
)
@_option(
    "--secagg-neighbors",
    type=int,
    default=None,
    show_default="all sites",
    help="Masking: SecAgg+ neighbours per site, ~O(log n).",
)
@_option(
    "--secagg-ring-bits",
    type=click.Choice(["32", "64"]),
    default=None,
    show_default=_DEFAULTS.secagg_ring_bits,
    help="Masking: fixed-point ring Z_(2^k).",
)
@_option(
    "--secagg-clip",
    type=float,
    default=None,
    show_default=_DEFAULTS.secagg_clip,
    help="Masking: largest |n_i * update| per coordinate; beyond it values are clipped "
    "and counted.",
)
@_option(
    "--he-poly-modulus-degree",
    type=int,
    default=None,
    show_default=_DEFAULTS.he_poly_modulus_degree,
    help="CKKS ring degree N (slots N/2).",
)
@_option(
    "--he-coeff-bits",
    default=None,
    show_default=_DEFAULTS.he_coeff_mod_bit_sizes,
    help="CKKS coefficient modulus bit sizes, comma-separated.",
)
@_option(
    "--he-scale-bits",
    type=int,
    default=None,
    show_default=_DEFAULTS.he_scale_bits,
    help="CKKS scale 2^bits.",
)
@_option(
    "--dropout-clients",
    type=float,
    default=None,
    show_default=0,  # RunConfig's 0.0: a count, shown as one
    help="Simulated dropouts per round: a count K, or a rate in (0, 1).",
)
@_option(
    "--dropout-phase",
    type=click.Choice(["after", "before"]),
    default=None,
    show_default=_DEFAULTS.dropout_phase,
    help="Sites drop after uploading their masked input (recovered) or before.",
)
@_option(
    "--seed",
    type=int,
    default=None,
    show_default=_DEFAULTS.seed,
    help="Seed for data, partition, init, augmentation and site sampling (DP noise: see "
    "--reproducible-noise).",
)
@_option(
    "--device",
    type=click.Choice(DEVICES),
    default=None,
    show_default=_DEFAULTS.device,
    help="Where to train.",
)
@_option(
    "--conv-acc-tol",
    type=float,
    default=None,
    show_default=_DEFAULTS.conv_acc_tol,
    help="Convergence: accuracy change below this counts as stable.",
)
@_option(
    "--conv-loss-tol",
    type=float,
    default=None,
    show_default=_DEFAULTS.conv_loss_tol,
    help="Convergence: loss change below this counts as stable.",
)
@_option(
    "--conv-patience",
    type=int,
    default=None,
    show_default=_DEFAULTS.conv_patience,
    help="Convergence: consecutive stable rounds required.",
)
@_option(
    "--task",
    type=click.Choice(TASKS),
    default=None,
    show_default=_DEFAULTS.task,
    help="classification or segmentation; auto follows the data set.",
)
@_option(
    "--fusion",
    type=click.Choice(FUSIONS),
    default=None,
    show_default=_DEFAULTS.fusion,
    help="Multi-modal input: early (modalities as channels) or late (one encoder each).",
)
@_option(
    "--augment/--no-augment",
    default=None,
    show_default="--augment" if _DEFAULTS.augment else "--no-augment",
    help="TorchIO augmentation of training data (flip, affine, elastic, bias field, noise).",
)
@_option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=None,
    show_default=_DEFAULTS.strategy,
    help="fedavg | fedprox | ftl (transfer from --pretrained) | cfl (clustered, IFCA).",
)
@_option(
    "--prox-mu",
    type=float,
    default=None,
    show_default="0.01 for fedprox",
    help="FedProx weight mu.",
)
@_option(
    "--server-opt",
    type=click.Choice(SERVER_OPTIMIZERS),
    default=None,
    show_default=_DEFAULTS.server_opt,
    help="Server optimizer on the aggregate: none (FedAvg) | avgm (FedAvgM) | adam (FedAdam).",
)
@_option(
    "--server-lr",
    type=float,
    default=None,
    show_default="1; adam 0.01",
    help="Server step size.",
)
@_option(
    "--server-momentum",
    type=float,
    default=None,
    show_default=_DEFAULTS.server_momentum,
    help="FedAvgM momentum / FedAdam beta1.",
)
@_option(
    "--pretrained",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help="Start from these safetensors weights (see `securefed pretrain`).",
)
@_option(
    "--freeze",
    default=None,
    show_default="none; backbone for ftl",
    help="none | backbone | comma-separated module prefixes.",
)
@_option(
    "--public-fraction",
    type=float,
    default=None,
    show_default=_DEFAULTS.public_fraction,
    help="Share of the training split declared public (pretraining); sites get the rest.",
)
@_option(
    "--public-seed",
    type=int,
    default=None,
    show_default=_DEFAULTS.public_seed,
    help="Seed of the public/private split; must match `securefed pretrain`.",
)
@_option(
    "--schedule",
    type=click.Choice(SCHEDULES),
    default=None,
    show_default=_DEFAULTS.schedule,
    help="parallel, or cyclic (the model visits the sites in turn; no secure aggregation).",
)
@_option(
    "--clusters",
    type=int,
    default=None,
    show_default=_DEFAULTS.clusters,
    help="cfl: number of cluster models K.",
)
@_option(
    "--personalize",
    type=int,
    default=None,
    show_default=_DEFAULTS.personalize,
    help="Digital twins: fine-tuning epochs per site on its own data (0 = off).",
)
@_option(
    "--personalize-when",
    type=click.Choice(PERSONALIZE_WHEN),
    default=None,
    show_default=_DEFAULTS.personalize_when,
    help="Fine-tune the twins after the last round only, or after every round.",
)
@_option(
    "--personalize-lr",
    type=float,
    default=None,
    show_default="--lr",
    help="Learning rate of twin fine-tuning.",
)
@_option(
    "--reproducible-noise",
    is_flag=True,
    default=None,
    help="Derive DP noise and Poisson sampling from --seed (research only: anyone who knows "
    "the seed can replay a site's training, so ε does not hold against them).",
)
@_option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    show_default="runs/<timestamp>",
    help="Output folder.",
)
@_option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_option(
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
    config = _config_from_flags(config_file, no_dp, data_option, flags, base=base)
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
    _exit_if_nothing_applied(run_dir)
    click.echo(_run_line(run_dir))


def _exit_if_nothing_applied(run_dir: Path) -> None:
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


def _config_from_flags(config_file, no_dp, data_option, flags, base=None) -> RunConfig:
    """A RunConfig from ``--config`` and the run flags (shared by train and deploy run).

    ``base`` (a resumed run's configuration) is what the flags change when no ``--config``
    is given.
    """
    if config_file:
        base = RunConfig.from_json(config_file)
    elif base is None:
        base = RunConfig()
    changes = {k: v for k, v in flags.items() if v is not None}
    if data_option:
        changes["data_options"] = _data_options(data_option)
    if "secagg_ring_bits" in changes:
        changes["secagg_ring_bits"] = int(changes["secagg_ring_bits"])
    if "he_coeff_bits" in changes:
        try:
            changes["he_coeff_mod_bit_sizes"] = tuple(
                int(b) for b in changes.pop("he_coeff_bits").split(",")
            )
        except ValueError as exc:
            raise click.BadParameter(
                "comma-separated integers, e.g. 60,40,40,60", param_hint="--he-coeff-bits"
            ) from exc
    if "dp_epsilon" in changes and math.isinf(changes["dp_epsilon"]):
        changes["dp_epsilon"] = None
    if no_dp:
        changes["dp_epsilon"] = None
    return base.replace(**changes)


def _data_options(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse (numbers, lists)."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(
                f"expected KEY=VALUE (got {pair!r})", param_hint="--data-option"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run_line(run_dir: Path) -> str:
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


@cli.command()
@_option("--dataset", default="synthetic", show_default=True, help="Public source data set.")
@_option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="MedMNIST folder.",
)
@_option(
    "--data",
    type=click.Path(),
    default=None,
    show_default="none (use --dataset)",
    help="A data folder or .npz file.",
)
@_option("--model", default="cnn", show_default=True, help="Model to pretrain.")
@_option(
    "--public-fraction",
    type=float,
    default=0.0,
    show_default=True,
    help="Pretrain on only this declared-public share of the training split (0: all of it, "
    "for a data set no site holds).",
)
@_option("--public-seed", type=int, default=0, show_default=True, help="Public split seed.")
@_option("--epochs", type=int, default=10, show_default=True, help="Training epochs.")
@_option("--batch-size", type=int, default=64, show_default=True, help="Batch size.")
@_option("--lr", type=float, default=0.05, show_default=True, help="SGD learning rate.")
@_option("--seed", type=int, default=0, show_default=True, help="Init and shuffle seed.")
@_option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@_option("--fusion", type=click.Choice(FUSIONS), default="early", show_default=True)
@_option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@_option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pretrain(out, quiet, **options) -> None:
    """Pretrain on public data (no DP, no privacy cost) for `train --strategy ftl`.

    Writes OUT/model.safetensors (with provenance metadata) and OUT/pretrain.json.
    """
    import json

    from securefed.fl.pretrain import pretrain as run_pretrain

    if not 0 <= options["public_fraction"] < 1:
        raise click.BadParameter("must be in [0, 1)", param_hint="--public-fraction")
    path = run_pretrain(out=Path(out), progress=not quiet, **options)
    info = json.loads((path.parent / "pretrain.json").read_text())
    scores = ", ".join(
        f"{k} {v:.3f}" for k, v in info["final"].items() if isinstance(v, float) and k != "loss"
    )
    click.echo(
        f"{path}: {info['source']['public_samples']} public samples, {scores} "
        "(test split); no privacy cost"
    )


@cli.command()
@click.argument("run_dir", type=click.Path())
@_option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_option(
    "--site-keys",
    "site_keys_file",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="none",
    help='Trusted site public keys, JSON {"<client_id>": "<hex>"}; the report\'s keys must '
    "equal them. Without it the report's keys are self-asserted.",
)
@_option(
    "--allow-reproducible-noise",
    is_flag=True,
    help="Accept a run whose DP noise came from a seed (test runs only: anyone with the seed "
    "can subtract the noise).",
)
def audit(run_dir, as_json, site_keys_file, allow_reproducible_noise) -> None:
    """Check RUN_DIR's privacy claims against its configuration and execution record.

    \b
    Proves: each DP site's claim (sigma, q, C, delta, planned steps, ledger events,
    epsilon, bound to config.json by run_sha256) carries a valid Ed25519 signature by
    the site's key; the report agrees with config.json (DP on/off, target epsilon,
    rounds, epochs, batch size, secure aggregation, accountant); the ledger has one
    event per round metrics.json lists the site in, of epochs x 1/q steps; sigma is the
    calibrated value; the ledger's epsilon, recomputed with dp_accounting (PLD,
    replace-one), is within the target and not above the claim; the noise was secret.

    \b
    Cannot prove: that noise was drawn at all (a site that skips it signs the same
    claim; the signature makes the site accountable for its claim, no more). Without
    --site-keys the keys are self-asserted by the report: anyone who rewrites the report
    can re-sign it with keys of their own. Pin the keys the sites published.

    \b
    Exit codes:
      0  every claim holds
      1  a claim fails
      2  input unreadable or malformed (or a 1.x report, which predates secret noise)
      3  the run makes no DP claim (config and report agree DP is off): not "verified"
    """  # noqa: D301 (click's \b keeps a paragraph as written)
    from securefed.dp.audit import TOLERANCE, audit_run, load_site_keys
    from securefed.errors import AuditError

    try:
        trusted = load_site_keys(site_keys_file) if site_keys_file else None
        result = audit_run(
            run_dir,
            site_keys=trusted,
            site_keys_source=site_keys_file,
            allow_reproducible_noise=allow_reproducible_noise,
        )
    except AuditError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "ok": result.ok,
                    "exit_code": result.exit_code,
                    "dp_claim": result.dp_claim,
                    "site_keys": result.keys,
                    "checks": [c.__dict__ for c in result.checks],
                    "sites": result.rows,
                    "tolerance": TOLERANCE,
                },
                indent=2,
            )
        )
    else:
        if result.rows:
            click.echo(
                f"{'site':>4} {'n':>6} {'delta':>8} {'q':>8} {'sigma':>8} {'steps':>6} "
                f"{'claimed ε':>10} {'PLD ε':>8}"
            )
            for r in result.rows:
                n = "-" if r["num_samples"] is None else r["num_samples"]
                click.echo(
                    f"{r['client_id']:>4} {n:>6} {r['delta']:>8.2g} {r['sample_rate']:>8.4f} "
                    f"{r['noise_multiplier']:>8.4f} {r['steps']:>6} {r['claimed']:>10.4f} "
                    f"{r['pld']:>8.4f}"
                )
            click.echo(
                "(PLD, replace-one, recomputed with Google's dp_accounting from the report's "
                "ledger; no RDP column: dp_accounting's RDP cannot do replace-one under Poisson "
                "sampling; n '-' = not disclosed)"
            )
        for c in result.checks:
            click.echo(f"[{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if result.dp_claim and result.rows:
            click.echo(
                "site keys: "
                + (
                    f"pinned by {site_keys_file}"
                    if result.keys == "pinned"
                    else "self-asserted by the report (not pinned; pass --site-keys)"
                )
            )
        if not result.ok:
            click.echo("audit: some claims FAIL")
        elif not result.dp_claim:
            click.echo("audit: no DP claim to verify (DP off in config and report)")
        else:
            click.echo("audit: all claims hold")
    sys.exit(result.exit_code)


@cli.group()
def bench() -> None:
    """Benchmark suites; each writes results.json, results.csv and summary.md to --out."""


def _bench_options(default_seeds: str):
    """Options every suite takes: --out, --quick, --seeds, --device."""

    def deco(fn):
        fn = _option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)(fn)
        fn = _option(
            "--seeds",
            default=None,
            show_default=default_seeds,
            help="Comma-separated seeds; tables show mean ± std over them.",
        )(fn)
        fn = _option("--quick", is_flag=True, help="A small grid: minutes on 2 CPU cores.")(fn)
        return _option(
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
@_option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="MedMNIST folder.",
)
@_option("--dataset", default="pneumoniamnist", show_default=True, help="Data set name.")
@_option(
    "--epsilons",
    default=None,
    show_default="1,2,4,8,inf",
    help="Comma-separated ε, inf = no DP.",
)
@_option("--rounds", type=int, default=None, help="Rounds per run [default: 10; quick 3].")
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
@_option(
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
@_option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="MedMNIST folder.",
)
@_option("--dataset", default="pneumoniamnist", show_default=True, help="Data set name.")
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
@_option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_default="~/.medmnist",
    help="MedMNIST folder.",
)
@_option("--dataset", default="pneumoniamnist", show_default=True, help="Data set name.")
@_option(
    "--arms",
    default="fl,cfl,ftl",
    show_default=True,
    help="Comma-separated: fl, fedprox, cfl, ftl (frozen backbone), ftl-all (fine-tune all).",
)
@_option("--epsilons", default="8,inf", show_default=True, help="Comma-separated ε; inf = no DP.")
@_option("--rounds", type=int, default=None, help="Rounds per run [default: 10; quick 4].")
@_option("--model", default=None, help="Model for every arm [default: cnn].")
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
@_option("--epsilons", default="inf,8", show_default=True, help="Comma-separated ε; inf = no DP.")
@_option("--model", default=None, help="Segmentation model [default: unet].")
def bench_twins(out, quick, seeds, device, epsilons, model):
    """Digital twins: global vs twin Dice per hospital (3D segmentation, 9 sites)."""
    import dataclasses

    from securefed.bench.twins import QUICK_TWINS, TwinGrid, run_twin_bench

    grid = QUICK_TWINS if quick else TwinGrid()
    base = dict(grid.base, device=device)
    if model is not None:
        base["model"] = model
    grid = dataclasses.replace(
        grid, epsilons=_epsilons(epsilons), seeds=_seeds(seeds, (0,)), base=base
    )
    _done(run_twin_bench(out_dir=Path(out or "bench-out/twins"), grid=grid, progress=True))


@cli.command()
@click.argument("folder", type=click.Path())
def report(folder) -> None:
    """Render FOLDER's summary.md and a self-contained report.html (a run or a bench suite)."""
    from securefed.report.html import render_report

    summary, page = render_report(Path(folder))
    click.echo(f"{summary}\n{page}")


@cli.command()
@_option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@_option(
    "--hosts",
    default="127.0.0.1,localhost",
    show_default=True,
    help="Comma-separated names/IPs the sites dial the server by (certificate SANs).",
)
@_option("--sites", type=int, default=3, show_default=True, help="Site key pairs to make.")
@_option("--days", type=int, default=30, show_default=True, help="Validity in days.")
@_option("--overwrite", is_flag=True, help="Replace existing files.")
def certs(out, hosts, sites, days, overwrite) -> None:
    """Create a TEST certificate authority, server certificate and site keys (for trials).

    A hospital deployment uses certificates from its own PKI, with the same file names:
    ca.crt, server.pem, server.key, and site{i}.key / site{i}.pub for SuperNode
    authentication.
    """
    from securefed.deploy.certs import create_test_pki

    made = create_test_pki(
        folder=Path(out),
        hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()),
        sites=sites,
        days=days,
        overwrite=overwrite,
    )
    click.echo(f"test PKI in {made.folder}: ca.crt, server.pem/.key, {sites} site key pairs")


@cli.group()
def deploy() -> None:
    """Run securefed across machines on Flower: a server, one site process per hospital."""


def _tls_options(f):
    f = _option("--insecure", is_flag=True, help="No TLS (closed test networks only).")(f)
    return _option(
        "--certs",
        type=click.Path(file_okay=False, exists=True),
        default=None,
        show_default="none",
        help="Folder with ca.crt (and, for the server, server.pem/server.key).",
    )(f)


def _exec(cmd: list[str]) -> None:
    """Run a Flower process in the foreground with securefed's environment."""
    import subprocess

    from securefed.deploy.launch import flower_env

    click.echo("$ " + " ".join(cmd), err=True)
    try:
        code = subprocess.call(cmd, env=flower_env())
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@deploy.command("server")
@_tls_options
@_option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@_option("--port", type=int, default=8000, show_default=True, help="The one HTTP port.")
@_option("--node-auth", is_flag=True, help="Accept only registered site keys.")
@_option(
    "--database",
    type=click.Path(dir_okay=False),
    default=None,
    show_default="in memory",
    help="SQLite file for the server's state (node registrations survive a restart).",
)
def deploy_server(certs, insecure, host, port, node_auth, database) -> None:
    """Start the Flower SuperLink (the server) with TLS."""
    from securefed.deploy.launch import superlink_command

    _exec(
        superlink_command(
            certs=Path(certs) if certs else None,
            insecure=insecure,
            host=host,
            port=port,
            node_auth=node_auth,
            database=Path(database) if database else None,
        )
    )


@deploy.command("register")
@_tls_options
@_option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@click.argument("public_key", type=click.Path(dir_okay=False, exists=True))
def deploy_register(certs, insecure, superlink, public_key) -> None:
    """Register a site's public key (site{i}.pub) with a server started with --node-auth."""
    import subprocess
    import tempfile

    from securefed.deploy.launch import flower_env, flower_home, register_command

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        flower_home(
            home, superlink=superlink, certs=Path(certs) if certs else None, insecure=insecure
        )
        code = subprocess.call(
            register_command(public_key=Path(public_key)), env=flower_env(home=home)
        )
    sys.exit(code)


@deploy.command("site")
@_tls_options
@_option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@_option("--site-id", type=int, required=True, help="This hospital's id, 0..N-1.")
@_option("--dataset", default=None, help="Data set name [default: the run's].")
@_option("--data-dir", default=None, show_default="none", help="Folder of the data set.")
@_option("--data", default=None, show_default="none", help="This hospital's data folder or file.")
@_option(
    "--shard",
    is_flag=True,
    help="Trials: take shard SITE_ID of a data set all sites share, as in-process.",
)
@_option("--device", default=None, help="cpu, cuda or auto [default: the run's].")
@_option(
    "--runtime-port", type=int, default=None, show_default="9094 + site id", help="Local port."
)
@_option(
    "--auth-key",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="none",
    help="This site's private key (site{i}.key) for a server with --node-auth.",
)
@_option(
    "--he-key",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    show_default="none",
    help="The sites' CKKS secret context (ckks-<id>.secret) for --secure-agg he.",
)
@_option(
    "--max-epsilon",
    type=float,
    default=None,
    show_default="no limit",
    help="This hospital's policy: refuse runs targeting a larger epsilon, or no DP.",
)
@_option(
    "--max-delta",
    type=float,
    default=None,
    show_default="no limit",
    help="This hospital's policy: refuse runs whose delta bound (--dp-delta) is larger.",
)
@_option(
    "--disclose-size",
    is_flag=True,
    help="Allow this site's training-set size into the run's files (off: it stays here).",
)
@_option(
    "--signing-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="This site's Ed25519 key for its signed privacy claims; created (0600) if missing "
    "[default: site<SITE_ID>.signing.key in the current folder].",
)
@_option(
    "--allow-reproducible-noise",
    is_flag=True,
    help="Accept --reproducible-noise runs (research only: their ε does not hold against "
    "anyone who knows the seed).",
)
def deploy_site(
    certs,
    insecure,
    superlink,
    site_id,
    dataset,
    data_dir,
    data,
    shard,
    device,
    runtime_port,
    auth_key,
    he_key,
    max_epsilon,
    max_delta,
    disclose_size,
    signing_key,
    allow_reproducible_noise,
) -> None:
    """Start one hospital's Flower SuperNode, pointing at its own data.

    The site signs its privacy claim every round with its own key; the public key is printed
    here: publish it where the server's operator cannot change it, for
    `securefed audit --site-keys`.
    """
    from securefed.deploy.launch import ensure_signing_key, supernode_command

    key = Path(signing_key or f"site{site_id}.signing.key")
    cmd = supernode_command(
        superlink=superlink,
        site_id=site_id,
        certs=Path(certs) if certs else None,
        insecure=insecure,
        dataset=dataset,
        data_dir=data_dir,
        data=data,
        shard=shard,
        device=device,
        runtime_port=runtime_port,
        auth_key=Path(auth_key) if auth_key else None,
        he_key=Path(he_key) if he_key else None,
        max_epsilon=max_epsilon,
        max_delta=max_delta,
        disclose_size=disclose_size,
        signing_key=key,
        allow_reproducible_noise=allow_reproducible_noise,
    )
    # After the command's own checks (TLS choice), so a refused start writes no key.
    click.echo(f"site {site_id} signing key {key}: {ensure_signing_key(key)}", err=True)
    _exec(cmd)


@deploy.command("he-keys")
@_option("--out", type=click.Path(file_okay=True), required=True, help="Existing folder.")
@_option(
    "--he-poly-modulus-degree",
    type=int,
    default=None,
    show_default=_DEFAULTS.he_poly_modulus_degree,
    help="CKKS ring degree N.",
)
@_option(
    "--he-coeff-bits",
    default=None,
    show_default=_DEFAULTS.he_coeff_mod_bit_sizes,
    help="CKKS moduli in bits, comma-separated.",
)
@_option(
    "--he-scale-bits",
    type=int,
    default=None,
    show_default=_DEFAULTS.he_scale_bits,
    help="CKKS scale 2^bits.",
)
def deploy_he_keys(out, he_poly_modulus_degree, he_coeff_bits, he_scale_bits) -> None:
    """Create the sites' shared CKKS key set (run it at one site; copy to the others).

    Writes ckks-<id>.secret (0600, for the sites only) and ckks-<id>.public. Use the same
    --he-* options as the run. The server never needs a file: sites send it the public context.
    """
    from securefed.crypto.ckks import generate_keys, write_key_files
    from securefed.fl.simulation import _aggregator_options

    flags = {
        "he_poly_modulus_degree": he_poly_modulus_degree,
        "he_coeff_bits": he_coeff_bits,
        "he_scale_bits": he_scale_bits,
    }
    config = _config_from_flags(None, False, (), flags).replace(secure_agg="he")
    from securefed.crypto.ckks import CKKSParams

    keys = generate_keys(params=CKKSParams(**_aggregator_options(config)))
    Path(out).mkdir(parents=True, exist_ok=True)
    secret, public = write_key_files(keys, directory=out)
    click.echo(f"CKKS key set: {secret} (sites only) and {public}")


@deploy.command("run")
@_tls_options
@_option("--superlink", default="127.0.0.1:8000", show_default=True, help="host:port.")
@_option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@_option("--resume", is_flag=True, help="Continue from OUT/checkpoint after a restart.")
@_option("--fit-timeout", type=float, default=3600.0, show_default=True, help="Seconds.")
@_option("--stage-timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@_option("--connect-timeout", type=float, default=300.0, show_default=True, help="Seconds.")
@_option(
    "--stop-after",
    type=int,
    default=0,
    show_default="0: run every round",
    help="Stop after N rounds (drills).",
)
def deploy_run(
    certs,
    insecure,
    superlink,
    out,
    resume,
    fit_timeout,
    stage_timeout,
    connect_timeout,
    stop_after,
    config_file,
    no_dp,
    data_option,
    **flags,
) -> None:
    """Submit a run to a deployment and wait.

    Takes `securefed train`'s options, except what only the in-process runtime runs for now:
    cfl, twins (--personalize), --schedule cyclic, --public-fraction, --dropout-clients.
    """
    from securefed.deploy.launch import RunOptions, submit

    flags.pop("quiet", None)
    config = _config_from_flags(config_file, no_dp, data_option, flags)
    options = RunOptions(
        superlink=superlink,
        certs=Path(certs) if certs else None,
        insecure=insecure,
        out=Path(out),
        resume=resume,
        fit_timeout=fit_timeout,
        stage_timeout=stage_timeout,
        connect_timeout=connect_timeout,
        stop_after=stop_after,
    )
    run_dir = submit(config, options=options)
    click.echo(_run_line(run_dir) if (run_dir / "privacy.json").exists() else f"stopped: {run_dir}")


# `train` options the Flower runtime refuses (see check_deployable), with those that only
# qualify them. `deploy run` still parses them, so each gets check_deployable's one-line error
# (not click's "no such option"), but its --help does not offer them.
_NOT_DEPLOYABLE = {
    "schedule",
    "personalize",
    "personalize_when",
    "personalize_lr",
    "public_fraction",
    "public_seed",
    "dropout_clients",
    "dropout_phase",
    "clusters",
}


def _deploy_run_option(option: click.Parameter) -> click.Parameter:
    """`train`'s option as `deploy run` shows it: hidden if refused, cfl left out of --strategy."""
    if option.name in _NOT_DEPLOYABLE:
        option = copy.copy(option)  # train's own option stays visible
        option.hidden = True
    elif option.name == "strategy":
        option = copy.copy(option)
        option.metavar = "[fedavg|fedprox|ftl]"
        option.help = "fedavg | fedprox | ftl (transfer from --pretrained)."
    return option


# `deploy run` takes every `train` option (minus --out and --resume, which it has, and --quiet).
deploy_run.params.extend(
    _deploy_run_option(p) for p in train.params if p.name not in {"out", "quiet", "resume"}
)


def main() -> None:
    """Console entry point: library errors become one line on stderr and a non-zero exit."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except SecureFedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
