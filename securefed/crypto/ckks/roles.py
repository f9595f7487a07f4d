"""The three CKKS roles: a site encrypts, the server adds, a key holder decrypts a sum."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.crypto.ckks.flooding import DECRYPTION_BUDGET, gaussian, quantum
from securefed.crypto.ckks.framing import (
    AGGREGATOR_ID,
    KIND_AGGREGATE,
    KIND_PUBLIC_CONTEXT,
    KIND_SECRET_CONTEXT,
    KIND_UPDATE,
    check_site_id,
    chunk_sizes,
    decode_vector_frame,
    encode_vector_frame,
    layout_id,
)
from securefed.crypto.ckks.keys import load_key
from securefed.crypto.ckks.params import CKKSParams, load_tenseal
from securefed.errors import (
    ConfigError,
    DataError,
    DropoutRecoveryError,
    IntegrityError,
    ProtocolError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    import tenseal

__all__ = [
    "CKKSAggregator",
    "CKKSDecryptor",
    "CKKSEncryptor",
    "HEResult",
    "as_vector",
    "normalize_subset",
    "select_coordinates",
]


def normalize_subset(
    subset: np.ndarray | Sequence[int] | Sequence[bool] | None, n_coordinates: int
) -> np.ndarray | None:
    """Turn a boolean mask or index array into sorted unique int64 indices (None = all)."""
    if subset is None:
        return None
    arr = np.asarray(subset)
    if arr.size == 0:
        raise ConfigError("`subset` selects no coordinates; nothing would be aggregated.")
    if arr.ndim != 1:
        raise ConfigError(f"`subset` must be a 1-D mask or index array (got shape {arr.shape}).")
    if arr.dtype == np.bool_:
        if arr.shape[0] != n_coordinates:
            raise ConfigError(
                f"`subset` mask has length {arr.shape[0]}, but the vector has {n_coordinates} "
                "coordinates."
            )
        idx = np.flatnonzero(arr)
    elif np.issubdtype(arr.dtype, np.integer):
        idx = np.unique(arr.astype(np.int64))
        if idx.shape[0] != arr.shape[0]:
            raise ConfigError("`subset` index array has repeated indices.")
        if idx.size and (idx[0] < 0 or idx[-1] >= n_coordinates):
            raise ConfigError(
                f"`subset` indices must lie in [0, {n_coordinates}) "
                f"(got {int(idx[0])}..{int(idx[-1])})."
            )
    else:
        raise ConfigError(f"`subset` must be a boolean mask or integer indices (got {arr.dtype}).")
    if idx.size == 0:  # an all-False mask
        raise ConfigError("`subset` selects no coordinates; nothing would be aggregated.")
    return idx.astype(np.int64, copy=False)


def as_vector(vector: np.ndarray, what: str) -> np.ndarray:
    """``vector`` as a non-empty 1-D float64 array, else a DataError naming ``what``."""
    arr = np.asarray(vector)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{what} must be a non-empty 1-D vector (got shape {arr.shape}).")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{what} must be numeric (got dtype {arr.dtype}).")
    return arr.astype(np.float64, copy=False)


class CKKSEncryptor:
    """A site's side: encrypt a flat vector into one framed update message.

    Args:
        context: A framed public context (enough for ``"asymmetric"`` parameters) or secret
            context (needed for ``"symmetric"``), from :class:`CKKSKeySet` or
            :func:`read_key_file`.

    Raises:
        ProtocolError: Symmetric parameters but only the public context was given.
        IntegrityError: The context frame is not intact.

    """

    def __init__(self, context: bytes | bytearray | memoryview) -> None:
        key = load_key(context, kinds=(KIND_SECRET_CONTEXT, KIND_PUBLIC_CONTEXT))
        if key.params.encryption == "symmetric" and key.kind != KIND_SECRET_CONTEXT:
            raise ProtocolError(
                "symmetric CKKS encryption needs the secret context; the public context can "
                "only add ciphertexts."
            )
        self._key = key
        ts = load_tenseal()
        # The public ts.ckks_vector() copies the values through numpy, a PlainTensor and a
        # Python list (about 0.4 ms per 4096-slot chunk); the native constructor takes the list.
        native = getattr(getattr(ts, "_ts_cpp", None), "CKKSVector", None)
        ctx = key.context
        if native is not None:
            self._encrypt_list = lambda values: native(ctx.data, values)
        else:  # pragma: no cover - only if TenSEAL's internal layout changes
            self._encrypt_list = lambda values: ts.ckks_vector(ctx, values)

    @property
    def params(self) -> CKKSParams:
        """The CKKS parameters of this key set."""
        return self._key.params

    @property
    def key_id(self) -> bytes:
        """The key set's id."""
        return self._key.key_id

    def encrypt(
        self,
        vector: np.ndarray,
        *,
        site_id: int,
        round_index: int = 0,
        subset: np.ndarray | Sequence[int] | Sequence[bool] | None = None,
    ) -> bytes:
        """Encrypt ``vector`` (or only its ``subset`` coordinates) into an update frame.

        Args:
            vector: Flat float64 vector, e.g. ``[n_i * u_i, n_i]``.
            site_id: This site's id, written into the frame.
            round_index: The round, written into the frame.
            subset: Boolean mask or index array of the coordinates to encrypt; the others are
                not read and not sent. None encrypts all.

        Returns:
            The frame bytes.

        Raises:
            DataError: The selected values are not finite or too large for the parameters.
            ConfigError: Bad ``subset`` or ``site_id``.

        """
        values = as_vector(vector, f"update of site {site_id}")
        sender = check_site_id(site_id)
        idx = normalize_subset(subset, values.shape[0])
        selected = select_coordinates(values, idx)
        if not np.all(np.isfinite(selected)):
            raise DataError(f"update of site {site_id} has non-finite values (NaN or inf).")
        limit = self.params.max_abs_sum()
        peak = float(np.max(np.abs(selected)))
        if peak >= limit:
            raise DataError(
                f"update of site {site_id} has |value| {peak:.3g}, at or above the CKKS bound "
                f"{limit:.3g} for these parameters."
            )
        slots = self.params.slots
        chunks = []
        for start, end in chunk_sizes(selected.shape[0], slots):
            chunks.append(self._encrypt_list(selected[start:end].tolist()).serialize())
        return encode_vector_frame(
            kind=KIND_UPDATE,
            key_id=self.key_id,
            round_index=round_index,
            sender=sender,
            n_values=selected.shape[0],
            layout_id=layout_id(values.shape[0], idx),
            slots=slots,
            weighted=False,
            contributors=(sender,),
            chunks=chunks,
        )


