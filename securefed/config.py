"""One validated run configuration, built from CLI flags or a JSON file."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from securefed import plugins
from securefed.errors import ConfigError
from securefed.metrics import CONV_ACC_TOL, CONV_LOSS_TOL, CONV_PATIENCE, CONV_WINDOW

__all__ = [
    "RunConfig",
    "ACCOUNTANTS",
    "LEGACY_ACCOUNTANTS",
    "PRIVACY_UNITS",
    "SECURE_AGG_MODES",
    "DEVICES",
    "STRATEGIES",
    "SERVER_OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "TEACHERS",
    "TWIN_PRIVACY",
    "Flag",
    "NotAFlag",
    "cli_metadata",
    "flag_for",
]

ACCOUNTANTS = ("pld",)
#: Accountants of schema 1.x runs: Opacus' add/remove accountants (gdp also under-reported).
LEGACY_ACCOUNTANTS = ("prv", "rdp", "gdp")
#: What one epsilon protects (``--privacy-unit``): one record, or all of one patient's records.
PRIVACY_UNITS = ("record", "patient")
#: The built-in names, read off :mod:`securefed.plugins` at import; what a run may use is the
#: registries' names when it is validated (a plug-in registered later adds to them).
SECURE_AGG_MODES = plugins.SECURE_AGG.names()
STRATEGIES = plugins.STRATEGIES.names()
SERVER_OPTIMIZERS = plugins.SERVER_OPTIMIZERS.names()
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("parallel", "cyclic")
#: q-FFL's server steps (securefed.fl.qffl): FedAvg's step size, or q-FedAvg's adaptive one.
FAIR_STEPS = ("fedavg", "qffl")
TASKS = ("auto", "classification", "segmentation")
PERSONALIZE_WHEN = ("end", "every")
LR_SCHEDULES = ("constant", "cosine")
FUSIONS = ("early", "late")
#: ``teacher-student``'s teacher: the ``--pretrained`` model in every round (``fixed``), or the
#: round's global model (``global``, the only recipe before schema 3.5).
TEACHERS = ("fixed", "global")
#: How a DP run trains its digital twins: DP-SGD inside the site's epsilon (``dp``), or without
#: DP, the twin never leaving the site and its held-out metric declared as a non-DP release
#: (``local``, schema 3.6; docs/twins.md).
TWIN_PRIVACY = ("dp", "local")
# Defaults fixed in advance, never tuned on a site's data (docs/defaults.md explains each).
#: DP-SGD: learning rate for a clipped (C = 1), noised mean gradient, and its momentum.
DP_LR, DP_MOMENTUM, DP_CLIP = 2.0, 0.5, 1.0
#: DP-SGD's largest batch: each step's noise on the mean gradient falls as 1/B, so DP-SGD
#: wants large batches (De et al. 2022; Ponomareva et al. 2023, "How to DP-fy ML").
DP_BATCH = 256
#: Plain SGD: a conventional minibatch of 64, lr 0.1 per 256 records (Goyal et al. 2017),
#: momentum 0.9, no clipping.
PLAIN_BATCH, PLAIN_LR, PLAIN_MOMENTUM = 64, 0.1, 0.9
#: Fewest steps per local epoch: below it a site gets no subsampling (q = 1) and too few
#: updates per round; smaller sites use smaller batches instead.
MIN_STEPS = 4
#: Records run through the model at once on a CPU when ``--max-physical-batch-size`` is unset:
#: bounds DP-SGD's per-step buffers (the quick start peaked at 1.16-1.75 GB with whole batches
#: of ~200, 0.72-0.75 GB with 64, at about the same wall time; docs/memory.md). A GPU keeps whole
#: batches, where chunks would only leave it idle.
CPU_PHYSICAL_BATCH = 64
#: The ``--model auto`` rule (:func:`securefed.models.auto_model`): 1 before ``scatter-linear``
#: (schema < 3.3); 2 from schema 3.3 (DP on 2D images above 64 px picks it); 3 from schema 3.9
#: (DP on 2D images of any size picks it). A recorded run keeps its own.
AUTO_RULES = (1, 2, 3)
AUTO_RULE = 3
#: How sigma is searched (:func:`securefed.dp.accounting.calibrate_noise`): 1, bisection from
#: sigma = 1 (before schema 3.10); 2, a safeguarded secant from an analytic guess (schema 3.10;
#: the same guarantee in about a third of the accountant calls). A recorded run keeps its own,
#: since the audit re-derives sigma with it.
SIGMA_SEARCHES = (1, 2)
SIGMA_SEARCH = 2
#: The rings ``--secagg-ring-bits auto`` chooses among
#: (:data:`securefed.crypto.fixedpoint.RING_RULE_CHOICES`): 1, the 32- or 64-bit ring (before
#: schema 3.12); 2, any ring from 8 to 64 bits, packed on the wire (schema 3.12: 30 bits for 3
#: sites at the default clip range, 0.94x float32). A recorded run keeps its own, since the
#: audit rebuilds the ring from it.
RING_AUTO_RULES = (1, 2)
RING_AUTO_RULE = 2
#: The ring sizes ``--secagg-ring-bits`` accepts besides ``auto``.
RING_BITS_RANGE = (8, 64)


def planned_epochs(
    *,
    rounds: int,
    local_epochs: int,
    personalize: int,
    personalize_when: str,
    twin_privacy: str = "dp",
) -> int:
    """DP-SGD epochs a site may run over a whole run: every round, plus its DP twin fine-tuning.

    Privacy calibration assumes all of them; the server and the audit check a site's planned
    steps against it. Takes plain values so a run dict read from config.json can use it too.
    Twins trained without DP (``twin_privacy="local"``) spend nothing and are not counted.
    """
    dp_twins = personalize if twin_privacy != "local" else 0
    twin_runs = (rounds if personalize_when == "every" else 1) if dp_twins else 0
    return rounds * local_epochs + twin_runs * dp_twins


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class Flag:
    """How a :class:`RunConfig` field is set on the command line.

    ``securefed train`` and ``deploy run`` generate their options from these
    (:mod:`securefed.cli.options`), so a new setting is one field with its ``Flag``. Pure data:
    the click types are made in the CLI, so this module (and a library user) never imports click.

    Attributes:
        help: The option's help text.
        flag: The option (default: ``--`` + the field name with dashes).
        off: A bool field's switch-off option (``--no-augment``); without one, a bool is a bare
            flag that can only switch the setting on.
        kind: How a value is read when the annotation does not say: ``path``, ``file``,
            ``dir`` (a path; ``file``/``dir`` refuse the other), ``epsilon`` (a number or
            ``inf``), ``int-list`` (comma-separated integers), ``key-value`` (repeatable
            ``KEY=VALUE``, values read as JSON when they parse).
        min: Smallest integer accepted, checked while parsing.
        choices: Allowed values, or a :class:`securefed.plugins.Registry` whose names are read
            when the option is parsed (so a registered plug-in is offered).
        shown: How ``--help`` shows the default when it is not the field's default as typed
            (``"2/3 majority"`` for a default that is computed).
        flag_value: The value of the option given bare (``--secure-agg`` alone: ``mask``).
        deploy: Whether ``deploy run`` offers the option. ``False``: it still parses (hidden),
            so the deployment's own check refuses it in one line instead of click's "no such
            option".
        deploy_choices: The choices ``deploy run``'s help lists, when fewer than ``choices``.
        deploy_help: ``deploy run``'s help text, when it differs.

    """

    help: str
    flag: str | None = None
    off: str | None = None
    kind: str | None = None
    min: int | None = None
    choices: tuple[Any, ...] | plugins.Registry | None = None
    shown: str | None = None
    flag_value: str | None = None
    deploy: bool = True
    deploy_choices: tuple[str, ...] | None = None
    deploy_help: str | None = None


@dataclass(frozen=True)
class NotAFlag:
    """A :class:`RunConfig` field that no option sets (a config file still may), and why."""

    reason: str


def _setting(default: Any, *, not_a_flag: str | None = None, **flag: Any) -> Any:
    """A RunConfig field with its command-line metadata (``not_a_flag``: why it has none)."""
    cli = NotAFlag(not_a_flag) if not_a_flag is not None else Flag(**flag)
    return dataclasses.field(default=default, metadata={"cli": cli})


def cli_metadata(field: str) -> Flag | NotAFlag:
    """The command-line metadata of RunConfig ``field``."""
    return _FIELDS[field].metadata["cli"]


def flag_for(field: str) -> str:
    """The ``securefed train`` option that sets RunConfig ``field`` (e.g. ``--batch-size``).

    For a field no option sets: the configuration-file key.
    """
    meta = cli_metadata(field)
    if isinstance(meta, NotAFlag):
        return field
    return meta.flag or "--" + field.replace("_", "-")


def _n(field: str) -> str:
    """How an error names a field: the flag a CLI user typed, then the config-file key."""
    flag = flag_for(field)
    return f"`{field}`" if flag == field else f"`{flag}` ({field})"


def _at_most(k: int) -> str:
    return f"--dropout-clients {k} or fewer" if k > 0 else "no --dropout-clients"


def _shown(value: Any) -> str:
    """A value as a config file spells it (``null``, ``true``, ``"two"``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# What each annotation accepts, and how an error describes it.
_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "dict[str, Any]": "an object of KEY: VALUE options",
    "tuple[int, ...]": "a list of integers",
}


