"""``--secure-agg mask``: Bonawitz pairwise masking with SecAgg+ neighbourhoods, over any link.

The one driver of the masking protocol (:mod:`securefed.crypto.secagg` holds its parties).
The fit reply carries the site's key advertisement; the server then runs three stages:

* ``Stage.SHARE``: every site that advertised gets all public keys and returns its sealed
  Shamir shares;
* ``Stage.MASKED``: every site that shared gets the shares sealed to it and uploads its
  masked, fixed-point-encoded update;
* ``Stage.CONSISTENCY``: every uploader gets the survivor list U3 and signs it with its
  identity key (Bonawitz et al. 2017's consistency round);
* ``Stage.UNMASK``: every site that signed gets U3 with the signatures and, once it has
  checked at least t of them over the list it signed, reveals the shares the server needs;
  the server removes the masks and decodes the sum.

This is the active-security variant (:mod:`securefed.crypto.secagg.active`): round keys and
share commitments are signed with each site's identity key and checked against the
federation's roster, and a site derives n and t from its roster and the signed key list,
never from the server. A site without a roster and identity key refuses to run the protocol.

A site keeps its round secrets in the runtime's state (bytes and ints only, so Flower can hold
it in ``context.state`` between processes); the server never holds one site's update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.messages import claimed_sender
from securefed.crypto.secagg import SecAggClient, SecAggConfig, SecAggServer
from securefed.crypto.secagg.active import (
    ActiveSecurity,
    collusion_tolerance,
    pinned_config,
)
from securefed.errors import ConfigError, DropoutRecoveryError, ProtocolError
from securefed.protocol.link import Link
from securefed.protocol.modes.base import (
    TIMING_DETAIL,
    SecureSumMode,
    SiteProtection,
    SiteState,
    SumCollector,
    SumOutcome,
    run_session,
)
from securefed.protocol.wire import Stage, vector_from_bytes, vector_to_bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.crypto.roster import Roster

__all__ = [
    "MaskingCollector",
    "MaskingMode",
    "MaskingSite",
    "ring_choice",
    "run_session",
    "secagg_config",
]

#: A round's masking parameters for ``n`` sampled sites.
ConfigFor = Callable[[int], SecAggConfig]

# Site-state keys, prefixed so they cannot collide with what the runtime keeps beside them.
_ROUND, _N_SITES, _VECTOR, _CLIENT = "mask.round", "mask.n_sites", "mask.vector", "mask.client"
#: In the site's persistent store: the rounds it advertised masking keys for.
_ADVERTISED = "mask.rounds"


def secagg_config(config: Any, *, n_sites: int, site: bool = False) -> SecAggConfig:
    """The masking parameters for a round of ``n_sites`` (identical at server and sites).

    Args:
        config: The run's :class:`~securefed.config.RunConfig`.
        n_sites: Sites sampled this round (the graph and the fixed-point head-room use it).
        site: A site's base parameters: the threshold and n it actually uses come from its
            roster and the signed key list (:func:`~securefed.crypto.secagg.active.
            pinned_config`), so the server's ``secagg_threshold`` and ``n_sites`` are ignored.

    The fixed-point fractional bits follow from the signed run's full complement of sites
    (``clients``: no round sums more), never from the round's announced size. Why: when
    they followed the announced size, a server could announce a huge round to every site
    but one, so that the others encoded ~10 bits coarser, and read the one site's update out
    of the "sum" (a reviewer's attack, ``tests/protocol/test_masking_ring.py``).
    """
    from securefed.crypto.fixedpoint import FixedPointCodec

    complement = max(2, int(config.clients))
    frac = FixedPointCodec(
        ring_bits=config.resolved_ring_bits,
        clip_range=config.secagg_clip,
        n_summands=complement,
    ).frac_bits
    return SecAggConfig(
        n_clients=complement if site else n_sites,
        threshold=None if site else config.secagg_threshold,
        neighbors=config.secagg_neighbors,
        ring_bits=config.resolved_ring_bits,
        clip_range=config.secagg_clip,
        frac_bits=frac,
    )


def ring_choice(config: Any) -> dict[str, Any]:
    """How the run's ring was chosen: the setting, and for ``auto`` the tolerance it met."""
    from securefed.crypto.fixedpoint import AUTO_RING_TOLERANCE

    setting = config.secagg_ring_bits
    out: dict[str, Any] = {"ring_setting": setting}
    if setting == "auto":
        # Rule 1's text is what reports before schema 3.12 state: the audit compares it.
        rings = "32, 64 bits" if config.ring_auto_rule == 1 else "the rings of 8 to 64 bits"
        out["ring_rule"] = (
            f"smallest of {rings} whose quantum (the worst-case rounding error per "
            "coordinate of the FedAvg average, every n_i >= 1) is at most ring_tolerance, for "
            "the run's sites and --secagg-clip"
        )
        out["ring_tolerance"] = AUTO_RING_TOLERANCE
    return out


def _check_sender(message: Any, sid: int) -> None:
    """The link knows who answered: a site must not speak for another one."""
    claimed = claimed_sender(message)
    if claimed != sid:
        raise ProtocolError(f"the message from site {sid} claims to be from {claimed}")


class MaskingSite(SiteProtection):
    """One site's side: advertise keys at fit, then share, upload masked, unmask.

    The :class:`~securefed.crypto.secagg.SecAggClient` is rebuilt from the state at every stage
    (a Flower site may answer each message in a fresh process).

    Args:
        site_id: This site's id.
        config_for: The round's parameters for ``n`` sampled sites (the server's must agree).
        roster: The federation's roster, as this site verified it (None: the site refuses to
            run the protocol).
        identity: This site's Ed25519 identity key (the roster's key for ``site_id``).
        session: The 32-byte session id the signatures are bound to.
        min_contributors: The site's own floor on the survivors of a round it unmasks (its
            node setting), on top of the roster's.

    Attributes:
        step_seconds: Wall-clock seconds per protocol step in the current round (summed over
            the stages this object answered), for harnesses and benchmarks.
        wall_seconds: Wall-clock seconds inside the steps this round.
        cpu_seconds: CPU seconds inside the steps this round.

    """

    stages = (Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK)

    def __init__(
        self,
        *,
        site_id: int,
        config_for: ConfigFor,
        roster: Roster | None = None,
        identity: Ed25519PrivateKey | None = None,
        session: bytes | None = None,
        min_contributors: int | None = None,
    ) -> None:
        self.site_id = int(site_id)
        self.config_for = config_for
        self.active: ActiveSecurity | None = None
        if roster is not None and identity is not None and session is not None:
            self.active = ActiveSecurity(
                roster=roster,
                session=session,
                identity=identity,
                site_id=self.site_id,
                min_contributors=min_contributors,
            )
        self.step_seconds: dict[str, float] = {}
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0

    def _tally(self, client: SecAggClient) -> None:
        for name, spent in client.timer.steps.items():
            self.step_seconds[name] = self.step_seconds.get(name, 0.0) + spent
        self.wall_seconds += client.timer.wall
        self.cpu_seconds += client.timer.cpu

    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        """Draw this round's keys and return their advertisement (the update stays here).

        A site advertises keys for a round once per run (remembered in :attr:`persistent`,
        which outlives the session's protocol state): a server that re-ran the round, once with
        every site and once without one, would get two sums whose difference is that site's
        update (training without DP is deterministic, so a re-fit gives the same update).

        Raises:
            ProtocolError: Without a roster and identity key, or for a round this site already
                advertised keys for.

        """
        start = time.perf_counter()
        self._require_active()
        self.persistent.claim_once(
            _ADVERTISED, int(round_index), what=f"site {self.site_id}: masking round {round_index}"
        )
        self.step_seconds, self.wall_seconds, self.cpu_seconds = {}, 0.0, 0.0
        try:
            config = self.config_for(int(n_sites))
        except ConfigError as exc:
            # The ring and clip range come from the signed run configuration; only the round
            # size is the server's word, and a size whose sum could wrap is refused.
            raise ProtocolError(
                f"site {self.site_id}: refusing masking parameters for a round of {n_sites} "
                f"sites: {exc}"
            ) from exc
        client = SecAggClient(
            site_id=self.site_id,
            config=config,
            round_index=round_index,
            dim=len(vector),
            active=self.active,
        )
        advertise = client.advertise_keys()
        self._tally(client)
        state[_ROUND] = int(round_index)
        state[_N_SITES] = int(n_sites)
        state[_VECTOR] = vector_to_bytes(vector)
        state[_CLIENT] = client.export_state()
        return {"advertise": advertise, "protect_seconds": time.perf_counter() - start}

    def _require_active(self) -> None:
        if self.active is None:
            raise ProtocolError(
                f"site {self.site_id}: masking needs the federation's signed roster and this "
                "site's identity key (a deployed site: node settings `roster` and "
                "`federation-key`); refusing to run secure aggregation without them"
            )

    def step(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """Answer ``share``, ``masked``, ``consistency`` or ``unmask`` for the round in ``state``.

        Raises:
            ProtocolError: For another round than the one in ``state`` (the site restarted
                mid-round or already answered the unmask request), a stage out of order, a
                malformed server message, or any check of the active variant.

        """
        start = time.perf_counter()
        if stage not in self.stages:
            return super().step(stage, fields, state=state)
        self._require_active()
        round_index = fields.get("round")
        if _CLIENT not in state or state.get(_ROUND) != round_index:
            raise ProtocolError(
                f"this site holds no state for round {round_index} (it restarted mid-round)"
            )
        message = fields.get("message")
        if not isinstance(message, bytes):
            raise ProtocolError(f"{stage} message: no protocol bytes")
        client = SecAggClient.from_state(
            state[_CLIENT], config=self.config_for(int(state[_N_SITES])), active=self.active
        )
        reply: dict[str, Any] = {}
        try:
            if stage == Stage.SHARE:
                reply["message"] = client.share_keys(message)
            elif stage == Stage.MASKED:
                values = vector_from_bytes(state[_VECTOR], what="the stored update")
                reply["message"] = client.masked_input(message, values=values)
                reply["clipped"] = int(client.clipped or 0)
                # The plaintext update is not needed any more: do not keep it at the site.
                state[_VECTOR] = b""
            elif stage == Stage.CONSISTENCY:
                reply["message"] = client.consistency(message)
            else:
                reply["message"] = client.unmask(message)
        except ProtocolError:
            # A refused step ends the round at this site: it signs at most one survivor list
            # and answers at most one unmask request, whatever the server sends next.
            for key in (_ROUND, _N_SITES, _VECTOR, _CLIENT):
                state.pop(key, None)
            raise
        finally:
            self._tally(client)
        if stage == Stage.UNMASK:
            for key in (_ROUND, _N_SITES, _VECTOR, _CLIENT):
                state.pop(key, None)
        else:
            state[_CLIENT] = client.export_state()
        reply["protect_seconds"] = time.perf_counter() - start
        return reply


class MaskingCollector(SumCollector):
    """The server's side: relay keys and shares, collect masked inputs, unmask the sum.

    Args:
        config_for: The round's parameters for ``n`` sampled sites.
        describe_config: The parameters privacy.json states (the run's full complement).
        graph_seed: Public SecAgg+ graph seed; None draws a fresh one each round (tests pin
            it to build the same graph).
        roster: The federation's roster; with ``session``, the server checks every signature
            and commitment and runs the consistency round (the sites require it).
        session: The 32-byte session id of the run.
        ring_choice: How the ring was chosen (the setting and the ``auto`` tolerance), for
            the report.

    Attributes:
        last_error: The exception that stopped the latest sum, else None (a harness re-raises
            it; the round engine reads the outcome's ``error``).
        last_server: The latest round's :class:`~securefed.crypto.secagg.SecAggServer` (its
            timer and participation sets), for harnesses and benchmarks.

    """

    def __init__(
        self,
        *,
        config_for: ConfigFor,
        describe_config: SecAggConfig,
        graph_seed: bytes | None = None,
        roster: Roster | None = None,
        session: bytes | None = None,
        ring_choice: Mapping[str, Any] | None = None,
    ) -> None:
        self.config_for = config_for
        self.describe_config = describe_config
        self.ring_choice = dict(ring_choice or {})
        self.graph_seed = graph_seed
        self.active: ActiveSecurity | None = None
        if roster is not None and session is not None:
            self.active = ActiveSecurity(roster=roster, session=session)
        self.last_error: Exception | None = None
        self.last_server: SecAggServer | None = None

    def collect(
        self,
        link: Link,
        fits: Mapping[int, Mapping[str, Any]],
        *,
        round_index: int,
        chosen: list[int],
        dim: int,
        timeout: float,
        drop_before_upload: Collection[int] = (),
        drop_after_upload: Collection[int] = (),
    ) -> SumOutcome:
        """Run share, masked and unmask over ``link``; see :meth:`SumCollector.collect`."""
        self.last_error = None
        site_errors: dict[int, str] = {}
        protect: dict[int, float] = {}
        group = str(round_index)
        server = SecAggServer(
            config=self.config_for(len(chosen)),
            round_index=round_index,
            site_ids=chosen,
            dim=dim,
            graph_seed=self.graph_seed,
            active=self.active,
        )
        self.last_server = server

        def refuse(sid: int, stage: str, why: str) -> None:
            site_errors.setdefault(sid, f"{stage}: {why}")

        def note(sid: int, reply: Mapping[str, Any]) -> None:
            seconds = reply.get("protect_seconds", 0.0)
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                protect[sid] = protect.get(sid, 0.0) + float(seconds)

        def run(stage: str, messages: Mapping[int, bytes], receive: Callable) -> dict[int, dict]:
            """One stage: send, then feed each reply to the server; a bad reply is refused."""
            replies, errors = link.exchange(
                {sid: (stage, {"round": round_index, "message": m}) for sid, m in messages.items()},
                timeout=timeout,
                group=group,
            )
            accepted = {}
            for sid in sorted(messages):
                if sid in errors:
                    refuse(sid, stage, errors[sid])
                    continue
                reply = replies.get(sid)
                if reply is None:
                    continue
                try:
                    _check_sender(reply["message"], sid)
                    receive(reply["message"])
                except (KeyError, TypeError, ProtocolError) as exc:
                    # Nothing of a refused reply reached the server's sums (parsed first).
                    refuse(sid, stage, f"refused: {exc}")
                    continue
                note(sid, reply)
                accepted[sid] = reply
            return accepted

        try:
            advertised = []
            for sid in sorted(fits):
                try:
                    _check_sender(fits[sid]["advertise"], sid)
                    server.receive_advertise_keys(fits[sid]["advertise"])
                except (KeyError, TypeError, ProtocolError) as exc:
                    refuse(sid, Stage.FIT, f"refused: {exc}")
                    continue
                note(sid, fits[sid])
                advertised.append(sid)
            keys = server.public_keys()
            run(Stage.SHARE, dict.fromkeys(advertised, keys), server.receive_encrypted_shares)
            # In-process simulation: a site gone before its upload is not asked for it.
            gone = set(drop_before_upload)
            relays = {s: m for s, m in server.relay_shares().items() if s not in gone}
            masked = run(Stage.MASKED, relays, server.receive_masked_input)
            away = set(drop_after_upload)
            answering = [s for s in server.survivors if s not in away]
            if self.active is not None:
                check = server.consistency_request()
                run(Stage.CONSISTENCY, dict.fromkeys(answering, check), server.receive_consistency)
                answering = [s for s in server.signers if s not in away]
            request = server.unmask_request()
            run(Stage.UNMASK, dict.fromkeys(answering, request), server.receive_unmask_shares)
            total = server.aggregate()
        except ProtocolError as exc:
            self.last_error = exc
            return SumOutcome(
                None,
                [],
                error=f"round {round_index}: {exc}",
                server_seconds=server.timer.wall,
                protect_seconds=protect,
                site_errors=site_errors,
            )
        return SumOutcome(
            total,
            list(server.survivors),
            clipped=sum(int(r.get("clipped", 0)) for r in masked.values()),
            server_seconds=server.timer.wall,
            protect_seconds=protect,
            site_errors=site_errors,
        )

    def describe(self) -> dict[str, Any]:
        """The protocol, its parameters and the fixed-point encoding."""
        out = self.describe_config.describe()
        out.update(self.ring_choice)
        if self.active is not None:
            roster = self.active.roster
            out.update(
                variant="active (Bonawitz et al. 2017, Fig. 4): signed round keys, signed share "
                "commitments, consistency round",
                threat_model=ACTIVE_THREAT_MODEL,
                identities="Ed25519 identity keys from the federation roster",
                roster_sha256=roster.digest().hex(),
                roster_sites=roster.n_sites,
                pinned_threshold=roster.threshold,
                min_contributors=roster.min_contributors,
            )
            try:
                pinned = pinned_config(
                    self.describe_config, roster=roster, n_round=self.describe_config.n_clients
                )
            except DropoutRecoveryError:
                pass  # the full complement cannot run a round: nothing to state
            else:
                assert pinned.threshold is not None
                # The server may run (or sample) any round the roster admits, and a smaller
                # round can tolerate fewer colluders: state the least over all of them.
                tolerances = []
                for n_round in range(2, roster.n_sites + 1):
                    try:
                        p = pinned_config(self.describe_config, roster=roster, n_round=n_round)
                    except DropoutRecoveryError:
                        continue
                    tolerances.append(
                        collusion_tolerance(threshold=p.threshold, holders=p.neighbourhood_size)
                    )
                out.update(
                    threshold=pinned.threshold,
                    max_dropouts_per_neighbourhood=pinned.neighbourhood_size - pinned.threshold,
                    tolerated_colluders=min(tolerances),
                    tolerated_colluders_full_round=collusion_tolerance(
                        threshold=pinned.threshold, holders=pinned.neighbourhood_size
                    ),
                )
        return out


#: ``secure_aggregation_params.threat_model`` of a run with a roster (the active variant).
ACTIVE_THREAT_MODEL = (
    "an active server (key substitution, split or lied views, replays, tampered shares) learns "
    "only the sum of at least max(t, min_contributors) sites unless it colludes with 2t - m of "
    "a site's m share holders, or with m - 1 of them ('tolerated_colluders', counted anywhere "
    "in the federation under SecAgg+); see docs/secure-aggregation.md"
)
#: The same, as reports before schema 3.7 wrote it (without the m - 1 bound).
ACTIVE_THREAT_MODEL_3_6 = (
    "an active server (key substitution, split or lied views, replays, tampered shares) learns "
    "only the sum of at least max(t, min_contributors) sites unless it colludes with 2t - m of "
    "a site's m share holders ('tolerated_colluders'); see docs/secure-aggregation.md"
)


class MaskingMode(SecureSumMode):
    """Pairwise masking (Bonawitz et al. 2017; SecAgg+ neighbourhoods, Bell et al. 2020)."""

    name = "mask"
    stages = (Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK)
    uses_roster = True

    def releases(self, config: Any) -> list[tuple[str, str, str, str]]:
        """Keys, sealed shares, the masked update, signatures, unmasking shares, timings."""
        dp = config.dp_enabled
        out = [
            (
                "fit",
                "advertise",
                "clear",
                "the site's two X25519 public keys for this round and its Ed25519 identity "
                "signature over them (bound to the roster, run and round)",
            ),
            (
                "share",
                "message",
                "clear",
                "Shamir shares of the site's secrets, each AES-GCM-sealed to one peer, with "
                "salted SHA-256 commitments to each share and the site's signature over them",
            ),
            (
                "masked",
                "message",
                "secure-sum",
                "n_i times the update and n_i, fixed-point encoded and masked",
            ),
            (
                "masked",
                "clipped",
                "dp-accounted" if dp else "clear",
                "how many coordinates of the site's (noised) update the fixed-point encoder "
                "clipped",
            ),
            (
                "consistency",
                "message",
                "clear",
                "the site's Ed25519 signature over the survivor list it was shown (consistency "
                "round)",
            ),
            (
                "unmask",
                "message",
                "clear",
                "shares that remove the masks: of survivors' self-mask seeds, of dropped sites' "
                "keys (never both for one site), with the salts that open their commitments",
            ),
        ]
        return out + [
            (m, "protect_seconds", "clear", TIMING_DETAIL)
            for m in ("fit", "share", "masked", "consistency", "unmask")
        ]

    def server(
        self,
        config: Any,
        *,
        n_sites: int,
        he_public: bytes | None = None,
        roster: Roster | None = None,
    ) -> SumCollector:
        """The server side; parameters from ``config``, ``n_sites`` for the report.

        Args:
            config: The run configuration.
            n_sites: Sites in the federation (for privacy.json).
            he_public: Unused (CKKS only).
            roster: The federation's roster; without it the sites refuse to take part.

        """
        return MaskingCollector(
            config_for=lambda n: secagg_config(config, n_sites=n),
            describe_config=secagg_config(config, n_sites=n_sites),
            roster=roster,
            session=run_session(config),
            ring_choice=ring_choice(config),
        )

    def site(
        self,
        config: Any,
        *,
        site_id: int,
        he_secret: bytes | None = None,
        identity: Ed25519PrivateKey | None = None,
        roster: Roster | None = None,
        min_contributors: int | None = None,
    ) -> SiteProtection:
        """Site ``site_id``'s side; run parameters from ``config``, n and t from ``roster``.

        Args:
            config: The run configuration.
            site_id: This site's id.
            he_secret: Unused (CKKS only).
            identity: This site's Ed25519 identity key (its registered signing key).
            roster: The federation's roster as this site verified it. Without it (or the
                identity) the site refuses every masking step.
            min_contributors: The site's own floor (node setting ``min-contributors``) on top
                of the roster's ``min_contributors``.

        """
        return MaskingSite(
            site_id=site_id,
            config_for=lambda n: secagg_config(config, n_sites=n, site=True),
            roster=roster,
            identity=identity,
            session=run_session(config),
            min_contributors=min_contributors,
        )
