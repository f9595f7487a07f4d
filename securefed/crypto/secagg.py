"""Secure aggregation by pairwise masking (Bonawitz et al. 2017) with SecAgg+ neighbourhoods.

Protocol (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, Fig. 4, honest-but-curious variant; Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020, for sparse neighbourhoods):

0. AdvertiseKeys: each site u draws two X25519 key pairs, (c_sk, c_pk) to seal shares and
   (s_sk, s_pk) to agree pairwise masks, and a 32-byte self-mask seed b_u; it sends both public
   keys. The server broadcasts all keys (U1) and a fresh public graph seed.
1. ShareKeys: u splits b_u and s_sk_u t-of-m with Shamir among its closed neighbourhood N[u]
   (itself included; m = degree + 1, m = n for classic SecAgg) and seals each neighbour's pair of
   shares with AES-256-GCM under HKDF-SHA256(X25519(c_sk_u, c_pk_v)); the server relays them.
   The sites that sent shares form U2.
2. MaskedInputCollection: u uploads y_u = enc(x_u) + PRG(b_u) + sum_{v in U2 n N(u), v > u}
   PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^k, with PRG = AES-256-CTR. The uploaders form U3.
3. Unmasking: the server announces U3 and D = U2 - U3. Each answering site sends, for every
   owner in its neighbourhood, its share of b_owner if the owner is in U3 or of s_sk_owner if it
   is in D, never both. The server reconstructs, recomputes the masks and removes them.

Threshold. ``threshold`` t counts members of one closed neighbourhood N[u] (u and its peers;
all n sites for classic SecAgg) and must be a strict majority of it, m/2 < t <= m. Default:
min(m, floor(2m/3) + 1), which tolerates m - t dropouts per neighbourhood and keeps t above the
2m/3 that Bonawitz et al. need against an active server. What it guarantees:

* Reconstruction: a site's secrets are recovered iff at least t of its N[u] answer the
  unmasking round; otherwise the round raises :class:`DropoutRecoveryError` (no partial sum).
* Secrecy: fewer than t holders (with the server) learn nothing about b_u or s_sk_u (Shamir).
  Honest sites reveal b-shares for U3 and s_sk-shares for D only, so the server never holds
  both secrets of one site; a majority threshold also means two disjoint groups of holders can
  never each reach t.
* SecAgg+: masks cancel only inside connected survivor components, so the server would learn
  the sum of each component. Sites therefore refuse to unmask unless the survivors induce a
  connected subgraph; the server learns only the total. Bell et al. show that random graphs of
  degree O(log n) stay connected, and keep any fixed site's neighbourhood from being mostly
  corrupt, with high probability; here connectivity is checked every round, not assumed. Unlike
  the complete graph, t colluding *neighbours* of u (out of k) suffice to recover u's secrets, so
  choose ``neighbors`` with a margin over your collusion assumption.

Out of scope (as in the design's threat model): a server that lies about dropouts to different
sites (needs the consistency round and signatures of the active-security variant) and sites that
send malformed inputs.
"""

from __future__ import annotations

