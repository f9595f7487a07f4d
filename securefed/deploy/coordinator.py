"""The server's side of a deployed run: the same round, over Flower messages.

The coordinator drives the sites through Flower's ``Grid`` and never holds a site's data or
its individual update: under ``--secure-agg mask`` it only sees the Bonawitz protocol's bytes
(key advertisements, sealed shares it relays, masked vectors, unmasking shares), and the sum.
It reuses the in-process runtime's parts: participant sampling, the server optimizers, the
model registry, the privacy plan (to check each site's), the metrics and the writers of
``config.json`` / ``metrics.json`` / ``privacy.json`` / ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from securefed.config import RunConfig
from securefed.data.dataset import load_dataset
from securefed.deploy.checkpoint import load_checkpoint, save_checkpoint
from securefed.deploy.site import deployed_claim, weights_to_bytes
from securefed.deploy.site_app import secagg_config
from securefed.protocol.wire import Stage, decode, encode, payload_size, vector_from_bytes
from securefed.dp.accounting import compute_epsilon
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.trainer import DPPlan
from securefed.errors import ConfigError, ProtocolError
from securefed.fl.aggregation import build_aggregator
from securefed.fl.params import ParamLayout
from securefed.fl.simulation import (
    Federation,
    RoundRecord,
    _aggregator_options,
    _seed_for,
    check_site_plan,
    model_spec,
    resolve_device,
    sample_participants,
    task_for,
)
from securefed.fl.strategies import build_server_optimizer
from securefed.models import build_model

__all__ = ["Coordinator", "Link", "check_deployable"]

log = logging.getLogger("securefed.deploy")


def check_deployable(config: RunConfig) -> None:
    """Refuse what the Flower runtime does not run yet, before anything starts.

    Raises:
        ConfigError: For clustered FL, digital twins, the cyclic schedule, a public split
            or simulated dropouts (all supported in-process only, for now).

    """
    problems = []
    if config.secure_agg not in ("none", "mask", "he"):
        problems.append(f"--secure-agg {config.secure_agg}")
    if config.strategy not in ("fedavg", "fedprox", "ftl"):
        problems.append(f"--strategy {config.strategy} (use fedavg, fedprox or ftl)")
    if config.schedule != "parallel":
        problems.append(f"--schedule {config.schedule}")
    if config.personalize:
        problems.append("--personalize")
    if config.public_fraction:
        problems.append("--public-fraction")
    if config.dropout_clients:
        problems.append("--dropout-clients (real sites drop out on their own)")
    if problems:
        raise ConfigError(
            "the Flower runtime does not support " + "; ".join(problems) + " yet; run it in-process"
        )


class _DeployedHE:
    """What the report says about CKKS in a deployment: the key set lives at the sites."""

    name = "he"

    def __init__(self, config: RunConfig) -> None:
        from securefed.crypto.ckks import CKKSParams

        self.params = CKKSParams(**_aggregator_options(config))
        # A decrypting site refuses a "sum" of one update (it would be that update).
        self.min_contributors = min(2, config.clients)

    def check_key(self, public: bytes | None) -> None:
        """The sites' key must be for the run's CKKS parameters."""
        from securefed.crypto.ckks import CKKSEncryptor

        if public is None:
            raise ConfigError("no site sent a CKKS public context")
        if CKKSEncryptor(public).params != self.params:
            raise ConfigError(
                "the sites' CKKS keys were made for other parameters than this run's --he-* options"
            )

    def describe(self) -> dict[str, Any]:
        """CKKS parameters and key placement."""
        return {
            "protocol": "ckks",
            "library": "tenseal",
            "server_holds_secret_key": False,
            "key_holder": "the sites (one key set, distributed out of band); the lowest-id "
            "contributing site decrypts each round's sum",
            "min_contributors": self.min_contributors,
            **self.params.describe(),
        }


class Link:
    """Flower's ``Grid`` with a fast poll and per-site payload byte counts.

    Flower's own ``send_and_receive`` polls every 3 s; a secure-aggregation round has four
    exchanges, so the coordinator polls every ``poll`` seconds instead.

    Args:
        grid: The ServerApp's ``Grid``.
        poll: Seconds between pulls.

    """

    def __init__(self, grid: Any, *, poll: float = 0.05) -> None:
        self.grid = grid
        self.poll = poll
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        #: Nodes Flower reported as gone (no heartbeat), e.g. a site process that was killed.
        self.unreachable: set[int] = set()

    def node_ids(self) -> list[int]:
        """Nodes (SuperNodes) connected now."""
        return sorted(int(n) for n in self.grid.get_node_ids())

    def exchange(
        self,
        payloads: Mapping[int, tuple[str, dict[str, Any]]],
        *,
        timeout: float,
        group: str,
        awaited: set[int] | None = None,
    ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """Send each node its message; wait up to ``timeout`` s for the replies.

        Args:
            payloads: Node -> (message type, fields).
            timeout: Seconds to wait.
            group: Flower group id (the round).
            awaited: Nodes to wait for (default: all); the others' replies are taken if they
                arrive first, but not waited for.

        Returns:
            Decoded replies by node, and the reason for each node that failed (an error reply,
            a malformed reply, or no reply in time).

        """
        from flwr.app import Message

        ids: dict[str, int] = {}
        messages = []
        for node, (stage, fields) in payloads.items():
            content = encode(fields)
            self.sent[node] = self.sent.get(node, 0) + payload_size(content)
            messages.append(Message(content, dst_node_id=node, message_type=stage, group_id=group))
        for node, mid in zip(payloads, self.grid.push_messages(messages)):
            ids[mid] = node
        replies: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(ids)
        wait_for = {m for m, n in ids.items() if awaited is None or n in awaited}
        while pending & wait_for and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                node = ids.get(mid)
                if node is None or mid not in pending:
                    continue
                pending.discard(mid)
                if reply.has_error():
                    errors[node] = _error_reason(reply.error.reason)
                    if reply.error.code in _UNREACHABLE:
                        self.unreachable.add(node)
                    continue
                self.received[node] = self.received.get(node, 0) + payload_size(reply.content)
                try:
                    replies[node] = decode(reply.content, what=f"reply of node {node}")
                except ProtocolError as exc:
                    errors[node] = str(exc)
            if pending & wait_for:
                time.sleep(self.poll)
        for mid in pending:
            errors[ids[mid]] = (
                f"no reply within {timeout:g} s" if mid in wait_for else "not awaited (dropped out)"
            )
        return replies, errors


# flwr.common.constant.ErrorCode: the message or its node is gone, not a site's own error.
_UNREACHABLE = frozenset({3, 4, 5})


def _error_reason(reason: str) -> str:
    """Flower wraps a ClientApp's exception as ``<class '...'>:<'message'>``; keep the message."""
    head, sep, tail = reason.partition(">:<'")
    if sep and tail.endswith("'>"):
        name = head.rsplit(".", 1)[-1].strip("'<>")
        return f"{name}: {tail[:-2]}"
    return reason


