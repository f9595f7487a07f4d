"""``--secure-agg he``: CKKS homomorphic encryption (TenSEAL), over any link.

The one driver of the CKKS protocol (:mod:`securefed.crypto.ckks` holds its roles). The fit
reply carries the site's ciphertext; the server, which holds only the public context, adds
the ciphertexts and sends the encrypted sum to one contributing site at a time
(``Stage.DECRYPT``, lowest id first) until one answers.

The decrypting site trusts nothing the server says about limits. Its minimum number of
contributors comes from its own pins (the federation's signed roster, else 2), never from the
run configuration the server sends; it decrypts only an aggregate of the round it has just
contributed to, under its own key, that lists it among the contributors, and only once per
round (remembered in its protocol state); it counts its decryptions against its share of the
key's budget; and it floods every decryption with Gaussian noise sized for the roster's size
(:mod:`securefed.crypto.ckks.flooding`), so the released sum does not give away the key.

What this cannot stop (``docs/ckks.md``): the server colluding with any key holder reads every
update, and an active server can book a single site's ciphertext, or that ciphertext plus
encryptions of zero, as an aggregate of several sites; the claimed contributor list is not
verifiable by the key holder.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from securefed.crypto.ckks import CKKSAggregator, CKKSDecryptor, CKKSEncryptor, CKKSParams
from securefed.crypto.ckks.flooding import DECRYPTION_BUDGET, SECURITY_BITS
from securefed.crypto.ckks.framing import read_frame_header
from securefed.errors import ConfigError, DataError, ProtocolError
from securefed.protocol.link import Link
from securefed.protocol.modes.base import (
    TIMING_DETAIL,
    SecureSumMode,
    SiteProtection,
    SiteState,
    SumCollector,
    SumOutcome,
)
from securefed.protocol.wire import Stage, vector_from_bytes, vector_to_bytes

__all__ = [
    "CKKSCollector",
    "CKKSMode",
    "CKKSSite",
    "ckks_params",
    "min_contributors",
    "pinned_min_contributors",
    "pinned_n_sites",
]

#: Keys of a CKKS site's protocol state (ints and a list of ints only).
_FIT_ROUND = "ckks.fit_round"
_DECRYPTED = "ckks.decrypted_rounds"
_QUERIES = "ckks.decryptions"
#: Fewest contributors a key holder without a roster decrypts: one update is not a sum.
_DEFAULT_MIN = 2


def ckks_params(config: Any, *, n_sites: int | None = None) -> CKKSParams:
    """The run's CKKS parameters (``--he-*`` options), refused if flooding would spoil them.

    Args:
        config: The run configuration.
        n_sites: Sites a sum may hold (sizes the flooding check); ``config.clients`` if None.

    Raises:
        ConfigError: Invalid parameters, or a flooding noise that makes the sum's error exceed
            :data:`~securefed.crypto.ckks.flooding.PRECISION_BOUND`.

    """
    params = CKKSParams(
        poly_modulus_degree=config.he_poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(config.he_coeff_mod_bit_sizes),
        global_scale_bits=config.he_scale_bits,
    )
    params.check_precision(config.clients if n_sites is None else n_sites)
    return params


def min_contributors(config: Any, roster: Any = None) -> int:
    """Fewest ciphertexts the *server* sends for decryption (the site checks on its own)."""
    if roster is not None:
        return int(roster.min_contributors)
    return min(_DEFAULT_MIN, config.clients)


def pinned_min_contributors(roster: Any = None) -> int:
    """Fewest summed sites a key holder decrypts, from its own pins only.

    The roster's ``min_contributors`` (signed by the federation, at least 2 when it lists two
    sites or more), else 2. Never the server's configuration: a server sending
    ``clients = 1`` must not get one site's update decrypted.
    """
    if roster is not None:
        return max(1, int(roster.min_contributors))
    return _DEFAULT_MIN


def pinned_n_sites(config: Any, roster: Any = None) -> int:
    """The most sites a sum may hold: the roster's size, else the run's ``clients``.

    Sizes the flooding noise and splits the decryption budget between key holders. Without a
    roster it comes from the configuration, which in a deployment the server sends.
    """
    if roster is not None:
        return int(roster.n_sites)
    return max(1, int(config.clients))


class CKKSSite(SiteProtection):
    """One site's side: encrypt the update at fit; decrypt a sum when asked (key holder).

    Args:
        site_id: This site's id (written into its ciphertext frame).
        context: The framed context it encrypts with (the secret one: every site holds the
            key set, so any contributor can decrypt the sum).
        min_contributors: Fewest sites an aggregate must sum before this site decrypts it
            (from the site's own pins, :func:`pinned_min_contributors`).
        subset: Coordinates to encrypt (None: all); the others never leave the site.
        max_sites: The most sites a sum may hold (pinned: the roster's size); sizes the
            flooding noise and this site's share of the decryption budget. None: the
            aggregate's own contributor count sizes the noise and the whole budget is this
            site's.

    Attributes:
        encrypt_seconds: Seconds the latest :meth:`protect` spent.
        decrypt_seconds: Seconds the latest decryption spent.
        update_bytes: Size of the latest ciphertext frame.
        last_sigma: Flooding standard deviation of the latest decryption.

    """

    stages = (Stage.DECRYPT,)

    def __init__(
        self,
        *,
        site_id: int,
        context: bytes,
        min_contributors: int,
        subset: np.ndarray | None = None,
        max_sites: int | None = None,
    ) -> None:
        self.site_id = int(site_id)
        self.context = context
        self.min_contributors = int(min_contributors)
        self.subset = subset
        self.max_sites = None if max_sites is None else int(max_sites)
        self.encrypt_seconds = 0.0
        self.decrypt_seconds = 0.0
        self.update_bytes = 0
        self.last_sigma = 0.0
        # Loading a TenSEAL context costs milliseconds: once per object, not per round.
        self._encryptor: CKKSEncryptor | None = None
        self._decryptor: CKKSDecryptor | None = None

    @property
    def decryption_allowance(self) -> int:
        """Ciphertext decryptions this site serves under the key: its share of the budget."""
        return DECRYPTION_BUDGET // max(1, self.max_sites or 1)

    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        """Encrypt the update, refusing one whose sum over ``n_sites`` could overflow.

        Records the round in ``state``: the site decrypts only an aggregate of this round.

        Raises:
            DataError: If ``n_sites`` updates like this one may exceed the CKKS bound.

        """
        start = time.perf_counter()
        if self._encryptor is None:
            self._encryptor = CKKSEncryptor(self.context)
        encryptor = self._encryptor
        limit = encryptor.params.max_abs_sum()
        values = np.asarray(vector, dtype=np.float64)
        if self.subset is not None:
            values = values[self.subset]
        if not float(np.max(np.abs(values))) * n_sites < limit:
            raise DataError(
                f"site {self.site_id}: a sum of {n_sites} updates like this one may exceed the "
                f"CKKS bound {limit:.3g}; use more data-prime bits"
            )
        frame = encryptor.encrypt(
            vector, site_id=self.site_id, round_index=round_index, subset=self.subset
        )
        state[_FIT_ROUND] = int(round_index)
        self.encrypt_seconds = time.perf_counter() - start
        self.update_bytes = len(frame)
        return {"ciphertext": frame, "protect_seconds": self.encrypt_seconds}

    def step(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """Key holder: decrypt, with flooding, the server's sum for the round just fit.

        Refuses (before touching the ciphertext) an aggregate that is not of the round this
        site last contributed to, one that does not list this site, a second decryption in
        the same round, one that sums fewer than the pinned minimum, and one beyond this
        site's share of the decryption budget.

        Raises:
            ProtocolError: For any refusal above, a malformed message, or another key set's
                aggregate.

        """
        if stage != Stage.DECRYPT:
            return super().step(stage, fields, state=state)
        start = time.perf_counter()
        aggregate, round_index = fields.get("aggregate"), fields.get("round")
        if not isinstance(aggregate, bytes) or not isinstance(round_index, int):
            raise ProtocolError("decrypt message: needs `aggregate` bytes and the `round`")
        header = read_frame_header(aggregate)
        fit_round = state.get(_FIT_ROUND)
        if fit_round is None or header.round_index != fit_round or round_index != fit_round:
            raise ProtocolError(
                f"site {self.site_id}: asked to decrypt an aggregate of round "
                f"{header.round_index} (message says {round_index}); this site's latest "
                f"contribution is to round {fit_round}"
            )
        done = [int(r) for r in state.get(_DECRYPTED, [])]
        if fit_round in done:
            raise ProtocolError(
                f"site {self.site_id}: the aggregate of round {fit_round} was already decrypted; "
                "one decryption per round"
            )
        if self.site_id not in header.contributors:
            raise ProtocolError(
                f"site {self.site_id}: the aggregate does not list this site's update; a key "
                "holder decrypts only a sum it contributed to"
            )
        used = int(state.get(_QUERIES, 0))
        if used + header.n_chunks > self.decryption_allowance:
            raise ProtocolError(
                f"site {self.site_id}: decrypting {header.n_chunks} more ciphertexts would pass "
                f"its share {self.decryption_allowance} of the key's {DECRYPTION_BUDGET}-"
                "decryption budget; make a new key set"
            )
        if self._decryptor is None:
            self._decryptor = CKKSDecryptor(
                self.context,
                min_contributors=self.min_contributors,
                max_contributors=self.max_sites,
            )
        total = self._decryptor.decrypt(aggregate, round_index=fit_round)
        # Every decrypted round of the session (a list of ints, as Flower's ConfigRecord
        # holds): a server that re-runs the fit of an old round gets no second decryption.
        state[_DECRYPTED] = [*done, fit_round]
        state[_QUERIES] = used + header.n_chunks
        self.last_sigma = self._decryptor.last_sigma
        self.decrypt_seconds = time.perf_counter() - start
        return {"vector": vector_to_bytes(total)}


class CKKSCollector(SumCollector):
    """The server's side: add the ciphertexts; a contributing site decrypts the sum.

    Args:
        public: The framed public context (a secret one is refused).
        params: The run's CKKS parameters; the sites' key must be for them.
        min_contributors: Fewest ciphertexts worth sending for decryption.
        weights: Optional plaintext weight per site, applied to its ciphertext by the server
            (key holders refuse to decrypt a weighted sum: its error cannot be flooded).
        n_sites: The most sites a sum may hold, for the report's flooding figures.

    Attributes:
        last_error: The exception that stopped the latest sum, else None.
        aggregate_bytes: Size of the latest aggregate frame.

    Raises:
        ConfigError: If no public context was given or it is for other parameters.

    """

    def __init__(
        self,
        *,
        public: bytes | None,
        params: CKKSParams,
        min_contributors: int,
        weights: Mapping[int, float] | None = None,
        n_sites: int | None = None,
    ) -> None:
        if public is None:
            raise ConfigError("no site sent a CKKS public context")
        # Loading it refuses a secret context now, not at the first round.
        if CKKSAggregator(public).params != params:
            raise ConfigError(
                "the sites' CKKS keys were made for other parameters than this run's --he-* options"
            )
        self.public = public
        self.params = params
        self.min_contributors = int(min_contributors)
        self.weights = weights
        self.n_sites = n_sites
        self.last_error: Exception | None = None
        self.aggregate_bytes = 0

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
        """Add the fit replies' ciphertexts, then have a contributor decrypt the sum.

        ``dim`` is the length of the encrypted part (the decrypted sum's length).
        """
        self.last_error = None
        start = time.perf_counter()
        site_errors: dict[int, str] = {}
        protect: dict[int, float] = {}
        agg = CKKSAggregator(
            self.public, round_index=round_index, weighted=self.weights is not None
        )
        gone = set(drop_before_upload)
        for sid in sorted(fits):
            if sid in gone:
                continue
            try:
                weight = None if self.weights is None else self.weights[sid]
                agg.add(fits[sid]["ciphertext"], site_id=sid, weight=weight)
            except (KeyError, TypeError, ProtocolError, DataError) as exc:
                site_errors[sid] = f"ciphertext: {exc}"
                continue
            seconds = fits[sid].get("protect_seconds", 0.0)
            protect[sid] = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        # An add that fails half-way discards the whole aggregate: its list is the truth.
        added = list(agg.contributors)
        if len(added) < self.min_contributors:
            return self._failed(
                round_index,
                f"only {len(added)} ciphertexts; {self.min_contributors} are needed",
                start,
                protect,
                site_errors,
            )
        blob = agg.aggregate()
        self.aggregate_bytes = len(blob)
        server_seconds = time.perf_counter() - start
        # In-process simulation: a site gone after its upload cannot decrypt.
        away = set(drop_after_upload)
        for holder in sorted(s for s in added if s not in away):
            replies, errors = link.exchange(
                {holder: (Stage.DECRYPT, {"round": round_index, "aggregate": blob})},
                timeout=timeout,
                group=str(round_index),
            )
            try:
                if holder not in replies:
                    raise ProtocolError(errors.get(holder, "no reply"))
                total = vector_from_bytes(
                    replies[holder]["vector"], length=dim, what=f"the sum from site {holder}"
                )
            except (KeyError, TypeError, ProtocolError) as exc:
                site_errors.setdefault(holder, f"decrypt: {exc}")
                continue
            return SumOutcome(
                total,
                added,
                server_seconds=server_seconds,
                protect_seconds=protect,
                site_errors=site_errors,
            )
        return self._failed(
            round_index, "no key-holding site decrypted the aggregate", start, protect, site_errors
        )

    def _failed(
        self,
        round_index: int,
        why: str,
        start: float,
        protect: dict[int, float],
        site_errors: dict[int, str],
    ) -> SumOutcome:
        from securefed.errors import DropoutRecoveryError

        self.last_error = DropoutRecoveryError(f"round {round_index}: {why}")
        return SumOutcome(
            None,
            [],
            error=str(self.last_error),
            server_seconds=time.perf_counter() - start,
            protect_seconds=protect,
            site_errors=site_errors,
        )

    def describe(self) -> dict[str, Any]:
        """CKKS parameters and key placement."""
        return {
            "protocol": "ckks",
            "library": "tenseal",
            "server_holds_secret_key": False,
            "key_holder": "the sites (one key set, distributed out of band); the lowest-id "
            "contributing site decrypts each round's sum, once, adding flooding noise",
            "min_contributors": self.min_contributors,
            **self.params.describe(n_sites=self.n_sites),
        }


class CKKSMode(SecureSumMode):
    """CKKS: sites encrypt under a shared key set; the server adds ciphertexts it cannot read."""

    name = "he"
    stages = (Stage.DECRYPT,)
    # The key holder pins its minimum number of contributors from the roster.
    uses_roster = True

    def releases(self, config: Any) -> list[tuple[str, str, str, str]]:
        """The ciphertext, the key holder's flooded decrypted sum, and step timings."""
        params = ckks_params(config)
        sigma = params.flooding_sigma(max(1, int(config.clients)))
        return [
            (
                "fit",
                "ciphertext",
                "secure-sum",
                "n_i times the update and n_i, CKKS-encrypted under the sites' key",
            ),
            (
                "decrypt",
                "vector",
                "secure-sum",
                "key holder only, once per round: the decrypted sum of at least the key "
                "holder's pinned minimum of sites' updates (the roster's min_contributors, "
                "else 2) plus Gaussian flooding noise "
                f"(sigma {sigma:.2g} for {config.clients} sites, {SECURITY_BITS}-bit security "
                "against key recovery), rounded to a power-of-two grid below sigma",
            ),
            ("fit", "protect_seconds", "clear", TIMING_DETAIL),
            ("decrypt", "protect_seconds", "clear", TIMING_DETAIL),
        ]

    def server(
        self,
        config: Any,
        *,
        n_sites: int,
        he_public: bytes | None = None,
        roster: Any = None,
    ) -> SumCollector:
        """The server side; it gets the sites' public context only.

        Raises:
            ConfigError: No public context, or one for other parameters than the run's.

        """
        most = pinned_n_sites(config, roster)
        return CKKSCollector(
            public=he_public,
            params=ckks_params(config, n_sites=most),
            min_contributors=min_contributors(config, roster),
            n_sites=most,
        )

    def site(
        self,
        config: Any,
        *,
        site_id: int,
        he_secret: bytes | None = None,
        identity: Any = None,
        roster: Any = None,
        min_contributors: int | None = None,
    ) -> SiteProtection:
        """Site ``site_id``'s side, holding the secret context.

        The minimum number of contributors and the most sites a sum may hold come from the
        site's roster (signed by the federation) and its own ``min_contributors`` (node setting,
        the larger applies), never from ``config``, which in a deployment the server sends.
        ``identity`` is not needed by CKKS.

        Raises:
            ConfigError: Without the secret context, or with parameters whose flooding noise
                would exceed the documented precision bound.

        """
        if he_secret is None:
            raise ConfigError(f"site {site_id}: --secure-agg he needs the CKKS secret key file")
        most = pinned_n_sites(config, roster)
        ckks_params(config, n_sites=most)
        return CKKSSite(
            site_id=site_id,
            context=he_secret,
            min_contributors=max(pinned_min_contributors(roster), min_contributors or 0),
            max_sites=most,
        )