import enum
import json
import secrets
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from securefed.crypto import kdf
from securefed.crypto.aead import open_sealed, seal
from securefed.crypto.fixedpoint import FixedPointCodec
from securefed.crypto.graph import (
    GRAPH_SEED_BYTES,
    NeighbourGraph,
    build_graph,
    effective_degree,
)
from securefed.crypto.messages import (
    SERVER_ID,
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
from securefed.crypto.prg import MaskStreams, apply_masks
from securefed.crypto.shamir import Share, combine, split
from securefed.errors import (
    ConfigError,
    DataError,
    DropoutRecoveryError,
    IntegrityError,
    ProtocolError,
)

__all__ = [
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "default_threshold",
    "masking_keystream_bytes",
    "secure_sum",  # noqa: F822 - resolved by the module __getattr__ below
]

_SEED_BYTES = 32
_ROUNDING_BYTES_PER_WORD = 8


def default_threshold(*, neighbourhood_size: int) -> int:
    """min(m, floor(2m/3) + 1) for a closed neighbourhood of m sites."""
    return min(neighbourhood_size, 2 * neighbourhood_size // 3 + 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Parameters of one secure-aggregation deployment, validated on construction.

    Attributes:
        n_clients: Number of sites invited to a round (>= 2); it bounds the fixed-point
            head-room. A round may run with fewer sites, down to ``threshold``.
        threshold: t, holders of a site's shares that must answer to unmask it; counted within
            its closed neighbourhood (see the module docstring). None: min(m, floor(2m/3) + 1).
            Resolved to an int on construction.
        neighbors: SecAgg+ degree k (>= 2), or None for the complete graph (classic SecAgg).
        ring_bits: 32 or 64, the ring Z_(2^k) of masked words.
        clip_range: Largest magnitude accepted per coordinate; larger values are clipped and
            counted.
        frac_bits: Fixed-point fractional bits; None derives the largest safe value (resolved
            on construction).

    """

    n_clients: int
    threshold: int | None = None
    neighbors: int | None = None
    ring_bits: int = 64
    clip_range: float = 1e6
    frac_bits: int | None = None
    codec: FixedPointCodec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _is_int(self.n_clients) or not 2 <= self.n_clients < SERVER_ID:
            raise ConfigError(
                f"`n_clients` must be an integer of at least 2 (got {self.n_clients!r}); "
                "secure aggregation of one site would reveal its input."
            )
        if self.neighbors is not None and (not _is_int(self.neighbors) or self.neighbors < 2):
            raise ConfigError(
                f"`neighbors` must be None (complete graph) or an integer >= 2 "
                f"(got {self.neighbors!r})."
            )
        m = self.neighbourhood_size
        if self.threshold is None:
            object.__setattr__(self, "threshold", default_threshold(neighbourhood_size=m))
        t = self.threshold
        if not _is_int(t):
            raise ConfigError(f"`threshold` must be an integer (got {t!r}).")
        if t > m:
            where = "sites" if self.is_complete else f"sites in a neighbourhood ({self.degree}+1)"
            raise ConfigError(f"`threshold` must be at most the number of {where} (got {t} > {m}).")
        if 2 * t <= m:
            raise ConfigError(
                f"`threshold` must be a strict majority of the {m} share holders "
                f"(got {t}, need at least {m // 2 + 1})."
            )
        codec = FixedPointCodec(
            ring_bits=self.ring_bits,
            clip_range=self.clip_range,
            n_summands=self.n_clients,
            frac_bits=self.frac_bits,
        )
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "frac_bits", codec.frac_bits)
        object.__setattr__(self, "clip_range", codec.clip_range)

    @property
    def degree(self) -> int:
        """Neighbours per site when all ``n_clients`` advertise keys."""
        return effective_degree(n_sites=self.n_clients, neighbors=self.neighbors)

    @property
    def neighbourhood_size(self) -> int:
        """Return m = degree + 1, the holders of each site's shares (itself included)."""
        return self.degree + 1

    @property
    def is_complete(self) -> bool:
        """Whether every site masks with every other (classic SecAgg)."""
        return self.degree == self.n_clients - 1

    @property
    def protocol(self) -> str:
        """``"SecAgg"`` (complete graph) or ``"SecAgg+"``."""
        return "SecAgg" if self.is_complete else "SecAgg+"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the privacy report."""
        reference = "Bonawitz et al. 2017, CCS"
        if not self.is_complete:
            reference = "Bell et al. 2020, CCS (on Bonawitz et al. 2017)"
        return {
            "protocol": self.protocol,
            "reference": reference,
            "threat_model": "honest-but-curious server and sites; up to m - t dropouts per "
            "neighbourhood",
            "n_clients": self.n_clients,
            "threshold": self.threshold,
            "neighbors": self.neighbors,
            "degree": self.degree,
            "neighbourhood_size": self.neighbourhood_size,
            "max_dropouts_per_neighbourhood": self.neighbourhood_size - self.threshold,
            **self.codec.describe(),
            "key_agreement": "X25519",
            "kdf": "HKDF-SHA256 (info bound to purpose, round, party ids)",
            "prg": "AES-256-CTR",
            "share_encryption": "AES-256-GCM",
            "secret_sharing": "Shamir over GF(2^521 - 1)",
        }


def masking_keystream_bytes(*, config: SecAggConfig, dim: int) -> int:
    """AES-CTR keystream bytes one site generates to encode and mask a ``dim`` vector.

    That is (1 + degree) masks of ``dim`` ring words (self mask plus one per neighbour) plus
    8 bytes of stochastic-rounding coins per coordinate. A benchmark can time raw
    :func:`securefed.crypto.prg.keystream` for this many bytes and compare.
    """
    if not _is_int(dim) or dim < 0:
        raise ConfigError(f"`dim` must be a non-negative integer (got {dim!r}).")
    word_bytes = config.ring_bits // 8
    return (1 + config.degree) * dim * word_bytes + dim * _ROUNDING_BYTES_PER_WORD


class _Timer:
    """Wall-clock (perf_counter) and CPU (process_time) seconds spent inside a party's steps."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.wall = 0.0
        self.cpu = 0.0
        self._depth = 0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; a step nested in another is reported apart but counted once in total."""
        wall, cpu = time.perf_counter(), time.process_time()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            spent = time.perf_counter() - wall
            self.steps[name] = self.steps.get(name, 0.0) + spent
            if self._depth == 0:
                self.wall += spent
                self.cpu += time.process_time() - cpu


class _Phase(enum.IntEnum):
    ADVERTISE = 0
    SHARE = 1
    MASK = 2
    UNMASK = 3
    DONE = 4


def _check_site_id(site_id: int) -> None:
    if not _is_int(site_id) or not 0 <= site_id < SERVER_ID:
        raise ConfigError(f"site id must be an integer in [0, 2^32 - 1) (got {site_id!r}).")


def _check_dim(dim: int) -> None:
    if not _is_int(dim) or dim < 1:
        raise ConfigError(f"`dim` must be a positive integer (got {dim!r}).")


def _check_round(round_index: int) -> None:
    if not _is_int(round_index) or not 0 <= round_index < 1 << 64:
        raise ConfigError(f"`round_index` must be an integer in [0, 2^64) (got {round_index!r}).")


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
        _check_site_id(site_id)
        _check_round(round_index)
        _check_dim(dim)
        self.site_id = int(site_id)
        self.config = config
        self.round_index = int(round_index)
        self.dim = int(dim)
        self.clipped: int | None = None
        self.timer = _Timer()
        self._phase = _Phase.ADVERTISE
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
        if self._phase == _Phase.DONE:
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
            client._phase = _Phase[state["phase"]]
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

    def _enter(self, phase: _Phase, step: str) -> None:
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
        self._enter(_Phase.ADVERTISE, "advertise_keys")
        with self.timer.step("advertise_keys"):
            message = AdvertiseKeys(
                round_index=self.round_index,
                sender=self.site_id,
                encryption_public=kdf.public_bytes(self._encryption_key),
                mask_public=kdf.public_bytes(self._mask_key),
            ).to_bytes()
        self._phase = _Phase.SHARE
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
        self._enter(_Phase.SHARE, "share_keys")
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
        self._phase = _Phase.MASK
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
        self._enter(_Phase.MASK, "masked_input")
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
        self._phase = _Phase.UNMASK
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
        self._enter(_Phase.UNMASK, "unmask")
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
            _require_connected(self._graph, survivors, self.round_index)
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
        self._phase = _Phase.DONE
        return message


def _require_connected(graph: NeighbourGraph, survivors: Collection[int], round_index: int) -> None:
    if graph.is_complete:
        return
    parts = graph.components(survivors)
    if len(parts) > 1:
        raise DropoutRecoveryError(
            f"the {len(survivors)} survivors of round {round_index} split into "
            f"{len(parts)} disconnected groups (sizes {[len(p) for p in parts]}) of the SecAgg+ "
            "graph; unmasking would reveal each group's sum, so the round is abandoned."
        )


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

    """

    def __init__(
        self,
        *,
        config: SecAggConfig,
        round_index: int,
        site_ids: Collection[int],
        dim: int,
        graph_seed: bytes | None = None,
    ) -> None:
        _check_round(round_index)
        _check_dim(dim)
        given = list(site_ids)
        for site in given:
            _check_site_id(site)
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
        self.round_index = int(round_index)
        self.dim = int(dim)
        self.invited = frozenset(ids)
        self.timer = _Timer()
        self._graph_seed = bytes(graph_seed)
        self._phase = _Phase.ADVERTISE
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

    # -- helpers ---------------------------------------------------------------------------

    def _enter(self, phase: _Phase, step: str) -> None:
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
        self._enter(_Phase.ADVERTISE, "receive_advertise_keys")
        with self.timer.step("advertise_keys"):
            msg = AdvertiseKeys.from_bytes(message)
            allowed = self.invited - set(self._keys)
            self._check_message(msg.round_index, msg.sender, allowed, "public keys")
            self._keys[msg.sender] = KeyEntry(
                site=msg.sender,
                encryption_public=msg.encryption_public,
                mask_public=msg.mask_public,
            )

    def public_keys(self) -> bytes:
        """Close round 0 (U1 = sites heard from) and return the PUBLIC_KEYS broadcast."""
        self._enter(_Phase.ADVERTISE, "public_keys")
        with self.timer.step("advertise_keys"):
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
        self._phase = _Phase.SHARE
        return message

    # -- round 1 ---------------------------------------------------------------------------

    def receive_encrypted_shares(self, message: bytes) -> None:
        """Accept one site's ENCRYPTED_SHARES message (sealed pairs the server cannot open)."""
        self._enter(_Phase.SHARE, "receive_encrypted_shares")
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
            for recipient, sealed in msg.sealed:
                self._sealed.setdefault(recipient, []).append((msg.sender, sealed))
            self._shared.add(msg.sender)

    def relay_shares(self) -> Mapping[int, bytes]:
        """Close round 1 (U2 = sites that shared) and return RELAYED_SHARES per site of U2."""
        self._enter(_Phase.SHARE, "relay_shares")
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
                sealed = sorted((s, c) for s, c in self._sealed.get(site, []) if s in self._shared)
                relays[site] = RelayedShares(
                    round_index=self.round_index, recipient=site, sealed=tuple(sealed)
                ).to_bytes()
            self._sealed = {}
        self._phase = _Phase.MASK
        return MappingProxyType(relays)

    # -- round 2 ---------------------------------------------------------------------------

    def receive_masked_input(self, message: bytes) -> None:
        """Accept one MASKED_INPUT message; it is added into the running sum and not kept."""
        self._enter(_Phase.MASK, "receive_masked_input")
        with self.timer.step("masked_input"):
            msg = MaskedInput.from_bytes(message)
            allowed = self._shared - self._uploaded
            self._check_message(msg.round_index, msg.sender, allowed, "masked input")
            if msg.ring_bits != self.config.ring_bits:
                raise IntegrityError(
                    f"masked input from site {msg.sender} uses a {msg.ring_bits}-bit ring, "
                    f"expected {self.config.ring_bits}."
                )
            if msg.dimension != self.dim:
                raise IntegrityError(
                    f"masked input from site {msg.sender} has {msg.dimension} words, "
                    f"expected {self.dim}."
                )
            self._ring_sum += msg.words
            self._uploaded.add(msg.sender)

    # -- round 4 ---------------------------------------------------------------------------

    def unmask_request(self) -> bytes:
        """Close round 2 (U3 = uploaders) and return the UNMASK_REQUEST broadcast.

        Raises:
            DropoutRecoveryError: If fewer than t sites uploaded, some site's secrets could not
                be reconstructed even if every survivor answered, or (SecAgg+) the survivors
                are disconnected in the graph.

        """
        self._enter(_Phase.MASK, "unmask_request")
        with self.timer.step("unmask"):
            self._require(len(self._uploaded), "uploaded masked inputs")
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
            _require_connected(self._graph, self._uploaded, self.round_index)
            message = UnmaskRequest(
                round_index=self.round_index,
                survivors=tuple(sorted(self._uploaded)),
                dropped=tuple(sorted(self._dropped)),
            ).to_bytes()
        self._phase = _Phase.UNMASK
        return message

    def receive_unmask_shares(self, message: bytes) -> None:
        """Accept one survivor's UNMASK_SHARES message."""
        self._enter(_Phase.UNMASK, "receive_unmask_shares")
        with self.timer.step("unmask"):
            msg = UnmaskShares.from_bytes(message)
            allowed = self._uploaded - self._answered
            self._check_message(msg.round_index, msg.sender, allowed, "unmask shares")
            assert self._graph is not None
            mine = self._graph.neighbourhood(msg.sender)
            # Every share is checked before any is stored: a refused message leaves no trace.
            accepted = []
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
                    accepted.append(
                        (store, owner, Share.from_bytes(index=msg.sender + 1, data=data))
                    )
            for store, owner, share in accepted:
                store.setdefault(owner, []).append(share)
            self._answered.add(msg.sender)

    def aggregate(self) -> np.ndarray:
        """Reconstruct the mask secrets, remove all masks and decode the sum.

        Returns:
            float64 sum of the survivors' (clipped) inputs.

        Raises:
            DropoutRecoveryError: If fewer than t holders of some site's shares answered.
            IntegrityError: If a reconstructed mask key does not match its public key.

        """
        self._enter(_Phase.UNMASK, "aggregate")
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
        self._phase = _Phase.DONE
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


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """Outcome and cost of one :func:`secure_sum` round.

    Attributes:
        total: float64 sum of the survivors' (clipped) inputs, within n * quantum.
        survivors: Sites whose input is in ``total`` (U3).
        dropped: Sites whose input is not in ``total``.
        dropped_after_upload: Survivors that did not answer the unmasking round.
        clipped: Coordinates clipped by the survivors' encoders, summed.
        bytes_sent: Bytes each site sent to the server.
        bytes_received: Bytes each site received from the server.
        client_seconds: Wall-clock seconds (perf_counter) inside each site's steps.
        client_cpu_seconds: CPU seconds (process_time) inside each site's steps.
        client_step_seconds: Per site, wall-clock seconds per step (``advertise_keys``,
            ``share_keys``, ``masked_input``, ``mask`` (encode + masks, part of
            ``masked_input``), ``unmask``).
        server_seconds: Wall-clock seconds inside the server's steps.
        server_cpu_seconds: CPU seconds inside the server's steps.
        codec: The fixed-point codec (ring bits, fractional bits, quantum, clip range).
        config: The configuration used.

    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    dropped_after_upload: tuple[int, ...]
    clipped: int
    bytes_sent: Mapping[int, int]
    bytes_received: Mapping[int, int]
    client_seconds: Mapping[int, float]
    client_cpu_seconds: Mapping[int, float]
    client_step_seconds: Mapping[int, Mapping[str, float]]
    server_seconds: float
    server_cpu_seconds: float
    codec: FixedPointCodec
    config: SecAggConfig

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for reports: protocol parameters, participation, cost."""
        return {
            **self.config.describe(),
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "dropped_after_upload": list(self.dropped_after_upload),
            "clipped": self.clipped,
            "bytes_sent": {str(k): v for k, v in self.bytes_sent.items()},
            "client_seconds": {str(k): v for k, v in self.client_seconds.items()},
            "server_seconds": self.server_seconds,
        }


def __getattr__(name: str) -> Any:
    """``secure_sum`` moved to :mod:`securefed.protocol.harness`; the old path still works.

    It runs the masking mode over an in-process link, so it lives above this layer; resolving
    it on first access keeps ``securefed.crypto`` free of any import of ``securefed.protocol``.
    """
    if name == "secure_sum":
        from securefed.protocol.harness import secure_sum

        return secure_sum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
