"""One site's side of SecAgg / SecAgg+ for one round (Bonawitz et al. 2017, Fig. 4)."""

from __future__ import annotations

import json
import secrets

import numpy as np

from securefed.crypto import kdf
from securefed.crypto.aead import open_sealed, seal
from securefed.crypto.graph import NeighbourGraph, build_graph
from securefed.crypto.messages import (
    AdvertiseKeys,
    EncryptedShares,
    KeyEntry,
    MaskedInput,
    PublicKeys,
    RelayedShares,
    UnmaskRequest,
    UnmaskShares,
    share_associated_data,
    share_pair_plaintext,
    split_share_pair,
)
from securefed.crypto.prg import MaskStreams
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
from securefed.errors import DataError, DropoutRecoveryError, ProtocolError

__all__ = ["SecAggClient"]

_SEED_BYTES = 32


class SecAggClient:
    """One site's side of SecAgg / SecAgg+ for one round (Bonawitz et al. 2017, Fig. 4).

    Call the four steps in order, each with the server's bytes; each returns the bytes to send.
    All secrets (key pairs, the self-mask seed, rounding coins) come from ``os.urandom`` via
    ``secrets``; they are dropped after :meth:`unmask`.

    Args:
        site_id: This site's id (its Shamir index is ``site_id + 1``).
        config: The deployment parameters (shared by all parties).
        round_index: Training round; bound into every key and message.
        dim: Length of the input vector.

    """

    def __init__(self, *, site_id: int, config: SecAggConfig, round_index: int, dim: int) -> None:
        check_site_id(site_id)
        check_round(round_index)
        check_dim(dim)
        self.site_id = int(site_id)
        self.config = config
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
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self._public_keys = b""

    #: Layout version of :meth:`export_state`.
    STATE_VERSION = 1

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
            "held": {str(k): [a.hex(), b.hex()] for k, (a, b) in self._held.items()},
            "clipped": self.clipped,
        }
        return json.dumps(state, sort_keys=True).encode()

    @classmethod
    def from_state(cls, data: bytes, *, config: SecAggConfig) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` bytes.

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
            )
            client._phase = Phase[state["phase"]]
            client._encryption_key = kdf.load_private_key(bytes.fromhex(state["encryption_key"]))
            client._mask_key = kdf.load_private_key(bytes.fromhex(state["mask_key"]))
            client._seed = bytes.fromhex(state["seed"])
            client._held = {
                int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in state["held"].items()
            }
            client.clipped = state["clipped"]
            public_keys = bytes.fromhex(state["public_keys"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"secure-aggregation state cannot be restored ({exc}).") from exc
        if public_keys:
            client._adopt_public_keys(public_keys)
        return client

    def _adopt_public_keys(self, public_keys: bytes) -> None:
        msg = PublicKeys.from_bytes(public_keys)
        self._peers = {e.site: e for e in msg.entries}
        self._graph = build_graph(
            sites=self._peers,
            neighbors=self.config.neighbors,
            seed=msg.graph_seed,
            round_index=self.round_index,
        )
        self._public_keys = bytes(public_keys)

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
            message = AdvertiseKeys(
                round_index=self.round_index,
                sender=self.site_id,
                encryption_public=kdf.public_bytes(self._encryption_key),
                mask_public=kdf.public_bytes(self._mask_key),
            ).to_bytes()
        self._phase = Phase.SHARE
        return message

    def share_keys(self, public_keys: bytes) -> bytes:
        """Round 1: share b_u and s_sk_u among N[u], each pair sealed to its holder.

        Args:
            public_keys: The server's PUBLIC_KEYS message.

        Returns:
            The ENCRYPTED_SHARES message.

        Raises:
            DropoutRecoveryError: If fewer than t sites advertised keys or N[u] has fewer
                than t members.
            ProtocolError: If the key list misrepresents this site or repeats a key.

        """
        self._enter(Phase.SHARE, "share_keys")
        with self.timer.step("share_keys"):
            msg = PublicKeys.from_bytes(public_keys)
            self._check_message_round(msg.round_index, "the public key list")
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
            t = self.config.threshold
            if len(entries) < t:
                raise DropoutRecoveryError(
                    f"only {len(entries)} sites advertised keys in round {self.round_index}; "
                    f"threshold={t} are needed."
                )
            graph = build_graph(
                sites=entries,
                neighbors=self.config.neighbors,
                seed=msg.graph_seed,
                round_index=self.round_index,
            )
            holders = sorted(graph.neighbourhood(self.site_id))
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
            for holder in holders:
                pair = (seed_shares[holder + 1].to_bytes(), key_shares[holder + 1].to_bytes())
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
                plaintext = share_pair_plaintext(seed_share=pair[0], key_share=pair[1])
                ad = share_associated_data(
                    round_index=self.round_index, sender=self.site_id, recipient=holder
                )
                sealed.append((holder, seal(key=key, plaintext=plaintext, associated_data=ad)))
            self._peers = entries
            self._graph = graph
            self._public_keys = bytes(public_keys)
            message = EncryptedShares(
                round_index=self.round_index, sender=self.site_id, sealed=tuple(sealed)
            ).to_bytes()
        self._phase = Phase.MASK
        return message

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
            for sender, sealed in msg.sealed:
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
                for share in pair:
                    Share.from_bytes(index=self.site_id + 1, data=share)
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
        self._phase = Phase.UNMASK
        return message

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
            seed_shares = tuple(
                (owner, self._held[owner][0]) for owner in sorted(survivors & set(self._held))
            )
            key_shares = tuple(
                (owner, self._held[owner][1]) for owner in sorted(dropped & set(self._held))
            )
            message = UnmaskShares(
                round_index=self.round_index,
                sender=self.site_id,
                seed_shares=seed_shares,
                key_shares=key_shares,
            ).to_bytes()
            self._seed = b""
            self._held = {}
            self._mask_key = None  # type: ignore[assignment]
            self._encryption_key = None  # type: ignore[assignment]
        self._phase = Phase.DONE
        return message
