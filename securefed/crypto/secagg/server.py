"""The aggregator of one masking round (honest-but-curious, or checked by the active variant)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Mapping
from types import MappingProxyType

import numpy as np

from securefed.crypto import kdf
from securefed.crypto.graph import GRAPH_SEED_BYTES, NeighbourGraph, build_graph
from securefed.crypto.messages import (
    KEY_SHARE,
    SEED_SHARE,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyEntry,
    MaskedInput,
    PublicKeys,
    RelayedShares,
    UnmaskRequest,
    UnmaskShares,
    commitments_payload,
    consistency_payload,
    share_commitment,
)
from securefed.crypto.prg import apply_masks
from securefed.crypto.secagg.active import ActiveSecurity, pinned_config
from securefed.crypto.secagg.config import SecAggConfig
from securefed.crypto.secagg.rounds import (
    Phase,
    StepTimer,
    check_dim,
    check_round,
    check_site_id,
    require_connected,
)
from securefed.crypto.shamir import Share, combine
from securefed.errors import ConfigError, DropoutRecoveryError, IntegrityError, ProtocolError

__all__ = ["SecAggServer"]


class SecAggServer:
    """The honest-but-curious aggregator of one round.

    Every public method takes or returns ``bytes`` only: public keys, sealed share pairs it
    cannot open, masked vectors (added into one running sum on arrival and not kept), Shamir
    shares, and finally the sum. It never receives an individual plaintext input, and after
    :meth:`aggregate` its state holds only the (now unmasked) ring sum and the float total;
    the reconstructed mask secrets live in local variables of :meth:`aggregate` only.

    Args:
        config: Deployment parameters.
        round_index: Training round.
        site_ids: Sites invited to this round (at most ``config.n_clients``).
        dim: Length of the vectors being summed.
        graph_seed: Public seed of the SecAgg+ graph; None draws 32 bytes from ``secrets``.
        active: Roster and session of the active variant (no identity key), or None. The
            server then refuses, naming the sender, any round key, share commitment or
            consistency signature that does not verify against the roster, runs the
            consistency round (:meth:`consistency_request`), and checks every revealed share
            against its owner's signed commitment before reconstruction.

    """

    def __init__(
        self,
        *,
        config: SecAggConfig,
        round_index: int,
        site_ids: Collection[int],
        dim: int,
        graph_seed: bytes | None = None,
        active: ActiveSecurity | None = None,
    ) -> None:
        check_round(round_index)
        check_dim(dim)
        given = list(site_ids)
        for site in given:
            check_site_id(site)
        ids = sorted(set(given))
        if len(ids) != len(given) or not 1 <= len(ids) <= config.n_clients:
            raise ConfigError(
                f"`site_ids` must list 1 to {config.n_clients} (`n_clients`) distinct sites, "
                f"got {len(given)} ({len(ids)} distinct)."
            )
        if graph_seed is None:
            graph_seed = secrets.token_bytes(GRAPH_SEED_BYTES)
        if len(graph_seed) != GRAPH_SEED_BYTES:
            raise ConfigError(f"`graph_seed` must be {GRAPH_SEED_BYTES} bytes.")
        self.config = config
        self.base_config = config
        self.active = active
        self.round_index = int(round_index)
        self.dim = int(dim)
        self.invited = frozenset(ids)
        self.timer = StepTimer()
        self._graph_seed = bytes(graph_seed)
        self._phase = Phase.ADVERTISE
        self._keys: dict[int, KeyEntry] = {}
        self._graph: NeighbourGraph | None = None
        self._sealed: dict[int, list[tuple[int, bytes]]] = {}
        self._shared: set[int] = set()
        self._uploaded: set[int] = set()
        self._ring_sum = np.zeros(self.dim, dtype=config.codec.dtype.newbyteorder("="))
        self._dropped: frozenset[int] = frozenset()
        self._seed_shares: dict[int, list[Share]] = {}
        self._key_shares: dict[int, list[Share]] = {}
        self._answered: set[int] = set()
        self._total: np.ndarray | None = None
        self._transcript = b""
        self._commitments: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        self._signatures: dict[int, bytes] = {}
        self._asked: frozenset[int] = frozenset()

    # -- helpers ---------------------------------------------------------------------------

    def _enter(self, phase: Phase, step: str) -> None:
        if self._phase != phase:
            raise ProtocolError(
                f"server: `{step}` called in phase {self._phase.name}, expected {phase.name}."
            )

    def _check_message(self, round_index: int, sender: int, allowed: Collection[int], what: str):
        if round_index != self.round_index:
            raise ProtocolError(
                f"server: {what} from site {sender} is for round {round_index}, this is round "
                f"{self.round_index} (replayed or stale message)."
            )
        if sender not in allowed:
            raise ProtocolError(
                f"server: unexpected {what} from site {sender} (not invited, dropped earlier, "
                "or already received)."
            )

    def _require(self, count: int, what: str) -> None:
        t = self.config.threshold
        if count < t:
            raise DropoutRecoveryError(
                f"only {count} of {len(self.invited)} sites {what} in round "
                f"{self.round_index}; threshold={t} are needed, so the round is abandoned "
                "and the global model must stay unchanged."
            )

    # -- round 0 ---------------------------------------------------------------------------

    def receive_advertise_keys(self, message: bytes) -> None:
        """Accept one site's ADVERTISE_KEYS message."""
        self._enter(Phase.ADVERTISE, "receive_advertise_keys")
        with self.timer.step("advertise_keys"):
            msg = AdvertiseKeys.from_bytes(message)
            allowed = self.invited - set(self._keys)
            self._check_message(msg.round_index, msg.sender, allowed, "public keys")
            if self.active is not None:
                self.active.verify(
                    msg.sender,
                    self.active.round_keys(
                        round_index=self.round_index,
                        site=msg.sender,
                        encryption_public=msg.encryption_public,
                        mask_public=msg.mask_public,
                    ),
                    msg.signature,
                    what=f"server: the round keys of site {msg.sender}",
                )
            self._keys[msg.sender] = KeyEntry(
                site=msg.sender,
                encryption_public=msg.encryption_public,
                mask_public=msg.mask_public,
                signature=msg.signature if self.active is not None else b"",
            )

    def public_keys(self) -> bytes:
        """Close round 0 (U1 = sites heard from) and return the PUBLIC_KEYS broadcast."""
        self._enter(Phase.ADVERTISE, "public_keys")
        with self.timer.step("advertise_keys"):
            if self.active is not None:
                self.config = pinned_config(
                    self.base_config, roster=self.active.roster, n_round=len(self._keys)
                )
            self._require(len(self._keys), "advertised keys")
            self._graph = build_graph(
                sites=self._keys,
                neighbors=self.config.neighbors,
                seed=self._graph_seed,
                round_index=self.round_index,
            )
            message = PublicKeys(
                round_index=self.round_index,
                graph_seed=self._graph_seed,
                entries=tuple(self._keys[s] for s in sorted(self._keys)),
            ).to_bytes()
            self._transcript = hashlib.sha256(message).digest()
        self._phase = Phase.SHARE
        return message

    # -- round 1 ---------------------------------------------------------------------------

    def receive_encrypted_shares(self, message: bytes) -> None:
        """Accept one site's ENCRYPTED_SHARES message (sealed pairs the server cannot open)."""
        self._enter(Phase.SHARE, "receive_encrypted_shares")
        with self.timer.step("share_keys"):
            msg = EncryptedShares.from_bytes(message)
            allowed = set(self._keys) - self._shared
            self._check_message(msg.round_index, msg.sender, allowed, "encrypted shares")
            assert self._graph is not None
            expected = self._graph.neighbours(msg.sender)
            recipients = {r for r, _ in msg.sealed}
            if recipients != expected:
                raise ProtocolError(
                    f"server: site {msg.sender} sealed shares to {sorted(recipients)}, expected "
                    f"its neighbours {sorted(expected)}."
                )
            signed: tuple = (None,) * len(msg.sealed)
            if self.active is not None:
                if len(msg.commitments) != len(msg.sealed):
                    raise ProtocolError(
                        f"server: site {msg.sender}'s shares carry no signed commitments."
                    )
                for (recipient, _), (c_seed, c_key, sig) in zip(
                    msg.sealed, msg.commitments, strict=True
                ):
                    self.active.verify(
                        msg.sender,
                        commitments_payload(
                            roster_digest=self.active.digest,
                            session=self.active.session,
                            round_index=self.round_index,
                            owner=msg.sender,
                            holder=recipient,
                            seed_commitment=c_seed,
                            key_commitment=c_key,
                        ),
                        sig,
                        what=f"server: site {msg.sender}'s commitments to its shares for "
                        f"site {recipient}",
                    )
                signed = msg.commitments
            for (recipient, sealed), commitment in zip(msg.sealed, signed, strict=True):
                self._sealed.setdefault(recipient, []).append((msg.sender, sealed, commitment))
                if commitment is not None:
                    self._commitments[(msg.sender, recipient)] = (commitment[0], commitment[1])
            self._shared.add(msg.sender)

    def relay_shares(self) -> Mapping[int, bytes]:
        """Close round 1 (U2 = sites that shared) and return RELAYED_SHARES per site of U2."""
        self._enter(Phase.SHARE, "relay_shares")
        with self.timer.step("share_keys"):
            self._require(len(self._shared), "shared their keys")
            assert self._graph is not None
            for site in sorted(self._shared):
                holders = self._graph.neighbourhood(site) & self._shared
                if len(holders) < self.config.threshold:
                    raise DropoutRecoveryError(
                        f"only {len(holders)} holders of site {site}'s shares remain after "
                        f"ShareKeys in round {self.round_index}; threshold="
                        f"{self.config.threshold} are needed."
                    )
            relays = {}
            for site in sorted(self._shared):
                entries = sorted(
                    (e for e in self._sealed.get(site, []) if e[0] in self._shared),
                    key=lambda e: e[0],
                )
                relays[site] = RelayedShares(
                    round_index=self.round_index,
                    recipient=site,
                    sealed=tuple((s, c) for s, c, _ in entries),
                    commitments=tuple(m for _, _, m in entries if m is not None),
                ).to_bytes()
            self._sealed = {}
        self._phase = Phase.MASK
        return MappingProxyType(relays)

    # -- round 2 ---------------------------------------------------------------------------

    def receive_masked_input(self, message: bytes) -> None:
        """Accept one MASKED_INPUT message; it is added into the running sum and not kept."""
        self._enter(Phase.MASK, "receive_masked_input")
        with self.timer.step("masked_input"):
            # The ring and length are checked on the header, before anything is unpacked.
            msg = MaskedInput.from_bytes(message, expect=(self.config.ring_bits, self.dim))
            allowed = self._shared - self._uploaded
            self._check_message(msg.round_index, msg.sender, allowed, "masked input")
            self._ring_sum += msg.words
            self._uploaded.add(msg.sender)

    # -- round 4 ---------------------------------------------------------------------------

    def _close_uploads(self) -> None:
        """U3 = uploaders; refuse if some site's masks could never be removed."""
        self._require(len(self._uploaded), "uploaded masked inputs")
        if self.active is not None and len(self._uploaded) < self.active.roster.min_contributors:
            raise DropoutRecoveryError(
                f"only {len(self._uploaded)} sites uploaded in round {self.round_index}; the "
                f"roster pins {self.active.roster.min_contributors} contributors."
            )
        assert self._graph is not None
        self._dropped = frozenset(self._shared - self._uploaded)
        for site in sorted(self._uploaded | self._dropped):
            holders = self._graph.neighbourhood(site) & self._uploaded
            if len(holders) < self.config.threshold:
                raise DropoutRecoveryError(
                    f"site {site}'s masks cannot be removed in round {self.round_index}: "
                    f"only {len(holders)} of its share holders uploaded, threshold="
                    f"{self.config.threshold}."
                )
        require_connected(self._graph, self._uploaded, self.round_index)

    def consistency_request(self) -> bytes:
        """Active variant: close round 2 (U3 = uploaders) and return the CONSISTENCY_REQUEST.

        Raises:
            ProtocolError: Without the active variant.
            DropoutRecoveryError: As :meth:`unmask_request`.

        """
        if self.active is None:
            raise ProtocolError("server: no consistency round without the active variant.")
        self._enter(Phase.MASK, "consistency_request")
        with self.timer.step("consistency"):
            self._close_uploads()
            message = ConsistencyRequest(
                round_index=self.round_index, survivors=tuple(sorted(self._uploaded))
            ).to_bytes()
        self._phase = Phase.CONSISTENCY
        return message

    def receive_consistency(self, message: bytes) -> None:
        """Active variant: accept one survivor's signature over U3 (refused unless it verifies)."""
        self._enter(Phase.CONSISTENCY, "receive_consistency")
        with self.timer.step("consistency"):
            msg = ConsistencySignature.from_bytes(message)
            allowed = self._uploaded - set(self._signatures)
            self._check_message(msg.round_index, msg.sender, allowed, "consistency signature")
            assert self.active is not None
            self.active.verify(
                msg.sender,
                consistency_payload(
                    roster_digest=self.active.digest,
                    session=self.active.session,
                    round_index=self.round_index,
                    transcript=self._transcript,
                    survivors=tuple(sorted(self._uploaded)),
                ),
                msg.signature,
                what=f"server: site {msg.sender}'s consistency signature",
            )
            self._signatures[msg.sender] = msg.signature

    @property
    def signers(self) -> tuple[int, ...]:
        """Survivors whose consistency signature verified (asked to unmask, active variant)."""
        return tuple(sorted(self._signatures))

    def unmask_request(self) -> bytes:
        """Close round 2 (honest-but-curious) or 3 (active) and return the UNMASK_REQUEST.

        Raises:
            DropoutRecoveryError: If fewer than t sites uploaded, some site's secrets could not
                be reconstructed even if every survivor answered, (SecAgg+) the survivors are
                disconnected in the graph, or (active) fewer than t survivors signed U3.

        """
        if self.active is not None:
            self._enter(Phase.CONSISTENCY, "unmask_request")
            with self.timer.step("unmask"):
                t = self.config.threshold
                if len(self._signatures) < t:
                    raise DropoutRecoveryError(
                        f"only {len(self._signatures)} survivors answered the unmasking round "
                        f"(signed the survivor list) in round {self.round_index}; threshold={t} "
                        "are needed, so the round is abandoned."
                    )
                self._asked = frozenset(self._signatures)
                message = UnmaskRequest(
                    round_index=self.round_index,
                    survivors=tuple(sorted(self._uploaded)),
                    dropped=tuple(sorted(self._dropped)),
                    signatures=tuple(sorted(self._signatures.items())),
                ).to_bytes()
            self._phase = Phase.UNMASK
            return message
        self._enter(Phase.MASK, "unmask_request")
        with self.timer.step("unmask"):
            self._close_uploads()
            message = UnmaskRequest(
                round_index=self.round_index,
                survivors=tuple(sorted(self._uploaded)),
                dropped=tuple(sorted(self._dropped)),
            ).to_bytes()
        self._phase = Phase.UNMASK
        return message

    def receive_unmask_shares(self, message: bytes) -> None:
        """Accept one survivor's UNMASK_SHARES message."""
        self._enter(Phase.UNMASK, "receive_unmask_shares")
        with self.timer.step("unmask"):
            msg = UnmaskShares.from_bytes(message)
            asked = self._asked if self.active is not None else self._uploaded
            allowed = asked - self._answered
            self._check_message(msg.round_index, msg.sender, allowed, "unmask shares")
            assert self._graph is not None
            mine = self._graph.neighbourhood(msg.sender)
            # Every share is checked before any is stored: a refused message leaves no trace.
            accepted = []
            if self.active is not None and len(msg.salts) != len(msg.seed_shares) + len(
                msg.key_shares
            ):
                raise ProtocolError(
                    f"server: site {msg.sender}'s shares carry no commitment salts."
                )
            salts = iter(msg.salts)
            for pairs, owners, store, kind in (
                (msg.seed_shares, self._uploaded, self._seed_shares, "seed"),
                (msg.key_shares, self._dropped, self._key_shares, "key"),
            ):
                for owner, data in pairs:
                    if owner not in owners or owner not in mine:
                        raise ProtocolError(
                            f"server: site {msg.sender} sent a {kind} share of site {owner}, "
                            "which it should not hold or which was not requested."
                        )
                    if self.active is not None:
                        self._check_revealed(msg.sender, owner, kind, data, next(salts))
                    accepted.append(
                        (store, owner, Share.from_bytes(index=msg.sender + 1, data=data))
                    )
            for store, owner, share in accepted:
                store.setdefault(owner, []).append(share)
            self._answered.add(msg.sender)

    def _check_revealed(
        self, holder: int, owner: int, kind: str, share: bytes, salt: bytes
    ) -> None:
        """A revealed share must open its owner's signed commitment (else its holder lied)."""
        assert self.active is not None
        if holder == owner:
            return  # a site's own share is not dealt, so not committed (see the docs)
        committed = self._commitments.get((owner, holder))
        if committed is None:
            raise ProtocolError(
                f"server: site {holder} revealed a {kind} share of site {owner}, which dealt "
                "it none."
            )
        expected = committed[0] if kind == "seed" else committed[1]
        got = share_commitment(
            session=self.active.session,
            round_index=self.round_index,
            owner=owner,
            holder=holder,
            kind=SEED_SHARE if kind == "seed" else KEY_SHARE,
            salt=salt,
            share=share,
        )
        if got != expected:
            raise IntegrityError(
                f"server: site {holder}'s {kind} share of site {owner} does not open the "
                f"commitment site {owner} signed (tampered share); all of site {holder}'s "
                "shares are excluded."
            )

    def aggregate(self) -> np.ndarray:
        """Reconstruct the mask secrets, remove all masks and decode the sum.

        Returns:
            float64 sum of the survivors' (clipped) inputs.

        Raises:
            DropoutRecoveryError: If fewer than t holders of some site's shares answered.
            IntegrityError: If a reconstructed mask key does not match its public key.

        """
        self._enter(Phase.UNMASK, "aggregate")
        with self.timer.step("unmask"):
            self._require(len(self._answered), "answered the unmasking round")
            assert self._graph is not None
            add: list[bytes] = []
            subtract: list[bytes] = []
            for owner in sorted(self._uploaded):
                seed = combine(
                    shares=self._enough(self._seed_shares, owner, "self mask"), secret_bytes=32
                )
                subtract.append(
                    kdf.self_mask_key(seed=seed, round_index=self.round_index, site=owner)
                )
            for owner in sorted(self._dropped):
                raw = combine(
                    shares=self._enough(self._key_shares, owner, "pairwise masks"), secret_bytes=32
                )
                private = kdf.load_private_key(raw)
                if kdf.public_bytes(private) != self._keys[owner].mask_public:
                    raise IntegrityError(
                        f"reconstructed mask key of dropped site {owner} does not match its "
                        "advertised public key: corrupted shares."
                    )
                for peer in sorted(self._graph.neighbours(owner) & self._uploaded):
                    pair_key = kdf.pairwise_mask_key(
                        private_key=private,
                        peer_public=self._keys[peer].mask_public,
                        round_index=self.round_index,
                        site_a=peer,
                        site_b=owner,
                    )
                    # The survivor added PRG(s) if owner > peer and subtracted it otherwise.
                    (subtract if owner > peer else add).append(pair_key)
            apply_masks(self._ring_sum, add=add, subtract=subtract)
            self._seed_shares = {}
            self._key_shares = {}
            self._total = self.config.codec.decode(self._ring_sum)
        self._phase = Phase.DONE
        return self._total.copy()

    def _enough(self, store: dict[int, list[Share]], owner: int, what: str) -> list[Share]:
        shares = sorted(store.get(owner, []), key=lambda s: s.index)
        t = self.config.threshold
        if len(shares) < t:
            raise DropoutRecoveryError(
                f"cannot remove the {what} of site {owner} in round {self.round_index}: only "
                f"{len(shares)} holders of its shares answered, threshold={t}."
            )
        return shares[:t]

    # -- read-only views -------------------------------------------------------------------

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: sites whose masked input is in the sum."""
        return tuple(sorted(self._uploaded))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Invited sites whose input is not in the sum."""
        return tuple(sorted(self.invited - self._uploaded))

    @property
    def answered(self) -> tuple[int, ...]:
        """Survivors that answered the unmasking round."""
        return tuple(sorted(self._answered))

    @property
    def total(self) -> np.ndarray | None:
        """The decoded float64 sum once :meth:`aggregate` has run, else None."""
        return None if self._total is None else self._total.copy()
