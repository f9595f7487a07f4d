"""One site's work, written once: what a hospital runs for every message of a round.

:class:`SiteRuntime` answers each stage (set-up, cluster choice, fit, evaluation, and the
secure-sum mode's protocol steps) from the site's own shard, plan, trainer and keys. The
in-process runtime holds one per simulated site behind a
:class:`~securefed.protocol.link.LocalLink`; the Flower ClientApp
(:mod:`securefed.deploy.site_app`) builds one from the hospital's node configuration and
hands it each Flower message. Every reply passes
:func:`~securefed.dp.disclosures.check_reply`: a field privacy.json does not declare never
leaves the site, in either runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.data.dataset import ArraySplit
from securefed.dp import calibration, class_prior, fair_loss, releases
from securefed.dp.disclosures import check_reply
from securefed.dp.empirical import AuditedSiteTrainer, GradientCanaries
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.signing import MODEL_FILE, SiteSigner
from securefed.dp.trainer import SiteTrainer
from securefed.errors import (
    ConfigError,
    DataError,
    PrivacyBudgetError,
    ProtocolError,
    SecureFedError,
)
from securefed.fl import qffl
from securefed.fl.bounds import clip_update, max_site_weight, update_clip_for
from securefed.fl.claims import plan_fields, site_claim_for
from securefed.fl.params import ParamLayout
from securefed.fl.planning import (
    mechanism_noise,
    model_choice,
    personalizes_in,
    plan_site_privacy,
    seed_for,
    training_dataset,
)
from securefed.fl.tasks import Task
from securefed.fl.teacher_student import (
    TeacherStudentDataset,
    check_unlabelled,
    drop_labels,
    pseudo_label_maps,
    site_labelled,
)
from securefed.models import BuiltModel, ModelSpec, build_model
from securefed.persistent import (
    CLOSE_SIGNATURE,
    CLOSED,
    LOCAL_TWIN_ROUNDS,
    PersistentStore,
    refuse_after_end,
)
from securefed.protocol.modes import get_mode
from securefed.protocol.wire import Stage

__all__ = ["SiteRuntime", "local_update", "weights_from_bytes", "weights_to_bytes"]

log = logging.getLogger("securefed.site")

#: In the site's persistent store: the rounds it trained (``fit``) in this run.
_FIT_ROUNDS = "fit.rounds"
#: In the site's persistent store: logit adjustment's released log class prior.
_PRIOR = "fit.log_prior"
#: In the site's persistent store: the rounds it chose a cluster for (CFL's ``select``).
_SELECT_ROUNDS = "select.rounds"
_EVALUATE_CLUSTER_ROUNDS = "evaluate.cluster.rounds"
#: Rounds whose decision calibration the site released (once per run: it is accounted).
_CALIBRATE_ROUNDS = "calibrate.rounds"
#: teacher-student ``--teacher fixed``: the SHA-256 (hex) of the one teacher of the run.
_TEACHER = "fit.teacher_sha256"
#: A model file's digest in a close.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def weights_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (the only weight format that crosses the network)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def weights_from_bytes(data: bytes, *, what: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; anything else (a pickle, a truncated file) is refused."""
    from safetensors.torch import load

    try:
        return dict(load(bytes(data)))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ProtocolError(f"{what}: not valid safetensors weights ({exc})") from exc


def _adjusted(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], log_prior: np.ndarray
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn`` of logits shifted by the fixed ``log_prior`` (logit adjustment's loss)."""
    shift = torch.from_numpy(np.asarray(log_prior, dtype=np.float32))

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits + shift.to(logits.device, logits.dtype), labels)

    return loss


def local_update(
    config: RunConfig,
    *,
    trainer: SiteTrainer,
    layout: ParamLayout,
    model: nn.Module,
    round_index: int,
    released_loss: float | None = None,
    log_prior: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float, dict[str, torch.Tensor]]:
    """One site's round: train a copy of ``model``, return ``[n * update..., n]`` and more.

    The update is clipped to the run's L2 bound C_u and the weight n capped at N_max
    (:mod:`securefed.fl.bounds`) before it is scaled: post-processing of the DP-SGD output
    (no privacy cost), and what lets the server refuse a sum no honest sites can make.
    With ``released_loss`` (q-FFL, ``--fair-q``: the site's released loss F of ``model``) the
    vector is q-FedAvg's ``[c s u, c h']`` instead (:func:`securefed.fl.qffl.fair_vector`),
    a function of the DP-SGD output and of the DP release F only. With ``log_prior`` (logit
    adjustment, ``--logit-adjust``: the site's released log class prior) the site trains
    ``f(x) + log_prior`` against its labels (:mod:`securefed.dp.class_prior`); the prior is
    a fixed vector, not a parameter, so it is not in the update.

    Returns:
        The vector to aggregate (pre-scaled by the sample count, so a weighted FedAvg needs
        only sums), the mean training loss, the training seconds and the trained state
        (unclipped: the cyclic schedule hands it on as trained).

    """
    local = copy.deepcopy(model)
    mu = config.effective_prox_mu
    # FedProx's anchor is a copy of the round's weights; without FedProx, no copy.
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()} if mu else None
    # The seeded generator serves what is no privacy mechanism (the baseline's shuffling);
    # DP-SGD's sampling and noise come from `mechanism_noise`.
    gen = torch.Generator(device="cpu").manual_seed(
        seed_for(config.seed, 4, round_index, trainer.client_id)
    )
    noise = (
        mechanism_noise(config, 4, round_index, trainer.client_id) if config.dp_enabled else None
    )
    result = trainer.train_round(
        model=local,
        round_index=round_index,
        epochs=config.local_epochs,
        generator=gen,
        noise=noise,
        prox_mu=mu,
        anchor=anchor,
        lr=trainer.site_lr * config.lr_factor(round_index),
        criterion=None if log_prior is None else _adjusted(trainer.loss_fn, log_prior),
    )
    update = layout.flatten(result.state) - layout.flatten(model.state_dict())
    update, clipped = clip_update(update, update_clip_for(config, layout.size))
    if clipped:
        log.info("site %d round %d: update clipped to C_u", trainer.client_id, round_index)
    weight = min(float(result.num_samples), max_site_weight(config))
    if released_loss is None:
        vec = np.concatenate([weight * update, [weight]])
    else:
        vec = qffl.fair_vector(
            update,
            weight=weight,
            loss=released_loss,
            q=float(config.fair_q),
            lipschitz=qffl.lipschitz(config),
            max_weight=max_site_weight(config),
            adaptive=config.fair_step == qffl.ADAPTIVE,
        )
    return vec, result.mean_loss, result.seconds, result.state