def _typed(field: str, annotation: str, value: Any) -> Any:
    """``value`` checked against ``annotation`` (and normalised: numpy ints, lists to tuples).

    bool is not accepted as a number and a float is not accepted as an int, even 2.0: a
    config file that says ``"rounds": 2.5`` or ``"seed": 1.0`` was written by mistake.
    """
    kinds = [k.strip() for k in annotation.split(" | ")]
    if kinds == ["int", "str"]:  # a count or a keyword (``secagg_ring_bits``: 64 or "auto")
        if isinstance(value, str):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{_n(field)} must be an integer or a string (got {_shown(value)}).")
        return int(value)
    optional = "None" in kinds
    base = next(k for k in kinds if k != "None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{_n(field)} must be {_KINDS[base]} (got null).")
    bad = ConfigError(
        f"{_n(field)} must be {_KINDS[base]}{' or null' if optional else ''} (got {_shown(value)})."
    )
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise bad
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise bad
        return bool(value)
    if base == "dict[str, Any]":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return value
    if base == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value
        ):
            raise bad
        return tuple(int(v) for v in value)
    raise AssertionError(f"RunConfig.{field}: no type check for {annotation!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a federated run; ``config.json`` is this, resolved.

    Defaults are the product's recommended settings: a user who passes only a data set
    and ``dp_epsilon`` should get a good model (the README quotes what they reach).

    Attributes:
        dataset: ``synthetic`` or a MedMNIST name (``NAME.npz`` in ``data_dir``).
        data_dir: Folder holding MedMNIST ``.npz`` files (default: ``~/.medmnist``).
        data: Path of an image-folder tree, NIfTI tree or ``.npz`` file; overrides ``dataset``.
        group_by: Where each record's patient id comes from
            (:func:`securefed.data.load_dataset`'s ``group_by``; docs/patients.md).
        data_options: Loader options, e.g. ``{"n_train": 108, "image_size": 32}`` for
            ``synthetic-seg``, ``{"image_size": 64}`` for a NIfTI tree, or
            ``{"image_size": 64, "val_fraction": 0.2}`` for an image folder.
        num_classes: Number of classes K of a data set that does not declare its classes
            (an ``.npz`` without a ``class_names`` array); ``None``: the largest training
            label + 1. A label outside [0, K) in any split is refused.
        model: Registered model name (see ``securefed.models.available_models``), or
            ``auto``: picked from the task and image size (:func:`securefed.models.auto_model`).
        auto_rule: Which rule ``auto`` follows (:data:`AUTO_RULES`): 3, today's; a run
            recorded under an older rule is replayed and resumed with the rule it ran (1 for
            one recorded before the field existed).
        sigma_search: How the noise multiplier is searched (:data:`SIGMA_SEARCHES`): 2,
            today's; a recorded run keeps its own (1, bisection, before the field existed).
        clients: Number of sites.
        partition: ``iid``, ``dirichlet:ALPHA``, ``by-label:K`` or ``by-group``.
        rounds: Federated rounds.
        local_epochs: Local epochs per round (each an expected pass over the site's data).
        batch_size: Largest expected batch B. A site of n records takes
            ``max(ceil(n/B), min_steps)`` steps per epoch (with DP, Poisson sampling at
            q = 1/steps), so its batch is about n/steps.
        min_steps: Fewest steps per local epoch (``securefed.dp.accounting.steps_per_epoch``).
        max_physical_batch_size: Most records run through the model at once (``None``:
            :data:`CPU_PHYSICAL_BATCH` on a CPU, a whole batch on a GPU; see
            :meth:`physical_batch`). Larger batches are split and their gradients
            accumulated into the same single step, so privacy and results are unchanged;
            memory is bounded.
        lr: Local learning rate (SGD with momentum) for a full batch of ``batch_size``
            (``None``: :attr:`effective_lr`); a site with a smaller batch scales it linearly.
        momentum: Local SGD momentum (``None``: 0.5 with DP, 0.9 without).
        lr_schedule: How the local learning rate changes over rounds: ``constant`` (the
            default, and how a record from before schema 3.4 ran) or ``cosine`` (round r of R
            trains at ``lr * (1 + cos(pi (r - 1) / R)) / 2``).
        client_fraction: Fraction of sites sampled each round.
        dp_epsilon: Target epsilon per site over the whole run; ``None`` disables DP.
        dp_delta: Largest delta a site may use (``None``: 1e-5). Each site lowers it to at most
            ``1/(10 n)`` for its own size n (:func:`securefed.dp.accounting.site_delta`).
        max_grad_norm: Per-sample gradient clipping bound C (``None``: 1 with DP; without DP
            no clipping, and a given value clips each batch gradient).
        accountant: ``pld``: dp_accounting's PLD accountant, replace-one adjacency (the only
            one; Opacus' add/remove accountants are refused, see ``dp/accounting.py``).
        privacy_unit: ``record`` (each training record is one unit of privacy) or
            ``patient`` (each patient: sampling over patients, per-patient clipping, so the
            accounted epsilon is per patient; needs patient ids, ``group_by``).
        calibrate: DP classification with one global model: after the last round, fit the
            decision offsets from DP-noised per-class score statistics of the sites' training
            data (:mod:`securefed.dp.calibration`), accounted within ``dp_epsilon``.
        calibration_noise: Noise multiplier of that release.
        calibration_clip: Its clipping bound R on a record's centred logits; None: by the
            model built (16 for ``scatter-linear``, 4 for others); 4 in a run recorded before
            schema 3.11.
        fair_q: q-FFL's fairness exponent q (:mod:`securefed.fl.qffl`): 0 is FedAvg; q > 0
            weighs each site's update by its DP-noised training loss to the power q
            (q-FedAvg, Li et al., ICLR 2020), so sites the model serves worst pull harder.
        fair_step: ``fedavg``: the server steps by ``Σ n F^q u / Σ n F^q`` (FedAvg's step
            size on loss-weighted updates); ``qffl``: q-FedAvg's adaptive step, whose
            denominator adds ``q F^(q-1) L ‖u‖²`` (the paper's Lipschitz term).
        fair_loss_noise: Noise multiplier of each round's loss release that q-FFL needs
            (:mod:`securefed.dp.fair_loss`), accounted within ``dp_epsilon``.
        logit_adjust: Logit adjustment for label skew (:mod:`securefed.dp.class_prior`): each
            site trains ``f(x) + log pi`` with its own class prior pi, released once under DP.
        prior_noise: Noise multiplier of that release, accounted within ``dp_epsilon``.
        audit_canaries: K > 0 makes the run an empirical privacy audit: site 0's DP-SGD
            carries K white-box gradient canaries (:mod:`securefed.dp.empirical`) and the
            report gains eps_emp, a lower bound on its epsilon. The canaries change the
            model, so such a run is an audit run, not one to deploy. 0: no audit.
        disclose_site_sizes: Every site agrees to put its training-set size and class counts
            in the run's files (off: they stay at the site; only their sum in a round's secure
            sum is released). In a deployment each site decides for itself.
        secure_agg: ``none``, ``mask`` (pairwise masking) or ``he`` (CKKS).
        secagg_threshold: Shamir threshold t (``None``: a 2/3 majority of a neighbourhood).
        secagg_neighbors: SecAgg+ neighbours per site (``None``: all other sites).
        secagg_ring_bits: Fixed-point ring Z_(2^k), k from 8 to 64, or ``auto``: the smallest
            whose rounding adds at most ``AUTO_RING_TOLERANCE`` (1e-3) per coordinate to the
            FedAvg average (:attr:`resolved_ring_bits`).
        ring_auto_rule: Which rings ``auto`` chooses among (:data:`RING_AUTO_RULES`): 2,
            today's, every k from 8 to 64; a recorded run keeps its own (1, 32 or 64 bits only,
            before the field existed).
        secagg_clip: Largest |value| the fixed-point encoder accepts per coordinate of the
            pre-scaled update ``n_i * u_i`` (and N_max, the largest weight n_i); larger values
            are clipped and counted. 1e5 (1e6 before schema 3.1): ``auto`` then takes 30 bits
            for 3 to 5 sites, 32 for 11 to 20 (every k needs about log2(n C / 1e-3) + 2).
        update_clip: Poisoning bound C_u: each site clips its whole model update (the L2
            norm of the flattened vector it aggregates, after training) to C_u before
            protecting it, and the server refuses to apply a round whose decoded sum is larger
            than such updates can make (docs/poisoning.md). ``None``: ``lr * sqrt(d)`` for a
            model of d aggregated values (each value moves by at most ``lr`` RMS a round).
        he_poly_modulus_degree: CKKS ring degree N (slots = N/2).
        he_coeff_mod_bit_sizes: CKKS coefficient moduli, in bits.
        he_scale_bits: CKKS scale 2^bits.
        dropout_clients: Simulated dropouts per round: a count K >= 1, or a rate in (0, 1).
            A setting under which no round can be aggregated is refused (masking: more than
            n - t of the n sampled sites; before uploading: every site, or all but one under
            CKKS).
        dropout_phase: ``after`` (drop after uploading, recovered by the protocol) or
            ``before`` (drop before uploading; the site's update is left out).
        seed: Seeds data generation, partitioning, model init, augmentation and participant
            sampling. Not DP noise or DP-SGD's Poisson sampling (see ``reproducible_noise``).
        device: ``auto``, ``cpu`` or ``cuda``.
        conv_acc_tol: Convergence (:func:`securefed.metrics.detect_convergence`): tolerance on
            the primary metric (accuracy or Dice) over a window, for its fitted change across
            the window and for its scatter around that trend.
        conv_loss_tol: Convergence: the same tolerance for the test loss.
        conv_patience: Convergence: consecutive flat windows needed.
        conv_window: Convergence: rounds per window (a configuration file from before schema
            2.3, without it, gets the default).
        task: ``auto`` (from the data set), ``classification`` or ``segmentation``.
        fusion: Multi-modal inputs: ``early`` (modalities as channels) or ``late``
            (one encoder per modality, logits averaged).
        augment: TorchIO augmentation of the training data (never of held-out data).
        strategy: ``fedavg``, ``fedprox``, ``ftl`` (federated transfer learning), ``cfl``
            (clustered FL, IFCA) or ``teacher-student`` (semi-supervised segmentation:
            pseudo-labels from the pretrained teacher or the received global model, see
            ``teacher``; :mod:`securefed.fl.teacher_student`).
        prox_mu: FedProx proximal weight mu (``None``: 0.01 for fedprox, 0 otherwise).
        server_opt: Server optimizer on the averaged update: ``none`` (FedAvg), ``avgm``
            (FedAvgM) or ``adam`` (FedAdam).
        server_lr: Server learning rate (``None``: 1.0 for none/avgm, 0.01 for adam).
        server_momentum: FedAvgM momentum, FedAdam beta1.
        pretrained: safetensors weights to start from (required by ``ftl`` and
            ``teacher-student``).
        freeze: What to freeze: ``none``, ``backbone``, ``backbone-except-last`` (all but
            the head and the model's last block) or comma-separated module prefixes
            (``None``: ``backbone`` for ftl, ``none`` otherwise).
        public_fraction: Share of the training split declared public (for pretraining)
            and kept away from the sites; 0 keeps every sample private.
        public_seed: Seed of the public/private split (must match ``securefed pretrain``).
        schedule: ``parallel`` (every site trains the same global model) or ``cyclic``
            (the model visits the sites one after another within a round).
        clusters: Number of cluster models K for ``cfl``.
        labelled_fraction: Share F of each site's training volumes that keep their labels:
            ``round(F * n_i)`` of site i's n_i records (at least 1), chosen by a generator
            seeded from ``seed`` and the site id. ``teacher-student`` pseudo-labels the rest;
            every other strategy trains on the labelled ones only (the supervised-only
            baseline). 1.0: every record is labelled.
        pseudo_threshold: ``teacher-student``: a voxel of an unlabelled volume gets the
            teacher's argmax class when the teacher's largest softmax probability is at
            least this (FixMatch's confidence threshold); other voxels are ignored.
        unlabelled_weight: ``teacher-student``: weight of the pseudo-label cross-entropy of
            an unlabelled volume against the Dice-CE of a labelled one.
        teacher: ``teacher-student``: which model pseudo-labels the unlabelled volumes:
            ``fixed``, the ``--pretrained`` teacher in every round (the server sends it beside
            the global model), or ``global``, the global model the site receives that round.
        personalize: Digital twins: local fine-tuning epochs per site (0 = off).
        personalize_when: ``end`` (after the last round) or ``every`` round.
        personalize_lr: Learning rate of twin fine-tuning, the same at every site (``None``:
            each site's own lr, :func:`securefed.dp.accounting.site_lr`).
        twin_privacy: Under DP, how twins train: ``dp`` (DP-SGD, accounted in the site's
            epsilon) or ``local`` (the same DP-SGD steps with sigma = 0, spending nothing). A
            local twin never leaves its site; its primary held-out metric, to two decimals, is
            then a declared non-DP release, once, after the last round, and the site refuses
            every step after it. Needs ``personalize`` and ``personalize_when="end"``.
            Without DP both are the same.
        reproducible_noise: Derive DP-SGD's noise and Poisson sampling from ``seed`` (for
            research reproducibility). Off (the default), each site draws them from a secret
            key of its own; on, anyone who knows the seed can replay a site's training, so
            the epsilon does not hold against them.

    """

    dataset: str = _setting(
        "synthetic",
        help="'synthetic' (offline default), a MedMNIST v2 name, read from DATA_DIR/NAME.npz, or "
        "module:function returning a DatasetBundle (see securefed.register_dataset).",
    )
    data_dir: str | None = _setting(
        None,
        kind="dir",
        shown="~/.medmnist",
        help="Folder with MedMNIST .npz files. Nothing is downloaded.",
    )
    data: str | None = _setting(
        None,
        kind="path",
        shown="none (use --dataset)",
        help="An image-folder tree (train/<class>/*.png, optional val/, test/) or a .npz file.",
    )
    data_options: dict[str, Any] | None = _setting(
        None,
        flag="--data-option",
        kind="key-value",
        help="Loader option, repeatable: e.g. --data-option n_train=108 --data-option "
        "image_size=32 (synthetic-seg), image_size=64 (NIfTI), image_size=64 or [H,W] and "
        "val_fraction=0.2 (image folder).",
    )
    num_classes: int | None = _setting(
        None,
        shown="largest training label + 1",
        help="Number of classes K of an .npz that declares none (no `class_names` array); any "
        "label outside [0, K) is refused.",
    )
    group_by: str | None = _setting(
        None,
        shown="none",
        help="Patient id of each record, for --privacy-unit patient: for an .npz the array "
        "suffix (patient_ids reads train_patient_ids); for image folders regex:PATTERN on file "
        "names or a CSV of file,patient; NIfTI subjects are one patient each unless "
        "regex:PATTERN merges their folder names (docs/patients.md).",
    )
    model: str = _setting(
        "auto",
        help="Model from the registry: auto (picked from the data, see docs/defaults.md), cnn, "
        "resnet-small, scatter-linear, resnet18, densenet121 (classification); unet, vit-unet "
        "(segmentation); or module:function building an nn.Module from a ModelSpec.",
    )
    auto_rule: int = _setting(
        AUTO_RULE,
        not_a_flag="the release's --model auto rule; a recorded run keeps the one it ran with",
    )
    sigma_search: int = _setting(
        SIGMA_SEARCH,
        not_a_flag="the release's noise calibration search; a recorded run keeps its own",
    )
    clients: int = _setting(3, help="Number of sites.")
    partition: str = _setting(
        "iid",
        help="How training data is split across sites: iid | dirichlet:ALPHA | by-label:K | "
        "by-group (one hospital group per site, e.g. synthetic-seg).",
    )
    rounds: int = _setting(10, help="Federated rounds.")
    local_epochs: int = _setting(2, help="Local epochs per round.")
    batch_size: int | None = _setting(
        None,
        shown="256 with DP; 64 without",
        help="Largest expected batch B; each site takes max(ceil(n/B), min-steps) steps an "
        "epoch (DP: Poisson sampling rate 1/steps), so a small site uses smaller batches. "
        "Under --privacy-unit patient, n and B count patients.",
    )
    min_steps: int = _setting(
        MIN_STEPS,
        help="Fewest optimizer steps a site takes per local epoch; a site with fewer than "
        "min-steps x B records uses batches of n/min-steps, and its learning rate shrinks "
        "in proportion.",
    )
    max_physical_batch_size: int | None = _setting(
        None,
        min=1,
        shown=f"{CPU_PHYSICAL_BATCH} on a CPU, whole batch on a GPU",
        help="Run at most N records through the model at once; a larger batch is split and its "
        "gradients accumulated into the same single step (same privacy, less memory).",
    )
    lr: float | None = _setting(
        None,
        shown="2.0 with DP; 0.1 x B/256 without",
        help="Local SGD learning rate for a full batch of --batch-size (a site whose batch is "
        "smaller scales it linearly).",
    )
    momentum: float | None = _setting(
        None, shown="0.5 with DP; 0.9 without", help="Local SGD momentum."
    )
    lr_schedule: str = _setting(
        "constant",
        choices=LR_SCHEDULES,
        help="Local learning rate over rounds: constant, or cosine (round r of R at "
        "lr*(1+cos(pi*(r-1)/R))/2; docs/defaults.md).",
    )
    client_fraction: float = _setting(
        1.0, help="Fraction of sites sampled per round (not used as privacy amplification)."
    )
    dp_epsilon: float | None = _setting(
        8.0,
        kind="epsilon",
        help="Target ε per site over the whole run; 'inf' for the non-private baseline.",
    )
    dp_delta: float | None = _setting(
        None,
        shown="1e-5",
        help="Largest δ a site may use; each site lowers it to at most 1/(10 n) for its own "
        "size n.",
    )
    max_grad_norm: float | None = _setting(
        None,
        shown="1.0 with DP; no clipping without",
        help="Per-sample gradient clipping bound C (without DP: clip each batch gradient to it, "
        "only when given).",
    )
    accountant: str = _setting(
        "pld",
        # The legacy names parse, so that RunConfig refuses them with the reason.
        choices=ACCOUNTANTS + LEGACY_ACCOUNTANTS,
        help="Accountant for calibration and reporting: dp_accounting PLD, replace-one adjacency "
        "(Opacus' prv/rdp/gdp account add/remove neighbours and are refused).",
    )
    privacy_unit: str = _setting(
        "record",
        choices=PRIVACY_UNITS,
        help="What ε protects: 'record' (one image or volume) or 'patient' (all of one "
        "patient's training records: Poisson sampling over patients, each patient's mean "
        "gradient "
        "clipped, --batch-size in patients; needs patient ids, see --group-by).",
    )
    calibrate: bool = _setting(
        True,
        off="--no-calibrate",
        help="DP classification: after the last round, set the decision threshold from "
        "DP-noised per-class score statistics of the sites' training data (accounted within "
        "--dp-epsilon; docs/calibration.md).",
    )
    calibration_noise: float = _setting(
        8.0,
        help="Noise multiplier of the calibration release (sigma per unit of its sensitivity); "
        "its privacy cost is part of --dp-epsilon.",
    )
    calibration_clip: float | None = _setting(
        None,
        help="R: the calibration's bound on the norm of a record's centred logits; its noise "
        "is sigma * R, so R changes the estimate's noise, not the privacy cost [default: 16 "
        "for scatter-linear, whose logits are large, 4 for other models; 4 in runs recorded "
        "before schema 3.11].",
    )
    fair_q: float = _setting(
        0.0,
        help="q-FFL fairness exponent q >= 0: weigh each site's update by its DP-noised "
        "training loss to the power q (q-FedAvg) so the worst-served sites pull harder; 0 is "
        "FedAvg (docs/fairness.md).",
    )
    fair_step: str = _setting(
        "fedavg",
        choices=FAIR_STEPS,
        help="q-FFL's server step: fedavg (FedAvg's step on loss^q-weighted updates) or qffl "
        "(q-FedAvg's adaptive step, whose |update|^2 term DP noise inflates; docs/fairness.md).",
    )
    fair_loss_noise: float = _setting(
        20.0,
        help="q-FFL under DP: noise multiplier of each site's per-round loss release (sigma per "
        "unit of its sensitivity); its privacy cost is part of --dp-epsilon.",
    )
    logit_adjust: bool = _setting(
        False,
        off="--no-logit-adjust",
        help="Logit adjustment against label skew: each site adds its own log class prior, "
        "released once with DP noise, to the logits it trains (docs/calibration.md).",
    )
    prior_noise: float = _setting(
        8.0,
        help="--logit-adjust under DP: noise multiplier of each site's class-count release "
        "(sigma per unit of its sensitivity); its privacy cost is part of --dp-epsilon.",
    )
    audit_canaries: int = _setting(
        0,
        help="Make this an audit run: K gradient canaries in site 0's DP-SGD give a measured "
        "lower bound eps_emp on its ε (privacy.json `empirical`); the model carries them: do "
        "not deploy it. 0: off.",
        deploy=False,
    )
    disclose_site_sizes: bool = _setting(
        False,
        off="--keep-site-sizes",
        shown="keep",
        help="Write each site's training-set size and class counts into the run's files, or keep "
        "them at the sites.",
    )
    secure_agg: str = _setting(
        "none",
        choices=plugins.SECURE_AGG,
        flag_value="mask",
        help="Secure aggregation: none | mask (pairwise masking; the bare flag) | he (CKKS).",
    )
    secagg_threshold: int | None = _setting(
        None, shown="2/3 majority", help="Masking: Shamir threshold t within a neighbourhood."
    )
    secagg_neighbors: int | None = _setting(
        None, shown="all sites", help="Masking: SecAgg+ neighbours per site, ~O(log n)."
    )
    secagg_ring_bits: int | str = _setting(
        "auto",
        kind="ring-bits",
        help="Masking: fixed-point ring Z_(2^k), k from 8 to 64 bits (k bits a value on the "
        "wire); auto: the smallest whose rounding adds at most 1e-3 per coordinate to the "
        "FedAvg average (docs/secure-aggregation.md).",
    )
    ring_auto_rule: int = _setting(
        RING_AUTO_RULE,
        not_a_flag="the release's --secagg-ring-bits auto rule; a recorded run keeps its own",
    )
    secagg_clip: float = _setting(
        1e5,
        help="Masking: largest |n_i * update| per coordinate; beyond it values are clipped "
        "and counted.",
    )
    update_clip: float | None = _setting(
        None,
        shown="lr*sqrt(d)",
        help="Poisoning bound: L2 norm each site clips its whole update to; the server refuses "
        "a round whose sum exceeds what such updates can make.",
    )
    he_poly_modulus_degree: int = _setting(8192, help="CKKS ring degree N (slots N/2).")
    he_coeff_mod_bit_sizes: tuple[int, ...] = _setting(
        (60, 60, 60, 38),
        flag="--he-coeff-bits",
        kind="int-list",
        help="CKKS coefficient modulus bit sizes, comma-separated (data primes, then the "
        "special prime).",
    )
    he_scale_bits: int = _setting(
        100,
        help="CKKS scale 2^bits; large, so the decryption's flooding noise stays below 1e-6 "
        "(see docs/ckks.md).",
    )
    dropout_clients: float = _setting(
        0.0,
        shown="0",  # a count, shown as one
        help="Simulated dropouts per round: a count K, or a rate in (0, 1).",
        deploy=False,
    )
    dropout_phase: str = _setting(
        "after",
        choices=("after", "before"),
        help="Sites drop after uploading their masked input (recovered) or before.",
        deploy=False,
    )
    seed: int = _setting(
        0,
        help="Seed for data, partition, init, augmentation and site sampling (DP noise: see "
        "--reproducible-noise).",
    )
    device: str = _setting("auto", choices=DEVICES, help="Where to train.")
    conv_acc_tol: float = _setting(
        CONV_ACC_TOL,
        help="Convergence: most the primary metric's trend may move across a window, and its "
        "scatter around the trend.",
    )
    conv_loss_tol: float = _setting(
        CONV_LOSS_TOL, help="Convergence: the same tolerance for the test loss."
    )
    conv_patience: int = _setting(
        CONV_PATIENCE, help="Convergence: consecutive flat windows required."
    )
    conv_window: int = _setting(CONV_WINDOW, help="Convergence: rounds per window (at least 3).")
    task: str = _setting(
        "auto", choices=TASKS, help="classification or segmentation; auto follows the data set."
    )
    fusion: str = _setting(
        "early",
        choices=FUSIONS,
        help="Multi-modal input: early (modalities as channels) or late (one encoder each).",
    )
    augment: bool = _setting(
        False,
        off="--no-augment",
        help="TorchIO augmentation of training data (flip, affine, elastic, bias field, noise).",
    )
    strategy: str = _setting(
        "fedavg",
        choices=plugins.STRATEGIES,
        help="fedavg | fedprox | ftl (transfer from --pretrained) | cfl (clustered, IFCA) | "
        "teacher-student (semi-supervised segmentation from a --pretrained teacher).",
    )
    prox_mu: float | None = _setting(None, shown="0.01 for fedprox", help="FedProx weight mu.")
    server_opt: str = _setting(
        "none",
        choices=plugins.SERVER_OPTIMIZERS,
        help="Server optimizer on the aggregate: none (FedAvg) | avgm (FedAvgM) | adam (FedAdam).",
    )
    server_lr: float | None = _setting(None, shown="1; adam 0.01", help="Server step size.")
    server_momentum: float = _setting(0.9, help="FedAvgM momentum / FedAdam beta1.")
    pretrained: str | None = _setting(
        None, kind="file", help="Start from these safetensors weights (see `securefed pretrain`)."
    )
    freeze: str | None = _setting(
        None,
        shown="none; backbone for ftl",
        help="none | backbone (all but the head) | backbone-except-last (head and last block "
        "train) | comma-separated module prefixes.",
    )
    public_fraction: float = _setting(
        0.0,
        help="Share of the training split declared public (pretraining); sites get the rest.",
        deploy=False,
    )
    public_seed: int = _setting(
        0, help="Seed of the public/private split; must match `securefed pretrain`.", deploy=False
    )
    schedule: str = _setting(
        "parallel",
        choices=SCHEDULES,
        help="parallel, or cyclic (the model visits the sites in turn; no secure aggregation).",
    )
    clusters: int = _setting(2, help="cfl: number of cluster models K.")
    labelled_fraction: float = _setting(
        1.0,
        help="Share of each site's training records that keep their labels (seeded by --seed "
        "and the site); teacher-student pseudo-labels the rest, other strategies drop them.",
    )
    pseudo_threshold: float = _setting(
        0.9,
        help="teacher-student: least teacher softmax confidence for a voxel's pseudo-label.",
    )
    unlabelled_weight: float = _setting(
        0.1, help="teacher-student: weight of the pseudo-label loss of an unlabelled volume."
    )
    teacher: str = _setting(
        "fixed",
        choices=TEACHERS,
        help="teacher-student: the model that pseudo-labels: the --pretrained teacher in "
        "every round (fixed), or the round's global model (global).",
    )
    personalize: int = _setting(
        0,
        help="Digital twins: fine-tuning epochs per site on its own data (0 = off).",
    )
    personalize_when: str = _setting(
        "end",
        choices=PERSONALIZE_WHEN,
        help="Fine-tune the twins after the last round only, or after every round.",
    )
    personalize_lr: float | None = _setting(
        None,
        shown="each site's lr",
        help="Learning rate of twin fine-tuning, used as is at every site.",
    )
    twin_privacy: str = _setting(
        "dp",
        choices=TWIN_PRIVACY,
        help="Under DP, digital twins train with DP-SGD inside the site's ε (dp), or without "
        "DP, staying at the site, its held-out metric a declared non-DP release (local).",
    )
    reproducible_noise: bool = _setting(
        False,
        help="Derive DP noise and Poisson sampling from --seed (research only: anyone who knows "
        "the seed can replay a site's training, so ε does not hold against them).",
    )

    def __post_init__(self) -> None:
        # Types first, so the range checks below compare numbers, never "two" or None.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f.name, str(f.type), getattr(self, f.name)))
        for name in ("dataset", "model", "partition"):
            _check(bool(getattr(self, name).strip()), f"{_n(name)} must not be empty.")
        if self.num_classes is not None:
            _check(
                self.num_classes >= 2,
                f"{_n('num_classes')} must be at least 2 (got {self.num_classes}).",
            )
        if self.num_classes is not None and "num_classes" in (self.data_options or {}):
            _check(
                self.data_options["num_classes"] == self.num_classes,
                f"{_n('num_classes')} {self.num_classes} disagrees with --data-option "
                f"num_classes={_shown(self.data_options['num_classes'])}.",
            )
        for name in (
            "clients",
            "rounds",
            "local_epochs",
            "min_steps",
            "conv_patience",
            "clusters",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"{_n(name)} must be at least 1 (got {value}).")
        if self.batch_size is not None:
            _check(
                self.batch_size >= 1,
                f"{_n('batch_size')} must be at least 1 (got {self.batch_size}).",
            )
        for name in ("seed", "public_seed", "personalize"):
            value = getattr(self, name)
            _check(value >= 0, f"{_n(name)} must be 0 or more (got {value}).")
        for name in ("lr", "max_grad_norm", "secagg_clip"):
            value = getattr(self, name)
            if value is None:
                continue
            _check(
                math.isfinite(value) and value > 0,
                f"{_n(name)} must be positive and finite (got {value}).",
            )
        # securefed.dp.calibration.MIN_NOISE_MULTIPLIER: below it the release is all budget.
        _check(
            math.isfinite(self.calibration_noise) and self.calibration_noise >= 1.0,
            f"{_n('calibration_noise')} must be at least 1 (got {self.calibration_noise}).",
        )
        # securefed.dp.calibration.MIN_CLIP and MAX_CLIP: near the smallest floats rounding
        # breaks the release's 2R sensitivity; far above any logit R only adds noise.
        if self.calibration_clip is not None:
            _check(
                math.isfinite(self.calibration_clip) and 1e-3 <= self.calibration_clip <= 1e3,
                f"{_n('calibration_clip')} must be in [0.001, 1000] (got {self.calibration_clip}).",
            )
        # securefed.dp.fair_loss.MAX_Q and MIN_NOISE_MULTIPLIER.
        _check(
            math.isfinite(self.fair_q) and 0 <= self.fair_q <= 10,
            f"{_n('fair_q')} must be in [0, 10] (got {self.fair_q}).",
        )
        _check(
            math.isfinite(self.fair_loss_noise) and self.fair_loss_noise >= 1.0,
            f"{_n('fair_loss_noise')} must be at least 1 (got {self.fair_loss_noise}).",
        )
        # securefed.dp.class_prior.MIN_NOISE_MULTIPLIER.
        _check(
            math.isfinite(self.prior_noise) and self.prior_noise >= 1.0,
            f"{_n('prior_noise')} must be at least 1 (got {self.prior_noise}).",
        )
        _check(
            not self.logit_adjust
            or (self.task != "segmentation" and self.strategy != "teacher-student"),
            f"{_n('logit_adjust')} adjusts classification logits; not for segmentation or "
            "teacher-student.",
        )
        # The counts would then leave each site twice: exactly, and once more under DP.
        _check(
            not (self.logit_adjust and self.disclose_site_sizes and self.dp_enabled),
            f"{_n('logit_adjust')} releases each site's class counts under DP, and "
            f"{_n('disclose_site_sizes')} already puts them in the run's files exactly: the "
            "release would spend epsilon for nothing; drop one of the two.",
        )
        for name in ("momentum", "server_momentum", "public_fraction"):
            value = getattr(self, name)
            if value is None:
                continue
            _check(0 <= value < 1, f"{_n(name)} must be in [0, 1) (got {value}).")
        if self.max_physical_batch_size is not None:
            _check(
                self.max_physical_batch_size >= 1,
                f"{_n('max_physical_batch_size')} must be at least 1 "
                f"(got {self.max_physical_batch_size}).",
            )
        _check(
            0 < self.client_fraction <= 1,
            f"{_n('client_fraction')} must be in (0, 1] (got {self.client_fraction}).",
        )
        _check(
            self.auto_rule in AUTO_RULES and not isinstance(self.auto_rule, bool),
            f"`auto_rule` must be one of {AUTO_RULES} (got {self.auto_rule!r}).",
        )
        _check(
            self.sigma_search in SIGMA_SEARCHES and not isinstance(self.sigma_search, bool),
            f"`sigma_search` must be one of {SIGMA_SEARCHES} (got {self.sigma_search!r}).",
        )
        _check(
            self.ring_auto_rule in RING_AUTO_RULES and not isinstance(self.ring_auto_rule, bool),
            f"`ring_auto_rule` must be one of {RING_AUTO_RULES} (got {self.ring_auto_rule!r}).",
        )
        if self.dp_epsilon is not None:
            _check(
                math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0,
                f"{_n('dp_epsilon')} must be positive and finite, or inf (config: null) for no DP "
                f"(got {self.dp_epsilon}).",
            )
        _check(
            self.audit_canaries == 0 or self.audit_canaries >= 2,
            f"{_n('audit_canaries')} must be 0 (off) or a count of at least 2 "
            f"(got {self.audit_canaries}).",
        )
        _check(
            self.privacy_unit in PRIVACY_UNITS,
            f"{_n('privacy_unit')} must be one of {', '.join(PRIVACY_UNITS)} "
            f"(got {self.privacy_unit!r}).",
        )
        _check(
            self.privacy_unit == "record" or self.dp_epsilon is not None,
            f"{_n('privacy_unit')} patient is a DP setting: it needs --dp-epsilon (not inf).",
        )
        _check(
            self.group_by is None or (isinstance(self.group_by, str) and self.group_by.strip()),
            f"{_n('group_by')} must be a non-empty key, regex:PATTERN or CSV path.",
        )
        _check(
            self.audit_canaries == 0 or self.dp_epsilon is not None,
            f"{_n('audit_canaries')} audits DP-SGD: it needs --dp-epsilon (not inf).",
        )
        if self.dp_delta is not None:
            _check(
                0 < self.dp_delta < 1,
                f"{_n('dp_delta')} must be in (0, 1) (got {self.dp_delta}).",
            )
        _check(
            self.accountant not in LEGACY_ACCOUNTANTS,
            f"{_n('accountant')} {self.accountant!r} accounts add/remove neighbours, but what a "
            "site releases (its sampling rate, a round's sample total) depends on its size, so "
            "securefed states replace-one epsilon, which only 'pld' computes: use "
            "--accountant pld.",
        )
        for name, allowed in (
            ("accountant", ACCOUNTANTS),
            ("secure_agg", plugins.SECURE_AGG.names()),
            ("device", DEVICES),
            ("dropout_phase", ("after", "before")),
        ):
            value = getattr(self, name)
            _check(
                value in allowed,
                f"{_n(name)} must be one of {', '.join(allowed)} (got {value!r}).",
            )
        low, high = RING_BITS_RANGE
        _check(
            self.secagg_ring_bits == "auto"
            or (isinstance(self.secagg_ring_bits, int) and low <= self.secagg_ring_bits <= high),
            f"{_n('secagg_ring_bits')} must be auto or an integer from {low} to {high} (got "
            f"{_shown(self.secagg_ring_bits)}).",
        )
        if self.secagg_threshold is not None:
            _check(
                self.secagg_threshold >= 1,
                f"{_n('secagg_threshold')} must be at least 1 (got {self.secagg_threshold}).",
            )
        if self.secagg_neighbors is not None:
            _check(
                self.secagg_neighbors >= 2,
                f"{_n('secagg_neighbors')} must be at least 2 (got {self.secagg_neighbors}).",
            )
        _check(
            math.isfinite(self.dropout_clients)
            and self.dropout_clients >= 0
            and (self.dropout_clients < 1 or float(self.dropout_clients).is_integer()),
            f"{_n('dropout_clients')} must be a whole count >= 1 or a rate in [0, 1) "
            f"(got {self.dropout_clients}).",
        )
        _check(
            self.conv_window >= 3,
            f"{_n('conv_window')} must be at least 3 (got {self.conv_window}).",
        )
        for name in ("conv_acc_tol", "conv_loss_tol"):
            value = getattr(self, name)
            _check(
                math.isfinite(value) and value >= 0,
                f"{_n(name)} must be 0 or more (got {value}).",
            )
        self._check_strategy()
        self._check_fairness()
        self._check_dropouts()

    def _check_strategy(self) -> None:
        for name, value, allowed in (
            ("task", self.task, TASKS),
            ("fusion", self.fusion, FUSIONS),
            ("strategy", self.strategy, plugins.STRATEGIES.names()),
            ("server_opt", self.server_opt, plugins.SERVER_OPTIMIZERS.names()),
            ("schedule", self.schedule, SCHEDULES),
            ("personalize_when", self.personalize_when, PERSONALIZE_WHEN),
            ("teacher", self.teacher, TEACHERS),
            ("twin_privacy", self.twin_privacy, TWIN_PRIVACY),
        ):
            _check(
                value in allowed,
                f"{_n(name)} must be one of {', '.join(allowed)} (got {value!r}).",
            )
        if self.prox_mu is not None:
            _check(
                math.isfinite(self.prox_mu) and self.prox_mu >= 0,
                f"{_n('prox_mu')} must be >= 0 (got {self.prox_mu}).",
            )
        for name in ("server_lr", "personalize_lr", "update_clip"):
            value = getattr(self, name)
            if value is not None:
                _check(
                    math.isfinite(value) and value > 0,
                    f"{_n(name)} must be positive and finite (got {value}).",
                )
        _check(
            0 < self.labelled_fraction <= 1,
            f"{_n('labelled_fraction')} must be in (0, 1] (got {self.labelled_fraction}).",
        )
        _check(
            0 < self.pseudo_threshold <= 1,
            f"{_n('pseudo_threshold')} must be in (0, 1] (got {self.pseudo_threshold}).",
        )
        _check(
            math.isfinite(self.unlabelled_weight) and self.unlabelled_weight >= 0,
            f"{_n('unlabelled_weight')} must be >= 0 and finite (got {self.unlabelled_weight}).",
        )
        if self.twin_privacy == "local":
            _check(self.personalize > 0, "--twin-privacy local needs twins (--personalize N).")
            # One non-DP release per site, after all of its DP ones (docs/twins.md).
            _check(
                self.personalize_when == "end",
                "--twin-privacy local fine-tunes one twin, after the last round: use "
                "--personalize-when end.",
            )
        _check(
            self.strategy != "teacher-student" or self.pretrained is not None,
            "--strategy teacher-student needs a teacher: `--pretrained` weights trained on "
            "public labelled volumes (`securefed pretrain` on a segmentation data set).",
        )
        _check(
            self.strategy != "ftl" or self.pretrained is not None,
            "--strategy ftl needs `--pretrained` weights (--pretrained FILE.safetensors; "
            "make them with `securefed pretrain`).",
        )
        _check(
            self.schedule == "parallel" or self.secure_agg == "none",
            "--schedule cyclic hands the model from site to site, so the next site sees the "
            "previous site's model: it cannot be combined with secure aggregation "
            "(use --secure-agg none, or the parallel schedule).",
        )
        _check(
            self.strategy != "cfl" or not self.dp_enabled,
            "--strategy cfl (IFCA) picks each site's cluster from its un-noised training loss, "
            "a release no DP accounting covers: run it without DP (--dp-epsilon inf), or use "
            "fedavg, fedprox, ftl or --personalize under DP.",
        )
        _check(
            self.strategy != "cfl" or self.secure_agg != "he",
            "--strategy cfl sums each cluster separately, several sums a round, and under "
            "--secure-agg he one site decrypts one sum per round (so that a server cannot have "
            "overlapping subsets decrypted and subtract them): use --secure-agg mask with cfl.",
        )
        _check(
            self.schedule == "parallel" or self.strategy in ("fedavg", "ftl", "fedprox"),
            f"--schedule cyclic has no meaning for --strategy {self.strategy}.",
        )

    def _check_fairness(self) -> None:
        """Refuse q-FFL where its server step (one weighted secure sum) has no meaning."""
        _check(
            self.fair_step in FAIR_STEPS,
            f"{_n('fair_step')} must be one of {', '.join(FAIR_STEPS)} (got {self.fair_step!r}).",
        )
        if self.fair_q == 0:
            return
        what = f"{_n('fair_q')} {self.fair_q:g} (q-FFL)"
        for ok, why in (
            (self.schedule == "parallel", "needs the parallel schedule (cyclic sums nothing)"),
            (
                self.strategy in ("fedavg", "fedprox", "ftl"),
                f"works with fedavg, fedprox or ftl, not --strategy {self.strategy}",
            ),
            (
                self.server_opt == "none" or self.fair_step == "fedavg",
                "with --fair-step qffl is its own server step (its h_k set the step size): "
                f"use --server-opt none, not {self.server_opt}",
            ),
            (self.task != "segmentation", "weighs classification losses, not segmentation"),
        ):
            _check(ok, f"{what} {why}.")

    @property
    def loader_options(self) -> dict[str, Any]:
        """Keyword options for :func:`~securefed.data.load_dataset`.

        ``data_options``, plus ``num_classes`` when set: one keyword, so the flag and a
        ``--data-option num_classes=K`` for synthetic data cannot collide.
        """
        options = dict(self.data_options or {})
        if self.num_classes is not None:
            options["num_classes"] = self.num_classes
        if self.group_by is not None:
            options["group_by"] = self.group_by
        return options

    @property
    def sites_per_round(self) -> int:
        """Sites sampled each round: ``client_fraction`` of ``clients``, at least one."""
        return min(self.clients, max(1, round(self.client_fraction * self.clients)))

    @property
    def dropouts_per_round(self) -> int:
        """Sites ``dropout_clients`` removes from each round (a count, or a rate of the sampled)."""
        k, n = self.dropout_clients, self.sites_per_round
        return min(n, int(k) if k >= 1 else int(round(k * n)))

    def _check_dropouts(self) -> None:
        """Refuse a dropout setting under which no round can ever be aggregated.

        Each round loses exactly :attr:`dropouts_per_round` of its n sampled sites, so whether
        the survivors suffice does not depend on luck: every round would abort, the model stay
        at its initialisation, and the sites still spend their privacy budget.
        """
        k, n = self.dropouts_per_round, self.sites_per_round
        if k == 0:
            return
        what = (
            f"{_n('dropout_clients')} {self.dropout_clients:g} drops {k} of the {n} sites "
            "sampled each round"
        )
        if self.secure_agg == "mask":
            self._check_mask_dropouts(k, n, what)
            return
        if self.dropout_phase == "after":
            return  # an upload that arrived is in the sum (plain, CKKS, cyclic hand-over)
        # Plaintext needs one upload; a CKKS sum of one site would decrypt to its update, so
        # (as in a deployment, which refuses it) it needs two.
        need = min(2, n) if self.secure_agg == "he" else 1
        _check(
            n - k >= need,
            f"{what} before uploading, leaving {n - k}; "
            + (
                f"--secure-agg he needs at least {need} uploads to decrypt a sum"
                if self.secure_agg == "he"
                else "no update would reach the server"
            )
            + f", so no round could be applied: use {_at_most(n - need)}, --dropout-phase "
            "after, or more --clients.",
        )

    def _check_mask_dropouts(self, k: int, n: int, what: str) -> None:
        """Masking: t of a site's m share holders must answer, whatever the dropout phase."""
        if n < 2:
            return  # the aggregator refuses secure aggregation of one site on its own
        from securefed.crypto.graph import effective_degree
        from securefed.crypto.secagg import default_threshold

        m = effective_degree(n_sites=n, neighbors=self.secagg_neighbors) + 1
        t = self.secagg_threshold
        source = "set by `--secagg-threshold`"
        if t is None:
            t, source = default_threshold(neighbourhood_size=m), "the default 2/3 majority"
        if t > m or 2 * t <= m:
            return  # the aggregator's own check names the threshold problem
        lowest = m // 2 + 1  # the smallest threshold that is still a strict majority
        hood = "" if m == n else f" of each neighbourhood of {m} (`--secagg-neighbors`)"
        # A dropped site's shares are held by its closed neighbourhood, itself included, so
        # at most m - 1 can answer for it: under SecAgg+ (m < n) t = m fails any dropout.
        _check(
            t <= m - 1,
            f"{what}, but under SecAgg+ a site's shares are held by its neighbourhood of {m} "
            f"sites (`--secagg-neighbors` {self.secagg_neighbors}), itself included, and "
            f"--secure-agg mask needs `--secagg-threshold` t = {t} ({source}) of them to "
            f"answer: a dropped site leaves at most {m - 1}, so every round would abort: use "
            f"--secagg-threshold {lowest} (the lowest majority), more --secagg-neighbors, or "
            "no --dropout-clients.",
        )
        _check(
            n - k >= t,
            f"{what}, leaving {n - k}, but --secure-agg mask needs `--secagg-threshold` "
            f"t = {t} ({source}{hood}) sites to answer, so every round would abort: use "
            f"{_at_most(n - t)}"
            + (
                f", or --secagg-threshold {lowest} (the lowest majority"
                + (f"; it survives up to {n - lowest} dropouts)" if m == n else ")")
                if lowest < t and n - lowest >= k
                else ""
            )
            + ", or more --clients.",
        )

    @property
    def resolved_ring_bits(self) -> int:
        """The masking ring: ``secagg_ring_bits``, or for ``auto`` the one it resolves to.

        ``auto`` picks, for the run's full complement of sites (``clients``: no round sums
        more) and ``secagg_clip``, the smallest ring of its rule (``ring_auto_rule``) whose
        worst-case rounding error on the FedAvg average is at most
        :data:`~securefed.crypto.fixedpoint.AUTO_RING_TOLERANCE`
        (:func:`~securefed.crypto.fixedpoint.choose_ring_bits`). Server and sites resolve it
        from the same signed configuration, so they agree.
        """
        if self.secagg_ring_bits != "auto":
            return int(self.secagg_ring_bits)
        from securefed.crypto.fixedpoint import choose_ring_bits

        return choose_ring_bits(
            clip_range=self.secagg_clip,
            n_summands=max(2, self.clients),
            rule=self.ring_auto_rule,
        )

    @property
    def effective_prox_mu(self) -> float:
        """Mu actually used: 0.01 for fedprox unless set, else the given value or 0."""
        if self.prox_mu is not None:
            return float(self.prox_mu)
        return 0.01 if self.strategy == "fedprox" else 0.0

    @property
    def effective_server_lr(self) -> float:
        """Server step size: 1.0 for FedAvg/FedAvgM, 0.01 for FedAdam unless set."""
        if self.server_lr is not None:
            return float(self.server_lr)
        return 0.01 if self.server_opt == "adam" else 1.0

    @property
    def effective_lr(self) -> float:
        """Learning rate for a full batch of B: 2.0 with DP, 0.1 x B/256 without.

        The DP default is for DP-SGD's clipped (norm <= 1) and noised mean gradient; the
        non-private one is the linear-scaling rule of Goyal et al. (2017), 0.1 per 256 records,
        for plain unclipped SGD with momentum 0.9. A site whose batch is smaller than
        ``batch_size`` scales this linearly (:func:`securefed.dp.accounting.site_lr`).
        """
        if self.lr is not None:
            return float(self.lr)
        return DP_LR if self.dp_enabled else PLAIN_LR * self.effective_batch_size / 256

    def lr_factor(self, round_index: int) -> float:
        """What round ``round_index`` (1-based) multiplies the local learning rate by.

        Cosine: 1 in round 1, falling to ``(1 + cos(pi (R - 1) / R)) / 2`` in round R (0.024
        for R = 10), never 0, so every round's training moves the model.

        Why offer it: under DP-SGD each step is a clipped (norm <= C) mean gradient plus noise
        of a fixed scale, neither of which shrinks near a minimum, so at a constant lr the
        model keeps moving and its noise keeps adding up; a decaying step is the textbook
        remedy (the cosine shape: Loshchilov & Hutter 2017). Measured, it steadies the last
        rounds but did not raise final accuracy, so it is not the default (docs/defaults.md).
        """
        if self.lr_schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (round_index - 1) / self.rounds))

    @property
    def effective_batch_size(self) -> int:
        """Largest expected batch B: 256 with DP, 64 without, unless set."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return DP_BATCH if self.dp_enabled else PLAIN_BATCH

    @property
    def effective_momentum(self) -> float:
        """Local SGD momentum: 0.5 with DP (noise averages over fewer steps), 0.9 without."""
        if self.momentum is not None:
            return float(self.momentum)
        return DP_MOMENTUM if self.dp_enabled else PLAIN_MOMENTUM

    @property
    def effective_max_grad_norm(self) -> float | None:
        """Clipping bound: C = 1 with DP unless set; without DP none unless set."""
        if self.max_grad_norm is not None:
            return float(self.max_grad_norm)
        return DP_CLIP if self.dp_enabled else None

    def physical_batch(self, device_type: str) -> int | None:
        """Records run through the model at once on ``device_type`` (``None``: whole batch).

        Chunks accumulate into the same step (equal up to float summation order), so each
        party may pick its own; the default depends on the device that trains.
        """
        if self.max_physical_batch_size is not None:
            return self.max_physical_batch_size
        return CPU_PHYSICAL_BATCH if device_type == "cpu" else None

    @property
    def effective_freeze(self) -> str:
        """What is frozen: ``backbone`` for ftl, ``none`` otherwise, unless set."""
        if self.freeze is not None:
            return self.freeze
        return "backbone" if self.strategy == "ftl" else "none"

    @property
    def planned_epochs(self) -> int:
        """Local epochs a site may run over the run (see :func:`planned_epochs`)."""
        return planned_epochs(
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            personalize=self.personalize,
            personalize_when=self.personalize_when,
            twin_privacy=self.twin_privacy,
        )

    @property
    def dp_twins(self) -> bool:
        """Whether the digital twins train with DP-SGD, inside the site's epsilon."""
        return self.dp_enabled and self.personalize > 0 and self.twin_privacy != "local"

    @property
    def local_twins(self) -> bool:
        """Whether a DP run trains its twins without DP (``--twin-privacy local``)."""
        return self.dp_enabled and self.personalize > 0 and self.twin_privacy == "local"

    @property
    def dp_enabled(self) -> bool:
        """Whether local training is DP-SGD."""
        return self.dp_epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``dp_epsilon`` None means no DP)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
        """Read a configuration file written as JSON (e.g. a previous run's ``config.json``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read configuration ({exc})") from exc
        if isinstance(data, dict) and "run" in data:
            if not isinstance(data["run"], dict):
                raise ConfigError(f"{path}: a configuration must be a JSON object")
            return cls.from_recorded(data["run"])
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a configuration must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_peer(cls, data: Any) -> RunConfig:
        """A configuration another securefed process sent: it must be of this very release.

        A deployment's server and sites each fill a missing field with their own default;
        a peer of another release would then build another model or plan (e.g. a config
        without ``auto_rule`` picks ``resnet-small`` at the server, ``scatter-linear`` at a
        newer site), which surfaces as a puzzling mismatch later. So every field must be
        present and none unknown.

        Raises:
            ConfigError: Fields missing or unknown (the message names the release mismatch),
                or the values are invalid.

        """
        if isinstance(data, dict):
            missing = sorted(set(_FIELDS) - set(data))
            unknown = sorted(set(data) - set(_FIELDS))
            if missing or unknown:
                what = f"no {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
                raise ConfigError(
                    f"the run's configuration comes from another securefed release ({what}); "
                    "run the same release at the server and every site"
                )
        return cls.from_dict(data)

    @classmethod
    def from_recorded(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuild the configuration a run recorded (config.json's ``run``, a checkpoint's).

        A record from before ``min_steps`` existed ran with ``ceil(n/B)`` steps an epoch,
        so it is read as ``min_steps = 1``: the replayed run is the one recorded. One without
        ``secagg_ring_bits`` or ``secagg_clip`` is read with the 64-bit ring and 1e6 clip range
        that masking had before ``auto``; one without ``auto_rule`` (before schema 3.3) with
        ``--model auto``'s rule 1, which never picks ``scatter-linear``; one without ``fair_q``
        (before schema 3.4) with q = 0, FedAvg, which it ran; one without ``lr_schedule``
        with the constant learning rate it ran with; a teacher-student one without
        ``teacher`` (before schema 3.5) with the ``global`` teacher, the only one there was;
        one without ``twin_privacy`` (before schema 3.6) with DP twins, the only ones there were;
        one without ``sigma_search`` (before schema 3.10) with the bisection that calibrated it;
        one without ``calibration_clip`` (before schema 3.11) with the R = 4 it released with;
        one without ``ring_auto_rule`` (before schema 3.12) with ``auto``'s 32- or 64-bit rule.
        """
        if "twin_privacy" not in data:
            data = {**data, "twin_privacy": "dp"}
        if "auto_rule" not in data:
            data = {**data, "auto_rule": 1}
        # Before schema 3.10 sigma was found by bisection.
        if "sigma_search" not in data:
            data = {**data, "sigma_search": 1}
        # Before schema 3.11 the decision calibration clipped centred logits at R = 4.
        if "calibration_clip" not in data:
            data = {**data, "calibration_clip": 4.0}
        # Before schema 3.12 --secagg-ring-bits auto chose between the 32- and 64-bit rings.
        if "ring_auto_rule" not in data:
            data = {**data, "ring_auto_rule": 1}
        # Before schema 3.5 the teacher-student teacher was the round's global model (other
        # strategies have no teacher: they take today's default, as a new run's flags do).
        if "teacher" not in data and data.get("strategy") == "teacher-student":
            data = {**data, "teacher": "global"}
        # Before schema 3.4 there was no q-FFL: every run aggregated by FedAvg.
        if "fair_q" not in data:
            data = {**data, "fair_q": 0.0}
        if "fair_loss_noise" not in data:
            data = {**data, "fair_loss_noise": 20.0}
        if "fair_step" not in data:
            data = {**data, "fair_step": "fedavg"}
        if "lr_schedule" not in data:
            data = {**data, "lr_schedule": "constant"}
        if "logit_adjust" not in data:
            data = {**data, "logit_adjust": False}
        if "prior_noise" not in data:
            data = {**data, "prior_noise": 8.0}
        if "min_steps" not in data:
            data = {**data, "min_steps": 1}
        # Before schema 3.1 the defaults were a 64-bit ring and a 1e6 clip range.
        if "secagg_ring_bits" not in data:
            data = {**data, "secagg_ring_bits": 64}
        if "secagg_clip" not in data:
            data = {**data, "secagg_clip": 1e6}
        return cls.from_dict(data)

    def differences(self, other: RunConfig) -> list[str]:
        """Names of the fields in which two configurations differ, as their JSON shows them."""
        mine = json.loads(json.dumps(self.to_dict(), default=str))
        theirs = json.loads(json.dumps(other.to_dict(), default=str))
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))

    def with_unflagged_of(self, recorded: RunConfig) -> RunConfig:
        """A copy taking ``recorded``'s values of the settings no option sets.

        For resuming: such a setting (``auto_rule``) is the one the run started with, which
        a user resuming an older run cannot type; other differences stay differences.
        """
        fixed = {
            name: getattr(recorded, name)
            for name in _FIELDS
            if isinstance(cli_metadata(name), NotAFlag)
        }
        return self.replace(**fixed)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
