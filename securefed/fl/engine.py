"""The federated round, written once: sample, fit, account, secure sum, server step, evaluate.

:class:`RoundEngine` is the server's side of a run over any
:class:`~securefed.protocol.link.Link`. The in-process runtime
(:class:`securefed.fl.simulation.Federation`) runs it over a
:class:`~securefed.protocol.link.LocalLink` to simulated
:class:`~securefed.fl.site_runtime.SiteRuntime` objects; the Flower runtime
(:class:`securefed.deploy.coordinator.Coordinator`) over Flower's Grid to the hospitals'
ClientApps, which run the same ``SiteRuntime``. Messages, accounting, the secure sum, the
server optimizer step and the round record are identical in both.

The server never holds a site's data or its individual update: it sends weights, gets back
what :mod:`securefed.dp.disclosures` declares (a protected update, DP accounting, held-out
metrics), and applies the sum a secure-sum mode (:mod:`securefed.protocol.modes`) returns.
A round that fails at any step changes no model.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.data.dataset import DatasetBundle
from securefed.dp import calibration
from securefed.errors import ConfigError, ProtocolError
from securefed.fl import qffl
from securefed.fl.bounds import (
    aggregate_violation,
    coordinate_slack,
    max_site_weight,
    site_violation,
    update_clip_for,
)
from securefed.fl.claims import ClaimBook
from securefed.fl.params import ParamLayout
from securefed.fl.planning import (
    model_choice,
    model_spec,
    personalize_rounds,
    personalizes_in,
    resolve_device,
    sample_participants,
    seed_for,
    task_for,
)
from securefed.fl.replies import SERVER_FIELDS, ReplySchema
from securefed.fl.site_runtime import weights_from_bytes, weights_to_bytes
from securefed.fl.strategies import ServerOptimizer, build_server_optimizer, build_strategy
from securefed.fl.transfer import pretraining_provenance
from securefed.metrics import convergence_criteria, detect_convergence, site_fairness
from securefed.models import build_model
from securefed.protocol.link import Link, Payloads, Replies
from securefed.protocol.modes import SumCollector, SumOutcome, get_mode
from securefed.protocol.wire import Stage, vector_from_bytes

__all__ = ["METRICS_SCHEMA_VERSION", "RoundEngine", "RoundRecord", "SiteInfo"]

#: metrics.json schema: 1.1 added task, strategy, primary_metric, site_mean, clusters and
#: personalization; 2.0 removed the per-site train_loss and num_train_samples (they no longer
#: leave a site; num_train_samples stays when the sites disclose their sizes); 2.1 (additive)
#: gives every run `runtime` and per-round `transport`, as one engine runs both runtimes;
#: 2.2 (additive) gives every round `dropped_reasons` and `update_bound` (the poisoning bound,
#: and why a round was refused); 2.3 (additive) judges convergence by a trend over a window of
#: rounds (``convergence_criteria`` names the rule and all its parameters) and gives every
#: round, and the run, a ``fairness`` block across sites (and ``fairness_twins``); 2.4
#: (additive) gives segmentation metrics ``mean_sensitivity``, ``mean_specificity`` and the
#: voxel-level ``voxel_sensitivity``/``voxel_specificity``/``voxel_f1``/``voxel_iou``.
METRICS_SCHEMA_VERSION = "2.4"

#: Events a runtime may log (``event=..., **fields``); the Flower runtime writes them to
#: deploy-log.jsonl.
EventSink = Callable[..., None]


@dataclass
class RoundRecord:
    """What one round produced: ``data`` is its ``metrics.json`` record (a JSON contract)."""

    data: dict[str, Any]
    applied: bool


@dataclass
class SiteInfo:
    """What a site told the server at set-up (shapes and keys; no records)."""

    client_id: int
    num_heldout: int
    fingerprint: str
    dataset: str
    signing_key: str | None = None
    num_samples: int | None = None
    class_counts: list[int] | None = None


@dataclass
class _Sums:
    """The fit and secure-sum part of a round, before evaluation."""

    applied: bool
    error: str | None
    survivors: list[int]
    train_seconds: float = 0.0
    protect_seconds: float = 0.0
    agg_seconds: float = 0.0
    clipped: int = 0
    clusters: list[dict[str, Any]] | None = None
    site_errors: dict[int, str] = field(default_factory=dict)
    #: Why the poisoning bound refused the round's sum (then ``applied`` is False).
    refused: str | None = None
    #: L2 norm of the applied average update (the largest over CFL's clusters).
    update_norm: float | None = None


class _LoggedLink:
    """A link that checks every reply, then reports the exchange to the engine's log.

    Args:
        link: The link to the sites.
        event: The engine's log.
        check: ``check(message, reply)`` raises :class:`ProtocolError` for a reply the server
            must not read (:meth:`~securefed.fl.replies.ReplySchema.check`); that site then
            failed the exchange, with the reason.

    """

    def __init__(
        self,
        link: Link,
        event: EventSink,
        check: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.link = link
        self.event = event
        self.check = check

    @property
    def sent(self) -> dict[int, int]:
        return self.link.sent

    @property
    def received(self) -> dict[int, int]:
        return self.link.received

    def exchange(
        self, payloads: Payloads, *, timeout: float, group: str, awaited: set[int] | None = None
    ) -> Replies:
        stages = sorted({stage.rsplit(".", 1)[-1] for stage, _ in payloads.values()})
        where = {"round": int(group)} if group.isdigit() else {"group": group}
        stage = stages[0] if len(stages) == 1 else ",".join(stages)
        self.event(event="sent", stage=stage, **where)
        replies, errors = self.link.exchange(
            payloads, timeout=timeout, group=group, awaited=awaited
        )
        if self.check is not None:
            for sid in sorted(replies):
                message = payloads[sid][0].rsplit(".", 1)[-1] if sid in payloads else "?"
                try:
                    self.check(message, replies[sid])
                except ProtocolError as exc:
                    # A malformed reply drops its site from the step; nothing of it is read.
                    errors[sid] = f"{message} reply refused: {exc}"
                    del replies[sid]
        self.event(
            event="replies",
            stage=stage,
            sites=sorted(replies),
            errors={str(k): v for k, v in sorted(errors.items())},
            **where,
        )
        return replies, errors


def apply_transfer(
    models: list[nn.Module],
    *,
    config: RunConfig,
    head_prefixes: tuple[str, ...],
    bundle: DatasetBundle,
    public_indices: np.ndarray | None,
    last_block_prefixes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load pretrained weights and freeze what ``freeze`` names, in every model."""
    from securefed.models.transfer import freeze, load_pretrained

    info: dict[str, Any] = {"pretrained": None, "frozen": [], "reinitialised": []}
    if config.pretrained is not None:
        loads = [
            load_pretrained(m, path=config.pretrained, head_prefixes=head_prefixes) for m in models
        ]
        info["pretrained"] = pretraining_provenance(
            metadata=dict(loads[0].metadata),
            file_sha256=loads[0].sha256,
            bundle=bundle,
            public_fraction=config.public_fraction,
            public_seed=config.public_seed,
            public_indices=public_indices,
        )
        info["pretrained"]["path"] = str(config.pretrained)
        # How the file's keys became the model's (securefed.models.weights): the naming
        # convention, and what was dropped, adapted or zero-filled on the way.
        info["pretrained"].update(
            convention=loads[0].convention,
            file_format=loads[0].file_format,
            renamed_keys=len(loads[0].renamed),
            dropped=list(loads[0].dropped),
            adapted=list(loads[0].adapted),
            zeroed=list(loads[0].zeroed),
        )
        info["reinitialised"] = list(loads[0].reinitialised)
    spec = config.effective_freeze
    if spec != "none":
        frozen = [
            freeze(
                m, spec=spec, head_prefixes=head_prefixes, last_block_prefixes=last_block_prefixes
            )
            for m in models
        ]
        info["frozen"] = list(frozen[0])
    # Scalars and tensors are counted apart: "parameters" always means scalars (numel), as
    # in num_parameters, and "tensors" the weight and bias arrays that hold them.
    params = list(models[0].parameters())
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in params)
    info.update(
        {
            "freeze": spec,
            "trainable_parameters": n_train,
            "frozen_parameters": n_all - n_train,
            "trainable_tensors": len(trainable),
            "frozen_tensors": len(params) - len(trainable),
            "all_parameters": n_all,
        }
    )
    return info