class Coordinator:
    """Runs ``config`` on the connected sites and writes the same files as ``securefed train``.

    Args:
        config: The run configuration (the same as ``securefed train``'s).
        link: The connection to the sites.
        out: Run folder (absolute path on the server machine).
        fit_timeout: Seconds a site may take to train a round before it counts as dropped.
        stage_timeout: Seconds a site may take for a protocol step.
        connect_timeout: Seconds to wait for ``config.clients`` sites to connect.
        resume: Continue from ``out/checkpoint`` instead of starting afresh.
        stop_after: Stop (as if the server died) after this many rounds: tests and drills.

    """

    def __init__(
        self,
        config: RunConfig,
        *,
        link: Link,
        out: Path,
        fit_timeout: float = 3600.0,
        stage_timeout: float = 300.0,
        connect_timeout: float = 300.0,
        resume: bool = False,
        stop_after: int | None = None,
    ) -> None:
        check_deployable(config)
        self.config = config
        self.link = link
        self.out = Path(out)
        self.fit_timeout = fit_timeout
        self.stage_timeout = stage_timeout
        self.connect_timeout = connect_timeout
        self.resume = resume
        self.stop_after = stop_after
        self.device = resolve_device(config.device)
        self.bundle = load_dataset(
            name=config.dataset,
            data_dir=config.data_dir,
            data=config.data,
            seed=config.seed,
            **config.loader_options,
        )
        self.task = task_for(self.bundle, config)
        self.spec = model_spec(self.bundle, self.task, config)
        torch.manual_seed(_seed_for(config.seed, 0x30DE1))
        self.built = build_model(name=config.model, spec=self.spec)
        self.models = [self.built.module.to(self.device)]
        self.public_indices = None
        self.transfer = Federation._apply_transfer(self)  # type: ignore[arg-type]
        state = self.models[0].state_dict()
        trainable = [n for n, p in self.models[0].named_parameters() if p.requires_grad]
        self.layout = ParamLayout(state, keys=trainable if self.transfer["frozen"] else None)
        self.server_opts = [
            build_server_optimizer(
                name=config.server_opt,
                lr=config.effective_server_lr,
                momentum=config.server_momentum,
            )
        ]
        self.aggregator = (
            _DeployedHE(config)
            if config.secure_agg == "he"
            else build_aggregator(
                mode=config.secure_agg, n_clients=config.clients, **_aggregator_options(config)
            )
        )
        self.he_public: bytes | None = None
        self.ledger = PrivacyLedger()
        self.plans: dict[int, DPPlan] = {}
        self.delta: float | None = None
        #: The latest signed claim of each site (hex Ed25519 signatures).
        self.signatures: dict[int, str] = {}
        self.sites: dict[int, dict[str, Any]] = {}
        self.nodes: dict[int, int] = {}
        self.eps_history: dict[int, list[float]] = {}
        self.records: list[RoundRecord] = []
        self.elapsed = 0.0
        self._step_errors: dict[int, str] = {}
        self._log = self.out / "deploy-log.jsonl"

    #: privacy.json's disclosures list the Flower messages' fields.
    runtime = "flower"

    # -- what write_outputs and Federation.metrics read -------------------------------------
    @property
    def global_model(self) -> torch.nn.Module:
        """The served model."""
        return self.models[0]

    def personalize_rounds(self) -> int:
        """Digital twins are not run on Flower (yet)."""
        return 0

    def site_summaries(self) -> list[dict[str, Any]]:
        """Per site: epsilon history, held-out size, and the training size if it disclosed it."""
        out = []
        for cid, info in sorted(self.sites.items()):
            entry = {
                "client_id": cid,
                "num_heldout": info["num_heldout"],
                "epsilon_per_round": list(self.eps_history.get(cid, [])),
            }
            if "num_samples" in info:
                entry["num_samples"] = info["num_samples"]
            out.append(entry)
        return out

    def metrics(self) -> dict[str, Any]:
        """``metrics.json``: the in-process schema, plus the transport figures per round."""
        out = Federation.metrics(self)  # type: ignore[arg-type]
        out["runtime"] = "flower"
        return out

    # -- progress ---------------------------------------------------------------------------
    def _event(self, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), **fields}, sort_keys=True)
        with self._log.open("a") as fh:
            fh.write(line + "\n")
        log.info(line)

    # -- set-up -----------------------------------------------------------------------------
    def _setup(self) -> None:
        """Ask every connected node for its site id and data; wait until all N sites answered.

        A node Flower lists but cannot reach (a killed site process whose record outlives it in
        the SuperLink's database) is skipped; a site whose own set-up fails stops the run.
        """
        need = self.config.clients
        wanted = set(range(need))
        cfg = self.config.to_dict()
        deadline = time.monotonic() + self.connect_timeout
        by_site: dict[int, int] = {}
        replies_by_site: dict[int, dict[str, Any]] = {}
        asked: set[int] = set()
        while True:
            fresh = [n for n in self.link.node_ids() if n not in asked]
            if fresh:
                asked.update(fresh)
                replies, errors = self.link.exchange(
                    {n: (Stage.SETUP, {"config": cfg}) for n in fresh},
                    timeout=self.stage_timeout,
                    group="setup",
                )
                for node, why in sorted(errors.items()):
                    if node not in self.link.unreachable:
                        raise ConfigError(f"site set-up failed on node {node}: {why}")
                    self._event(event="unreachable", node=str(node), why=why)
                for node, info in replies.items():
                    sid = int(info["site_id"])
                    if sid in by_site:
                        raise ConfigError(
                            f"two site processes claim site-id {sid}; give each its own"
                        )
                    if sid not in wanted:
                        raise ConfigError(
                            f"a site claims site-id {sid}, but the run has {need} sites "
                            f"(site-id 0..{need - 1})"
                        )
                    self._check_site(sid, info)
                    by_site[sid] = node
                    replies_by_site[sid] = info
            if set(by_site) == wanted:
                break
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(by_site))
                raise ConfigError(
                    f"sites {missing} did not connect within {self.connect_timeout:g} s; start "
                    "a site process for each (securefed deploy site --site-id ...)"
                )
            time.sleep(0.5)
        self.nodes = by_site
        self.sites = replies_by_site
        keys = [info.get("signing_key") for info in self.sites.values()]
        if self.config.dp_enabled and len(set(keys)) != len(keys):
            raise ConfigError("two sites sent the same signing key; each site needs its own")
        if self.config.secure_agg == "he":
            keys = {sid: info.pop("he_public", None) for sid, info in self.sites.items()}
            if len(set(keys.values())) != 1:
                raise ConfigError("the sites hold different CKKS keys; give every site the same")
            self.he_public = keys[0]
            self.aggregator.check_key(self.he_public)
        self._event(event="setup", sites={str(k): v for k, v in sorted(by_site.items())})

    def _check_site(self, sid: int, info: Mapping[str, Any]) -> None:
        want = {
            "in_channels": self.spec.in_channels,
            "num_classes": self.spec.num_classes,
            "spatial_dims": self.spec.spatial_dims,
            "image_shape": list(self.spec.image_shape),
        }
        if info.get("spec") != want or info.get("task") != self.task.name:
            raise ConfigError(
                f"site {sid}: its data ({info.get('task')}, {info.get('spec')}) does not fit "
                f"the run's model ({self.task.name}, {want})"
            )
        if self.config.dp_enabled and not isinstance(info.get("signing_key"), str):
            raise ConfigError(f"site {sid}: sent no signing key for its privacy claims")
        disclosed = "num_samples" in info
        if disclosed != self.config.disclose_site_sizes:
            raise ConfigError(
                f"site {sid}: "
                + (
                    "disclosed its size, which the run did not ask for"
                    if disclosed
                    else "keeps its size private, but the run asks sites to disclose it"
                )
            )

    # -- checkpoint -------------------------------------------------------------------------
    def _checkpoint(self, round_index: int) -> None:
        save_checkpoint(
            self.out,
            round_index=round_index,
            model_state=self.models[0].state_dict(),
            optimizer_state=self.server_opts[0].state(),
            meta={
                "config": self.config.to_dict(),
                "sites": {str(k): v for k, v in self.sites.items()},
                "plans": {str(k): dataclasses.asdict(p) for k, p in self.plans.items()},
                "signatures": {str(k): v for k, v in self.signatures.items()},
                "events": [e.to_dict() for e in self.ledger.events],
                "epsilon_per_round": {str(k): v for k, v in self.eps_history.items()},
                "records": [{"data": r.data, "applied": r.applied} for r in self.records],
                "elapsed": self.elapsed,
            },
        )
        self._event(event="checkpoint", round=round_index)

    def _restore(self) -> int:
        ck = load_checkpoint(self.out)
        if ck.meta["config"] != json.loads(json.dumps(self.config.to_dict())):
            raise ConfigError(
                f"{self.out}/checkpoint: written for another configuration; resume with the "
                "same options (see its config)"
            )
        self.models[0].load_state_dict(ck.model_state, strict=True)
        self.server_opts[0].load_state(ck.optimizer_state)
        for e in ck.meta["events"]:
            self.ledger.record(PrivacyEvent(**e))
        self.plans = {int(k): DPPlan(**p) for k, p in ck.meta.get("plans", {}).items()}
        self.delta = max((p.delta for p in self.plans.values()), default=None)
        self.signatures = {int(k): v for k, v in ck.meta.get("signatures", {}).items()}
        self.eps_history = {int(k): list(v) for k, v in ck.meta["epsilon_per_round"].items()}
        self.records = [
            RoundRecord(data=r["data"], applied=r["applied"]) for r in ck.meta["records"]
        ]
        self.elapsed = float(ck.meta["elapsed"])
        saved_sites = {int(k): v for k, v in ck.meta["sites"].items()}
        for sid, info in self.sites.items():
            old = saved_sites.get(sid, {})
            if (old.get("num_samples"), old.get("fingerprint")) != (
                info.get("num_samples"),
                info["fingerprint"],
            ):
                raise ConfigError(f"site {sid}: its data changed since the checkpoint")
            if old.get("signing_key") != info.get("signing_key"):
                raise ConfigError(f"site {sid}: its signing key changed since the checkpoint")
        self._event(event="resume", round=ck.round)
        return ck.round

    # -- rounds -----------------------------------------------------------------------------
    def run(self) -> Path:
        """Set up, run every round (resuming if asked), evaluate, write the run's files."""
        from securefed.fl.run import _prepare_out, write_outputs

        if self.resume:
            if (self.out / "privacy.json").exists():
                raise ConfigError(f"{self.out}: the run already finished")
        else:
            _prepare_out(self.out)
            if (self.out / "checkpoint").exists():
                raise ConfigError(f"{self.out}: holds a checkpoint; resume it or choose another")
        self.out.mkdir(parents=True, exist_ok=True)
        self._setup()
        first = self._restore() + 1 if self.resume else 1
        for r in range(first, self.config.rounds + 1):
            self.run_round(r)
            self._checkpoint(r)
            if self.stop_after is not None and r >= self.stop_after:
                self._event(event="stopped", round=r)
                return self.out
        self._final_evaluation()
        write_outputs(self, self.out)  # type: ignore[arg-type]
        self._event(event="done", out=str(self.out))
        return self.out

    def _weights(self) -> bytes:
        return weights_to_bytes(self.models[0].state_dict())

    def _base(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "layout_keys": list(self.layout.keys)}

    def run_round(self, round_index: int) -> RoundRecord:
        """One round over the network. A failed round changes no model."""
        start = time.perf_counter()
        cfg = self.config
        chosen = sample_participants(cfg, ids=sorted(self.sites), round_index=round_index)
        weights = self._weights()
        payloads: dict[int, tuple[str, dict[str, Any]]] = {}
        for sid in sorted(self.sites):
            node = self.nodes[sid]
            if sid in chosen:
                payloads[node] = (
                    Stage.FIT,
                    {
                        **self._base(),
                        "weights": weights,
                        "round": round_index,
                        "n_sites": len(chosen),
                        "secure_agg": cfg.secure_agg,
                        "history": [e.to_dict() for e in self.ledger.for_client(sid)],
                        "evaluate_first": round_index > 1,
                    },
                )
            elif round_index > 1:
                payloads[node] = (Stage.EVALUATE, {**self._base(), "weights": weights})
        self._step_errors: dict[int, str] = {}
        sent_before = dict(self.link.sent)
        received_before = dict(self.link.received)
        self._event(event="sent", round=round_index, stage="fit")
        fit_start = time.perf_counter()
        replies, errors = self._exchange(
            payloads, timeout=self.fit_timeout, round_index=round_index
        )
        fit_seconds = time.perf_counter() - fit_start
        site_replies = {
            sid: replies[self.nodes[sid]] for sid in self.sites if self.nodes[sid] in replies
        }
        self._fill_previous(site_replies)
        fits = {sid: rep for sid, rep in site_replies.items() if sid in chosen}
        for sid in sorted(fits):
            try:
                self._account(sid, fits[sid], round_index)
            except ProtocolError as exc:
                errors[self.nodes[sid]] = str(exc)
                del fits[sid]
        self._event(
            event="replies",
            round=round_index,
            stage="fit",
            sites=sorted(fits),
            errors={str(k): v for k, v in errors.items()},
        )
        agg_start = time.perf_counter()
        total, survivors, error, clipped, server_seconds = self._aggregate(
            fits, round_index, chosen
        )
        agg_seconds = time.perf_counter() - agg_start
        for node, why in self._step_errors.items():
            errors.setdefault(node, why)
        applied = error is None
        if applied:
            state = {n: v.detach().clone() for n, v in self.models[0].state_dict().items()}
            current = self.layout.flatten(state)
            delta = total[:-1] / float(total[-1])
            new_vec = self.server_opts[0].step(current=current, delta=delta)
            self.models[0].load_state_dict({**state, **self.layout.unflatten(new_vec)}, strict=True)
        eval_start = time.perf_counter()
        record = self._evaluate(round_index, chosen)
        eval_seconds = time.perf_counter() - eval_start
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        sent = {
            s: self.link.sent.get(self.nodes[s], 0) - sent_before.get(self.nodes[s], 0)
            for s in self.sites
        }
        received = {
            s: self.link.received.get(self.nodes[s], 0) - received_before.get(self.nodes[s], 0)
            for s in self.sites
        }
        record.update(
            {
                "seconds": seconds,
                "cumulative_seconds": self.elapsed,
                "applied": applied,
                "error": error,
                "participants": chosen,
                "survivors": survivors,
                "dropped": sorted(set(chosen) - set(survivors)),
                "timing": {
                    # Sites send no training time (a side channel on their size); this is
                    # the server's own wall time of the fit exchange.
                    "local_training": fit_seconds,
                    "protection": sum(float(f.get("protect_seconds", 0.0)) for f in fits.values()),
                    "aggregation": server_seconds if server_seconds is not None else agg_seconds,
                    "personalization": 0.0,
                    "evaluation": eval_seconds,
                },
                "bytes_per_client": {str(s): received[s] for s in sorted(fits)},
                "clipped_values": clipped,
                "transport": {
                    "runtime": "flower",
                    "payload_bytes_from_site": {str(s): received[s] for s in self.sites},
                    "payload_bytes_to_site": {str(s): sent[s] for s in self.sites},
                    "site_errors": {
                        str(sid): errors[n] for sid, n in self.nodes.items() if n in errors
                    },
                },
            }
        )
        rec = RoundRecord(data=record, applied=applied)
        self.records.append(rec)
        self._event(
            event="round",
            round=round_index,
            applied=applied,
            error=error,
            survivors=survivors,
            seconds=round(seconds, 3),
        )
        return rec

    def _exchange(
        self,
        payloads: Mapping[int, tuple[str, dict[str, Any]]],
        *,
        timeout: float,
        round_index: int,
    ) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        return self.link.exchange(payloads, timeout=timeout, group=str(round_index))

    def _account(self, sid: int, reply: Mapping[str, Any], round_index: int) -> None:
        """Record a site's DP report, then check it against the plan the server derives.

        What a site says it spent in this round is always recorded, even when its update is
        then refused (other sigma, other sample count): the privacy report must not
        under-count, and the audit flags events that differ from the plan.

        Raises:
            ProtocolError: If the report is malformed (another site's or round's events),
                or the site's update must be left out of the sum.

        """
        try:
            events = [PrivacyEvent(**e) for e in reply.get("events") or []]
        except TypeError as exc:
            raise ProtocolError(f"site {sid}: malformed DP report ({exc})") from exc
        if any(
            e.client_id != sid or e.round != round_index or e.phase != "federated" for e in events
        ):
            raise ProtocolError(f"site {sid}: reported an event that is not its round's")
        for e in events:
            self.ledger.record(e)
        if not self.config.dp_enabled:
            return
        try:
            plan = DPPlan(**(reply.get("plan") or {}))
        except TypeError as exc:
            raise ProtocolError(f"site {sid}: malformed DP plan ({exc})") from exc
        pinned = self.plans.get(sid)
        if pinned is None:
            try:
                check_site_plan(self.config, plan)
            except ProtocolError as exc:
                raise ProtocolError(
                    f"site {sid}: its DP plan breaks the run's rules: {exc}"
                ) from exc
            self.plans[sid] = pinned = plan
            self.delta = max(p.delta for p in self.plans.values())
        elif plan != pinned:
            raise ProtocolError(f"site {sid}: its DP plan changed during the run")
        self._check_signature(sid, reply)
        per_epoch = round(1.0 / pinned.sample_rate)
        for e in events:
            if (e.noise_multiplier, e.sample_rate, e.max_grad_norm) != (
                pinned.noise_multiplier,
                pinned.sample_rate,
                pinned.max_grad_norm,
            ) or e.steps != self.config.local_epochs * per_epoch:
                raise ProtocolError(f"site {sid}: trained with other DP parameters than planned")
        if not events:
            raise ProtocolError(f"site {sid}: reported no DP accounting for round {round_index}")

    def _check_signature(self, sid: int, reply: Mapping[str, Any]) -> None:
        """A site's signature must cover exactly the claim the report will state for it.

        The server holds no site key; it keeps the latest signature of each site and checks
        it now, so a claim the site did not sign never reaches privacy.json.
        """
        from securefed.dp.signing import verify_claim

        key = self.sites.get(sid, {}).get("signing_key")
        signature = reply.get("signature")
        if not isinstance(key, str) or not isinstance(signature, str):
            raise ProtocolError(f"site {sid}: sent no signed privacy claim")
        claim = deployed_claim(
            self.config,
            client_id=sid,
            plan=self.plans[sid],
            events=[e.to_dict() for e in self.ledger.for_client(sid)],
            epsilon=self._epsilon(sid),
            num_samples=self.sites[sid].get("num_samples"),
        )
        if not verify_claim(claim, signature, key):
            raise ProtocolError(f"site {sid}: its signature does not cover the claim on record")
        self.signatures[sid] = signature

    def sign_privacy(self, privacy: dict[str, Any], *, run: Mapping[str, Any]) -> None:
        """Attach the signatures the sites made themselves (the server signs for no one)."""
        from securefed.dp.signing import attach_site_signatures

        attach_site_signatures(
            privacy,
            run=run,
            signed={
                sid: (self.sites[sid]["signing_key"], sig) for sid, sig in self.signatures.items()
            },
        )

    def _aggregate(
        self, fits: Mapping[int, Mapping[str, Any]], round_index: int, chosen: list[int]
    ) -> tuple[np.ndarray | None, list[int], str | None, int, float | None]:
        """Sum the sites' vectors: in the clear, or through the masking protocol."""
        dim = self.layout.size + 1
        if not fits:
            return None, [], "no site completed training this round", 0, None
        if self.config.secure_agg == "none":
            total = np.zeros(dim)
            for sid in sorted(fits):
                total += vector_from_bytes(fits[sid]["vector"], length=dim, what=f"site {sid}")
            return total, sorted(fits), None, 0, None
        try:
            if self.config.secure_agg == "he":
                return self._he_sum(fits, round_index, dim)
            return self._masked_sum(fits, round_index, chosen, dim)
        except ProtocolError as exc:
            return None, [], str(exc), 0, None

    def _he_sum(
        self, fits: Mapping[int, Mapping[str, Any]], round_index: int, dim: int
    ) -> tuple[np.ndarray, list[int], str | None, int, float]:
        """Add the sites' CKKS ciphertexts; the lowest-id contributor that answers decrypts."""
        from securefed.crypto.ckks import CKKSAggregator
        from securefed.errors import DataError

        start = time.perf_counter()
        agg = CKKSAggregator(self.he_public, round_index=round_index)
        added = []
        for sid in sorted(fits):
            try:
                agg.add(fits[sid]["ciphertext"], site_id=sid)
            except (ProtocolError, DataError) as exc:
                self._step_errors.setdefault(self.nodes[sid], f"ciphertext: {exc}")
                continue
            added.append(sid)
        need = self.aggregator.min_contributors
        if len(added) < need:
            return None, [], f"only {len(added)} ciphertexts; {need} are needed", 0, None
        blob = agg.aggregate()
        seconds = time.perf_counter() - start
        for holder in added:
            node = self.nodes[holder]
            self._event(event="sent", round=round_index, stage="decrypt", site=holder)
            fields = {
                "config": self.config.to_dict(),
                "round": round_index,
                "aggregate": blob,
                "min_contributors": need,
            }
            replies, errors = self._exchange(
                {node: (Stage.DECRYPT, fields)}, timeout=self.stage_timeout, round_index=round_index
            )
            if node in replies:
                total = vector_from_bytes(replies[node]["vector"], length=dim, what="the sum")
                return total, added, None, 0, seconds
            self._step_errors.setdefault(node, f"decrypt: {errors.get(node)}")
        return None, [], "no key-holding site decrypted the aggregate", 0, None

    def _masked_sum(
        self, fits: Mapping[int, Mapping[str, Any]], round_index: int, chosen: list[int], dim: int
    ) -> tuple[np.ndarray, list[int], None, int, float]:
        from securefed.crypto.secagg import SecAggServer

        config = secagg_config(self.config, n_sites=len(chosen))
        server = SecAggServer(config=config, round_index=round_index, site_ids=chosen, dim=dim)
        advertised = []
        for sid in sorted(fits):
            try:
                server.receive_advertise_keys(fits[sid]["advertise"])
            except ProtocolError as exc:
                self._event(event="refused", round=round_index, site=sid, why=str(exc))
                continue
            advertised.append(sid)

        def step(stage: str, name: str, messages: Mapping[int, bytes], receive: Callable) -> dict:
            payloads = {
                self.nodes[sid]: (stage, {"round": round_index, "message": m})
                for sid, m in messages.items()
            }
            self._event(event="sent", round=round_index, stage=name)
            replies, errors = self._exchange(
                payloads, timeout=self.stage_timeout, round_index=round_index
            )
            by_site = {}
            for sid in sorted(messages):
                rep = replies.get(self.nodes[sid])
                if rep is None:
                    continue
                try:
                    receive(rep["message"])
                except ProtocolError as exc:
                    errors[self.nodes[sid]] = str(exc)
                    continue
                by_site[sid] = rep
            for node, why in errors.items():
                self._step_errors.setdefault(node, f"{name}: {why}")
            self._event(
                event="replies",
                round=round_index,
                stage=name,
                sites=sorted(by_site),
                errors={str(k): v for k, v in errors.items()},
            )
            return by_site

        keys = server.public_keys()
        step(
            Stage.SHARE,
            "share",
            dict.fromkeys(advertised, keys),
            server.receive_encrypted_shares,
        )
        masked = step(
            Stage.MASKED, "masked", dict(server.relay_shares()), server.receive_masked_input
        )
        request = server.unmask_request()
        step(
            Stage.UNMASK,
            "unmask",
            dict.fromkeys(server.survivors, request),
            server.receive_unmask_shares,
        )
        total = server.aggregate()
        clipped = sum(int(r.get("clipped", 0)) for r in masked.values())
        return total, sorted(server.survivors), None, clipped, server.timer.wall

    # -- evaluation -------------------------------------------------------------------------
    def _epsilon(self, sid: int) -> float | None:
        plan = self.plans.get(sid)
        if plan is None:
            return None
        return compute_epsilon(
            history=self.ledger.history(sid), delta=plan.delta, accountant=plan.accountant
        )

    def _evaluate(self, round_index: int, chosen: list[int]) -> dict[str, Any]:
        clients = []
        for sid in sorted(self.sites):
            eps = self._epsilon(sid)
            self.eps_history.setdefault(sid, []).append(eps if eps is not None else float("inf"))
            entry = {"client_id": sid, "participated": sid in chosen, "epsilon": eps}
            if "num_samples" in self.sites[sid]:
                entry["num_train_samples"] = self.sites[sid]["num_samples"]
            clients.append(entry)
        return {
            "round": round_index,
            "global": self.task.evaluate(
                model=self.models[0], split=self.bundle.test, device=self.device
            ),
            "clients": clients,
            "site_mean": {self.task.primary_metric: None},
        }

    def _fill_previous(self, replies: Mapping[int, Mapping[str, Any]]) -> None:
        """Sites evaluated the model they received: that is the previous round's result."""
        if not self.records:
            return
        data = self.records[-1].data
        for entry in data["clients"]:
            rep = replies.get(entry["client_id"])
            if rep is None:
                continue
            metrics = rep.get("previous_metrics", rep.get("metrics"))
            if metrics:
                entry.update(metrics)
        primary = self.task.primary_metric
        scored = [c[primary] for c in data["clients"] if c.get(primary) is not None]
        data["site_mean"] = {primary: float(np.mean(scored)) if scored else None}

    def _final_evaluation(self) -> None:
        """Every site evaluates the final model; last round's dropouts are not waited for."""
        payloads = {
            self.nodes[sid]: (Stage.EVALUATE, {**self._base(), "weights": self._weights()})
            for sid in sorted(self.sites)
        }
        last = self.records[-1].data if self.records else {}
        gone = {int(k) for k in last.get("transport", {}).get("site_errors", {})}
        awaited = {self.nodes[sid] for sid in self.sites if sid not in gone}
        self._event(event="sent", stage="evaluate")
        replies, errors = self.link.exchange(
            payloads, timeout=self.fit_timeout, group="final", awaited=awaited
        )
        self._fill_previous(
            {sid: replies[self.nodes[sid]] for sid in self.sites if self.nodes[sid] in replies}
        )
        self._event(
            event="replies", stage="evaluate", errors={str(k): v for k, v in errors.items()}
        )
