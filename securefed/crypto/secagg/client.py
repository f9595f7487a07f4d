"""One site's side of SecAgg / SecAgg+ for one round (Bonawitz et al. 2017, Fig. 4)."""

from __future__ import annotations

import hashlib
import json
import secrets

import numpy as np

from securefed.crypto import kdf
from securefed.crypto.aead import open_sealed, seal
from securefed.crypto.graph import NeighbourGraph, build_graph
from securefed.crypto.messages import (
    KEY_SHARE,
    SALT_BYTES,
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
    share_associated_data,
    share_commitment,
    share_pair_plaintext,
    split_share_pair,
)
from securefed.crypto.prg import MaskStreams
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
from securefed.crypto.shamir import Share, split
from securefed.errors import DataError, DropoutRecoveryError, IntegrityError, ProtocolError

__all__ = ["SecAggClient"]

_SEED_BYTES = 32

#: What a site holds of one owner: (b-share, b-salt, s_sk-share, s_sk-salt).
Held = tuple[bytes, bytes, bytes, bytes]


class SecAggClient:
    """One site's side of SecAgg / SecAgg+ for one round (Bonawitz et al. 2017, Fig. 4).

    Call the steps in order, each with the server's bytes; each returns the bytes to send.
    All secrets (key pairs, the self-mask seed, commitment salts, rounding coins) come from
    ``os.urandom`` via ``secrets``; they are dropped after :meth:`unmask`.

    With ``active`` (the active-security variant) the site signs its round keys, checks every
    peer's signature against its roster before sharing or masking, commits to every share it
    deals, derives n and t itself (:func:`~securefed.crypto.secagg.active.pinned_config`),
    signs the survivor list in :meth:`consistency` and reveals shares in :meth:`unmask` only
    for that same list, countersigned by at least t survivors. Without it the site runs the
    honest-but-curious protocol (no :meth:`consistency` step).

    Args:
        site_id: This site's id (its Shamir index is ``site_id + 1``).
        config: The run's parameters (with ``active``, the round's threshold and size are
            re-derived from the signed key list and the roster).
        round_index: Training round; bound into every key and message.
        dim: Length of the input vector.
        active: Roster, session and identity key for the active variant, or None.

    """

    def __init__(
        self,
        *,
        site_id: int,
        config: SecAggConfig,
        round_index: int,
        dim: int,
        active: ActiveSecurity | None = None,
    ) -> None:
        check_site_id(site_id)
        check_round(round_index)
        check_dim(dim)
        if active is not None and active.site_id != site_id:
            raise ProtocolError(f"site {site_id}: the active-security identity is another site's")
        self.site_id = int(site_id)
        self.base_config = config
        self.config = config
        self.active = active
        self.round_index = int(round_index)
        self.dim = int(dim)
        self.clipped: int | None = None
        self.timer = StepTimer()
        self._phase = Phase.ADVERTISE
        self._encryption_key = kdf.generate_private_key()
        self._mask_key = kdf.generate_private_key()
        self._seed = secrets.token_bytes(_SEED_BYTES)
        self._peers: dict[int, KeyEntry] = {}
        self._graph: NeighbourGraph | None = None
        self._held: dict[int, Held] = {}
        self._public_keys = b""
        self._transcript = b""
        self._signed_survivors: tuple[int, ...] | None = None

    #: Layout version of :meth:`export_state`.
    STATE_VERSION = 2

    def export_state(self) -> bytes:
        """This site's protocol state as JSON bytes, to resume the round in another process.

        A deployed site runs each protocol step in a fresh process (Flower's ClientApp), so the
        secrets must outlive the process. The state holds private keys and shares: it must
        stay at the site (Flower keeps it in the SuperNode's memory, never sending it out).
        """
        if self._phase == Phase.DONE:
            raise ProtocolError(f"site {self.site_id}: the round is over; nothing to export.")
        state = {
            "version": self.STATE_VERSION,
            "site_id": self.site_id,
            "round_index": self.round_index,
            "dim": self.dim,
            "phase": self._phase.name,
            "encryption_key": self._encryption_key.private_bytes_raw().hex(),
            "mask_key": self._mask_key.private_bytes_raw().hex(),
            "seed": self._seed.hex(),
            "public_keys": self._public_keys.hex(),
            "held": {str(k): [v.hex() for v in pair] for k, pair in self._held.items()},
            "clipped": self.clipped,
            "signed_survivors": None
            if self._signed_survivors is None
            else list(self._signed_survivors),
        }
        return json.dumps(state, sort_keys=True).encode()

    @classmethod
    def from_state(
        cls, data: bytes, *, config: SecAggConfig, active: ActiveSecurity | None = None
    ) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` bytes.

        Args:
            data: The exported state.
            config: The run's parameters, as given to the constructor.
            active: The active-security view, as given to the constructor.

        Raises:
            ProtocolError: If the state is malformed or from another layout version.

        """
        try:
            state = json.loads(data)
            if state.get("version") != cls.STATE_VERSION:
                raise ValueError(f"state version {state.get('version')!r}")
            client = cls(
                site_id=int(state["site_id"]),
                config=config,
                round_index=int(state["round_index"]),
                dim=int(state["dim"]),
                active=active,
            )
            client._phase = Phase[state["phase"]]
            client._encryption_key = kdf.load_private_key(bytes.fromhex(state["encryption_key"]))
            client._mask_key = kdf.load_private_key(bytes.fromhex(state["mask_key"]))
            client._seed = bytes.fromhex(state["seed"])
            held = {}
            for k, pair in state["held"].items():
                a, b, c, d = (bytes.fromhex(v) for v in pair)
                held[int(k)] = (a, b, c, d)
            client._held = held
            client.clipped = state["clipped"]
            signed = state["signed_survivors"]
            client._signed_survivors = None if signed is None else tuple(int(s) for s in signed)
            public_keys = bytes.fromhex(state["public_keys"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"secure-aggregation state cannot be restored ({exc}).") from exc
        if public_keys:
            client._adopt_public_keys(public_keys)
        return client

    def _adopt_public_keys(self, public_keys: bytes) -> None:
        msg = PublicKeys.from_bytes(public_keys)
        self._peers = {e.site: e for e in msg.entries}
        if self.active is not None:
            self.config = pinned_config(
                self.base_config,
                roster=self.active.roster,
                n_round=len(self._peers),
                min_contributors=self.active.min_contributors,
            )
        self._graph = build_graph(
            sites=self._peers,
            neighbors=self.config.neighbors,
            seed=msg.graph_seed,
            round_index=self.round_index,
        )
        self._public_keys = bytes(public_keys)
        self._transcript = hashlib.sha256(self._public_keys).digest()

    def _enter(self, phase: Phase, step: str) -> None:
        if self._phase != phase:
            raise ProtocolError(
                f"site {self.site_id}: `{step}` called in phase {self._phase.name}, "
                f"expected {phase.name}."
            )

    def _check_message_round(self, round_index: int, what: str) -> None:
        if round_index != self.round_index:
            raise ProtocolError(
                f"site {self.site_id}: {what} is for round {round_index}, this is round "
                f"{self.round_index} (replayed or stale message)."
            )

    def advertise_keys(self) -> bytes:
        """Round 0: return the AdvertiseKeys message (both public keys)."""
        self._enter(Phase.ADVERTISE, "advertise_keys")
        with self.timer.step("advertise_keys"):
            enc = kdf.public_bytes(self._encryption_key)
            mask = kdf.public_bytes(self._mask_key)
            signature = b""
            if self.active is not None:
                signature = self.active.sign(
                    self.active.round_keys(
                        round_index=self.round_index,
                        site=self.site_id,
                        encryption_public=enc,
                        mask_public=mask,
                    )
                )
            message = AdvertiseKeys(
                round_index=self.round_index,
                sender=self.site_id,
                encryption_public=enc,
                mask_public=mask,
                signature=signature,
            ).to_bytes()
        self._phase = Phase.SHARE
        return message

    def _verify_key_list(self, msg: PublicKeys) -> None:
        """Active variant: every entry signed by its roster site for this session and round."""
        assert self.active is not None
        if not msg.signed:
            raise ProtocolError(
                f"site {self.site_id}: the server's key list carries no signatures; refusing "
                "to share (active variant)."
            )
        for e in msg.entries:
            self.active.verify(
                e.site,
                self.active.round_keys(
                    round_index=self.round_index,
                    site=e.site,
                    encryption_public=e.encryption_public,
                    mask_public=e.mask_public,
                ),
                e.signature,
                what=f"site {self.site_id}: the round keys listed for site {e.site} "
                f"(round {self.round_index}); refusing before any share is dealt",
            )

    def share_keys(self, public_keys: bytes) -> bytes:
        """Round 1: share b_u and s_sk_u among N[u], each pair sealed to its holder.

        Args:
            public_keys: The server's PUBLIC_KEYS message.

        Returns:
            The ENCRYPTED_SHARES message.

        Raises:
            DropoutRecoveryError: If fewer than t sites advertised keys or N[u] has fewer
                than t members (active: t and n as this site derives them).
            ProtocolError: If the key list misrepresents this site, repeats a key, or (active)
                lists a key without a valid signature from a roster site.

        """
        self._enter(Phase.SHARE, "share_keys")
        with self.timer.step("share_keys"):
            msg = PublicKeys.from_bytes(public_keys)
            self._check_message_round(msg.round_index, "the public key list")
            if self.active is not None:
                self._verify_key_list(msg)
            entries = {e.site: e for e in msg.entries}
            own = entries.get(self.site_id)
            if own is None or (
                own.encryption_public != kdf.public_bytes(self._encryption_key)
                or own.mask_public != kdf.public_bytes(self._mask_key)
            ):
                raise ProtocolError(
                    f"site {self.site_id}: the server's key list does not carry this site's "
                    "advertised keys."
                )
            keys = [e.encryption_public for e in msg.entries] + [e.mask_public for e in msg.entries]
            if len(set(keys)) != len(keys):
                raise ProtocolError(
                    f"site {self.site_id}: the key list repeats a public key; aborting."
                )
            self._adopt_public_keys(public_keys)
            t = self.config.threshold
            if len(entries) < t:
                raise DropoutRecoveryError(
                    f"only {len(entries)} sites advertised keys in round {self.round_index}; "
                    f"threshold={t} are needed."
                )
            assert self._graph is not None
            holders = sorted(self._graph.neighbourhood(self.site_id))
            if len(holders) < t:
                raise DropoutRecoveryError(
                    f"site {self.site_id} has {len(holders)} share holders in round "
                    f"{self.round_index}; threshold={t} are needed."
                )
            indices = [h + 1 for h in holders]
            seed_shares = split(secret=self._seed, threshold=t, indices=indices)
            key_shares = split(
                secret=self._mask_key.private_bytes_raw(), threshold=t, indices=indices
            )
            sealed = []
            commitments = []
            for holder in holders:
                pair: Held = (
                    seed_shares[holder + 1].to_bytes(),
                    secrets.token_bytes(SALT_BYTES),
                    key_shares[holder + 1].to_bytes(),
                    secrets.token_bytes(SALT_BYTES),
                )
                if holder == self.site_id:
                    self._held[holder] = pair
                    continue
                key = kdf.share_encryption_key(
                    private_key=self._encryption_key,
                    peer_public=entries[holder].encryption_public,
                    round_index=self.round_index,
                    sender=self.site_id,
                    recipient=holder,
                )
                plaintext = share_pair_plaintext(
                    seed_share=pair[0], seed_salt=pair[1], key_share=pair[2], key_salt=pair[3]
                )
                ad = share_associated_data(
                    round_index=self.round_index, sender=self.site_id, recipient=holder
                )
                sealed.append((holder, seal(key=key, plaintext=plaintext, associated_data=ad)))
                if self.active is not None:
                    commitments.append(self._commit(holder, pair))
            message = EncryptedShares(
                round_index=self.round_index,
                sender=self.site_id,
                sealed=tuple(sealed),
                commitments=tuple(commitments),
            ).to_bytes()
        self._phase = Phase.MASK
        return message

    def _commitments_of(self, owner: int, holder: int, pair: Held) -> tuple[bytes, bytes]:
        assert self.active is not None
        common = {
            "session": self.active.session,
            "round_index": self.round_index,
            "owner": owner,
            "holder": holder,
        }
        return (
            share_commitment(**common, kind=SEED_SHARE, salt=pair[1], share=pair[0]),
            share_commitment(**common, kind=KEY_SHARE, salt=pair[3], share=pair[2]),
        )

    def _commit(self, holder: int, pair: Held) -> tuple[bytes, bytes, bytes]:
        """(seed commitment, key commitment, signature) for the pair dealt to ``holder``."""
        assert self.active is not None
        c_seed, c_key = self._commitments_of(self.site_id, holder, pair)
        signature = self.active.sign(
            commitments_payload(
                roster_digest=self.active.digest,
                session=self.active.session,
                round_index=self.round_index,
                owner=self.site_id,
                holder=holder,
                seed_commitment=c_seed,
                key_commitment=c_key,
            )
        )
        return c_seed, c_key, signature

    def masked_input(self, relayed_shares: bytes, *, values: np.ndarray) -> bytes:
        """Round 2: open the relayed shares, then encode and mask ``values``.

        Args:
            relayed_shares: The server's RELAYED_SHARES message for this site.
            values: The plaintext input, a float vector of length ``dim``; it never leaves
                this method unmasked and is not stored.

        Returns:
            The MASKED_INPUT message.

        Raises:
            IntegrityError: If a sealed share fails its AES-GCM tag.
            DropoutRecoveryError: If fewer than t holders of this site's shares remain.
            DataError: If ``values`` has the wrong shape or holds NaN/inf.

        """
        self._enter(Phase.MASK, "masked_input")
        with self.timer.step("masked_input"):
            msg = RelayedShares.from_bytes(relayed_shares)
            self._check_message_round(msg.round_index, "the relayed shares")
            if msg.recipient != self.site_id:
                raise ProtocolError(
                    f"site {self.site_id} received shares addressed to site {msg.recipient}."
                )
            assert self._graph is not None
            neighbours = self._graph.neighbours(self.site_id)
            strangers = {s for s, _ in msg.sealed} - neighbours
            if strangers:
                raise ProtocolError(
                    f"site {self.site_id} received shares from non-neighbours {sorted(strangers)}."
                )
            if self.active is not None and len(msg.commitments) != len(msg.sealed):
                raise ProtocolError(
                    f"site {self.site_id}: the relayed shares carry no signed commitments; "
                    "refusing (active variant)."
                )
            for i, (sender, sealed) in enumerate(msg.sealed):
                key = kdf.share_encryption_key(
                    private_key=self._encryption_key,
                    peer_public=self._peers[sender].encryption_public,
                    round_index=self.round_index,
                    sender=sender,
                    recipient=self.site_id,
                )
                ad = share_associated_data(
                    round_index=self.round_index, sender=sender, recipient=self.site_id
                )
                pair = split_share_pair(open_sealed(key=key, sealed=sealed, associated_data=ad))
                for share in (pair[0], pair[2]):
                    Share.from_bytes(index=self.site_id + 1, data=share)
                if self.active is not None:
                    self._check_dealt(sender, pair, msg.commitments[i])
                self._held[sender] = pair
            alive = {s for s, _ in msg.sealed}
            t = self.config.threshold
            if len(alive) + 1 < t:
                raise DropoutRecoveryError(
                    f"site {self.site_id}: only {len(alive) + 1} holders of its shares remain "
                    f"in round {self.round_index}; threshold={t} are needed."
                )
            x = np.asarray(values)
            if x.ndim != 1 or x.shape[0] != self.dim:
                raise DataError(
                    f"site {self.site_id}: `values` must be a vector of length {self.dim} "
                    f"(got shape {x.shape})."
                )
            with self.timer.step("mask"):
                add = [
                    kdf.self_mask_key(
                        seed=self._seed, round_index=self.round_index, site=self.site_id
                    )
                ]
                subtract = []
                for peer in sorted(alive):
                    pair_key = kdf.pairwise_mask_key(
                        private_key=self._mask_key,
                        peer_public=self._peers[peer].mask_public,
                        round_index=self.round_index,
                        site_a=self.site_id,
                        site_b=peer,
                    )
                    # Bonawitz et al. eq. (1): +PRG(s_uv) for v > u, -PRG(s_uv) for v < u.
                    (add if peer > self.site_id else subtract).append(pair_key)
                words, clipped = self.config.codec.encode(
                    x, masks=MaskStreams(add=add, subtract=subtract)
                )
            self.clipped = clipped
            message = MaskedInput(
                round_index=self.round_index,
                sender=self.site_id,
                ring_bits=self.config.ring_bits,
                words=words,
            ).to_bytes()
        self._phase = Phase.UNMASK if self.active is None else Phase.CONSISTENCY
        return message

    def _check_dealt(self, sender: int, pair: Held, signed: tuple[bytes, bytes, bytes]) -> None:
        """The pair ``sender`` dealt matches the commitments it signed (else it is refused)."""
        assert self.active is not None
        c_seed, c_key, signature = signed
        self.active.verify(
            sender,
            commitments_payload(
                roster_digest=self.active.digest,
                session=self.active.session,
                round_index=self.round_index,
                owner=sender,
                holder=self.site_id,
                seed_commitment=c_seed,
                key_commitment=c_key,
            ),
            signature,
            what=f"site {self.site_id}: the share commitments relayed from site {sender}",
        )
        if self._commitments_of(sender, self.site_id, pair) != (c_seed, c_key):
            raise IntegrityError(
                f"site {self.site_id}: the shares site {sender} dealt do not match the "
                "commitments it signed; refusing to mask with them."
            )

    def _alive(self) -> set[int]:
        """U2 as this site saw it: the neighbours whose shares reached it, and itself."""
        return set(self._held)

    def consistency(self, request: bytes) -> bytes:
        """Active variant, round 3: sign the survivor list U3 the server shows this site.

        Answered at most once per round. The site refuses a list that leaves itself out (it
        uploaded), names a site it never saw alive (U3 must lie in U1, and within its
        neighbourhood in the senders of the shares it holds), or is too small.

        Args:
            request: The server's CONSISTENCY_REQUEST.

        Returns:
            The CONSISTENCY_SIGNATURE message.

        Raises:
            ProtocolError: If the list is inconsistent with what this site saw.
            DropoutRecoveryError: If fewer than max(t, min_contributors) sites survived, or
                (SecAgg+) the survivors are disconnected.

        """
        if self.active is None:
            raise ProtocolError(f"site {self.site_id}: no consistency round without identities.")
        self._enter(Phase.CONSISTENCY, "consistency")
        with self.timer.step("consistency"):
            msg = ConsistencyRequest.from_bytes(request)
            self._check_message_round(msg.round_index, "the consistency request")
            assert self._graph is not None
            survivors = set(msg.survivors)
            self._check_survivors(survivors)
            signature = self.active.sign(
                consistency_payload(
                    roster_digest=self.active.digest,
                    session=self.active.session,
                    round_index=self.round_index,
                    transcript=self._transcript,
                    survivors=msg.survivors,
                )
            )
            self._signed_survivors = tuple(msg.survivors)
            message = ConsistencySignature(
                round_index=self.round_index, sender=self.site_id, signature=signature
            ).to_bytes()
        self._phase = Phase.UNMASK
        return message

    def _check_survivors(self, survivors: set[int]) -> None:
        assert self._graph is not None and self.active is not None
        if self.site_id not in survivors:
            raise ProtocolError(
                f"site {self.site_id}: the server has it listed as dropped after it uploaded; "
                "refusing to answer."
            )
        unknown = survivors - set(self._graph.sites)
        if unknown:
            raise ProtocolError(
                f"site {self.site_id}: survivors {sorted(unknown)} never advertised keys in "
                f"round {self.round_index} (U3 must lie in U1)."
            )
        unseen = (survivors & self._graph.neighbourhood(self.site_id)) - self._alive()
        if unseen:
            raise ProtocolError(
                f"site {self.site_id}: survivors {sorted(unseen)} dealt it no shares "
                f"(U3 must lie in U2); refusing."
            )
        least = max(self.config.threshold, self.active.least_contributors)
        if len(survivors) < least:
            raise DropoutRecoveryError(
                f"only {len(survivors)} sites survive round {self.round_index}; this site "
                f"needs at least {least}; refusing to unmask."
            )
        require_connected(self._graph, survivors, self.round_index)

    def _check_consistency(self, msg: UnmaskRequest) -> None:
        """Active variant: the request is for the list this site signed, countersigned by >= t."""
        assert self.active is not None
        if self._signed_survivors is None or tuple(msg.survivors) != self._signed_survivors:
            raise ProtocolError(
                f"site {self.site_id}: the unmask request's survivors {list(msg.survivors)} "
                f"are not the list it signed {list(self._signed_survivors or ())}; refusing."
            )
        if self.site_id in msg.dropped:
            raise ProtocolError(f"site {self.site_id}: listed as dropped; refusing to answer.")
        payload = consistency_payload(
            roster_digest=self.active.digest,
            session=self.active.session,
            round_index=self.round_index,
            transcript=self._transcript,
            survivors=msg.survivors,
        )
        survivors = set(msg.survivors)
        for signer, signature in msg.signatures:
            if signer not in survivors:
                raise ProtocolError(
                    f"site {self.site_id}: a consistency signature from site {signer}, which "
                    "is not a survivor."
                )
            self.active.verify(
                signer,
                payload,
                signature,
                what=f"site {self.site_id}: site {signer}'s consistency signature",
            )
        t = self.config.threshold
        if len(msg.signatures) < t:
            raise ProtocolError(
                f"site {self.site_id}: only {len(msg.signatures)} survivors signed the list; "
                f"threshold={t} are needed before any share is revealed."
            )

    def unmask(self, request: bytes) -> bytes:
        """Round 4: reveal seed shares of survivors and key shares of dropped sites.

        Args:
            request: The server's UNMASK_REQUEST message.

        Returns:
            The UNMASK_SHARES message; this site's secrets are then discarded.

        Raises:
            DropoutRecoveryError: If fewer than t sites survived, or (SecAgg+) the survivors do
                not induce a connected graph, so unmasking would reveal partial sums.
            ProtocolError: If the lists are inconsistent with the shares this site holds.

        """
        self._enter(Phase.UNMASK, "unmask")
        with self.timer.step("unmask"):
            msg = UnmaskRequest.from_bytes(request)
            self._check_message_round(msg.round_index, "the unmask request")
            assert self._graph is not None
            if self.active is not None:
                self._check_consistency(msg)
            survivors, dropped = set(msg.survivors), set(msg.dropped)
            unknown = (survivors | dropped) - set(self._graph.sites)
            if unknown:
                raise ProtocolError(
                    f"site {self.site_id}: unmask request names unknown sites {sorted(unknown)}."
                )
            t = self.config.threshold
            if len(survivors) < t:
                raise DropoutRecoveryError(
                    f"only {len(survivors)} sites uploaded masked inputs in round "
                    f"{self.round_index}; threshold={t} are needed; refusing to unmask."
                )
            require_connected(self._graph, survivors, self.round_index)
            mine = self._graph.neighbourhood(self.site_id)
            missing = (survivors & mine) - set(self._held)
            if missing:
                raise ProtocolError(
                    f"site {self.site_id}: survivors {sorted(missing)} never shared keys with "
                    "it; the server's lists are inconsistent."
                )
            seed_owners = sorted(survivors & set(self._held))
            # Never both shares of one owner: key shares only of owners not in U3.
            key_owners = sorted((dropped & set(self._held)) - survivors)
            salts: tuple[bytes, ...] = ()
            if self.active is not None:
                salts = tuple(self._held[o][1] for o in seed_owners) + tuple(
                    self._held[o][3] for o in key_owners
                )
            message = UnmaskShares(
                round_index=self.round_index,
                sender=self.site_id,
                seed_shares=tuple((o, self._held[o][0]) for o in seed_owners),
                key_shares=tuple((o, self._held[o][2]) for o in key_owners),
                salts=salts,
            ).to_bytes()
            self._seed = b""
            self._held = {}
            self._mask_key = None  # type: ignore[assignment]
            self._encryption_key = None  # type: ignore[assignment]
        self._phase = Phase.DONE
        return message