#: Fewest optimizer steps a round before a site warns (see ``SiteRuntime.batch_warnings``).
MIN_ROUND_STEPS = 4
#: Smallest DP-SGD batch before a site warns that noise swamps its signal.
MIN_DP_BATCH = 16
#: Largest ratio of a DP twin's noise to the most signal its steps can carry before a site
#: warns (``SiteRuntime.batch_warnings``): above 1 the noise outweighs even a signal of full
#: norm. In the twins benchmark DP twins at 2x (only the output layer trained), 36x and 170x
#: all ended below the global model they started from (docs/benchmarks.md).
MAX_TWIN_NOISE_RATIO = 1.0


class SiteRuntime:
    """A site's shard, privacy plan, trainer, keys and protocol state, for one run.

    Args:
        config: The run configuration.
        client_id: The site's id in the federation.
        train: The site's private training records.
        heldout: The site's held-out split (evaluation only), or None.
        spec: The model shape the data implies.
        task: The task (loss, metrics).
        spatial_dims: 2 or 3 (for augmentation).
        device: Where the site trains.
        dataset_name: The data set's name (reported at set-up).
        fingerprint: What the site reports to identify its data across sessions.
        signer: The site's signing key (needed with DP: the site signs its claims); it is
            also the site's identity key in modes that use the roster (masking).
        he_secret: The CKKS secret context (``--secure-agg he``).
        he_public: The CKKS public context the site reports at set-up.
        disclose_size: Whether the site's policy lets it disclose its size when the run asks.
        roster: The federation's roster as the site verified it (secure aggregation needs it).
        min_contributors: The site's own least number of sites in any sum it helps reveal
            (a deployed site's ``min-contributors``); the mode applies the larger of it and
            the roster's.
        canaries: Gradient canaries for an empirical audit run (``--audit-canaries``; the
            in-process runtime hands them to site 0): the site's DP-SGD carries them.
        keep_twin_metric: Under ``--twin-privacy local``, send nothing about the twin: the
            site keeps its metric (``twin_metrics``, and its own log), so nothing it sends is
            outside epsilon (a deployed site's ``keep-twin-metric``; docs/twins.md).

    Attributes:
        plan: The DP-SGD plan the site derived for itself (None without DP).
        ledger: The site's own record of its DP events (the server keeps a copy).
        trainer: The site's DP-SGD trainer.
        train_log: Per round, the site's mean training loss: it stays at the site.
        state: The secure-sum mode's state between protocol steps (stays at the site).
        persistent: What the site remembers across the run's sessions (the rounds it trained;
            its mode's once-per-round steps); shared with its mode's site side.
        twin: The site's latest digital twin (a private fine-tuned copy), or None.

    """

    def __init__(
        self,
        config: RunConfig,
        *,
        client_id: int,
        train: ArraySplit,
        heldout: ArraySplit | None,
        spec: ModelSpec,
        task: Task,
        spatial_dims: int,
        device: torch.device,
        dataset_name: str,
        fingerprint: str,
        signer: SiteSigner | None = None,
        he_secret: bytes | None = None,
        he_public: bytes | None = None,
        disclose_size: bool = True,
        roster: Roster | None = None,
        min_contributors: int | None = None,
        canaries: GradientCanaries | None = None,
        keep_twin_metric: bool = False,
    ) -> None:
        if config.dp_enabled and signer is None:
            raise ConfigError(f"site {client_id}: a DP run needs the site's signing key")
        check_unlabelled(config.strategy, train, who=f"site {client_id}")
        #: The records that keep their labels (``--labelled-fraction``; all by default),
        #: less the ones the data mark unlabelled (teacher-student only, checked above).
        self.labelled = site_labelled(
            train, seed=config.seed, fraction=config.labelled_fraction, site_id=client_id
        )
        self.teacher_student = config.strategy == "teacher-student"
        if self.teacher_student:
            # The unlabelled volumes' true maps are forgotten here, before anything reads them.
            train = drop_labels(train, self.labelled)
        elif len(self.labelled) < len(train):
            # Supervised-only at this labelled fraction: the unlabelled records are not used.
            train = train.subset(indices=self.labelled)
            self.labelled = np.arange(len(train), dtype=np.int64)
        self.config = config
        self.client_id = client_id
        self.train = train
        self.heldout = heldout
        self.spec = spec
        self.task = task
        self.device = device
        self.dataset_name = dataset_name
        self.fingerprint = fingerprint
        self.signer = signer
        #: The federation's verified roster (the secure-sum mode and set-up proofs use it).
        self.roster = roster
        self.he_public = he_public
        self.disclose_size = bool(config.disclose_site_sizes and disclose_size)
        # The site picks its own delta from its size; nothing the server sends sets it.
        #: Each record's patient under --privacy-unit patient (None: record-level DP).
        self.patients = _patients_of(config, train, client_id)
        #: The site's size in privacy units (records, or patients): what its plan, its FedAvg
        #: weight and any size it discloses count. Under patient adjacency the record count
        #: changes with the patient replaced; the number of patients does not.
        self.size = train.patient_count() if self.patients is not None else len(train)
        self.plan = plan_site_privacy(config, num_samples=self.size) if config.dp_enabled else None
        self.ledger = PrivacyLedger()
        #: False until the site knows its own history (a fresh site process learns it from its
        #: stored copy; a new site starts with an empty one).
        self.history_known = True
        audit = {} if canaries is None else {"canaries": canaries}
        dataset = (
            TeacherStudentDataset(
                train,
                labelled=self.labelled,
                num_classes=spec.num_classes,
                augment_labelled=config.augment,
                spatial_dims=spatial_dims,
                seed=seed_for(config.seed, 8, client_id),
            )
            if self.teacher_student
            else training_dataset(config, train=train, spatial_dims=spatial_dims, site_id=client_id)
        )
        self.trainer = (SiteTrainer if canaries is None else AuditedSiteTrainer)(
            **audit,
            client_id=client_id,
            dataset=dataset,
            plan=self.plan,
            ledger=self.ledger,
            batch_size=config.effective_batch_size,
            min_steps=config.min_steps,
            lr=config.effective_lr,
            momentum=config.effective_momentum,
            device=device,
            max_grad_norm=config.effective_max_grad_norm,
            loss_fn=task.loss_fn,
            max_physical_batch_size=config.physical_batch(device.type),
            units=None if self.patients is None else train.units(),
        )
        mode = get_mode(config.secure_agg)
        self.protects = mode.protects
        keys: dict[str, Any] = {}
        if mode.uses_roster:
            identity = None if signer is None else signer.private_key
            keys = {"identity": identity, "roster": roster, "min_contributors": min_contributors}
        self.protection = mode.site(config, site_id=client_id, he_secret=he_secret, **keys)
        self.state: dict[str, Any] = {}
        self._persistent = PersistentStore()
        self.protection.persistent = self._persistent
        self.train_log: list[dict[str, float]] = []
        self.twin: nn.Module | None = None
        self.keep_twin_metric = keep_twin_metric
        #: The twin's held-out metrics, as the site computed them (kept here when
        #: ``keep_twin_metric``; what it sends is at most the rounded primary metric).
        self.twin_metrics: dict[str, Any] | None = None
        self._built: Any = None
        #: teacher-student: the SHA-256 of the teacher whose pseudo-labels the training set
        #: holds, and their share of the unlabelled voxels.
        self._pseudo: tuple[str, float] | None = None

    @property
    def persistent(self) -> PersistentStore:
        """The site's store for the run (:mod:`securefed.persistent`)."""
        return self._persistent

    @persistent.setter
    def persistent(self, store: PersistentStore) -> None:
        """Continue from a stored copy (a deployed site: its state file); the mode shares it."""
        self._persistent = store
        self.protection.persistent = store

    # -- what other parts read --------------------------------------------------------------
    def own_events(self) -> list[dict[str, Any]]:
        """The site's own copy of its DP events (what a runtime persists between messages)."""
        return [e.to_dict() for e in self.ledger.for_client(self.client_id)]

    def restore_events(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Continue from the site's own stored copy of its events (a fresh site process)."""
        self._adopt([PrivacyEvent(**e) for e in events])
        self.history_known = True

    def _adopt(self, events: list[PrivacyEvent]) -> None:
        if not events:
            return
        if self.plan is None:
            raise ProtocolError("a run without DP has no privacy history")
        planned = releases.planned(self.config.to_dict())
        for phase in (calibration.PHASE, class_prior.PHASE):
            if sum(e.phase == phase for e in events) > len(planned[phase]):
                raise ProtocolError(f"a privacy history with more {phase} releases than planned")
        if _PRIOR in self.persistent and planned[class_prior.PHASE]:
            if not any(e.phase == class_prior.PHASE for e in events):
                raise ProtocolError(
                    "a privacy history without the class-prior release this site made"
                )
        losses = [e.round for e in events if e.phase == fair_loss.PHASE]
        if len(losses) != len(set(losses)):
            raise ProtocolError("a privacy history with two q-FFL loss releases in one round")
        try:
            self.trainer.resume_accounting(events, releases=planned)
        except PrivacyBudgetError as exc:
            raise ProtocolError(str(exc)) from exc

    # -- dispatch -----------------------------------------------------------------------------
    def batch_warnings(self) -> list[str]:
        """Lines for the site's operator when its batches are too few or too small to learn.

        Local only: they name the site's size, which it may keep to itself. Rules fixed in
        advance (docs/defaults.md): one step per epoch (q = 1: no subsampling, so no privacy
        amplification), fewer than :data:`MIN_ROUND_STEPS` steps a round, and under DP
        batches below :data:`MIN_DP_BATCH` records, whose signal the noise swamps.
        """
        t, cfg = self.trainer, self.config
        n, spe, b = t.num_units, t.steps_per_epoch, t.site_batch
        unit = "records" if t.units is None else "patients"
        who = f"site {self.client_id} ({n} training {unit})"
        out = []
        if spe == 1:
            out.append(
                f"warning: {who}: one step per epoch with --batch-size {cfg.effective_batch_size} "
                f"(q = 1: no subsampling"
                + (", so DP-SGD gets no privacy amplification" if cfg.dp_enabled else "")
                + f"); raise --min-steps (now {cfg.min_steps}) or lower --batch-size."
            )
        if spe * cfg.local_epochs < MIN_ROUND_STEPS:
            out.append(
                f"warning: {who}: only {spe * cfg.local_epochs} optimizer step(s) a round; "
                "raise --local-epochs or --min-steps."
            )
        if cfg.dp_enabled and b < MIN_DP_BATCH:
            sigma = self.plan.noise_multiplier if self.plan is not None else float("nan")
            out.append(
                f"warning: {who}: DP-SGD batches of about {b} {unit} (noise std "
                f"sigma*C/batch = {sigma / b:.3g}*C on every coordinate of a mean gradient of "
                "norm <= C): expect little learning here; pool data into fewer, larger sites, "
                "or use --strategy ftl from a pretrained backbone."
            )
        if cfg.dp_twins and self.plan is not None:
            out += self._twin_warnings(who, steps=spe * cfg.personalize)
        if self.patients is not None:
            out += self._patient_warnings(who)
        return out

    def _twin_warnings(self, who: str, *, steps: int) -> list[str]:
        """A DP twin whose noise outweighs anything its few steps can learn.

        Each twin step adds noise of norm about sigma*C*sqrt(d)/B to a clipped mean gradient
        of norm <= C, so over ``steps`` steps the noise is sigma*sqrt(d)/(B*sqrt(steps))
        times the largest possible signal (d: the twin's trainable parameters).
        """
        # The weights are overwritten by the server's before any use; the fork keeps this early
        # build from moving the global RNG that later draws in this process may read.
        with torch.random.fork_rng(devices=[]):
            module = self._site_model().module
        self._freeze()
        d = sum(p.numel() for p in module.parameters() if p.requires_grad)
        ratio = (
            self.plan.noise_multiplier * math.sqrt(d) / (self.trainer.site_batch * math.sqrt(steps))
        )
        if ratio < MAX_TWIN_NOISE_RATIO:
            return []
        shown = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        return [
            f"warning: {who}: the digital twin's DP noise is about {shown}x the largest "
            f"signal its {steps} step(s) can carry (sigma*sqrt(d)/(batch*sqrt(steps)), d = {d} "
            "trainable parameters): expect a twin no better than the global model, likely worse; "
            "train fewer parameters (--freeze), pool data into larger sites, train twins "
            "without DP at the site (--twin-privacy local: their metric then leaves outside "
            "epsilon; docs/twins.md), or leave --personalize off under DP."
        ]

    def _patient_warnings(self, who: str) -> list[str]:
        """Signs that the patient ids do not describe patients (local lines, like the rest)."""
        out = []
        if self.size == len(self.train) and len(self.train) > 1:
            out.append(
                f"warning: {who}: every training record has a patient of its own; if patients "
                "have several records, --group-by does not find them (patient-level DP is "
                "then record-level)."
            )
        held = getattr(self.heldout, "patients", None)
        if held is not None:
            shared = np.intersect1d(np.asarray(held), self.patients).size
            if shared:
                out.append(
                    f"warning: {who}: {shared} patient(s) have records in both the training "
                    "and the held-out split; held-out metrics are not patient-level private "
                    "and overstate accuracy on new patients."
                )
        return out

    def handle(self, stage: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Answer one message; the reply's fields are checked against the disclosures.

        Raises:
            ProtocolError: On a malformed message, or a step the site refuses.

        """
        refuse_after_end(self.persistent, stage, self.client_id)
        if stage == Stage.SETUP:
            reply = self.describe()
        elif stage == Stage.SELECT:
            reply = self.select(fields)
        elif stage == Stage.FIT:
            reply = self.fit(fields)
        elif stage == Stage.EVALUATE:
            reply = self.evaluate(fields)
        elif stage == Stage.CALIBRATE:
            reply = self.calibrate(fields)
        elif stage == Stage.CLOSE:
            reply = self.close(fields)
        elif stage in self.protection.stages:
            reply = self.protection.answer(stage, fields, state=self.state)
        else:
            raise ProtocolError(f"site {self.client_id}: unknown stage {stage!r}")
        return check_reply(self.config, stage.rsplit(".", 1)[-1], reply)

    # -- set-up ---------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the site tells the server at set-up: shapes, keys, its plan; no records.

        Its training-set size (and class counts) only if its policy allows and the run asks.
        """
        out: dict[str, Any] = {
            "site_id": self.client_id,
            "num_heldout": len(self.heldout) if self.heldout is not None else 0,
            "dataset": self.dataset_name,
            "fingerprint": self.fingerprint,
            "task": self.task.name,
            "spec": {
                "in_channels": self.spec.in_channels,
                "num_classes": self.spec.num_classes,
                "spatial_dims": self.spec.spatial_dims,
                "image_shape": list(self.spec.image_shape),
            },
        }
        if self.disclose_size:
            out["num_samples"] = self.size
            # Under patient-level DP the sizes count patients (one by its first record): a
            # record count would move with the patient replaced.
            # Teacher-student: only the labelled records have label maps to count.
            k = self.spec.num_classes
            if not len(self.labelled):  # only unlabelled subjects: no class is counted
                out["class_counts"] = [0] * k
            else:
                counted = self.train.subset(indices=self.labelled)
                if self.patients is not None:
                    _, first = np.unique(self.patients[self.labelled], return_index=True)
                    counted = counted.subset(indices=np.sort(first))
                out["class_counts"] = counted.class_counts(num_classes=k).tolist()
        if self.signer is not None and self.config.dp_enabled:
            # (a masking run's identity key is in the roster already: not sent again)
            out["signing_key"] = self.signer.public_key_hex
        if self.plan is not None:
            out["plan"] = plan_fields(self.plan)
            # Over what the site spent so far (nothing, or its stored history): the report
            # can state the site's claim even if it never trains in this run.
            out["signature"] = self.sign_claim()
        if self.he_public is not None:
            out["he_public"] = self.he_public
        return out

    # -- models -----------------------------------------------------------------------------
    def _site_model(self) -> BuiltModel:
        """The site's one model instance, built on first use (its weights are set by callers)."""
        if self._built is None:
            self._built = build_model(
                name=self.config.model, spec=self.spec, **model_choice(self.config)
            )
            self._built.module.to(self.device)
        return self._built

    def _freeze(self) -> str:
        """Freeze the site's model as the run says; returns the ``--freeze`` spec applied."""
        from securefed.models.transfer import freeze

        built = self._site_model()
        spec = self.config.effective_freeze
        if spec != "none":
            freeze(
                built.module,
                spec=spec,
                head_prefixes=built.head_prefixes,
                last_block_prefixes=built.last_block_prefixes,
            )
        return spec

    def model(
        self, weights: bytes, *, layout_keys: Sequence[str], what: str = "the global weights"
    ) -> tuple[nn.Module, ParamLayout]:
        """The global model from the server's weights, frozen as the run says.

        Args:
            weights: The weights (safetensors).
            layout_keys: The server's list of aggregated parameters.
            what: Names the weights in an error.

        Raises:
            ProtocolError: If the weights or the trainable-parameter list do not fit the model.

        """
        model = self._site_model().module
        state = weights_from_bytes(weights, what=what)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ProtocolError(f"{what} do not fit the model ({first})") from exc
        spec = self._freeze()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        layout = ParamLayout(model.state_dict(), keys=trainable if spec != "none" else None)
        if list(layout.keys) != list(layout_keys):
            raise ProtocolError(
                "the server's list of aggregated parameters differs from this site's model"
            )
        return model, layout

    def _models(self, fields: Mapping[str, Any]) -> list[nn.Module]:
        """CFL: the cluster models a message carries (fields ``models`` = K, ``model0``...)."""
        count = fields["models"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 64:
            raise ProtocolError(f"a message names {count!r} cluster models")
        out = []
        for k in range(count):
            model, _ = self.model(fields[f"model{k}"], layout_keys=fields["layout_keys"])
            out.append(copy.deepcopy(model))
        return out

    @torch.no_grad()
    def _data_loss(self, model: nn.Module, split: ArraySplit, batch_size: int = 256) -> float:
        model.eval()
        images, labels = torch.tensor(split.images), torch.tensor(split.labels)
        total = 0.0
        for i in range(0, len(split), batch_size):
            x, y = images[i : i + batch_size].to(self.device), labels[i : i + batch_size]
            total += float(self.task.loss_fn(model(x).float(), y.to(self.device))) * len(y)
        return total / len(split)

    def select_cluster(self, models: Sequence[nn.Module]) -> int:
        """IFCA's site step: the cluster model with the lowest loss on the site's data.

        Only the chosen index leaves the site (the report says so; CFL runs without DP).
        """
        return int(np.argmin([self._data_loss(m, self.train) for m in models]))

    def _check_round(self, fields: Mapping[str, Any]) -> int:
        """The message's round, within the run's ``1..rounds``, whatever the server asks.

        Raises:
            ProtocolError: No round, or one outside the run.

        """
        try:
            round_index = fields["round"]
        except KeyError:
            raise ProtocolError(f"site {self.client_id}: the message names no round") from None
        if isinstance(round_index, bool) or not isinstance(round_index, int):
            raise ProtocolError(f"site {self.client_id}: the message's round is not an integer")
        if not 1 <= round_index <= self.config.rounds:
            raise ProtocolError(
                f"site {self.client_id}: round {round_index} is outside the run's "
                f"{self.config.rounds} rounds"
            )
        return round_index

    def select(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """CFL: choose the cluster for a round, once per round of the run.

        Fields: ``models``, ``layout_keys`` and ``round``. The choice is an un-noised function
        of the site's records: answered for every model set a server liked, it would probe
        them, so the site answers one ``select`` per round (recorded in the persistent store
        before it computes the answer).

        Raises:
            ProtocolError: No valid round, or a round the site answered already.

        """
        round_index = self._check_round(fields)
        self.persistent.claim_once(
            _SELECT_ROUNDS,
            round_index,
            what=f"site {self.client_id}: choosing a cluster for round {round_index}",
        )
        return {"cluster": self.select_cluster(self._models(fields))}

    # -- training -----------------------------------------------------------------------------
    def _sync_history(self, history: Sequence[Mapping[str, Any]], round_index: int) -> None:
        """Compare the server's copy of this site's events with the site's own.

        Within a run the site keeps its own copy: a server that under-reports the budget
        already spent would otherwise make the site over-spend it.
        """
        if self.history_known:
            if self.own_events() != list(history):
                raise ProtocolError("the server's copy of this site's privacy history differs")
            return
        try:
            earlier = [PrivacyEvent(**e) for e in history]
        except TypeError as exc:
            raise ProtocolError(f"malformed privacy history from the server ({exc})") from exc
        if any(e.round >= round_index for e in earlier):
            raise ProtocolError(f"privacy history holds events of round {round_index} or later")
        self._adopt(earlier)
        self.history_known = True

    def _check_budget(self, round_index: int, *, epochs: int, phase: str) -> None:
        """Refuse training the site's own plan does not cover, whatever the server asks.

        The plan was calibrated for ``rounds`` rounds (and the twins' fine-tuning): a round
        past them, a round trained twice, or steps beyond the planned ones would spend more
        than the epsilon the site agreed to.

        Raises:
            ProtocolError: Naming what the site refuses.

        """
        cid = self.client_id
        if not 1 <= round_index <= self.config.rounds:
            # DP or not: a run's rounds are its rounds.
            raise ProtocolError(
                f"site {cid}: round {round_index} is outside the run's {self.config.rounds} rounds"
            )
        if self.plan is None:
            return
        own = self.own_events()
        if any(e["phase"] == phase and e["round"] >= round_index for e in own):
            raise ProtocolError(f"site {cid}: already trained ({phase}) in round {round_index}")
        steps = epochs * self.trainer.steps_per_epoch
        # The releases have their own places in the plan (not DP-SGD steps).
        spent = sum(int(e["steps"]) for e in own if e["phase"] not in releases.PHASES)
        if spent + steps > self.plan.planned_steps:
            raise ProtocolError(
                f"site {cid}: {steps} more steps would pass the {self.plan.planned_steps} its "
                f"privacy plan covers ({spent} spent)"
            )

    def _claim_fields(self, before: int) -> dict[str, Any]:
        """This step's events, the site's epsilon, its plan and its signature over the claim."""
        if self.plan is None:
            return {}
        events = self.own_events()
        epsilon = self.trainer.epsilon()
        claim = site_claim_for(
            self.config,
            client_id=self.client_id,
            plan=self.plan,
            events=events,
            epsilon=epsilon,
            num_samples=self.size if self.disclose_size else None,
        )
        assert self.signer is not None  # checked at construction
        return {
            "events": events[before:],
            "epsilon": epsilon,
            "plan": plan_fields(self.plan),
            "signature": self.signer.sign_claim(claim),
        }

    def sign_claim(self) -> str | None:
        """The site's signature over its claim as it stands (None without DP)."""
        return self._claim_fields(0).get("signature")

    def close(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Sign the site's closing claim; after it the site takes no further step of the run.

        Fields: ``last_round`` (the last round the run ran), ``models`` (each model file the
        run writes -> its SHA-256) and ``history``. The site signs its claim over every event
        it spent in the run, with those fields and the digest of the roster it pinned
        (:func:`securefed.dp.signing.close_message`), and records the close before it
        answers: a later fit, calibration or protocol step is refused (:meth:`handle`), so
        the closed claim is the whole of what the site spent. A report that presents an
        earlier round as the run's end has no closing signature that fits it. A repeated
        close with the same fields gets the same signature (a server that lost the reply);
        with other fields it is refused.

        Raises:
            ProtocolError: No DP plan (nothing to close), malformed fields, no record of
                its own of what it spent (a deployed site whose state was lost: the server's
                copy is never adopted here), a server copy that differs from it, a last round
                before one the site trained or outside the run, or a close that differs from
                the one the site gave.

        """
        cid = self.client_id
        if self.plan is None or self.signer is None:
            raise ProtocolError(f"site {cid}: a run without DP has no privacy claim to close")
        last = fields.get("last_round")
        if (
            isinstance(last, bool)
            or not isinstance(last, int)
            or not 1 <= last <= self.config.rounds
        ):
            raise ProtocolError(
                f"site {cid}: the close names no last round within the run's "
                f"{self.config.rounds} rounds"
            )
        models = fields.get("models")
        if (
            not isinstance(models, Mapping)
            or not 1 <= len(models) <= 1000
            or not all(
                isinstance(k, str)
                and MODEL_FILE.fullmatch(k)
                and isinstance(v, str)
                and _SHA256_HEX.fullmatch(v)
                for k, v in models.items()
            )
        ):
            raise ProtocolError(f"site {cid}: the close names no valid model files and digests")
        if not self.history_known:
            # Adopting the server's copy here would let it choose what the site closes on.
            raise ProtocolError(
                f"site {cid}: it holds no record of what it spent in this run (its state was "
                "lost), so it cannot close it"
            )
        self._sync_history(fields.get("history") or [], last + 1)
        trained = [int(e["round"]) for e in self.own_events()]
        if trained and max(trained) > last:
            raise ProtocolError(
                f"site {cid}: the close says the run ended at round {last}, but the site "
                f"spent privacy in round {max(trained)}"
            )
        close = {
            "last_round": last,
            "models": dict(sorted(models.items())),
            "roster_sha256": None if self.roster is None else self.roster.digest().hex(),
        }
        text = json.dumps(close, sort_keys=True)
        done = self.persistent.get(CLOSED)
        if done is not None:
            if done != text:
                raise ProtocolError(f"site {cid}: it closed the run already, with other fields")
            return self._close_reply(close, str(self.persistent[CLOSE_SIGNATURE]))
        claim = site_claim_for(
            self.config,
            client_id=cid,
            plan=self.plan,
            events=self.own_events(),
            epsilon=self.trainer.epsilon(),
            num_samples=self.size if self.disclose_size else None,
        )
        signature = self.signer.sign_close(claim, close)
        # Recorded before the reply leaves: from now on the site refuses to spend more.
        self.persistent[CLOSED] = text
        self.persistent[CLOSE_SIGNATURE] = signature
        return self._close_reply(close, signature)

    @staticmethod
    def _close_reply(close: Mapping[str, Any], signature: str) -> dict[str, Any]:
        """The close's answer: the signature, and the pinned roster's digest if there is one."""
        reply = {"close_signature": signature}
        if close["roster_sha256"] is not None:
            reply["roster_sha256"] = close["roster_sha256"]
        return reply

    def fit(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Train one round from the server's weights and protect the update.

        Fields: ``weights``, ``layout_keys``, ``round``, ``n_sites``, ``history`` (the
        server's copy of this site's events), ``teacher`` (teacher-student with ``--teacher
        fixed``: the pretrained teacher's weights), and ``return_weights`` (the cyclic
        schedule: hand the trained model on, in the clear; refused with secure aggregation).
        """
        round_index = self._check_round(fields)
        # Checked before the round is claimed and trained: a field refused after training
        # would leave the site's budget spent and its events unsent.
        n_sites = fields.get("n_sites")
        if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
            raise ProtocolError(
                f"site {self.client_id}: the fit names no valid number of sites (n_sites)"
            )
        if fields.get("return_weights") and self.protects:
            raise ProtocolError("the server asked for the trained model in the clear")
        self._sync_history(fields["history"], round_index)
        self._check_budget(round_index, epochs=self.config.local_epochs, phase="federated")
        # Before the round is claimed: a refused teacher leaves the round to a good message.
        coverage = self._pseudo_label(fields) if self.teacher_student else None
        # DP or not, a site trains a round once per run: without DP a re-fit of the same round
        # gives the same update, and a server that summed it twice (with and without this
        # site's neighbours) would difference the sums. Recorded before training, in the store
        # that outlives the session (``setup`` clears the protocol state, not this).
        self.persistent.claim_once(
            _FIT_ROUNDS, round_index, what=f"site {self.client_id}: training round {round_index}"
        )
        model, layout = self.model(fields["weights"], layout_keys=fields["layout_keys"])
        before = len(self.own_events())
        released = self._release_loss(model, round_index) if self.config.fair_q else None
        prior = self._class_prior(round_index) if self.config.logit_adjust else None
        vec, loss, _, state = local_update(
            self.config,
            trainer=self.trainer,
            layout=layout,
            model=model,
            round_index=round_index,
            released_loss=released,
            log_prior=prior,
        )
        # The training loss is an un-noised function of the site's records: it stays here
        # (and so does the share of confidently pseudo-labelled voxels).
        entry = {"round": round_index, "train_loss": loss}
        if coverage is not None:
            entry["pseudo_coverage"] = coverage
        self.train_log.append(entry)
        log.info("site %d round %d: train loss %.4f", self.client_id, round_index, loss)
        reply = self._claim_fields(before)
        if fields.get("return_weights"):  # refused above under secure aggregation
            reply["weights"] = weights_to_bytes(state)
            return reply
        start = time.perf_counter()
        try:
            protected = self.protection.protect(
                np.asarray(vec, dtype=np.float64),
                round_index=round_index,
                n_sites=n_sites,
                state=self.state,
            )
        except SecureFedError as exc:
            # The site trained and spent budget: its accounting still goes to the server (so
            # the report counts it), with no update and the reason it kept it back.
            self.state.clear()
            reply["refused"] = f"site {self.client_id}: {exc}"
            return reply
        reply.update(protected)
        if self.protects:
            reply["protect_seconds"] = time.perf_counter() - start
        return reply

    def evaluate(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The served model's metrics on the held-out split; with ``personalize``, the twin's.

        Fields: ``weights`` (or CFL's ``models``, then the site picks its cluster first),
        ``layout_keys``, ``round`` (the model's round), ``personalize`` and ``history``.
        Fine-tuning the twin is DP-SGD on the site's records, accounted as phase
        ``personalize`` of that round; the twin never leaves the site. Under
        ``--twin-privacy local`` it is trained without DP, so its metric is a non-DP release:
        the site answers for it once, in the last round, and refuses every later step
        (:meth:`handle`), whatever the server asks.
        """
        reply: dict[str, Any] = {}
        round_index = self._check_round(fields)
        if "models" in fields:
            # The cluster choice is the un-noised function `select` answers once per round:
            # here too, or the held-out step would be a probe without limit.
            self.persistent.claim_once(
                _EVALUATE_CLUSTER_ROUNDS,
                round_index,
                what=f"site {self.client_id}: choosing a cluster to evaluate, round {round_index}",
            )
            models = self._models(fields)
            reply["cluster"] = cluster = self.select_cluster(models)
            model = models[cluster]
        else:
            model, _ = self.model(fields["weights"], layout_keys=fields["layout_keys"])
        metrics = None
        if self.heldout is not None:
            metrics = self.task.evaluate(model=model, split=self.heldout, device=self.device)
        reply["metrics"] = metrics
        if fields.get("personalize"):
            if not personalizes_in(self.config, round_index):
                raise ProtocolError(
                    f"site {self.client_id}: the run does not fine-tune twins in round "
                    f"{round_index}"
                )
            self._sync_history(fields["history"], round_index + 1)
            if self.config.local_twins:
                self._answer_local_twin(model, round_index, reply)
            else:
                self._check_budget(round_index, epochs=self.config.personalize, phase="personalize")
                before = len(self.own_events())
                self.twin = self._fine_tune(model, round_index)
                if self.heldout is not None:
                    reply["twin"] = self.twin_metrics = self.task.evaluate(
                        model=self.twin, split=self.heldout, device=self.device
                    )
                reply.update(self._claim_fields(before))
        return reply

    def calibrate(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Noised per-class score statistics of the final model on the site's training data.

        Fields: ``weights``, ``layout_keys``, ``round`` (the run's last) and ``history``. The
        release is one Gaussian mechanism of sensitivity 2R under replace-one adjacency
        (:mod:`securefed.dp.calibration`), recorded as an event of phase ``calibrate`` and
        covered by the site's plan. The site answers once per run, and only in a run that
        calibrates, whatever the server asks.

        Raises:
            ProtocolError: Not a calibrating run, not the last round, or asked twice.

        """
        round_index = self._check_round(fields)
        cid = self.client_id
        run = self.config.to_dict()
        if (
            self.plan is None
            or not calibration.calibrates(run)
            or self.task.name != "classification"
        ):
            raise ProtocolError(f"site {cid}: this run does not calibrate its decision")
        if round_index != self.config.rounds:
            raise ProtocolError(f"site {cid}: calibration only after the last round")
        self._sync_history(fields["history"], round_index + 1)
        if any(e["phase"] == calibration.PHASE for e in self.own_events()):
            raise ProtocolError(f"site {cid}: already released its calibration statistics")
        self.persistent.claim_once(
            _CALIBRATE_ROUNDS, round_index, what=f"site {cid}: calibrating round {round_index}"
        )
        model, _ = self.model(fields["weights"], layout_keys=fields["layout_keys"])
        # A data-independent check: weights that are not finite can only be a probe.
        if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
            raise ProtocolError(f"site {cid}: the model to calibrate has non-finite weights")
        ((sigma, q, steps),) = calibration.planned_entries(run)
        clip = calibration.clip_of(run, model=self._built.name)
        logits = self._logits(model, self.train)
        stats = calibration.site_statistics(
            logits,
            np.asarray(self.train.labels),
            num_classes=self.spec.num_classes,
            clip=clip,
            units=self.patients,
        )
        before = len(self.own_events())
        released = self._release(
            stats, (sigma, q, steps, clip), calibration.PHASE, round_index, label=7
        )
        return {"statistics": released.tolist(), **self._claim_fields(before)}

    def _release(
        self,
        values: np.ndarray,
        entry: tuple[float, float, int, float],
        phase: str,
        round_index: int,
        label: int,
    ) -> np.ndarray:
        """One planned Gaussian release (:mod:`securefed.dp.releases`): noise it, account it.

        Adds noise of standard deviation ``sigma * C`` from the site's own CSPRNG to
        ``values`` (whose replace-one sensitivity is 2C) and records the event
        ``entry = (sigma, q, steps, C)`` of ``phase`` in this round.
        """
        sigma, q, steps, clip = entry
        noise = mechanism_noise(self.config, label, round_index, self.client_id)
        noised = np.asarray(values, dtype=np.float64) + (
            noise.gaussian(int(np.size(values))).double().numpy() * (sigma * clip)
        )
        self.ledger.record(
            PrivacyEvent(
                round=round_index,
                client_id=self.client_id,
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                max_grad_norm=clip,
                phase=phase,
            )
        )
        return noised

    def _class_prior(self, round_index: int) -> np.ndarray:
        """Logit adjustment's log class prior: released once, with the first training.

        Under DP one Gaussian mechanism of the class counts (sensitivity sqrt(2) under
        replace-one adjacency, :mod:`securefed.dp.class_prior`), recorded as an event of phase
        ``class-prior`` of this round; without DP the exact counts. Kept in the persistent
        store, so later rounds, and a resumed site, reuse it instead of releasing it again.

        Raises:
            ProtocolError: The task is not classification, or the site released its prior
                before but no longer holds it (it will not release it twice).

        """
        cid = self.client_id
        if _PRIOR in self.persistent:
            return np.asarray(self.persistent[_PRIOR], dtype=np.float32)
        if self.task.name != "classification":
            raise ProtocolError(f"site {cid}: logit adjustment is for classification only")
        if any(e.phase == class_prior.PHASE for e in self.ledger.for_client(cid)):
            raise ProtocolError(
                f"site {cid}: its class prior was released before but is not in its store; "
                "it will not release it a second time"
            )
        counts = class_prior.class_mass(
            np.asarray(self.train.labels).reshape(-1),
            num_classes=self.spec.num_classes,
            units=self.patients,
        )
        if self.plan is not None:
            (entry,) = class_prior.planned_releases(self.config.to_dict())
            counts = self._release(counts, entry, class_prior.PHASE, round_index, label=10)
        prior = class_prior.log_prior(counts)
        self.persistent[_PRIOR] = [float(v) for v in prior]
        return prior

    def _release_loss(self, model: nn.Module, round_index: int) -> float:
        """q-FFL's F: the global model's clipped training loss, noised under DP (and accounted).

        One Gaussian mechanism of sensitivity B under replace-one adjacency
        (:mod:`securefed.dp.fair_loss`), recorded as an event of phase ``fair-loss`` of the
        round, which :meth:`fit` trains once. Without DP the exact clipped mean loss.

        Raises:
            ProtocolError: The model has non-finite weights, or the task is not
                classification.

        """
        cid = self.client_id
        if self.task.name != "classification":
            raise ProtocolError(f"site {cid}: q-FFL weighs classification losses only")
        # A data-independent check: weights that are not finite can only be a probe.
        if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()):
            raise ProtocolError(f"site {cid}: the model to weigh has non-finite weights")
        logits = torch.from_numpy(self._logits(model, self.train)).double()
        labels = torch.from_numpy(np.array(self.train.labels, dtype=np.int64).reshape(-1))
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy()
        total = fair_loss.clipped_loss_sum(losses, units=self.patients)
        if self.plan is None:
            return fair_loss.released_loss(total, size=self.size)
        (entry,) = fair_loss.planned_releases(self.config.to_dict())
        noised = float(self._release(np.array([total]), entry, fair_loss.PHASE, round_index, 9)[0])
        return fair_loss.released_loss(noised, size=self.size)

    def _pseudo_label(self, fields: Mapping[str, Any]) -> float | None:
        """Teacher-student: the round's pseudo-labels of the unlabelled volumes.

        The teacher is the message's ``teacher`` weights under ``--teacher fixed`` (the
        pretrained model, the same every round: the site pins its SHA-256 in its persistent
        store the first time and refuses another, and labels once), else the round's global
        ``weights``. The training set keeps the pseudo-labels until the teacher changes.
        Returns the share of unlabelled voxels confident enough to be pseudo-labelled (None
        without unlabelled volumes); it stays at the site.

        The pin is for the integrity of the recipe, not for privacy: a volume's
        pseudo-labels depend on that volume and the teacher only, whoever picked it.

        Raises:
            ProtocolError: ``--teacher fixed`` and the message carries no teacher, another
                teacher than the pinned one, or teacher weights that do not fit the model or
                are not finite.

        """
        dataset = self.trainer.dataset
        assert isinstance(dataset, TeacherStudentDataset)
        if not len(dataset.unlabelled):
            return None
        fixed = self.config.teacher == "fixed"
        cid = self.client_id
        blob = fields.get("teacher" if fixed else "weights")
        if not isinstance(blob, bytes):
            raise ProtocolError(
                f"site {cid}: the run pseudo-labels with the --pretrained teacher "
                "(--teacher fixed) but the server sent no teacher weights"
                if fixed
                else f"site {cid}: the server sent no global weights"
            )
        digest = hashlib.sha256(blob).hexdigest()
        pinned = self.persistent.get(_TEACHER) if fixed else None
        if pinned is not None and pinned != digest:
            raise ProtocolError(
                f"site {cid}: the server sent another teacher than in an earlier round "
                "(--teacher fixed: one teacher for the whole run)"
            )
        if self._pseudo is None or self._pseudo[0] != digest:
            # The site's one model instance: the student's weights are loaded after this.
            teacher, _ = self.model(
                blob, layout_keys=fields["layout_keys"], what="the teacher's weights"
            )
            # A data-independent check: non-finite weights would label nothing, silently.
            if not all(bool(torch.isfinite(t).all()) for t in teacher.state_dict().values()):
                raise ProtocolError(f"site {cid}: the teacher has non-finite weights")
            k = self.spec.num_classes
            encoded = pseudo_label_maps(
                teacher,
                self.train.images[dataset.unlabelled],
                num_classes=k,
                threshold=self.config.pseudo_threshold,
                device=self.device,
            )
            dataset.set_pseudo_labels(encoded)
            self._pseudo = (digest, float((encoded < 2 * k).mean()))
        if fixed and pinned is None:
            self.persistent[_TEACHER] = digest
        return self._pseudo[1]

    @torch.no_grad()
    def _logits(self, model: nn.Module, split: ArraySplit, batch_size: int = 256) -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, len(split), batch_size):
            x = torch.from_numpy(np.array(split.images[start : start + batch_size]))
            out.append(model(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.spec.num_classes))

    def _answer_local_twin(self, model: nn.Module, round_index: int, reply: dict[str, Any]) -> None:
        """Fine-tune the twin without DP and add what the site sends of it to ``reply``."""
        # No budget bounds a local twin: this does. Its answer is a function of the training
        # records without DP noise, so the server gets one (RunConfig allows local twins only
        # after the last round).
        self._check_budget(round_index, epochs=0, phase="personalize")
        self.persistent.claim_once(
            LOCAL_TWIN_ROUNDS,
            round_index,
            what=f"site {self.client_id}: a local twin for round {round_index}",
        )
        # A local twin's failure is a non-DP fact about the training records too (a crafted
        # model that overflows only after fine-tuning on some record): it stays in the site's
        # log, and the reply is the one a failed twin gets.
        try:
            twin = self._local_twin(model, round_index)
        except Exception as exc:  # noqa: BLE001 - any failure, reported alike
            log.warning("site %s: local twin failed (%s)", self.client_id, exc)
            self.twin, twin = None, None
        primary = self.task.primary_metric
        self.twin_metrics = twin
        value = None if twin is None else twin.get(primary)
        if self.keep_twin_metric:
            # The site's own policy: the metric stays with its operator, and no value the
            # site sends escapes epsilon.
            log.warning(
                "site %s: local twin %s %s (kept at this site)", self.client_id, primary, value
            )
        elif self.heldout is not None:
            # Data minimisation for the one non-DP release: the primary metric only, to two
            # decimals (about 7 bits), not the loss, AUC or confusion matrix.
            reply["twin"] = {primary: None if value is None else round(float(value), 2)}

    def _local_twin(self, model: nn.Module, round_index: int) -> dict[str, Any] | None:
        """Fine-tune the local twin and score it on the held-out split (None without one)."""
        self.twin = self._fine_tune(model, round_index)
        if self.heldout is None:
            return None
        return self.task.evaluate(model=self.twin, split=self.heldout, device=self.device)

    def _fine_tune(self, model: nn.Module, round_index: int) -> nn.Module:
        """The site's digital twin: a private copy of ``model`` fine-tuned on its records.

        DP-SGD with the site's plan; under ``--twin-privacy local`` the same steps with
        sigma = 0 (Poisson batches, per-record clipping to C and the same learning rate, so
        the twin learns what a DP twin would without the noise), recorded in a ledger of its
        own that no claim reads: a local twin spends none of the site's epsilon.
        """
        twin = copy.deepcopy(model)
        cid = self.client_id
        gen = torch.Generator(device="cpu").manual_seed(
            seed_for(self.config.seed, 6, round_index, cid)
        )
        trainer = self.trainer
        if self.config.local_twins:
            assert self.plan is not None
            t = self.trainer
            # A plain SiteTrainer, never the audit's: gradient canaries measure the DP
            # mechanism, and sigma = 0 steps are none (an audit run would fail on them).
            trainer = SiteTrainer(
                client_id=cid,
                dataset=t.dataset,
                plan=dataclasses.replace(self.plan, noise_multiplier=0.0),
                ledger=PrivacyLedger(),  # read by no claim: a local twin spends no epsilon
                batch_size=t.batch_size,
                lr=t.lr,
                momentum=t.momentum,
                device=t.device,
                max_grad_norm=t.max_grad_norm,
                loss_fn=t.loss_fn,
                max_physical_batch_size=t.max_physical_batch_size,
                min_steps=t.min_steps,
                clipping=t.clipping,
                units=t.units,
            )
        noise = (
            mechanism_noise(self.config, 6, round_index, cid) if self.config.dp_enabled else None
        )
        result = trainer.train_round(
            model=twin,
            round_index=round_index,
            epochs=self.config.personalize,
            generator=gen,
            noise=noise,
            phase="personalize",
            lr=self.config.personalize_lr,
        )
        twin.load_state_dict(result.state, strict=True)
        return twin


def _patients_of(config: RunConfig, train: ArraySplit, site: int) -> np.ndarray | None:
    """The patient id of each training record under ``--privacy-unit patient``, else None.

    Raises:
        DataError: Patient-level DP was asked for and the data carry no patient ids.

    """
    if config.privacy_unit != "patient":
        return None
    patients = getattr(train, "patients", None)
    if patients is None:
        raise DataError(
            f"site {site}: --privacy-unit patient needs a patient id per record, and this "
            "site's data have none (set --group-by; docs/patients.md)"
        )
    return np.asarray(patients)