class RoundEngine:
    """The server's state and the round, over a :class:`~securefed.protocol.link.Link`.

    Args:
        config: The run configuration.
        bundle: The server's copy of the data set: its test split scores the global model;
            nothing else of it is used here.
        link: The connection to the sites (keyed by site id).
        public_indices: Records the pretraining used (FTL provenance), if any.
        dropout_schedule: In-process simulation only: ``f(round, participants) ->
            (drop_before_upload, drop_after_upload)``.
        fit_timeout: Seconds a site may take to train (or evaluate) before it counts as gone.
        stage_timeout: Seconds a site may take for one protocol step.
        on_event: Called with progress events (``event="sent", round=...``).

    """

    #: Which runtime drives the engine (privacy.json's disclosures, metrics' transport).
    runtime = "in-process"

    def __init__(
        self,
        config: RunConfig,
        *,
        bundle: DatasetBundle,
        link: Link,
        public_indices: np.ndarray | None = None,
        dropout_schedule: Callable[[int, list[int]], tuple[set[int], set[int]]] | None = None,
        fit_timeout: float = 3600.0,
        stage_timeout: float = 300.0,
        on_event: EventSink | None = None,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.link = link
        #: The link every round exchange goes through: it logs each stage sent and answered.
        self.logged = _LoggedLink(link, self._event)
        self.public_indices = public_indices
        self.dropout_schedule = dropout_schedule
        self.fit_timeout = fit_timeout
        self.stage_timeout = stage_timeout
        self.on_event = on_event
        self.device = resolve_device(config.device)
        self.task = task_for(bundle, config)
        self.spec = model_spec(bundle, self.task, config)
        self.strategy = build_strategy(config.strategy)
        builds = []
        for k in range(self.strategy.num_models(config)):
            # Cluster k > 0 gets its own initialisation: IFCA needs distinct models to start.
            torch.manual_seed(seed_for(config.seed, 0x30DE1, *([k] if k else [])))
            builds.append(build_model(name=config.model, spec=self.spec, **model_choice(config)))
        self.built = builds[0]
        self.models: list[nn.Module] = [b.module.to(self.device) for b in builds]
        self.transfer = apply_transfer(
            self.models,
            config=config,
            head_prefixes=tuple(self.built.head_prefixes),
            last_block_prefixes=tuple(self.built.last_block_prefixes),
            bundle=bundle,
            public_indices=public_indices,
        )
        #: teacher-student with ``--teacher fixed``: the pretrained teacher as loaded, sent
        #: beside the global model in every round (a resumed run loads it again here, before
        #: the checkpoint's global weights replace the model's).
        self.teacher_blob: bytes | None = (
            weights_to_bytes(self.models[0].state_dict())
            if config.strategy == "teacher-student" and config.teacher == "fixed"
            else None
        )
        if self.teacher_blob is not None and self.transfer["reinitialised"]:
            # The loader re-initialises a head that does not fit; a fixed teacher keeps it
            # random for the whole run (a global one would at least train it).
            raise ConfigError(
                f"--teacher fixed: the --pretrained teacher lacks a fitting "
                f"{', '.join(sorted(self.transfer['reinitialised']))} (another label set?), so "
                "it would pseudo-label at random; pretrain it for this data set's classes, or "
                "use --teacher global"
            )
        trainable = [n for n, p in self.models[0].named_parameters() if p.requires_grad]
        self.layout = ParamLayout(
            self.models[0].state_dict(), keys=trainable if self.transfer["frozen"] else None
        )
        self.server_opts: list[ServerOptimizer] = [
            build_server_optimizer(
                name=config.server_opt,
                lr=config.effective_server_lr,
                momentum=config.server_momentum,
            )
            for _ in self.models
        ]
        self.mode = get_mode(config.secure_agg)
        self._collectors: dict[int, SumCollector] = {}
        self.he_public: bytes | None = None
        #: The federation's roster, for modes that use one (the runtime sets it at set-up).
        self.roster: Roster | None = None
        self.claims = ClaimBook(config)
        self.setup_signatures: dict[int, str] = {}
        #: Sites that did not close the run (:meth:`close_sites`), and why.
        self.close_errors: dict[int, str] = {}
        self.site_info: dict[int, SiteInfo] = {}
        #: CFL: each site's cluster (None until it is known).
        self.clusters: dict[int, int | None] = {}
        self.eps_history: dict[int, list[float]] = {}
        self.records: list[RoundRecord] = []
        self.elapsed = 0.0
        #: Every reply of a round is checked against it before anything reads it.
        self.schema = ReplySchema(
            config, num_models=len(self.models), primary_metric=self.task.primary_metric
        )
        self.logged.check = self.schema.check
        #: The poisoning bound (docs/poisoning.md): C_u and N_max.
        self.update_clip = update_clip_for(config, self.layout.size)
        self.max_weight = max_site_weight(config)
        #: The smallest last coordinate an honest site sends (1, or q-FFL's, docs/fairness.md).
        self.least_weight = qffl.least_weight(config)
        if self.least_weight < 1.0 and self.least_weight <= 2.0 * coordinate_slack(config, 1):
            raise ConfigError(
                f"--fair-q {config.fair_q:g}: an honest site's weight can be as small as "
                f"{self.least_weight:.3g}, within the {config.secure_agg} sum's error per site "
                f"({coordinate_slack(config, 1):.3g}), so the server's step could be noise; "
                "use a smaller --fair-q"
                + (" or --secagg-ring-bits 64" if config.secure_agg == "mask" else "")
            )
        if config.logit_adjust and self.task.name != "classification":
            raise ConfigError(
                f"--logit-adjust adjusts classification logits; {bundle.name} is a "
                f"{self.task.name} data set"
            )
        if config.fair_q and self.task.name != "classification":
            raise ConfigError(
                f"--fair-q {config.fair_q:g} (q-FFL) weighs classification losses; "
                f"{bundle.name} is a {self.task.name} data set"
            )

    # -- what the report writers read ---------------------------------------------------------
    @property
    def ledger(self) -> Any:
        """Every DP event the sites reported (:class:`~securefed.dp.ledger.PrivacyLedger`)."""
        return self.claims.ledger

    @property
    def plans(self) -> dict[int, Any]:
        """Each site's pinned DP plan."""
        return self.claims.plans

    @property
    def delta(self) -> float | None:
        """The run's delta: the largest any site uses."""
        return self.claims.delta

    @property
    def global_model(self) -> nn.Module:
        """The model the federation serves: the only one, or (CFL) the largest cluster's."""
        return self.models[self.largest_cluster()]

    @property
    def aggregator(self) -> SumCollector:
        """The secure-sum mode's server side (its ``describe()`` goes into the report)."""
        return self._collector(len(self.site_info) or self.config.clients)

    def largest_cluster(self) -> int:
        """Index of the cluster with most sites (ties: the lowest index); 0 without CFL."""
        if len(self.models) == 1:
            return 0
        known = [k for k in self.clusters.values() if k is not None]
        return int(np.argmax(np.bincount(known, minlength=len(self.models))))

    def personalize_rounds(self) -> int:
        """How many times the twins are fine-tuned over the run."""
        return personalize_rounds(self.config)

    def _event(self, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(**fields)

    def _collector(self, n_sites: int) -> SumCollector:
        """One server side per group size (masking's parameters depend on it)."""
        if n_sites not in self._collectors:
            extra = {"roster": self.roster} if self.mode.uses_roster else {}
            self._collectors[n_sites] = self.mode.server(
                self.config, n_sites=n_sites, he_public=self.he_public, **extra
            )
        return self._collectors[n_sites]

    # -- set-up ---------------------------------------------------------------------------------
    def adopt_sites(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        """Check every site's set-up reply and pin its keys and plan.

        Raises:
            ConfigError: If a site's data does not fit the model, a key is missing or
                shared, a size disclosure breaks the run's rule, or a plan breaks it.

        """
        cfg = self.config
        want = {
            "in_channels": self.spec.in_channels,
            "num_classes": self.spec.num_classes,
            "spatial_dims": self.spec.spatial_dims,
            "image_shape": list(self.spec.image_shape),
        }
        infos: dict[int, SiteInfo] = {}
        for sid, info in sorted(replies.items()):
            try:
                self.schema.check("setup", info)
            except ProtocolError as exc:
                raise ConfigError(f"site {sid}: set-up reply refused: {exc}") from exc
            if info.get("spec") != want or info.get("task") != self.task.name:
                raise ConfigError(
                    f"site {sid}: its data ({info.get('task')}, {info.get('spec')}) does not "
                    f"fit the run's model ({self.task.name}, {want})"
                )
            if cfg.dp_enabled and not isinstance(info.get("signing_key"), str):
                raise ConfigError(f"site {sid}: sent no signing key for its privacy claims")
            disclosed = "num_samples" in info
            if disclosed != cfg.disclose_site_sizes:
                raise ConfigError(
                    f"site {sid}: "
                    + (
                        "disclosed its size, which the run did not ask for"
                        if disclosed
                        else "keeps its size private, but the run asks sites to disclose it "
                        "(start it with --disclose-size, node config disclose-size=true; "
                        "its node config says disclose-size=false)"
                    )
                )
            infos[sid] = SiteInfo(
                client_id=sid,
                num_heldout=int(info.get("num_heldout", 0)),
                fingerprint=str(info.get("fingerprint")),
                dataset=str(info.get("dataset")),
                signing_key=info.get("signing_key"),
                num_samples=info.get("num_samples"),
                class_counts=info.get("class_counts"),
            )
        keys = [i.signing_key for i in infos.values()]
        if cfg.dp_enabled and len(set(keys)) != len(keys):
            raise ConfigError("two sites sent the same signing key; each site needs its own")
        if cfg.secure_agg == "he":
            publics = {replies[sid].get("he_public") for sid in infos}
            if len(publics) != 1 or None in publics:
                raise ConfigError("the sites hold different CKKS keys; give every site the same")
            self.he_public = publics.pop()
            self._collectors.clear()
            self._collector(len(infos)).describe()  # refuses keys of other parameters
        for sid, info in infos.items():
            if info.signing_key is not None:
                self.claims.keys[sid] = info.signing_key
            if info.num_samples is not None:
                self.claims.sizes[sid] = int(info.num_samples)
            if cfg.dp_enabled:
                try:
                    self.claims.pin_plan(sid, replies[sid].get("plan"))
                except ProtocolError as exc:
                    raise ConfigError(str(exc)) from exc
        #: The signature each site sent at set-up (over its claim as it then stood).
        self.setup_signatures = {
            sid: replies[sid]["signature"] for sid in infos if "signature" in replies[sid]
        }
        self.site_info = infos
        self.clusters = {sid: None for sid in infos} if len(self.models) > 1 else {}

    # -- rounds ---------------------------------------------------------------------------------
    def participants(self, round_index: int) -> list[int]:
        """Sites sampled for a round (from a generator of its own, not the training RNG)."""
        return sample_participants(self.config, ids=sorted(self.site_info), round_index=round_index)

    def _blobs(self) -> list[bytes]:
        return [weights_to_bytes(m.state_dict()) for m in self.models]

    def _history(self, sid: int) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.ledger.for_client(sid)]

    def run_round(self, round_index: int) -> RoundRecord:
        """Train, aggregate and evaluate one round. A failed round changes no model."""
        start = time.perf_counter()
        cfg = self.config
        chosen = self.participants(round_index)
        drop_before, drop_after = (
            self.dropout_schedule(round_index, chosen) if self.dropout_schedule else (set(), set())
        )
        sent_before, received_before = dict(self.link.sent), dict(self.link.received)
        if cfg.schedule == "cyclic":
            sums = self._cyclic_round(round_index, chosen, drop_before)
        else:
            sums = self._parallel_round(round_index, chosen, drop_before, drop_after)
        calibrated, calibration_seconds = None, 0.0
        if round_index == cfg.rounds and self.calibrates:
            cal_start = time.perf_counter()
            calibrated = self._calibrate(round_index, chosen, sums)
            calibration_seconds = time.perf_counter() - cal_start
        eval_start = time.perf_counter()
        record, twin_seconds, eval_errors = self._evaluate(round_index, chosen, sums)
        eval_seconds = time.perf_counter() - eval_start - twin_seconds
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        errors = {**eval_errors, **sums.site_errors}
        sent = {s: self.link.sent.get(s, 0) - sent_before.get(s, 0) for s in self.site_info}
        received = {
            s: self.link.received.get(s, 0) - received_before.get(s, 0) for s in self.site_info
        }
        record.update(
            {
                "seconds": seconds,
                "cumulative_seconds": self.elapsed,
                "applied": sums.applied,
                "error": sums.error,
                "participants": chosen,
                "survivors": sums.survivors,
                "dropped": sorted(set(chosen) - set(sums.survivors)),
                "dropped_reasons": {
                    str(s): errors.get(s)
                    or ("its update is not in the sum" if sums.applied else "round not applied")
                    for s in sorted(set(chosen) - set(sums.survivors))
                },
                "update_bound": None
                if cfg.schedule == "cyclic"
                else {
                    "update_clip": self.update_clip,
                    "max_weight": self.max_weight,
                    "update_norm": sums.update_norm,
                    "refused": sums.refused,
                },
                "timing": {
                    # Sites send no training time (a side channel on their size): this is the
                    # server's own wall time of the fit exchange.
                    "local_training": sums.train_seconds,
                    "protection": sums.protect_seconds,
                    "aggregation": sums.agg_seconds,
                    "personalization": twin_seconds,
                    "evaluation": eval_seconds,
                    "calibration": calibration_seconds,
                },
                "bytes_per_client": {str(s): received[s] for s in sums.survivors},
                "clipped_values": sums.clipped,
                "transport": {
                    "runtime": self.runtime,
                    "payload_bytes_from_site": {str(s): received[s] for s in self.site_info},
                    "payload_bytes_to_site": {str(s): sent[s] for s in self.site_info},
                    "site_errors": {str(s): why for s, why in sorted(errors.items())},
                },
            }
        )
        if sums.clusters is not None:
            record["clusters"] = sums.clusters
        if calibrated is not None:
            record["decision_calibration"] = calibrated
        rec = RoundRecord(data=record, applied=sums.applied)
        self.records.append(rec)
        self._event(
            event="round",
            round=round_index,
            applied=sums.applied,
            error=sums.error,
            survivors=sums.survivors,
            seconds=round(seconds, 3),
        )
        return rec

    def _fit(
        self, round_index: int, payloads: dict[int, tuple[str, dict[str, Any]]]
    ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """The fit exchange, then each reply's DP accounting (a refused one is left out)."""
        replies, errors = self.logged.exchange(
            payloads, timeout=self.fit_timeout, group=str(round_index)
        )
        fits = {}
        for sid in sorted(replies):
            try:
                self.claims.account(sid, replies[sid], round_index=round_index)
            except ProtocolError as exc:
                errors[sid] = str(exc)
                continue
            if "refused" in replies[sid]:
                # It trained (and was accounted) but kept its update back.
                errors[sid] = str(replies[sid]["refused"])
                continue
            fits[sid] = replies[sid]
        return fits, errors

    def _assign(
        self, round_index: int, chosen: list[int], blobs: list[bytes], errors: dict[int, str]
    ) -> dict[int, int]:
        """Which model each chosen site trains: the one the strategy (CFL: the site) picks."""
        if not self.strategy.selects_model:
            return dict.fromkeys(chosen, 0)
        payloads = {
            sid: (
                Stage.SELECT,
                {
                    **_models_fields(blobs),
                    "layout_keys": list(self.layout.keys),
                    "round": round_index,  # the site answers once per round
                },
            )
            for sid in chosen
        }
        replies, failed = self.logged.exchange(
            payloads, timeout=self.fit_timeout, group=str(round_index)
        )
        errors.update(failed)
        assign = {}
        for sid, rep in replies.items():
            k = rep.get("cluster")
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.models):
                errors[sid] = f"site {sid}: chose no valid cluster ({k!r})"
                continue
            assign[sid] = k
        return assign

    def _parallel_round(
        self, round_index: int, chosen: list[int], drop_before: set[int], drop_after: set[int]
    ) -> _Sums:
        errors: dict[int, str] = {}
        blobs = self._blobs()
        assign = self._assign(round_index, chosen, blobs, errors)
        groups = {
            k: sorted(c for c in assign if assign[c] == k)
            for k in range(len(self.models))
            if any(v == k for v in assign.values())
        }
        keys = list(self.layout.keys)
        cfl = len(self.models) > 1
        # A site alone in its cluster under secure aggregation is not asked to train: a "sum"
        # of its one update would reveal it, so the cluster is skipped below.
        solo = {
            c
            for members in groups.values()
            if cfl and self.mode.protects and len(members) < 2
            for c in members
        }
        payloads = {
            sid: (
                Stage.FIT,
                {
                    "weights": blobs[assign[sid]],
                    "layout_keys": keys,
                    "round": round_index,
                    "n_sites": len(groups[assign[sid]]),
                    "history": self._history(sid),
                    **({"teacher": self.teacher_blob} if self.teacher_blob is not None else {}),
                },
            )
            for sid in sorted(assign)
            if sid not in solo
        }
        fit_start = time.perf_counter()
        fits, fit_errors = self._fit(round_index, payloads)
        errors.update(fit_errors)
        if not self.mode.protects:
            fits = self._screen_updates(fits, errors)
        train_seconds = time.perf_counter() - fit_start
        outcomes: dict[int, SumOutcome] = {}
        skipped: dict[int, str] = {}
        error: str | None = None
        refused: str | None = None
        agg_start = time.perf_counter()
        for k, members in groups.items():
            if cfl and self.mode.protects and len(members) < 2:
                # A "sum" of one update is that update: aggregating it securely would only
                # pretend. The cluster keeps its model this round.
                skipped[k] = "one site: a secure sum of one update would reveal it"
                continue
            contributed = {c: fits[c] for c in members if c in fits}
            if not contributed:
                skipped[k] = "no site completed training this round"
                continue
            outcome = self._collector(len(members)).collect(
                self.logged,
                contributed,
                round_index=round_index,
                chosen=members,
                dim=self.layout.size + 1,
                timeout=self.stage_timeout,
                drop_before_upload=set(members) & drop_before,
                drop_after_upload=set(members) & drop_after,
            )
            for sid, why in outcome.site_errors.items():
                errors.setdefault(sid, why)
            if outcome.error is not None or outcome.total is None:
                # One failed sum fails the round: no cluster is half-applied.
                outcomes, error = {}, outcome.error or "the secure sum failed"
                break
            refused = self._bound_violation(outcome)
            if refused is not None:
                # A sum no honest clipped updates can make: the round is refused, no model
                # changes (and no cluster is half-applied).
                outcomes, error = {}, f"round {round_index} refused: {refused}"
                break
            outcomes[k] = outcome
        agg_seconds = time.perf_counter() - agg_start
        if error is None and not outcomes:
            error = (
                "no site completed training this round"
                if not cfl
                else "no cluster could be aggregated this round: "
                + "; ".join(f"cluster {k}: {why}" for k, why in sorted(skipped.items()))
            )
        if error is None:
            for k, outcome in outcomes.items():
                self._server_step(k, outcome.total)
            for sid in assign:
                if cfl:
                    self.clusters[sid] = assign[sid]
        survivors = sorted(c for o in outcomes.values() for c in o.survivors)
        protect = sum(float(f.get("protect_seconds", 0.0)) for f in fits.values())
        protect += sum(sum(o.protect_seconds.values()) for o in outcomes.values())
        norms = [
            float(np.linalg.norm(o.total[:-1])) / float(o.total[-1])
            for o in outcomes.values()
            if o.total is not None
        ]
        sums = _Sums(
            applied=error is None,
            error=error,
            refused=refused,
            update_norm=max(norms) if norms and error is None else None,
            survivors=survivors,
            train_seconds=train_seconds,
            protect_seconds=protect,
            agg_seconds=sum(o.server_seconds for o in outcomes.values()) or agg_seconds,
            clipped=sum(o.clipped for o in outcomes.values()),
            site_errors=errors,
        )
        if cfl:
            sums.clusters = [
                {
                    "cluster": k,
                    "members": groups.get(k, []),
                    "applied": k in outcomes,
                    "skipped": skipped.get(k),
                }
                for k in range(len(self.models))
            ]
        return sums

    def _screen_updates(
        self, fits: dict[int, dict[str, Any]], errors: dict[int, str]
    ) -> dict[int, dict[str, Any]]:
        """Without secure aggregation: drop each site whose own vector breaks the bound.

        The server sees each plaintext update, so it checks each one (a secure mode's server
        can check only the sum: :meth:`_bound_violation`).
        """
        kept = {}
        for sid, reply in fits.items():
            if "vector" in reply:
                try:
                    vector = vector_from_bytes(
                        reply["vector"], length=self.layout.size + 1, what=f"site {sid}"
                    )
                except ProtocolError as exc:
                    errors[sid] = f"vector: {exc}"
                    continue
                why = site_violation(
                    vector,
                    clip=self.update_clip,
                    max_weight=self.max_weight,
                    least_weight=self.least_weight,
                )
                if why is not None:
                    errors[sid] = f"fit: update refused: {why}"
                    continue
            kept[sid] = reply
        return kept

    def _bound_violation(self, outcome: SumOutcome) -> str | None:
        """Why a decoded sum breaks the poisoning bound (docs/poisoning.md), or None."""
        assert outcome.total is not None
        k = len(outcome.survivors)
        return aggregate_violation(
            outcome.total,
            contributors=k,
            clip=self.update_clip,
            max_weight=self.max_weight,
            slack=coordinate_slack(self.config, k),
            least_weight=self.least_weight,
        )

    def _server_step(self, k: int, total: np.ndarray) -> None:
        """Apply the average update of cluster ``k`` through its server optimizer."""
        model = self.models[k]
        state = {n: v.detach().clone() for n, v in model.state_dict().items()}
        current = self.layout.flatten(state)
        delta = total[:-1] / float(total[-1])
        new_vec = self.server_opts[k].step(current=current, delta=delta)
        model.load_state_dict({**state, **self.layout.unflatten(new_vec)}, strict=True)

    def _cyclic_round(self, round_index: int, chosen: list[int], drop_before: set[int]) -> _Sums:
        """Cyclic weight transfer: the model visits the sites in a fresh order each round."""
        order = np.random.default_rng(seed_for(self.config.seed, 7, round_index)).permutation(
            chosen
        )
        current = self._blobs()[0]
        visited: list[int] = []
        errors: dict[int, str] = {}
        trial = copy.deepcopy(self.models[0])  # checks each handed-on model before use
        start = time.perf_counter()
        for sid in (int(c) for c in order):
            fields = {
                "weights": current,
                "layout_keys": list(self.layout.keys),
                "round": round_index,
                "n_sites": 1,
                "history": self._history(sid),
                "return_weights": True,
            }
            fits, failed = self._fit(round_index, {sid: (Stage.FIT, fields)})
            errors.update(failed)
            if sid not in fits or sid in drop_before:
                continue  # it never handed its model on; the next site starts from the last one
            try:
                trial.load_state_dict(
                    weights_from_bytes(fits[sid]["weights"], what=f"site {sid}'s model"),
                    strict=True,
                )
            except (ProtocolError, RuntimeError) as exc:
                errors[sid] = f"site {sid}: its model does not fit ({str(exc).splitlines()[0]})"
                continue
            current = fits[sid]["weights"]
            visited.append(sid)
        applied = bool(visited)
        if applied:
            self.models[0].load_state_dict(
                weights_from_bytes(current, what="the handed-on model"), strict=True
            )
        return _Sums(
            applied=applied,
            error=None if applied else "every site dropped before handing the model on",
            survivors=sorted(visited),
            train_seconds=time.perf_counter() - start,
            site_errors=errors,
        )

    # -- evaluation -------------------------------------------------------------------------
    @property
    def calibrates(self) -> bool:
        """Whether the run ends with a decision calibration (:mod:`securefed.dp.calibration`)."""
        return (
            calibration.calibrates(self.config.to_dict())
            and self.task.name == "classification"
            and len(self.models) == 1
        )

    def _calibrate(self, round_index: int, chosen: list[int], sums: _Sums) -> dict[str, Any]:
        """After the last round: shift the global model's decision by the sites' noised statistics.

        Every site that neither failed nor dropped out of this round is asked (its budget
        covers the release whether or not it was sampled for the round); a dropped site may be
        gone, in both runtimes alike. Each reply is accounted before it is read. The
        offsets change only the bias of the model's output layer, before the final
        evaluation, so metrics.json's last round and model.safetensors describe the
        calibrated model.
        """
        k = self.spec.num_classes
        clip = calibration.clip_of(self.config.to_dict(), model=self.built.name)
        blob = self._blobs()[0]
        dropped = set(chosen) - set(sums.survivors) if sums.applied else set()
        asked = sorted(set(self.site_info) - set(sums.site_errors) - dropped)
        payloads = {
            sid: (
                Stage.CALIBRATE,
                {
                    "weights": blob,
                    "layout_keys": list(self.layout.keys),
                    "round": round_index,
                    "history": self._history(sid),
                },
            )
            for sid in asked
        }
        replies, errors = self.logged.exchange(
            payloads, timeout=self.stage_timeout, group=str(round_index)
        )
        total = np.zeros(calibration.statistics_size(k))
        used: list[int] = []
        accounted: list[int] = []
        for sid in sorted(replies):
            try:
                # Accounted first: what a site says it spent counts even if its values are bad.
                self.claims.account(
                    sid, replies[sid], round_index=round_index, phase=calibration.PHASE
                )
            except ProtocolError as exc:
                errors[sid] = str(exc)
                continue
            accounted.append(sid)
            try:
                vec = calibration.check_statistics(
                    replies[sid].get("statistics"), num_classes=k, what=f"site {sid}"
                )
            except ValueError as exc:
                errors[sid] = str(exc)
                continue
            why = calibration.implausible(
                vec,
                num_classes=k,
                noise_multiplier=float(self.config.calibration_noise),
                max_records=self.max_weight,
                clip=clip,
            )
            if why is not None:
                errors[sid] = f"site {sid}: calibration statistics refused: {why}"
                continue
            total += vec
            used.append(sid)
        noise = float(self.config.calibration_noise)
        record: dict[str, Any] = {
            "sites": used,
            # Every site whose release is in the ledger (the audit checks the two agree).
            "accounted": accounted,
            "noise_multiplier": noise,
            "clip": clip,
            "site_errors": {str(s): why for s, why in sorted(errors.items())},
        }
        if not used:
            record.update(applied=False, reason="no site sent calibration statistics")
            record.update(offsets=[0.0] * k, counts=None)
            return record
        try:
            result = calibration.offsets_from_sum(
                total, num_classes=k, sites=len(used), noise_multiplier=noise, clip=clip
            )
        except ValueError as exc:  # a sum that overflowed: bad releases, not a failed round
            result = calibration.Calibration([0.0] * k, False, str(exc), [])
        applied, reason = result.applied, result.reason
        if applied:
            reason = self._shift_output(result.offsets)
            applied = reason is None
        record.update(
            applied=applied,
            reason=reason,
            offsets=result.offsets if applied else [0.0] * k,
            counts=result.counts,
        )
        self._event(event="calibration", round=round_index, applied=applied, reason=reason)
        return record

    @torch.no_grad()
    def _shift_output(self, offsets: list[float]) -> str | None:
        """Add ``offsets`` to the global model's logits through its output bias.

        The bias is found by structure (:func:`_output_biases`), then the shift is verified on
        two test images: every logit must move by exactly its offset. A model whose layout
        fooled the search (a plug-in whose last linear layer is not its output) is put back
        as it was. Returns why the shift was not made, or None.
        """
        model = self.models[0]
        biases = _output_biases(model, len(offsets))
        if not biases:
            return "the model has no output-layer bias to shift"
        probe = torch.from_numpy(np.array(self.bundle.test.images[:2])).to(self.device)
        model.eval()
        before = model(probe).double()
        shift = [torch.tensor(offsets, dtype=b.dtype, device=b.device) for b in biases]
        for bias, s in zip(biases, shift):
            bias += s
        moved = model(probe).double() - before
        want = torch.tensor(offsets, dtype=torch.float64, device=moved.device).expand_as(moved)
        if not torch.allclose(moved, want, atol=1e-4, rtol=1e-4):
            for bias, s in zip(biases, shift):
                bias -= s
            return "the model's output did not move by the offsets (its output layer is not found)"
        return None

    def _evaluate(
        self, round_index: int, chosen: list[int], sums: _Sums
    ) -> tuple[dict[str, Any], float, dict[int, str]]:
        """Every site scores the model it uses on its held-out split (and fine-tunes its twin).

        Returns:
            The round's record (without timing), the seconds of a twin fine-tuning exchange
            (0.0 when none ran) and the sites that failed it.

        """
        cfg = self.config
        personalize = personalizes_in(cfg, round_index)
        blobs = self._blobs()
        payloads: dict[int, tuple[str, dict[str, Any]]] = {}
        for sid in sorted(self.site_info):
            # A site that failed a step this round may be gone: its reply is not awaited, so it
            # is not asked to fine-tune (spending the server might then not count).
            twin = personalize and sid not in sums.site_errors
            fields: dict[str, Any] = {
                "layout_keys": list(self.layout.keys),
                "round": round_index,
                "personalize": twin,
            }
            if twin:
                fields["history"] = self._history(sid)
            if len(self.models) > 1 and self.clusters.get(sid) is None:
                fields.update(_models_fields(blobs))
            else:
                fields["weights"] = blobs[self.clusters.get(sid) or 0]
            payloads[sid] = (Stage.EVALUATE, fields)
        # A site that failed this round may be gone for good: its evaluation is not awaited.
        awaited = set(self.site_info) - set(sums.site_errors)
        start = time.perf_counter()
        replies, errors = self.logged.exchange(
            payloads, timeout=self.fit_timeout, group=str(round_index), awaited=awaited
        )
        exchange_seconds = time.perf_counter() - start
        ev = self.task.evaluate
        primary = self.task.primary_metric
        clients = []
        for sid in sorted(self.site_info):
            rep = replies.get(sid, {})
            # A local twin (--twin-privacy local) spends nothing: no claim to account.
            if payloads[sid][1]["personalize"] and sid in replies and not cfg.local_twins:
                try:
                    self.claims.account(sid, rep, round_index=round_index, phase="personalize")
                except ProtocolError as exc:
                    errors[sid] = str(exc)
                    rep = {}
            if "cluster" in rep and len(self.models) > 1:
                k = rep["cluster"]
                if isinstance(k, int) and 0 <= k < len(self.models):
                    self.clusters[sid] = k
            eps = self.claims.epsilon(sid)
            self.eps_history.setdefault(sid, []).append(eps if eps is not None else float("inf"))
            entry: dict[str, Any] = {
                "client_id": sid,
                "participated": sid in chosen,
                "epsilon": eps,
            }
            if cfg.disclose_site_sizes and self.site_info[sid].num_samples is not None:
                entry["num_train_samples"] = self.site_info[sid].num_samples
            if len(self.models) > 1:
                entry["cluster"] = self.clusters.get(sid)
            if rep.get("metrics"):
                # The site's figures never replace what the server computed (its id, its
                # epsilon from the server's own accounting, ...): a figure of such a name is
                # dropped (the reply schema already refused it).
                entry.update(
                    (k, v)
                    for k, v in rep["metrics"].items()
                    if k not in entry and k not in SERVER_FIELDS
                )
                if rep.get("twin"):
                    entry["twin"] = rep["twin"]
            clients.append(entry)
        out: dict[str, Any] = {
            "round": round_index,
            "global": ev(model=self.global_model, split=self.bundle.test, device=self.device),
            "clients": clients,
        }
        scored = [c for c in clients if c.get(primary) is not None]
        out["site_mean"] = {
            primary: float(np.mean([c[primary] for c in scored])) if scored else None
        }
        twins = [c["twin"][primary] for c in scored if c.get("twin", {}).get(primary) is not None]
        if twins:
            out["site_mean"]["twin_" + primary] = float(np.mean(twins))
        if len(self.models) > 1:
            out["global_model_cluster"] = self.largest_cluster()
            out["cluster_test"] = [
                {
                    "cluster": k,
                    primary: ev(model=m, split=self.bundle.test, device=self.device)[primary],
                }
                for k, m in enumerate(self.models)
            ]
        return out, (exchange_seconds if personalize else 0.0), errors

    # -- checkpoint -----------------------------------------------------------------------------
    def checkpoint_state(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
        """What :func:`securefed.fl.checkpoint.save_checkpoint` needs after a completed round.

        Returns:
            ``(model_state, optimizer_state, meta, extra)``: the first model and its server
            optimizer, CFL's other cluster models and optimizers as extra tensor groups, and
            JSON for the rest (the claim book, the sites' set-up, epsilon history, records).
            Digital twins are not stored: every twin is fine-tuned afresh from the served
            model before it is read. Nothing a site keeps to itself is stored.

        """
        extra: dict[str, dict[str, torch.Tensor]] = {}
        for k in range(1, len(self.models)):
            extra[f"model{k}"] = dict(self.models[k].state_dict())
            extra[f"serveropt{k}"] = {
                n: torch.from_numpy(np.asarray(v, np.float64))
                for n, v in self.server_opts[k].state().items()
            }
        meta = _plain(
            {
                "runtime": self.runtime,
                "config": self.config.to_dict(),
                "dataset_fingerprint": self.bundle.fingerprint,
                "pretrained_sha256": (self.transfer.get("pretrained") or {}).get("file_sha256"),
                **self.claims.to_json(),
                "sites": {str(k): asdict(v) for k, v in sorted(self.site_info.items())},
                "epsilon_per_round": {str(k): v for k, v in sorted(self.eps_history.items())},
                "clusters": {str(k): v for k, v in sorted(self.clusters.items())},
                "records": [{"data": r.data, "applied": r.applied} for r in self.records],
                "elapsed": self.elapsed,
            }
        )
        return dict(self.models[0].state_dict()), self.server_opts[0].state(), meta, extra

    def restore(self, ck: Any) -> int:
        """Continue from a checkpoint of this same run; returns the last completed round.

        Every site's privacy events go back into the claim book in their original order,
        each checked against the site's pinned plan first.

        Raises:
            ConfigError: If the checkpoint belongs to another runtime, configuration, data
                set, pretrained file, privacy plan or site set-up.

        """
        meta = ck.meta
        if meta.get("runtime") != self.runtime:
            raise ConfigError(f"the checkpoint is not one of a {self.runtime} run")
        # Read as a recorded run (RunConfig.from_recorded): a checkpoint written before a
        # field existed carries the value it ran with, which is what this run must have.
        try:
            recorded = RunConfig.from_recorded(dict(meta["config"]))
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"the checkpoint's configuration is unreadable ({exc})") from exc
        changed = recorded.differences(self.config)
        if changed:
            raise ConfigError(
                "the checkpoint was written for another configuration "
                f"({', '.join(changed)} differ); resume with the same options (see its config)"
            )
        if meta["dataset_fingerprint"] != self.bundle.fingerprint:
            raise ConfigError(
                "the data set changed since the checkpoint (fingerprint differs); resume "
                "with the same data"
            )
        pretrained = (self.transfer.get("pretrained") or {}).get("file_sha256")
        if meta.get("pretrained_sha256") != pretrained:
            raise ConfigError("the pretrained weights changed since the checkpoint")
        saved = {int(k): v for k, v in meta["sites"].items()}
        for sid, info in self.site_info.items():
            old = saved.get(sid, {})
            if (old.get("num_samples"), old.get("fingerprint")) != (
                info.num_samples,
                info.fingerprint,
            ):
                raise ConfigError(f"site {sid}: its data changed since the checkpoint")
            if self.runtime != "in-process" and old.get("signing_key") != info.signing_key:
                raise ConfigError(f"site {sid}: its signing key changed since the checkpoint")
        plans = {int(k): v for k, v in meta.get("plans", {}).items()}
        current = {k: asdict(p) for k, p in self.claims.plans.items()}
        if current and plans != current:
            raise ConfigError("the sites' privacy plans differ from the checkpoint's")
        expected = {f"model{k}" for k in range(1, len(self.models))}
        if not expected <= set(ck.extra):
            raise ConfigError("the checkpoint lacks cluster models this run needs")
        book = ClaimBook(self.config)
        book.keys, book.sizes = dict(self.claims.keys), dict(self.claims.sizes)
        try:
            book.restore(meta)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.models[0].load_state_dict(ck.model_state, strict=True)
            for k in range(1, len(self.models)):
                self.models[k].load_state_dict(ck.extra[f"model{k}"], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(
                f"the checkpoint's weights do not fit the {self.built.name} this configuration "
                f"builds ({first})"
            ) from exc
        self.claims = book
        self.server_opts[0].load_state(ck.optimizer_state)
        for k in range(1, len(self.models)):
            self.server_opts[k].load_state(
                {n: v.numpy() for n, v in ck.extra.get(f"serveropt{k}", {}).items()}
            )
        self.eps_history = {
            int(k): [float("inf") if x is None else float(x) for x in v]
            for k, v in meta["epsilon_per_round"].items()
        }
        if len(self.models) > 1:
            self.clusters = {
                int(k): (None if v is None else int(v)) for k, v in meta["clusters"].items()
            }
        self.records = [RoundRecord(data=r["data"], applied=r["applied"]) for r in meta["records"]]
        self.elapsed = float(meta["elapsed"])
        return int(ck.round)

    # -- summaries ------------------------------------------------------------------------------
    def site_summaries(self) -> list[dict[str, Any]]:
        """Per site: epsilon history, held-out size, and disclosed training size and classes."""
        out = []
        for sid, info in sorted(self.site_info.items()):
            entry: dict[str, Any] = {
                "client_id": sid,
                "num_heldout": info.num_heldout,
                "epsilon_per_round": list(self.eps_history.get(sid, [])),
            }
            if info.num_samples is not None:
                entry["num_samples"] = info.num_samples
            if info.class_counts is not None:
                entry["class_counts"] = list(info.class_counts)
            out.append(entry)
        return out

    def sign_privacy(self, privacy: dict[str, Any], *, run: Mapping[str, Any]) -> None:
        """Attach the signatures the sites made themselves (the server signs for no one).

        A site that never reported a step since set-up is covered by its set-up signature
        (checked here: it must cover the claim as the book states it).
        """
        from securefed.errors import IntegrityError

        for sid, signature in sorted(self.setup_signatures.items()):
            if sid not in self.claims.signatures:
                try:
                    self.claims.check_signature(sid, signature)
                except ProtocolError as exc:
                    raise IntegrityError(str(exc)) from exc
        self.claims.attach(privacy, run=run)

    def close_sites(self, models: Mapping[str, str]) -> dict[str, Any] | None:
        """After the run's last step, every DP site signs its closing claim.

        Each set-up site is asked, with the run's last round, the digests of the model files
        the run writes and its own events (as the book holds them); it signs its claim over
        every event it spent with those and the roster it pinned, then takes no further step
        of the run (:meth:`securefed.fl.site_runtime.SiteRuntime.close`). A site that fails
        or does not answer is named in ``close_errors``; the report then carries no closing
        signature for it, which ``securefed audit`` fails (it cannot show where that site's
        spending ended).

        Args:
            models: Each model file the run writes (``model.safetensors``, CFL's
                ``model_cluster<k>.safetensors``) -> the SHA-256 hex of its bytes.

        Returns:
            privacy.json's ``close`` block (None without DP).

        """
        if not self.config.dp_enabled or not self.records:
            return None
        close: dict[str, Any] = {
            "last_round": int(self.records[-1].data["round"]),
            "models": dict(sorted(models.items())),
        }
        payloads = {
            sid: (
                Stage.CLOSE,
                {
                    "last_round": close["last_round"],
                    "models": close["models"],
                    "history": self._history(sid),
                },
            )
            for sid in sorted(self.site_info)
            if sid in self.claims.plans
        }
        replies, errors = self.logged.exchange(payloads, timeout=self.stage_timeout, group="close")
        # The roster each site signs is the one it pinned: the server's own when it holds one
        # (in-process, or deployed with --roster), else the one most sites name; a site that
        # pinned another does not close (its signature cannot fit the report's block).
        named = [r.get("roster_sha256") for r in replies.values()]
        own = None if self.roster is None else self.roster.digest().hex()
        close["roster_sha256"] = (
            own if own is not None or not named else Counter(named).most_common(1)[0][0]
        )
        for sid in sorted(replies):
            try:
                self.claims.check_close(sid, close, replies[sid].get("close_signature"))
            except ProtocolError as exc:
                errors[sid] = str(exc)
        #: Sites that did not close the run, and why.
        self.close_errors = {sid: str(errors[sid]) for sid in sorted(errors)}
        self._event(
            event="close",
            sites=sorted(self.claims.closed),
            errors={str(k): v for k, v in self.close_errors.items()},
        )
        return close

    def personalization_table(self) -> list[dict[str, Any]]:
        """Per site: the global (or cluster) model vs the twin on the site's held-out data."""
        if not self.records:
            return []
        primary = self.task.primary_metric
        rows = []
        for c in self.records[-1].data["clients"]:
            if "twin" not in c:
                continue
            row = {"client_id": c["client_id"], "num_heldout": c.get("num_samples")}
            for key in self.task.headline:
                row[f"global_{key}"] = c.get(key)
                row[f"twin_{key}"] = c["twin"].get(key)
            served = c.get(primary)
            if self.config.local_twins and served is not None:
                # A local twin's figure arrives to two decimals: compare like with like.
                served = round(float(served), 2)
            gain = (c["twin"].get(primary), served)
            row["twin_gain"] = None if None in gain else gain[0] - gain[1]
            rows.append(row)
        return rows

    def _with_fairness(self, record: dict[str, Any]) -> dict[str, Any]:
        """A copy of a round's record with its ``fairness`` (and ``fairness_twins``) block."""
        sizes = {sid: info.num_heldout for sid, info in self.site_info.items()}
        primary = self.task.primary_metric
        out = {
            **record,
            "fairness": site_fairness(record["clients"], metric=primary, num_heldout=sizes),
        }
        if any("twin" in c for c in record["clients"]):
            out["fairness_twins"] = site_fairness(
                record["clients"], metric=primary, num_heldout=sizes, twin=True
            )
        return out

    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: per-round records, final figures, fairness and convergence."""
        primary = self.task.primary_metric
        # Fairness is derived here, not stored in the records: checkpoints stay as they were,
        # and a resumed run's earlier rounds get it too.
        rounds = [self._with_fairness(r.data) for r in self.records]
        cfg = self.config
        criteria = convergence_criteria(
            metric=primary,
            acc_tol=cfg.conv_acc_tol,
            loss_tol=cfg.conv_loss_tol,
            patience=cfg.conv_patience,
            window=cfg.conv_window,
        )
        conv = detect_convergence(
            accuracies=[r["global"][primary] for r in rounds],
            losses=[r["global"]["loss"] for r in rounds],
            seconds=[r["seconds"] for r in rounds],
            acc_tol=cfg.conv_acc_tol,
            loss_tol=cfg.conv_loss_tol,
            patience=cfg.conv_patience,
            window=cfg.conv_window,
        )
        best = max(rounds, key=lambda r: r["global"][primary]) if rounds else None
        out: dict[str, Any] = {
            "schema_version": METRICS_SCHEMA_VERSION,
            "runtime": self.runtime,
            "task": self.task.name,
            "strategy": self.config.strategy,
            "primary_metric": primary,
            "rounds": rounds,
            "final": rounds[-1]["global"] if rounds else None,
            "best": {"round": best["round"], **best["global"]} if best else None,
            "convergence": conv,
            "convergence_criteria": criteria,
            "total_seconds": self.elapsed,
        }
        # The last round's fairness, beside ``final`` (which stays the global test figures).
        for key in ("fairness", "fairness_twins"):
            if rounds and key in rounds[-1]:
                out["final_" + key] = rounds[-1][key]
        if self.personalize_rounds():
            out["personalization"] = self.personalization_table()
        if len(self.models) > 1:
            out["clusters"] = {
                "final_membership": {str(s): k for s, k in sorted(self.clusters.items())},
                "served_cluster": self.largest_cluster(),
            }
        return out


def _output_biases(model: nn.Module, num_classes: int) -> list[torch.Tensor]:
    """The bias of the layer that emits the logits (of each branch, for late fusion).

    Late fusion averages its branches' logits, so the same offset goes on every branch's
    head. A model whose last linear layer is not ``num_classes`` wide, or has no bias, gets
    none (the calibration is then reported as not applied).
    """
    branches = getattr(model, "branches", None)
    parts = list(branches) if isinstance(branches, nn.ModuleList) else [model]
    out = []
    for part in parts:
        linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
        last = linears[-1] if linears else None
        if last is None or last.out_features != num_classes or last.bias is None:
            return []
        out.append(last.bias)
    return out


def _models_fields(blobs: list[bytes]) -> dict[str, Any]:
    """CFL's cluster models as message fields (bytes travel as fields, not inside JSON)."""
    return {"models": len(blobs), **{f"model{k}": b for k, b in enumerate(blobs)}}


def _plain(obj: Any) -> Any:
    """JSON-ready copies of numpy scalars and tuples (for checkpoint metadata)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
