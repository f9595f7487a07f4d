"""Privacy claims: what a site signs after each round, and the server's book of them.

One function builds the claim (:func:`site_claim_for`), so the site that signs it and the
server that checks it cannot disagree on its content. :class:`ClaimBook` is the server's
side: it records the DP events every site reports, pins each site's plan, checks the plan
against the run's rules, and keeps the latest signature that covers exactly what the report
will state. The same in both runtimes: the in-process sites sign with keys of their own too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from securefed.config import RunConfig
from securefed.dp import calibration, class_prior, fair_loss
from securefed.dp.accounting import ADJACENCY, compute_epsilon
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.releases import PHASES
from securefed.dp.releases import planned as planned_releases
from securefed.dp.signing import attach_site_signatures, site_claim, verify_claim, verify_close
from securefed.dp.trainer import DPPlan
from securefed.errors import ProtocolError
from securefed.fl.planning import check_site_plan

__all__ = ["ClaimBook", "noise_description", "plan_fields", "site_claim_for"]


def noise_description(config: RunConfig) -> tuple[str, str]:
    """privacy.json ``noise`` and ``noise_source`` for a run of ``config``."""
    if config.reproducible_noise:
        return "reproducible", (
            "ChaCha20 keyed from --seed (--reproducible-noise): anyone who knows the seed can "
            "replay the noise and the sampling, so the epsilon below does NOT hold against them"
        )
    return "secret", (
        "ChaCha20 keyed from os.urandom at each site, fresh for every round: the DP noise and "
        "the Poisson sampling are secret to the site (never derived from --seed)"
    )


def plan_fields(plan: DPPlan) -> dict[str, Any]:
    """A plan as the fields a site sends."""
    return dataclasses.asdict(plan)


def site_claim_for(
    config: RunConfig,
    *,
    client_id: int,
    plan: DPPlan,
    events: Sequence[Mapping[str, Any]],
    epsilon: float,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """The claim a site signs and the server checks: one function for both sides.

    Args:
        config: The run.
        client_id: The site.
        plan: The site's DP plan.
        events: Every DP event of the site so far, in ledger order.
        epsilon: The site's epsilon over ``events``.
        num_samples: The site's size, only if it discloses it.

    """
    entry: dict[str, Any] = {
        "client_id": client_id,
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "max_grad_norm": plan.max_grad_norm,
        "planned_steps": plan.planned_steps,
        "epsilon": epsilon,
    }
    if num_samples is not None:
        entry["num_samples"] = num_samples
    return site_claim(
        entry=entry,
        events=events,
        run=config.to_dict(),
        noise=noise_description(config)[0],
        adjacency=ADJACENCY,
        accountant=config.accountant,
    )


#: Ranges of a reported DP event's numbers (beyond its types): what an accountant can replay.
_EVENT_RANGES = {
    "noise_multiplier": lambda v: 0 <= v <= 1e6,
    "sample_rate": lambda v: 0 < v <= 1,
    "steps": lambda v: 0 <= v <= 10**9,
    "max_grad_norm": lambda v: 0 < v <= 1e12,
    "round": lambda v: 0 <= v <= 10**9,
    "phase": lambda v: v in ("federated", "personalize", *PHASES),
}


def _typed(cls: type, fields: Any, *, sid: int, what: str) -> Any:
    """``cls(**fields)`` for a dataclass, each field of its declared type (finite numbers).

    Raises:
        ProtocolError: If ``fields`` is not an object of exactly ``cls``'s fields, each of
            its type (an int is a number; a bool is neither), or a number is not finite.

    """
    if not isinstance(fields, Mapping):
        raise ProtocolError(f"site {sid}: malformed {what} (not an object)")
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            continue  # the constructor names a missing one
        value = fields[f.name]
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        ok = not isinstance(value, bool) and (
            (kind == "int" and isinstance(value, int))
            or (kind == "float" and isinstance(value, (int, float)) and math.isfinite(value))
            or (kind == "str" and isinstance(value, str) and len(value) <= 64)
        )
        if not ok:
            raise ProtocolError(f"site {sid}: malformed {what} (`{f.name}` is {value!r:.40})")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ProtocolError(f"site {sid}: malformed {what} ({exc})") from exc


def _event(fields: Any, *, sid: int) -> PrivacyEvent:
    """One reported DP event, typed and in the ranges an accountant can replay."""
    event = _typed(PrivacyEvent, fields, sid=sid, what="DP report")
    for name, ok in _EVENT_RANGES.items():
        if not ok(getattr(event, name)):
            raise ProtocolError(
                f"site {sid}: malformed DP report (`{name}` = {getattr(event, name)!r})"
            )
    return event


class ClaimBook:
    """The server's record of every site's privacy spending and signed claims.

    Args:
        config: The run.

    Attributes:
        ledger: Every DP event the sites reported, in arrival order.
        plans: Each site's pinned plan (the first one it reported, checked).
        signatures: The latest signature of each site (hex Ed25519).
        closed: Each site's closing signature (hex Ed25519), once it closed the run.
        keys: Each site's public signing key (hex), from set-up.
        sizes: Each site's training-set size, only where it disclosed it.

    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.ledger = PrivacyLedger()
        self.plans: dict[int, DPPlan] = {}
        self.signatures: dict[int, str] = {}
        self.closed: dict[int, str] = {}
        self.keys: dict[int, str] = {}
        self.sizes: dict[int, int] = {}

    @property
    def delta(self) -> float | None:
        """The run's delta: the largest any site uses (None without DP)."""
        return max((p.delta for p in self.plans.values()), default=None)

    def pin_plan(self, sid: int, fields: Mapping[str, Any] | None) -> DPPlan:
        """Check a site's reported plan against the run's rules and pin it.

        Raises:
            ProtocolError: If the plan is malformed, breaks a rule, or differs from the one
                pinned earlier.

        """
        plan = _typed(DPPlan, fields or {}, sid=sid, what="DP plan")
        pinned = self.plans.get(sid)
        if pinned is None:
            try:
                check_site_plan(self.config, plan)
            except ProtocolError as exc:
                raise ProtocolError(
                    f"site {sid}: its DP plan breaks the run's rules: {exc}"
                ) from exc
            self.plans[sid] = plan
            return plan
        if plan != pinned:
            raise ProtocolError(f"site {sid}: its DP plan changed during the run")
        return pinned

    def account(
        self, sid: int, reply: Mapping[str, Any], *, round_index: int, phase: str = "federated"
    ) -> None:
        """Record a site's DP report for one step, then check it against its pinned plan.

        What a site says it spent is always recorded, even when its update is then refused:
        the privacy report must not under-count, and the audit flags events that differ
        from the plan.

        Raises:
            ProtocolError: If the report is malformed (another site's, round's or phase's
                events), or breaks the plan, or its signature does not cover the claim.

        """
        reported = reply.get("events") or []
        if not isinstance(reported, list):
            raise ProtocolError(f"site {sid}: malformed DP report (events are not a list)")
        # Every event is checked before any is recorded: the ledger holds only events an
        # accountant can replay (a malformed one would break every later epsilon).
        events = [_event(e, sid=sid) for e in reported]
        # A fit reply also carries the round's q-FFL loss release and, in the site's first
        # trained round, logit adjustment's class prior (each its own phase).
        phases = {phase, fair_loss.PHASE, class_prior.PHASE} if phase == "federated" else {phase}
        if any(
            e.client_id != sid or e.round != round_index or e.phase not in phases for e in events
        ):
            raise ProtocolError(f"site {sid}: reported an event that is not its round's")
        for e in events:
            self.ledger.record(e)
        if not self.config.dp_enabled:
            return
        plan = self.pin_plan(sid, reply.get("plan"))
        self.check_signature(sid, reply.get("signature"))
        per_epoch = round(1.0 / plan.sample_rate)
        epochs = self.config.local_epochs if phase == "federated" else self.config.personalize
        planned = planned_releases(self.config.to_dict())
        if phase == calibration.PHASE:
            # One release of its own kind, whose parameters the run fixes.
            want = planned[calibration.PHASE]
            if len(events) != 1 or any(
                (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) not in want
                for e in events
            ):
                raise ProtocolError(f"site {sid}: calibrated with other DP parameters than planned")
            return
        losses = [e for e in events if e.phase == fair_loss.PHASE]
        priors = [e for e in events if e.phase == class_prior.PHASE]
        events = [e for e in events if e.phase not in (fair_loss.PHASE, class_prior.PHASE)]
        if phase == "federated":
            # One prior release over the run, with the site's first training, iff planned.
            want = planned[class_prior.PHASE]
            total = sum(e.phase == class_prior.PHASE for e in self.ledger.for_client(sid))
            if total != (1 if want else 0) or any(
                (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) not in want
                for e in priors
            ):
                raise ProtocolError(
                    f"site {sid}: released its class prior {total} times or with other DP "
                    "parameters than planned (once, with its first training)"
                )
            # One loss release per round trained iff the run weighs by loss, as planned.
            want = planned[fair_loss.PHASE]
            if len(losses) != (1 if want else 0) or any(
                (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) not in want
                for e in losses
            ):
                raise ProtocolError(
                    f"site {sid}: released its q-FFL loss with other DP parameters than planned"
                )
        for e in events:
            if (e.noise_multiplier, e.sample_rate, e.max_grad_norm) != (
                plan.noise_multiplier,
                plan.sample_rate,
                plan.max_grad_norm,
            ) or e.steps != epochs * per_epoch:
                raise ProtocolError(f"site {sid}: trained with other DP parameters than planned")
        if not events:
            raise ProtocolError(f"site {sid}: reported no DP accounting for round {round_index}")

    def epsilon(self, sid: int) -> float | None:
        """Site ``sid``'s epsilon over what it reported (None without a plan)."""
        plan = self.plans.get(sid)
        if plan is None:
            return None
        return compute_epsilon(
            history=self.ledger.history(sid), delta=plan.delta, accountant=plan.accountant
        )

    def _claim(self, sid: int) -> dict[str, Any]:
        """Site ``sid``'s claim as the report will state it."""
        return site_claim_for(
            self.config,
            client_id=sid,
            plan=self.plans[sid],
            events=[e.to_dict() for e in self.ledger.for_client(sid)],
            epsilon=self.epsilon(sid),
            num_samples=self.sizes.get(sid),
        )

    def check_signature(self, sid: int, signature: Any) -> None:
        """A site's signature must cover exactly the claim the report will state for it.

        The server holds no site key; it keeps the latest signature of each site and checks
        it now, so a claim the site did not sign never reaches privacy.json.
        """
        key = self.keys.get(sid)
        if not isinstance(key, str) or not isinstance(signature, str):
            raise ProtocolError(f"site {sid}: sent no signed privacy claim")
        if not verify_claim(self._claim(sid), signature, key):
            raise ProtocolError(f"site {sid}: its signature does not cover the claim on record")
        self.signatures[sid] = signature

    def check_close(self, sid: int, close: Mapping[str, Any], signature: Any) -> None:
        """A site's closing signature must cover its claim on record and the run's ``close``.

        Raises:
            ProtocolError: No key or signature, no plan, or a signature over anything else
                (another claim, another last round, other model digests or another roster).

        """
        key = self.keys.get(sid)
        if not isinstance(key, str) or not isinstance(signature, str) or sid not in self.plans:
            raise ProtocolError(f"site {sid}: sent no closing signature")
        if not verify_close(self._claim(sid), close, signature, key):
            raise ProtocolError(
                f"site {sid}: its closing signature does not cover the claim on record and the "
                f"run's end (last round {close.get('last_round')}, the model files' digests, "
                "the roster)"
            )
        self.closed[sid] = signature

    def attach(self, privacy: dict[str, Any], *, run: Mapping[str, Any]) -> None:
        """Attach the signatures the sites made themselves (the server signs for no one)."""
        attach_site_signatures(
            privacy,
            run=run,
            signed={sid: (self.keys[sid], sig) for sid, sig in self.signatures.items()},
            closed=self.closed,
        )

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint keeps of the book."""
        return {
            "plans": {str(k): dataclasses.asdict(p) for k, p in sorted(self.plans.items())},
            "signatures": {str(k): v for k, v in sorted(self.signatures.items())},
            "events": [e.to_dict() for e in self.ledger.events],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Continue from :meth:`to_json`; every event is checked against its site's plan.

        Raises:
            ProtocolError: If an event does not match its site's plan, or the book is not
                empty.

        """
        if self.ledger.events:
            raise ProtocolError("this run already accounted rounds; resume into a fresh one")
        plans = {int(k): DPPlan(**p) for k, p in data.get("plans", {}).items()}
        events = [PrivacyEvent(**e) for e in data.get("events", [])]
        run = self.config.to_dict()
        releases = planned_releases(run)
        for e in events:
            plan = plans.get(e.client_id)
            if e.phase in releases and plan is not None:
                # A release is checked against the run's plan for it, not DP-SGD's.
                if (e.noise_multiplier, e.sample_rate, e.steps, e.max_grad_norm) in releases[
                    e.phase
                ]:
                    continue
                raise ProtocolError(
                    f"site {e.client_id}: a checkpointed {e.phase} event (round {e.round}) "
                    "does not match the run's plan"
                )
            if plan is None or (e.noise_multiplier, e.sample_rate, e.max_grad_norm) != (
                plan.noise_multiplier,
                plan.sample_rate,
                plan.max_grad_norm,
            ):
                raise ProtocolError(
                    f"site {e.client_id}: a checkpointed privacy event (round {e.round}) does "
                    "not match its plan"
                )
        self.plans = plans
        self.signatures = {int(k): v for k, v in data.get("signatures", {}).items()}
        for e in events:
            self.ledger.record(e)
