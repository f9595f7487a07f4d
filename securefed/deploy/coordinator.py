"""The server's side of a deployed run: the round engine over Flower messages.

:class:`Coordinator` is the :class:`~securefed.fl.engine.RoundEngine` (the same round the
in-process runtime runs) over a :class:`FlowerLink` to the hospitals' ClientApps
(:mod:`securefed.deploy.site_app`), which run the same
:class:`~securefed.fl.site_runtime.SiteRuntime`. What is Flower-specific lives here: finding
the sites among the connected nodes, the message transport, the run folder's log and
checkpoints. The coordinator never holds a site's data or its individual update.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from securefed.config import RunConfig
from securefed.crypto.roster import Roster
from securefed.data.dataset import load_dataset
from securefed.deploy.launch import check_deployable
from securefed.deploy.trust import IDENTITY_FIELD, verify_identity
from securefed.errors import ConfigError, ProtocolError
from securefed.fl.checkpoint import load_checkpoint, save_checkpoint
from securefed.fl.engine import RoundEngine
from securefed.protocol.link import Payloads, Replies
from securefed.protocol.wire import RUN_CONFIG, Stage, decode, encode, payload_size

__all__ = ["Coordinator", "FlowerLink", "check_deployable"]

log = logging.getLogger("securefed.deploy")


class FlowerLink:
    """The :class:`~securefed.protocol.link.Link` over Flower's ``Grid``.

    Payloads are keyed by site id once :meth:`bind` maps sites to Flower nodes (before it,
    :meth:`exchange_nodes` addresses nodes directly, for set-up). Every message carries the
    run configuration, which each site checks against its own policy. Flower's own
    ``send_and_receive`` polls every 3 s; a secure-aggregation round has four exchanges, so
    this link polls every ``poll`` seconds instead.

    Args:
        grid: The ServerApp's ``Grid``.
        config: The run configuration (sent with every message).
        poll: Seconds between pulls.

    """

    def __init__(self, grid: Any, *, config: RunConfig | None = None, poll: float = 0.05) -> None:
        self.grid = grid
        self.config = config
        self.poll = poll
        self.nodes: dict[int, int] = {}
        #: Payload bytes per Flower node (the per-site figures are read through ``nodes``).
        self.node_sent: dict[int, int] = {}
        self.node_received: dict[int, int] = {}
        #: Nodes Flower reported as gone (no heartbeat), e.g. a site process that was killed.
        self.unreachable: set[int] = set()

    def node_ids(self) -> list[int]:
        """Nodes (SuperNodes) connected now."""
        return sorted(int(n) for n in self.grid.get_node_ids())

    @property
    def sent(self) -> dict[int, int]:
        """Per site, payload bytes sent to it so far."""
        return {sid: self.node_sent.get(node, 0) for sid, node in self.nodes.items()}

    @property
    def received(self) -> dict[int, int]:
        """Per site, payload bytes received from it so far."""
        return {sid: self.node_received.get(node, 0) for sid, node in self.nodes.items()}

    def bind(self, nodes: Mapping[int, int]) -> None:
        """Address site ``sid`` at Flower node ``nodes[sid]`` from now on."""
        self.nodes = dict(nodes)

    def exchange(
        self, payloads: Payloads, *, timeout: float, group: str, awaited: set[int] | None = None
    ) -> Replies:
        """Send each site its message; see :meth:`securefed.protocol.link.Link.exchange`."""
        by_node = {self.nodes[sid]: p for sid, p in payloads.items()}
        site_of = {n: s for s, n in self.nodes.items()}
        replies, errors = self.exchange_nodes(
            by_node,
            timeout=timeout,
            group=group,
            awaited=None
            if awaited is None
            else {self.nodes[s] for s in awaited if s in self.nodes},
        )
        return (
            {site_of[n]: r for n, r in replies.items()},
            {site_of[n]: why for n, why in errors.items()},
        )

    def exchange_nodes(
        self,
        payloads: Payloads,
        *,
        timeout: float,
        group: str,
        awaited: set[int] | None = None,
    ) -> Replies:
        """Send each node its message; wait up to ``timeout`` s for the replies.

        Returns:
            Decoded replies by node, and the reason for each node that failed (an error reply,
            a malformed reply, or no reply in time).

        """
        from flwr.app import Message

        ids: dict[str, int] = {}
        messages = []
        run = self.config.to_dict() if self.config is not None else None
        for node, (stage, fields) in payloads.items():
            content = encode({**fields, RUN_CONFIG: run} if run is not None else fields)
            self.node_sent[node] = self.node_sent.get(node, 0) + payload_size(content)
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
                size = payload_size(reply.content)
                self.node_received[node] = self.node_received.get(node, 0) + size
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


class Coordinator(RoundEngine):
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
        roster: The federation's signed roster: a site's set-up reply must carry an identity
            proof by the roster's key for the site id it claims
            (:func:`securefed.deploy.trust.verify_identity`), so no site process can take
            another site's id. None (``--insecure-no-roster``): ids are taken as claimed.
        run_id: The Flower run id the identity proofs are bound to (default: the grid's).

    """

    runtime = "flower"

    def __init__(
        self,
        config: RunConfig,
        *,
        link: FlowerLink,
        out: Path,
        fit_timeout: float = 3600.0,
        stage_timeout: float = 300.0,
        connect_timeout: float = 300.0,
        resume: bool = False,
        stop_after: int | None = None,
        roster: Roster | None = None,
        run_id: int | None = None,
    ) -> None:
        check_deployable(config)
        link.config = config
        self.run_id = run_id
        self.out = Path(out)
        self.connect_timeout = connect_timeout
        self.resume = resume
        self.stop_after = stop_after
        self._log = self.out / "deploy-log.jsonl"
        bundle = load_dataset(
            name=config.dataset,
            data_dir=config.data_dir,
            data=config.data,
            seed=config.seed,
            **config.loader_options,
        )
        super().__init__(
            config,
            bundle=bundle,
            link=link,
            fit_timeout=fit_timeout,
            stage_timeout=stage_timeout,
            on_event=self._event,
        )
        # The roster binds site ids to identity keys at set-up, and is the one the masking
        # and CKKS server sides pin their parameters from (the engine's `roster`).
        self.roster = roster

    def _event(self, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), **fields}, sort_keys=True)
        with self._log.open("a") as fh:
            fh.write(line + "\n")
        log.info(line)

    def _setup(self) -> None:
        """Ask every connected node for its site id and set-up; wait until all N answered.

        A node Flower lists but cannot reach (a killed site process whose record outlives it in
        the SuperLink's database) is skipped; a site whose own set-up fails stops the run.
        """
        link: FlowerLink = self.link  # type: ignore[assignment]
        need = self.config.clients
        wanted = set(range(need))
        deadline = time.monotonic() + self.connect_timeout
        by_site: dict[int, int] = {}
        replies_by_site: dict[int, dict[str, Any]] = {}
        asked: set[int] = set()
        refused: dict[int, str] = {}
        while True:
            fresh = [n for n in link.node_ids() if n not in asked]
            if fresh:
                asked.update(fresh)
                replies, errors = link.exchange_nodes(
                    {n: (Stage.SETUP, {}) for n in fresh},
                    timeout=self.stage_timeout,
                    group="setup",
                )
                for node, why in sorted(errors.items()):
                    if node not in link.unreachable:
                        raise ConfigError(f"site set-up failed on node {node}: {why}")
                    self._event(event="unreachable", node=str(node), why=why)
                for node, info in replies.items():
                    sid = info.get("site_id")
                    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
                        # A node that cannot say which site it is answers nothing else.
                        why = f"its set-up reply names no valid site id ({sid!r})"
                        refused[node] = why
                        self._event(event="refused", node=str(node), why=why)
                        continue
                    why = self._identity_refusal(node, sid, info.pop(IDENTITY_FIELD, None))
                    if why is not None:
                        # Not bound: the real site can still connect and take its id.
                        refused[node] = why
                        self._event(event="refused", node=str(node), site=sid, why=why)
                        log.warning("node %s refused: %s", node, why)
                        continue
                    if sid in by_site:
                        raise ConfigError(
                            f"two site processes claim site-id {sid}; give each its own"
                        )
                    if sid not in wanted:
                        raise ConfigError(
                            f"a site claims site-id {sid}, but the run has {need} sites "
                            f"(site-id 0..{need - 1})"
                        )
                    by_site[sid] = node
                    replies_by_site[sid] = info
            if set(by_site) == wanted:
                break
            if time.monotonic() > deadline:
                missing = sorted(wanted - set(by_site))
                refusals = "".join(f"; refused node {n}: {w}" for n, w in sorted(refused.items()))
                raise ConfigError(
                    f"sites {missing} did not connect within {self.connect_timeout:g} s; start "
                    "a site process for each (securefed deploy site --site-id ...)" + refusals
                )
            time.sleep(0.5)
        link.bind(by_site)
        self.adopt_sites(replies_by_site)
        self._event(event="setup", sites={str(k): v for k, v in sorted(by_site.items())})

    def _identity_refusal(self, node: int, sid: int, proof: Any) -> str | None:
        """Why node ``node`` may not be site ``sid`` (None: it may).

        With a roster, the node's set-up reply must carry an identity proof by the roster's
        key for ``sid``, bound to this run and this node: a site claiming another site's id,
        a site not in the roster, or a proof replayed from another node or run is refused.
        Without a roster (``--insecure-no-roster``) every claim is taken as made.
        """
        if self.roster is None:
            return None
        run_id = self.run_id
        if run_id is None:
            run_id = int(self.link.grid.run.run_id)  # type: ignore[attr-defined]
        try:
            verify_identity(self.roster, proof, run_id=run_id, node_id=node, site_id=sid)
        except ProtocolError as exc:
            return str(exc)
        return None

    def run(self) -> Path:
        """Set up, run every round (resuming if asked), write the run's files."""
        from securefed.report.artifacts import prepare_out, write_outputs

        if self.resume:
            if (self.out / "privacy.json").exists():
                raise ConfigError(f"{self.out}: the run already finished")
        else:
            prepare_out(self.out)
            if (self.out / "checkpoint").exists():
                raise ConfigError(f"{self.out}: holds a checkpoint; resume it or choose another")
        self.out.mkdir(parents=True, exist_ok=True)
        self._setup()
        first = 1
        if self.resume:
            try:
                first = self.restore(load_checkpoint(self.out)) + 1
            except ConfigError as exc:
                raise ConfigError(f"{self.out}/checkpoint: {exc}") from exc
            self._event(event="resume", round=first - 1)
        for r in range(first, self.config.rounds + 1):
            self.run_round(r)
            model, opt, meta, extra = self.checkpoint_state()
            save_checkpoint(
                self.out,
                round_index=r,
                model_state=model,
                optimizer_state=opt,
                meta=meta,
                extra=extra,
            )
            self._event(event="checkpoint", round=r)
            if self.stop_after is not None and r >= self.stop_after:
                self._event(event="stopped", round=r)
                return self.out
        write_outputs(self, self.out)
        self._event(event="done", out=str(self.out))
        return self.out