def select_coordinates(values: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    """The coordinates ``idx`` of ``values`` (all for None; a view when they are contiguous)."""
    if idx is None:
        return values
    if idx[-1] - idx[0] + 1 == idx.shape[0]:  # contiguous: a view, no copy
        return values[int(idx[0]) : int(idx[-1]) + 1]
    return values[idx]


class CKKSAggregator:
    """The server's side: add encrypted updates without any secret key.

    Args:
        public_context: The framed *public* context. A secret context is refused.
        round_index: The round being aggregated; frames of other rounds are refused.
        weighted: If True, every update is multiplied by a plaintext scalar weight given to
            :meth:`add` before summing (the ciphertext scale becomes ``2**(2*scale_bits)``;
            no modulus level is consumed, see :meth:`CKKSParams.max_abs_sum`).

    Raises:
        ProtocolError: The context holds a secret key.
        IntegrityError: The context frame is not intact.

    """

    def __init__(
        self,
        public_context: bytes | bytearray | memoryview,
        *,
        round_index: int = 0,
        weighted: bool = False,
    ) -> None:
        kinds = (KIND_SECRET_CONTEXT, KIND_PUBLIC_CONTEXT)
        key = load_key(public_context, kinds=kinds)
        if key.kind == KIND_SECRET_CONTEXT or key.context.is_private():
            raise ProtocolError(
                "the server must not hold the CKKS secret key; give it the public context."
            )
        if weighted and key.params.max_abs_sum(weighted=True) < 1.0:
            raise ConfigError(
                f"`coeff_mod_bit_sizes` {key.params.coeff_mod_bit_sizes} leave no room for "
                "server-side weights: the data primes must exceed 2 * global_scale_bits + 1 bits."
            )
        # Weighting multiplies the scale instead of rescaling: TenSEAL's auto-rescale would
        # relabel the scale as 2**scale_bits although the dropped prime is only close to it,
        # biasing every weighted sum by (q / 2**scale_bits - 1), about 1e-8 relative.
        key.context.auto_rescale = False
        self._key = key
        self._round = round_index
        self._weighted = weighted
        self._sum: list[Any] | None = None
        self._layout: bytes | None = None
        self._n_values = 0
        self._contributors: list[int] = []
        self._ts = load_tenseal()

    @property
    def params(self) -> CKKSParams:
        """The CKKS parameters of the key set."""
        return self._key.params

    @property
    def context(self) -> tenseal.Context:
        """The server's TenSEAL context (public: ``is_private()`` is False)."""
        return self._key.context

    @property
    def contributors(self) -> tuple[int, ...]:
        """Sites added so far, in order."""
        return tuple(self._contributors)

    def add(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        site_id: int,
        weight: float | None = None,
    ) -> None:
        """Add one site's encrypted update to the running sum.

        Args:
            frame: The site's update frame.
            site_id: The sender as the transport knows it; must match the frame.
            weight: Plaintext scalar weight (required iff the aggregator is ``weighted``).

        Raises:
            IntegrityError: The frame is damaged or its ciphertexts do not load.
            ProtocolError: Wrong key set, round, sender, layout, or a repeated site.
            ConfigError: A missing, unexpected or non-finite weight.

        """
        header, chunks = decode_vector_frame(frame, kinds=(KIND_UPDATE,), what="CKKS update")
        if header.key_id != self._key.key_id:
            raise ProtocolError(
                f"update of site {site_id} is under key set {header.key_id.hex()}, not "
                f"{self._key.key_id.hex()}."
            )
        if header.sender != site_id:
            raise ProtocolError(f"update from site {site_id} claims to be from {header.sender}.")
        if header.round_index != self._round:
            raise ProtocolError(
                f"update of site {site_id} is for round {header.round_index}, not {self._round}."
            )
        if site_id in self._contributors:
            raise ProtocolError(f"site {site_id} already contributed to this aggregate.")
        if header.slots != self._key.params.slots:
            raise ProtocolError(
                f"update of site {site_id} uses {header.slots} slots per ciphertext, not "
                f"{self._key.params.slots}."
            )
        if self._layout is not None and header.layout_id != self._layout:
            raise ProtocolError(
                f"update of site {site_id} carries a different vector length or coordinate "
                "subset than the updates already added."
            )
        factor = self._weight_factor(site_id, weight)
        loaded = [self._load_chunk(blob, site_id, i) for i, blob in enumerate(chunks)]
        for i, (vec, (start, end)) in enumerate(
            zip(loaded, chunk_sizes(header.n_values, header.slots), strict=True)
        ):
            if vec.size() != end - start:
                raise IntegrityError(
                    f"chunk {i} of site {site_id}'s update holds {vec.size()} values, "
                    f"expected {end - start}."
                )
        try:
            if factor is not None:
                for vec in loaded:
                    vec.mul_(factor)
            if self._sum is None:
                self._sum = loaded
            else:
                for acc, vec in zip(self._sum, loaded, strict=True):
                    acc.add_(vec)
        except (ValueError, RuntimeError) as exc:
            # A failure half-way would leave a partial sum; the round cannot be applied.
            self._sum = None
            self._contributors.clear()
            raise IntegrityError(
                f"adding site {site_id}'s ciphertexts failed ({exc}); the aggregate is discarded."
            ) from exc
        self._layout = header.layout_id
        self._n_values = header.n_values
        self._contributors.append(site_id)

    def _weight_factor(self, site_id: int, weight: float | None) -> float | None:
        if not self._weighted:
            if weight is not None:
                raise ConfigError(
                    f"a weight was given for site {site_id}, but the aggregator is unweighted."
                )
            return None
        if weight is None:
            raise ConfigError(f"`weights[{site_id}]` is missing; the aggregator is weighted.")
        w = float(weight)
        if not math.isfinite(w) or w == 0.0:
            # A zero product is a "transparent" ciphertext SEAL refuses; leave the site out.
            raise ConfigError(
                f"`weights[{site_id}]` must be finite and non-zero (got {weight}); "
                "leave the site out instead."
            )
        return w

    def _load_chunk(self, blob: memoryview, site_id: int, index: int) -> Any:
        try:
            return self._ts.ckks_vector_from(self._key.context, bytes(blob))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise IntegrityError(
                f"chunk {index} of site {site_id}'s update is not a valid CKKS ciphertext for "
                f"this context: {exc}"
            ) from exc

    def aggregate(self) -> bytes:
        """Serialize the encrypted sum as an aggregate frame for the key holder.

        Raises:
            DropoutRecoveryError: No update was added.

        """
        if self._sum is None:
            raise DropoutRecoveryError(
                f"round {self._round}: no site update was added; there is nothing to aggregate."
            )
        return encode_vector_frame(
            kind=KIND_AGGREGATE,
            key_id=self._key.key_id,
            round_index=self._round,
            sender=AGGREGATOR_ID,
            n_values=self._n_values,
            layout_id=self._layout or b"",
            slots=self._key.params.slots,
            weighted=self._weighted,
            contributors=self._contributors,
            chunks=[vec.serialize() for vec in self._sum],
        )


class CKKSDecryptor:
    """The key holder's side: decrypt an aggregate (never a single site's update), flooded.

    A raw CKKS decryption gives away the secret key (Li and Micciancio 2021; see
    :mod:`.flooding`), so every decryption adds Gaussian noise from the OS CSPRNG to the
    plaintext polynomial, exactly, before decoding, and rounds the released values to a
    power-of-two grid below ``sigma`` (Li, Micciancio, Schultz, Sorrell, CRYPTO 2022).

    The noise is sized for the error of ``k`` fresh encryptions added together, so give it
    only an aggregate the key holder added itself from ciphertexts it checked (the CKKS mode's
    key holder adds the sites' signed ciphertexts, :mod:`.contributions`). A frame an active
    server composed may be the sum doubled 72 times: its error then dwarfs the noise, and the
    reply divided by ``2**72`` is the raw decryption that gives away the key
    (``tests/crypto/test_ckks_scaled_aggregate.py``).

    Args:
        secret_context: The framed secret context.
        min_contributors: Refuse aggregates that claim fewer summed sites than this. The claim
            is the server's, so this guards against mistakes, not a malicious server.
        max_contributors: The most sites a sum may hold (the pinned roster size); the noise is
            sized for ``max(claimed contributors, max_contributors)`` fresh encryptions, so a
            server cannot shrink it by under-reporting. None trusts the frame's claim.
        queries: Decryptions the key serves over its lifetime (LMSS's ``alpha``).

    Attributes:
        last_sigma: The flooding standard deviation of the latest decryption (value units).

    Raises:
        ProtocolError: A public context was given.
        ConfigError: ``min_contributors`` below 1.

    """

    def __init__(
        self,
        secret_context: bytes | bytearray | memoryview,
        *,
        min_contributors: int = 1,
        max_contributors: int | None = None,
        queries: int = DECRYPTION_BUDGET,
    ) -> None:
        key = load_key(secret_context, kinds=(KIND_SECRET_CONTEXT, KIND_PUBLIC_CONTEXT))
        if key.kind != KIND_SECRET_CONTEXT:
            raise ProtocolError("decryption needs the secret context; got the public context.")
        if min_contributors < 1:
            raise ConfigError(f"`min_contributors` must be at least 1 (got {min_contributors}).")
        if max_contributors is not None and max_contributors < 1:
            raise ConfigError(f"`max_contributors` must be at least 1 (got {max_contributors}).")
        self._key = key
        self._min = min_contributors
        self._max = max_contributors
        self._queries = int(queries)
        self._ts = load_tenseal()
        self.last_sigma = 0.0

    @property
    def params(self) -> CKKSParams:
        """The CKKS parameters of the key set."""
        return self._key.params

    def sigma(self, contributors: int) -> float:
        """The flooding standard deviation for an aggregate claiming ``contributors`` sites."""
        k = max(int(contributors), self._max or 0, 1)
        return self._key.params.flooding_sigma(k, queries=self._queries)

    def decrypt(
        self, frame: bytes | bytearray | memoryview, *, round_index: int | None = None
    ) -> np.ndarray:
        """Decrypt an aggregate frame to the flooded float64 sum over its encrypted coordinates.

        Args:
            frame: The server's aggregate frame.
            round_index: If given, the round the aggregate must belong to.

        Returns:
            The sum plus Gaussian noise of :meth:`sigma`, rounded to
            :func:`~securefed.crypto.ckks.flooding.quantum`, one entry per encrypted coordinate
            (subset order).

        Raises:
            IntegrityError: The frame is damaged.
            ProtocolError: A site update instead of an aggregate, another key set or round, too
                few contributors, or server-side weights.

        """
        header, chunks = decode_vector_frame(frame, kinds=(KIND_AGGREGATE,), what="CKKS aggregate")
        if header.key_id != self._key.key_id:
            raise ProtocolError(
                f"aggregate is under key set {header.key_id.hex()}, not {self._key.key_id.hex()}."
            )
        if round_index is not None and header.round_index != round_index:
            raise ProtocolError(f"aggregate is for round {header.round_index}, not {round_index}.")
        if len(header.contributors) < self._min:
            raise ProtocolError(
                f"aggregate sums {len(header.contributors)} site(s); at least {self._min} "
                "are required before decrypting."
            )
        if header.weighted:
            # Server-side weights multiply each site's error by amounts the key holder never
            # sees, so no flooding could be sized for them.
            raise ProtocolError(
                "aggregate carries server-side weights; the key holder cannot bound their error "
                "and decrypts unweighted sums only (sites send n_i * u_i instead)."
            )
        sigma = self.sigma(len(header.contributors))
        grid = quantum(sigma)
        out = np.empty(header.n_values, dtype=np.float64)
        for i, (blob, (start, end)) in enumerate(
            zip(chunks, chunk_sizes(header.n_values, header.slots), strict=True)
        ):
            try:
                vec = self._ts.ckks_vector_from(self._key.context, bytes(blob))
                if vec.size() != end - start:
                    raise IntegrityError(
                        f"chunk {i} of the aggregate holds {vec.size()} values, "
                        f"expected {end - start}."
                    )
                # Exact: the noise is encoded at the ciphertext's scale and added to it as a
                # plaintext, so it enters the integer polynomial before any float rounding.
                vec.add_((sigma * gaussian(end - start)).tolist())
                values = np.asarray(vec.decrypt(), dtype=np.float64)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise IntegrityError(
                    f"chunk {i} of the aggregate does not decrypt under this key: {exc}"
                ) from exc
            if values.shape[0] != end - start:
                raise IntegrityError(
                    f"chunk {i} of the aggregate holds {values.shape[0]} values, "
                    f"expected {end - start}."
                )
            out[start:end] = np.round(values / grid) * grid
        self.last_sigma = sigma
        return out


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not results
class HEResult:
    """Outcome of one CKKS aggregation run in-process.

    Attributes:
        total: Float64 sum over survivors (weighted if weights were given), full vector length;
            coordinates outside the encrypted subset were never sent and are 0.
        survivors: Sites whose update is in ``total``.
        dropped: Sites that dropped before upload.
        bytes_per_client: Per surviving site, bytes of its update frame.
        client_seconds: Per surviving site, seconds to encrypt, serialize and frame.
        server_seconds: Seconds the server spent deserializing, adding (and weighting) and
            serializing the aggregate.
        decrypt_seconds: Seconds the key holder spent deserializing and decrypting.
        aggregate_bytes: Size of the aggregate frame sent to the key holder.
        keygen_seconds: Seconds spent on key set-up (0 if keys were given).
        params: The CKKS parameters.
        encrypted_indices: Coordinates that were encrypted, or None for all.

    """

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    bytes_per_client: dict[int, int]
    client_seconds: dict[int, float]
    server_seconds: float
    decrypt_seconds: float
    aggregate_bytes: int
    keygen_seconds: float
    params: CKKSParams
    encrypted_indices: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        """Protocol description for the privacy report."""
        n = int(self.total.shape[0])
        enc = n if self.encrypted_indices is None else int(self.encrypted_indices.shape[0])
        out = {"protocol": "ckks"}
        out.update(self.params.describe(n_coordinates=n, n_encrypted=enc))
        return out
