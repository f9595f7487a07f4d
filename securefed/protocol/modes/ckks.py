"""``--secure-agg he``: CKKS homomorphic encryption (TenSEAL), over any link.

The one driver of the CKKS protocol (:mod:`securefed.crypto.ckks` holds its roles). The fit
reply carries the site's ciphertext; the server, which holds only the public context, adds
the ciphertexts and sends the encrypted sum to one contributing site at a time
(``Stage.DECRYPT``, lowest id first) until one answers. That site holds the secret context
and refuses a sum of fewer than ``min_contributors`` sites, counted by itself from its own
configuration (a sum of one update would be that update).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from securefed.crypto.ckks import CKKSAggregator, CKKSDecryptor, CKKSEncryptor, CKKSParams
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

__all__ = ["CKKSCollector", "CKKSMode", "CKKSSite", "ckks_params", "min_contributors"]


def ckks_params(config: Any) -> CKKSParams:
    """The run's CKKS parameters (``--he-*`` options)."""
    return CKKSParams(
        poly_modulus_degree=config.he_poly_modulus_degree,
        coeff_mod_bit_sizes=tuple(config.he_coeff_mod_bit_sizes),
        global_scale_bits=config.he_scale_bits,
    )


def min_contributors(config: Any) -> int:
    """Fewest summed sites a key holder decrypts: 2 (one update alone is not a sum)."""
    return min(2, config.clients)


class CKKSSite(SiteProtection):
    """One site's side: encrypt the update at fit; decrypt a sum when asked (key holder).

    Args:
        site_id: This site's id (written into its ciphertext frame).
        context: The framed context it encrypts with (the secret one: every site holds the
            key set, so any contributor can decrypt the sum).
        min_contributors: Fewest sites an aggregate must sum before this site decrypts it.
        subset: Coordinates to encrypt (None: all); the others never leave the site.

    Attributes:
        encrypt_seconds: Seconds the latest :meth:`protect` spent.
        decrypt_seconds: Seconds the latest decryption spent.
        update_bytes: Size of the latest ciphertext frame.

    """

    stages = (Stage.DECRYPT,)

    def __init__(
        self,
        *,
        site_id: int,
        context: bytes,
        min_contributors: int,
        subset: np.ndarray | None = None,
    ) -> None:
        self.site_id = int(site_id)
        self.context = context
        self.min_contributors = int(min_contributors)
        self.subset = subset
        self.encrypt_seconds = 0.0
        self.decrypt_seconds = 0.0
        self.update_bytes = 0
        # Loading a TenSEAL context costs milliseconds: once per object, not per round.
        self._encryptor: CKKSEncryptor | None = None
        self._decryptor: CKKSDecryptor | None = None

    def protect(
        self, vector: np.ndarray, *, round_index: int, n_sites: int, state: SiteState
    ) -> dict[str, Any]:
        """Encrypt the update, refusing one whose sum over ``n_sites`` could overflow.

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
        self.encrypt_seconds = time.perf_counter() - start
        self.update_bytes = len(frame)
        return {"ciphertext": frame, "protect_seconds": self.encrypt_seconds}

    def step(self, stage: str, fields: dict[str, Any], *, state: SiteState) -> dict[str, Any]:
        """Key holder: decrypt the server's sum of at least ``min_contributors`` updates.

        Raises:
            ProtocolError: For a malformed message, another round's or key set's aggregate,
                or one that sums too few sites.

        """
        if stage != Stage.DECRYPT:
            return super().step(stage, fields, state=state)
        start = time.perf_counter()
        aggregate, round_index = fields.get("aggregate"), fields.get("round")
        if not isinstance(aggregate, bytes) or not isinstance(round_index, int):
            raise ProtocolError("decrypt message: needs `aggregate` bytes and the `round`")
        if self._decryptor is None:
            self._decryptor = CKKSDecryptor(self.context, min_contributors=self.min_contributors)
        total = self._decryptor.decrypt(aggregate, round_index=round_index)
        self.decrypt_seconds = time.perf_counter() - start
        return {"vector": vector_to_bytes(total)}


class CKKSCollector(SumCollector):
    """The server's side: add the ciphertexts; a contributing site decrypts the sum.

    Args:
        public: The framed public context (a secret one is refused).
        params: The run's CKKS parameters; the sites' key must be for them.
        min_contributors: Fewest ciphertexts worth sending for decryption.
        weights: Optional plaintext weight per site, applied to its ciphertext by the server.

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
            "contributing site decrypts each round's sum",
            "min_contributors": self.min_contributors,
            **self.params.describe(),
        }


class CKKSMode(SecureSumMode):
    """CKKS: sites encrypt under a shared key set; the server adds ciphertexts it cannot read."""

    name = "he"
    stages = (Stage.DECRYPT,)

    def releases(self, config: Any) -> list[tuple[str, str, str, str]]:
        """The ciphertext, the key holder's decrypted sum, and step timings."""
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
                "key holder only: the decrypted sum of at least 2 sites' updates",
            ),
            ("fit", "protect_seconds", "clear", TIMING_DETAIL),
            ("decrypt", "protect_seconds", "clear", TIMING_DETAIL),
        ]

    def server(self, config: Any, *, n_sites: int, he_public: bytes | None = None) -> SumCollector:
        """The server side; it gets the sites' public context only.

        Raises:
            ConfigError: No public context, or one for other parameters than the run's.

        """
        return CKKSCollector(
            public=he_public, params=ckks_params(config), min_contributors=min_contributors(config)
        )

    def site(self, config: Any, *, site_id: int, he_secret: bytes | None = None) -> SiteProtection:
        """Site ``site_id``'s side, holding the secret context.

        Raises:
            ConfigError: Without the secret context.

        """
        if he_secret is None:
            raise ConfigError(f"site {site_id}: --secure-agg he needs the CKKS secret key file")
        return CKKSSite(
            site_id=site_id, context=he_secret, min_contributors=min_contributors(config)
        )
