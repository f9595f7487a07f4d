"""``--secure-agg he``: CKKS homomorphic encryption (TenSEAL), over any link.

The one driver of the CKKS protocol (:mod:`securefed.crypto.ckks` holds its roles). The fit
reply carries the site's ciphertext and its Ed25519 signature over it (bound to the roster,
the run's session and the round); the server, which holds only the public context, checks
each ciphertext and signature and sends the signed ciphertexts to the round's one decrypting
site (``Stage.DECRYPT``): :func:`decrypting_site`, a public function of the run's session and
the round over the roster, which the server cannot choose.

The decrypting site trusts nothing the server says. It decrypts only a sum it computed
itself, from ciphertexts each signed by a distinct site of its roster for its session and that
round, of at least its pinned minimum of sites (the federation's signed roster); only in the
rounds it is the decrypting site of, and once per round (remembered in its persistent store);
within its share of the key's decryption budget; and it floods every decryption with Gaussian
noise sized for the roster's size (:mod:`securefed.crypto.ckks.flooding`), so the released sum
does not give away the key. A server that sends a ciphertext of its own making (a multiple of
the aggregate that defeats the flooding, one site's ciphertext as a "sum", its own Enc(0)
booked as a site) gets no decryption; and since one site decrypts one list per round, it
cannot have overlapping subsets of a round decrypted and solve for single updates. Without a
roster and identity key a site refuses to take part.

What this cannot stop (``docs/ckks.md``): the server colluding with any key holder reads every
update, and a site that colludes with the server can sign an encryption of zero, so "k
contributors" means k roster sites signed, not k honest updates.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.ckks import CKKSAggregator, CKKSDecryptor, CKKSEncryptor, CKKSParams
from securefed.crypto.ckks.contributions import (
    Contribution,
    decode_contributions,
    encode_contributions,
    frame_digest,
    sign_contribution,
    verify_contribution,
)
from securefed.crypto.ckks.flooding import DECRYPTION_BUDGET, SECURITY_BITS
from securefed.crypto.ckks.framing import read_frame_header
from securefed.crypto.ckks.keys import public_context_of
from securefed.crypto.roster import federation_public_key
from securefed.errors import ConfigError, DataError, ProtocolError
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
    "CKKSCollector",
    "CKKSMode",
    "CKKSSite",
    "ckks_params",
    "decrypting_site",
    "min_contributors",
    "pinned_min_contributors",
    "pinned_n_sites",
]

#: Keys of a CKKS site's protocol state (ints, a list of ints and 32 bytes only).
_FIT_ROUND = "ckks.fit_round"
_FIT_DIGEST = "ckks.fit_digest"
_DECRYPTED = "ckks.decrypted_rounds"
_QUERIES = "ckks.decryptions"
#: Fewest contributors a key holder without a roster decrypts: one update is not a sum.
_DEFAULT_MIN = 2


def decrypting_site(roster: Roster, session: bytes, round_index: int) -> int:
    """The one roster site that decrypts round ``round_index``'s sum.

    A public function of the run's session and the round, so the server cannot pick the key
    holder, and every site computes it for itself. One site, decrypting once per round, means
    the server gets one sum per round: asking several key holders to decrypt overlapping
    subsets of a round (and subtracting) would otherwise give it single sites' updates. The
    price: a round whose decrypting site is offline is not decrypted (the run goes on).
    """
    ids = sorted(roster.sites)
    tag = b"securefed/ckks/decrypting-site/v1\x00"
    digest = hashlib.sha256(tag + bytes(session) + int(round_index).to_bytes(8, "big")).digest()
    return ids[int.from_bytes(digest[:8], "big") % len(ids)]


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
    """One site's side: encrypt and sign the update at fit; sum and decrypt when asked.

    Args:
        site_id: This site's id (written into its ciphertext frame).
        context: The framed context it encrypts with (the secret one: every site holds the
            key set, so any contributor can decrypt the sum).
        min_contributors: Fewest roster sites whose signed updates this site sums before it
            decrypts (from the site's own pins, :func:`pinned_min_contributors`).
        subset: Coordinates to encrypt (None: all); the others never leave the site.
        max_sites: The most sites a sum may hold (pinned: the roster's size); sizes the
            flooding noise and this site's share of the decryption budget. None: the number
            of verified contributors sizes the noise and the whole budget is this site's.
        roster: The federation's roster as this site verified it; None: the site refuses to
            take part (it could neither sign its update nor check the others').
        identity: This site's Ed25519 identity key (the roster's key for ``site_id``).
        session: The 32-byte session id the contribution signatures are bound to
            (:func:`~securefed.protocol.modes.base.run_session`).

    Attributes:
        encrypt_seconds: Seconds the latest :meth:`protect` spent.
        decrypt_seconds: Seconds the latest decryption spent (checks, sum and decryption).
        update_bytes: Size of the latest ciphertext frame.
        last_sigma: Flooding standard deviation of the latest decryption.

    Raises:
        ConfigError: ``identity`` is not the roster's key for ``site_id``, or a session id
            that is not 32 bytes.

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
        roster: Roster | None = None,
        identity: Ed25519PrivateKey | None = None,
        session: bytes | None = None,
    ) -> None:
        self.site_id = int(site_id)
        self.context = context
        self.min_contributors = int(min_contributors)
        self.subset = subset
        self.max_sites = None if max_sites is None else int(max_sites)
        if session is not None and len(session) != 32:
            raise ConfigError(f"site {site_id}: the session id must be 32 bytes")
        if roster is not None and identity is not None:
            if roster.sites.get(self.site_id) != federation_public_key(identity):
                raise ConfigError(
                    f"site {site_id}: its identity key is not the roster's key for this site"
                )
        self.roster = roster
        self.identity = identity
        self.session = session
        self.encrypt_seconds = 0.0
        self.decrypt_seconds = 0.0
        self.update_bytes = 0
        self.last_sigma = 0.0
        # Loading a TenSEAL context costs milliseconds: once per object, not per round.
        self._encryptor: CKKSEncryptor | None = None
        self._decryptor: CKKSDecryptor | None = None
        self._public: bytes | None = None

    @property
    def decryption_allowance(self) -> int:
        """Ciphertext decryptions this site serves under the key: its share of the budget."""
        return DECRYPTION_BUDGET // max(1, self.max_sites or 1)

    def _pinned(self) -> tuple[Roster, Ed25519PrivateKey, bytes]:
        if self.roster is None or self.identity is None or self.session is None:
            raise ProtocolError(
                f"site {self.site_id}: --secure-agg he needs the federation's signed roster and "
                "this site's identity key (a deployed site: node settings `roster` and "
                "`federation-key`); without them it can neither sign its ciphertext nor check "
                "what it is asked to decrypt, and refuses to take part"
            )
        return self.roster, self.identity, self.session

    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        """Encrypt the update and sign the frame, refusing one whose sum could overflow.

        Records the round and the frame's SHA-256 in ``state``: the site decrypts only a sum
        of this round that holds exactly this frame.

        Raises:
            DataError: If ``n_sites`` updates like this one may exceed the CKKS bound.
            ProtocolError: Without a roster, identity key or session.

        """
        roster, identity, session = self._pinned()
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
        digest = frame_digest(frame)
        signature = sign_contribution(
            identity,
            roster=roster,
            session=session,
            round_index=round_index,
            site_id=self.site_id,
            frame=frame,
            digest=digest,
        )
        state[_FIT_ROUND] = int(round_index)
        state[_FIT_DIGEST] = digest
        self.encrypt_seconds = time.perf_counter() - start
        self.update_bytes = len(frame)
        return {
            "ciphertext": frame,
            "ciphertext_signature": signature,
            "protect_seconds": self.encrypt_seconds,
        }

    def step(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """Key holder: check the signed contributions, add them, decrypt the sum with flooding.

        The site never decrypts a ciphertext the server composed. It refuses, before adding or
        decrypting anything: a round it is not the decrypting site of (:func:`decrypting_site`),
        a second decryption of a round, a list it cannot parse or for another round, a
        contribution whose signature does not verify against its roster for its session and
        that round, a list that leaves out or changes this site's own frame when it
        contributed to the round (it need not have), fewer signed roster sites than its pinned
        minimum, and a decryption beyond its share of the budget.

        Raises:
            ProtocolError: For any refusal above, a malformed message, or ciphertexts under
                another key set (``IntegrityError`` for damaged ones).

        """
        if stage != Stage.DECRYPT:
            return super().step(stage, fields, state=state)
        roster, _, session = self._pinned()
        start = time.perf_counter()
        listing, round_index = fields.get("contributions"), fields.get("round")
        if not isinstance(listing, bytes) or not isinstance(round_index, int):
            raise ProtocolError("decrypt message: needs `contributions` bytes and the `round`")
        designated = decrypting_site(roster, session, round_index)
        if designated != self.site_id:
            raise ProtocolError(
                f"site {self.site_id}: the sum of round {round_index} is decrypted by site "
                f"{designated} (fixed by the session and the round), not by this site"
            )
        done = [int(r) for r in self.persistent.get(_DECRYPTED, [])]
        if round_index in done:
            raise ProtocolError(
                f"site {self.site_id}: the sum of round {round_index} was already decrypted; "
                "one decryption per round"
            )
        listed_round, entries = decode_contributions(listing)
        if listed_round != round_index:
            raise ProtocolError(
                f"site {self.site_id}: the contribution list is for round {listed_round}, not "
                f"{round_index}"
            )
        digests = {e.site_id: frame_digest(e.frame) for e in entries}
        for entry in entries:
            verify_contribution(
                roster,
                session=session,
                round_index=round_index,
                contribution=entry,
                digest=digests[entry.site_id],
            )
        mine = state.get(_FIT_DIGEST) if state.get(_FIT_ROUND) == round_index else None
        own = [e for e in entries if e.site_id == self.site_id]
        if mine is not None and (not own or not hmac.compare_digest(digests[self.site_id], mine)):
            raise ProtocolError(
                f"site {self.site_id}: the contribution list leaves out or changes the "
                "ciphertext this site sent for this round"
            )
        if len(entries) < self.min_contributors:
            raise ProtocolError(
                f"site {self.site_id}: {len(entries)} signed contribution(s); at least "
                f"{self.min_contributors} roster sites are required before decrypting"
            )
        n_chunks = read_frame_header(entries[0].frame).n_chunks
        used = int(self.persistent.get(_QUERIES, 0))
        if used + n_chunks > self.decryption_allowance:
            raise ProtocolError(
                f"site {self.site_id}: decrypting {n_chunks} more ciphertexts would pass "
                f"its share {self.decryption_allowance} of the key's {DECRYPTION_BUDGET}-"
                "decryption budget; make a new key set"
            )
        if self._public is None:
            self._public = public_context_of(self.context)
        if self._decryptor is None:
            self._decryptor = CKKSDecryptor(
                self.context,
                min_contributors=self.min_contributors,
                max_contributors=self.max_sites,
            )
        # The sum is this site's own: every ciphertext in it is a fresh encryption signed by
        # a roster site, so the flooding sized for len(entries) (or the roster) covers its
        # error; a multiple of one, or anything else the server composes, is never decrypted.
        agg = CKKSAggregator(self._public, round_index=round_index)
        for entry in entries:
            agg.add(entry.frame, site_id=entry.site_id)
        total = self._decryptor.decrypt(agg.aggregate(), round_index=round_index)
        # Every decrypted round of the session (a list of ints, as Flower's ConfigRecord
        # holds): a server that re-runs the fit of an old round gets no second decryption.
        # In the site's persistent store: a new session (set-up) of the run must not reset
        # what it decrypted, or a server could re-run set-up for another decryption.
        self.persistent[_DECRYPTED] = [*done, round_index]
        self.persistent[_QUERIES] = used + n_chunks
        self.last_sigma = self._decryptor.last_sigma
        self.decrypt_seconds = time.perf_counter() - start
        return {"vector": vector_to_bytes(total)}


class CKKSCollector(SumCollector):
    """The server's side: check and forward the signed ciphertexts; a contributor decrypts.

    The server checks each fit reply's ciphertext (it loads under the public context, is of
    this round and this site) and its signature against the roster; a site whose reply fails
    is dropped with the reason. It sends the key holder the signed frames
    (:func:`~securefed.crypto.ckks.contributions.encode_contributions`), not a sum of its
    own: the key holder adds them itself.

    Args:
        public: The framed public context (a secret one is refused).
        params: The run's CKKS parameters; the sites' key must be for them.
        min_contributors: Fewest ciphertexts worth sending for decryption.
        n_sites: The most sites a sum may hold, for the report's flooding figures.
        roster: The federation's roster; None: the server checks no signature (the key
            holder still does, and refuses what does not verify).
        session: The run's session id (:func:`~securefed.protocol.modes.base.run_session`);
            needed with ``roster``.

    Attributes:
        last_error: The exception that stopped the latest sum, else None.
        aggregate_bytes: Size of the latest contribution list sent for decryption.

    Raises:
        ConfigError: If no public context was given or it is for other parameters.

    """

    def __init__(
        self,
        *,
        public: bytes | None,
        params: CKKSParams,
        min_contributors: int,
        n_sites: int | None = None,
        roster: Roster | None = None,
        session: bytes | None = None,
    ) -> None:
        if public is None:
            raise ConfigError("no site sent a CKKS public context")
        # Loading it refuses a secret context now, not at the first round.
        if CKKSAggregator(public).params != params:
            raise ConfigError(
                "the sites' CKKS keys were made for other parameters than this run's --he-* options"
            )
        if roster is not None and (session is None or len(session) != 32):
            raise ConfigError("checking the sites' signatures needs the run's 32-byte session id")
        self.public = public
        self.params = params
        self.min_contributors = int(min_contributors)
        self.n_sites = n_sites
        self.roster = roster
        self.session = session
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
        """Check the fit replies' signed ciphertexts, then have a contributor decrypt their sum.

        ``dim`` is the length of the encrypted part (the decrypted sum's length).
        """
        self.last_error = None
        start = time.perf_counter()
        site_errors: dict[int, str] = {}
        protect: dict[int, float] = {}
        # The server still adds the ciphertexts: a frame that does not load, or of another
        # round, site or layout, is refused here instead of failing the key holder's sum.
        agg = CKKSAggregator(self.public, round_index=round_index)
        signed: list[Contribution] = []
        gone = set(drop_before_upload)
        for sid in sorted(fits):
            if sid in gone:
                continue
            try:
                frame, signature = fits[sid]["ciphertext"], fits[sid]["ciphertext_signature"]
                if not isinstance(frame, bytes) or not isinstance(signature, bytes):
                    raise TypeError("`ciphertext` and `ciphertext_signature` must be bytes")
                entry = Contribution(sid, frame, signature)
                if self.roster is not None:
                    assert self.session is not None
                    verify_contribution(
                        self.roster,
                        session=self.session,
                        round_index=round_index,
                        contribution=entry,
                    )
                agg.add(frame, site_id=sid)
            except (KeyError, TypeError, ProtocolError, DataError) as exc:
                site_errors[sid] = f"ciphertext: {exc}"
                continue
            signed.append(entry)
            seconds = fits[sid].get("protect_seconds", 0.0)
            protect[sid] = float(seconds) if isinstance(seconds, (int, float)) else 0.0
        # An add that fails half-way discards the whole aggregate: its list is the truth.
        added = list(agg.contributors)
        signed = [e for e in signed if e.site_id in added]
        if len(added) < self.min_contributors:
            return self._failed(
                round_index,
                f"only {len(added)} ciphertexts; {self.min_contributors} are needed",
                start,
                protect,
                site_errors,
            )
        blob = encode_contributions(round_index, signed)
        self.aggregate_bytes = len(blob)
        server_seconds = time.perf_counter() - start
        # One site decrypts each round's sum (fixed by the session and the round); without a
        # roster (a harness) any contributor may. In-process simulation: a site gone after its
        # upload cannot decrypt.
        away = set(drop_after_upload)
        if self.roster is not None:
            assert self.session is not None
            holders = [decrypting_site(self.roster, self.session, round_index)]
        else:
            holders = sorted(added)
        for holder in [h for h in holders if h not in away]:
            replies, errors = link.exchange(
                {holder: (Stage.DECRYPT, {"round": round_index, "contributions": blob})},
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
        for holder in holders:
            if holder in away:
                site_errors.setdefault(holder, "decrypt: gone after its upload")
        named = f" (the round's decrypting site: {holders[0]})" if self.roster is not None else ""
        return self._failed(
            round_index,
            f"no key-holding site decrypted the sum{named}",
            start,
            protect,
            site_errors,
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
            "key_holder": "the sites (one key set, distributed out of band); one site per "
            "round, fixed by the run's session and the round, checks the contributors' signed "
            "ciphertexts, adds them itself and decrypts the sum, once, adding flooding noise",
            "min_contributors": self.min_contributors,
            **self.params.describe(n_sites=self.n_sites),
        }


class CKKSMode(SecureSumMode):
    """CKKS: sites encrypt under a shared key set; the server adds ciphertexts it cannot read."""

    name = "he"
    stages = (Stage.DECRYPT,)
    # Sites sign their ciphertexts with their identity keys; the key holder checks them, and
    # pins its minimum number of contributors, against the roster.
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
                "fit",
                "ciphertext_signature",
                "clear",
                "the site's Ed25519 signature over its ciphertext (SHA-256 of the frame, bound "
                "to the roster, the run's session, the round and the site id)",
            ),
            (
                "decrypt",
                "vector",
                "secure-sum",
                "key holder only, once per round: the decrypted sum, computed by the key "
                "holder itself, of the signed ciphertexts of at least its pinned minimum of "
                "roster sites (the roster's min_contributors), its own included, plus "
                "Gaussian flooding noise "
                f"(sigma {sigma:.2g} for {config.clients} sites, at least: the key holder sizes "
                f"it for its roster's sites, {SECURITY_BITS}-bit security "
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
        roster: Roster | None = None,
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
            roster=roster,
            session=run_session(config),
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
        """Site ``site_id``'s side, holding the secret context.

        The minimum number of contributors and the most sites a sum may hold come from the
        site's roster (signed by the federation) and its own ``min_contributors`` (node setting,
        the larger applies), never from ``config``, which in a deployment the server sends.
        Without ``roster`` and ``identity`` the site refuses every step (it can neither sign
        its ciphertext nor check the ones it would decrypt).

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
            roster=roster,
            identity=identity,
            session=run_session(config),
        )
