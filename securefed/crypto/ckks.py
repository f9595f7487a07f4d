"""CKKS homomorphic aggregation of flat update vectors with TenSEAL (``--secure-agg he``).

Roles and keys (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of
Approximate Numbers"; TenSEAL, Benaissa et al. 2021):

* **Key set-up** (:func:`generate_keys`): whoever holds the secret key (the sites, or one key
  holder they trust) creates a key set. The secret context goes to key files written ``0600``
  with ``O_EXCL``; the *public* context (no secret key, ``is_private()`` is False) goes to the
  server and to sites that only encrypt.
* **Site** (:class:`CKKSEncryptor`): encrypts its flat float64 vector, chunked into ciphertexts
  of ``N/2`` slots, and sends one framed byte message. The FL layer passes
  ``[n_i * u_i, n_i]``, so the server needs no plaintext weights.
* **Server** (:class:`CKKSAggregator`): holds only the public context and ciphertext bytes; adds
  the ciphertexts (optionally times plaintext scalar weights) and returns an aggregate frame. It
  cannot decrypt.
* **Key holder** (:class:`CKKSDecryptor`): decrypts the aggregate only, never a single update.

Threat model notes for a reviewer. The server is honest-but-curious. One CKKS key is shared by
the key holders, so the server colluding with any holder of the secret key learns every site's
update; with ``encryption="asymmetric"`` sites may encrypt with the public context alone and only
the key holder can collude. The frame digest is an unkeyed SHA-256: it detects truncation and
corruption, not a forger (authenticity is the transport's job, e.g. TLS). Dropout needs no
recovery: a site that does not upload contributes nothing.

Precision (default parameters, N = 8192, scale 2^40): a fresh ciphertext decrypts with an
absolute error of at most about 2e-8 per coordinate (measured over 1e6 coordinates), whatever
the magnitude (CKKS noise is additive, not relative). Errors add over sites, so the sum of ``k``
vectors is off by at most ``k * 5e-8`` (``5e-8 * sum|w_i|`` with server weights; the budget the
tests enforce): 5e-6 for 100 sites, a relative error below 1e-9 for sums of magnitude 1e4-1e5
and far inside the 1e-4 FedAvg needs after dividing by the summed weight. Sums must stay below
:meth:`CKKSParams.max_abs_sum` (2^99 plain, 2^59 weighted, at the defaults) or decryption wraps.

Cost: next to TenSEAL's own encrypt/add/decrypt, the protocol adds TenSEAL ``serialize()``
(SEAL's compressed format) and deserialization on every hop, plus a SHA-256 per frame; see
:func:`raw_tenseal_reference` for the two baselines a benchmark should print.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import stat
import struct
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securefed.errors import (
    ConfigError,
    DataError,
    DropoutRecoveryError,
    IntegrityError,
    OptionalDependencyError,
    ProtocolError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    import tenseal

__all__ = [
    "CKKSParams",
    "CKKSKeySet",
    "CKKSEncryptor",
    "CKKSAggregator",
    "CKKSDecryptor",
    "FrameHeader",
    "HEResult",
    "generate_keys",
    "write_key_files",
    "read_key_file",
    "read_frame_header",
    "he_sum",  # noqa: F822 - resolved by the module __getattr__ below
    "raw_tenseal_reference",
    "MAX_COEFF_MODULUS_BITS",
]

# Largest total coefficient-modulus size for 128-bit classical security with a ternary secret,
# HomomorphicEncryption.org security standard (Albrecht et al. 2018), Table 1; SEAL enforces the
# same table. Smaller degrees leave no room for a useful modulus chain and are refused.
MAX_COEFF_MODULUS_BITS: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
_SECURITY_LEVEL_BITS = 128
# SEAL generates NTT-friendly primes of at most 60 bits; below 20 bits there are too few primes
# congruent to 1 mod 2N and the scale would give no useful precision.
_MIN_PRIME_BITS, _MAX_PRIME_BITS = 20, 60
_ENCRYPTION_TYPES = ("asymmetric", "symmetric")

# Byte layout (big-endian). Every frame: prefix, kind-specific body, SHA-256 of all before it.
_MAGIC = b"SFCKKS"
_VERSION = 1
_KIND_SECRET_CONTEXT = 1
_KIND_PUBLIC_CONTEXT = 2
_KIND_UPDATE = 3
_KIND_AGGREGATE = 4
_KIND_NAMES = {
    _KIND_SECRET_CONTEXT: "secret key context",
    _KIND_PUBLIC_CONTEXT: "public key context",
    _KIND_UPDATE: "site update",
    _KIND_AGGREGATE: "aggregate",
}
_PREFIX = struct.Struct(">6sBB16s")  # magic, version, kind, key_id
_KEY_BODY = struct.Struct(">IB")  # poly_modulus_degree, number of primes (then one byte each)
_KEY_TAIL = struct.Struct(">BB")  # global_scale_bits, encryption type
_VECTOR_BODY = struct.Struct(">QIQ16sIIB")  # round, sender, n_values, layout, slots, chunks, w
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_DIGEST_BYTES = 32
_KEY_ID_BYTES = 16
_AGGREGATOR_ID = 0xFFFFFFFF  # the sender field of an aggregate frame
_MAX_SITE_ID = _AGGREGATOR_ID - 1


def _tenseal() -> Any:
    """Import TenSEAL on first use; it is an optional, heavy dependency."""
    try:
        import tenseal as ts
    except ImportError as exc:
        raise OptionalDependencyError(
            "CKKS secure aggregation (`--secure-agg he`) needs TenSEAL, which is not installed; "
            "install it with `pip install 'tenseal==0.3.*'`."
        ) from exc
    return ts


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters, validated against the 128-bit HE security standard.

    Attributes:
        poly_modulus_degree: Ring degree ``N`` (one of 4096, 8192, 16384, 32768); a ciphertext
            holds ``N/2`` values.
        coeff_mod_bit_sizes: Bit sizes of the coefficient-modulus primes; the last is SEAL's
            special (key-switching) prime, the others are data primes. Their sum must not exceed
            :data:`MAX_COEFF_MODULUS_BITS` for ``N``.
        global_scale_bits: Values are encoded as ``round(x * 2**global_scale_bits)``; sets the
            precision. At most the smallest middle prime and below the first prime.
        encryption: ``"asymmetric"`` (public-key encryption: sites may hold only the public
            context) or ``"symmetric"`` (secret-key encryption: about twice as fast, every site
            must hold the secret key; the server's context then holds no key at all).

    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40
    encryption: str = "asymmetric"

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if isinstance(degree, bool) or not isinstance(degree, int | np.integer):
            raise ConfigError(f"`poly_modulus_degree` must be an integer (got {degree!r}).")
        if int(degree) not in MAX_COEFF_MODULUS_BITS:
            known = ", ".join(str(d) for d in MAX_COEFF_MODULUS_BITS)
            raise ConfigError(f"`poly_modulus_degree` must be one of {known} (got {degree}).")
        object.__setattr__(self, "poly_modulus_degree", int(degree))

        sizes = self.coeff_mod_bit_sizes
        if isinstance(sizes, str | bytes) or not isinstance(sizes, Sequence):
            raise ConfigError(
                f"`coeff_mod_bit_sizes` must be a sequence of prime bit sizes (got {sizes!r})."
            )
        for i, bits in enumerate(sizes):
            if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
                raise ConfigError(f"`coeff_mod_bit_sizes[{i}]` must be an integer (got {bits!r}).")
            if not _MIN_PRIME_BITS <= bits <= _MAX_PRIME_BITS:
                raise ConfigError(
                    f"`coeff_mod_bit_sizes[{i}]` must be between {_MIN_PRIME_BITS} and "
                    f"{_MAX_PRIME_BITS} bits (got {bits})."
                )
        sizes = tuple(int(b) for b in sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if len(sizes) < 2:
            raise ConfigError(
                "`coeff_mod_bit_sizes` needs at least 2 primes (data primes, then the special "
                f"prime) (got {len(sizes)})."
            )
        bound = MAX_COEFF_MODULUS_BITS[self.poly_modulus_degree]
        if sum(sizes) > bound:
            raise ConfigError(
                f"`coeff_mod_bit_sizes` total {sum(sizes)} bits exceeds {bound} bits, the "
                f"{_SECURITY_LEVEL_BITS}-bit security bound for poly_modulus_degree "
                f"{self.poly_modulus_degree} (HomomorphicEncryption.org standard)."
            )

        scale = self.global_scale_bits
        if isinstance(scale, bool) or not isinstance(scale, int | np.integer):
            raise ConfigError(f"`global_scale_bits` must be an integer (got {scale!r}).")
        scale = int(scale)
        object.__setattr__(self, "global_scale_bits", scale)
        if scale < _MIN_PRIME_BITS:
            raise ConfigError(
                f"`global_scale_bits` must be at least {_MIN_PRIME_BITS} for useful precision "
                f"(got {scale})."
            )
        if scale >= sizes[0]:
            raise ConfigError(
                f"`global_scale_bits` must be below the first prime's {sizes[0]} bits "
                f"(got {scale} >= {sizes[0]})."
            )
        middle = sizes[1:-1]
        if middle and scale > min(middle):
            raise ConfigError(
                f"`global_scale_bits` must be at most the smallest middle prime "
                f"(got {scale} > {min(middle)})."
            )
        if self.encryption not in _ENCRYPTION_TYPES:
            raise ConfigError(
                f"`encryption` must be one of {', '.join(_ENCRYPTION_TYPES)} "
                f"(got {self.encryption!r})."
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (``N/2``)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives under (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    def max_abs_sum(self, *, weighted: bool = False) -> float:
        """Largest magnitude a decrypted coordinate may have before decryption wraps around.

        The aggregate is never rescaled, so it is decrypted modulo ``Q`` (all data primes, about
        ``2**data_modulus_bits``); a value ``x`` at scale ``D`` decodes only if ``|x| D < Q/2``.
        Server weights multiply the scale by ``2**global_scale_bits`` once more.

        Args:
            weighted: Whether the server multiplies by plaintext weights.

        Returns:
            The bound (0.0 if these parameters cannot hold a weighted sum at all).

        """
        scale_bits = self.global_scale_bits * (2 if weighted else 1)
        headroom = self.data_modulus_bits - scale_bits - 1
        return math.ldexp(1.0, headroom) if headroom > 0 else 0.0

    def describe(
        self, *, n_coordinates: int | None = None, n_encrypted: int | None = None
    ) -> dict[str, Any]:
        """Parameters for the privacy report.

        Args:
            n_coordinates: Length of the full update vector, if known.
            n_encrypted: How many of its coordinates are encrypted and sent (a trainable subset);
                the rest are not sent at all.

        Returns:
            A JSON-serializable dictionary.

        """
        out: dict[str, Any] = {
            "scheme": "CKKS",
            "library": "TenSEAL (Microsoft SEAL)",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "coeff_modulus_bits": sum(self.coeff_mod_bit_sizes),
            "max_coeff_modulus_bits": MAX_COEFF_MODULUS_BITS[self.poly_modulus_degree],
            "global_scale_bits": self.global_scale_bits,
            "slots_per_ciphertext": self.slots,
            "security_level_bits": _SECURITY_LEVEL_BITS,
            "security_standard": "HomomorphicEncryption.org 2018, ternary secret, classical",
            "encryption": self.encryption,
            "server_keys": "public context only (no secret key); the server cannot decrypt",
            "max_abs_sum": self.max_abs_sum(),
        }
        if n_coordinates is not None:
            encrypted = n_coordinates if n_encrypted is None else n_encrypted
            out["coordinates"] = n_coordinates
            out["encrypted_coordinates"] = encrypted
            out["coordinates_not_sent"] = n_coordinates - encrypted
            if encrypted < n_coordinates:
                out["subset_note"] = (
                    "only the trainable subset is encrypted and sent; the other coordinates "
                    "never leave the site"
                )
        return out

    def _tenseal_context(self) -> tenseal.Context:
        ts = _tenseal()
        enc = (
            ts.ENCRYPTION_TYPE.ASYMMETRIC
            if self.encryption == "asymmetric"
            else ts.ENCRYPTION_TYPE.SYMMETRIC
        )
        try:
            ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                poly_modulus_degree=self.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
                encryption_type=enc,
                n_threads=1,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"TenSEAL refused the CKKS parameters {self}: {exc}") from exc
        ctx.global_scale = 2.0**self.global_scale_bits
        return ctx


# --------------------------------------------------------------------------------------------
# Framing helpers
# --------------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from a frame; every shortfall is an IntegrityError."""

    def __init__(self, data: memoryview, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise IntegrityError(
                f"{self._what} is truncated: needs {n} bytes at offset {self._pos}, "
                f"only {len(self._data) - self._pos} left."
            )
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise IntegrityError(
                f"{self._what} has {len(self._data) - self._pos} unexpected trailing bytes."
            )


def _open_frame(frame: bytes | bytearray | memoryview, *, kinds: Collection[int], what: str):
    """Check magic, version, kind and digest; return (kind, key_id, reader over the body)."""
    data = memoryview(frame).cast("B")
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
        raise IntegrityError(
            f"{what} is truncated: {len(data)} bytes, shorter than the "
            f"{_PREFIX.size + _DIGEST_BYTES}-byte header and digest."
        )
    magic, version, kind, key_id = _PREFIX.unpack(data[: _PREFIX.size])
    if magic != _MAGIC:
        raise IntegrityError(f"{what} is not a securefed CKKS frame (bad magic {bytes(magic)!r}).")
    if version != _VERSION:
        raise IntegrityError(f"{what} has format version {version}; this code reads {_VERSION}.")
    body = data[:-_DIGEST_BYTES]
    digest = hashlib.sha256(body).digest()
    if not hmac.compare_digest(digest, data[-_DIGEST_BYTES:]):
        raise IntegrityError(
            f"{what} failed its SHA-256 check ({len(data)} bytes): truncated, tampered with or "
            "corrupted in transit."
        )
    if kind not in kinds:
        expected = " or ".join(_KIND_NAMES[k] for k in kinds)
        got = _KIND_NAMES.get(kind, f"unknown kind {kind}")
        raise ProtocolError(f"{what} is a {got} frame; expected a {expected} frame.")
    reader = _Reader(body, what)
    reader.take(_PREFIX.size)
    return kind, bytes(key_id), reader


def _finish_frame(parts: list[bytes]) -> bytes:
    """Append the SHA-256 digest; the frame is copied once, by the final join."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    parts.append(h.digest())
    return b"".join(parts)


def _layout_id(n_total: int, indices: np.ndarray | None) -> bytes:
    """Fingerprint of which coordinates a frame carries, so mismatched subsets never add."""
    h = hashlib.sha256(b"securefed-ckks-layout-v1")
    h.update(_U64.pack(n_total))
    if indices is not None:
        h.update(np.ascontiguousarray(indices, dtype=">i8").tobytes())
    return h.digest()[:16]


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
    arr = np.asarray(vector)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{what} must be a non-empty 1-D vector (got shape {arr.shape}).")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{what} must be numeric (got dtype {arr.dtype}).")
    return arr.astype(np.float64, copy=False)


def _check_site_id(site_id: int) -> int:
    if isinstance(site_id, bool) or not isinstance(site_id, int | np.integer):
        raise ConfigError(f"`site_id` must be an integer (got {site_id!r}).")
    if not 0 <= site_id <= _MAX_SITE_ID:
        raise ConfigError(f"`site_id` must lie in [0, {_MAX_SITE_ID}] (got {site_id}).")
    return int(site_id)


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _key_frame(kind: int, key_id: bytes, params: CKKSParams, context_bytes: bytes) -> bytes:
    sizes = params.coeff_mod_bit_sizes
    parts = [
        _PREFIX.pack(_MAGIC, _VERSION, kind, key_id),
        _KEY_BODY.pack(params.poly_modulus_degree, len(sizes)),
        bytes(sizes),
        _KEY_TAIL.pack(params.global_scale_bits, _ENCRYPTION_TYPES.index(params.encryption)),
        _U64.pack(len(context_bytes)),
        context_bytes,
    ]
    return _finish_frame(parts)


@dataclass(frozen=True)
class _KeyMaterial:
    kind: int
    key_id: bytes
    params: CKKSParams
    context: tenseal.Context


def _load_key(frame: bytes | bytearray | memoryview, *, kinds: Collection[int]) -> _KeyMaterial:
    kind, key_id, r = _open_frame(frame, kinds=kinds, what="CKKS key context")
    degree, n_primes = r.unpack(_KEY_BODY)
    sizes = tuple(r.take(n_primes))
    scale_bits, enc = r.unpack(_KEY_TAIL)
    if enc >= len(_ENCRYPTION_TYPES):
        raise IntegrityError(f"CKKS key context names unknown encryption type {enc}.")
    try:
        params = CKKSParams(degree, sizes, scale_bits, _ENCRYPTION_TYPES[enc])
    except ConfigError as exc:
        raise IntegrityError(f"CKKS key context carries invalid parameters: {exc}") from exc
    (length,) = r.unpack(_U64)
    blob = bytes(r.take(length))
    r.finish()
    ts = _tenseal()
    try:
        ctx = ts.context_from(blob, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise IntegrityError(f"TenSEAL could not load the CKKS key context: {exc}") from exc
    if ctx.is_private() != (kind == _KIND_SECRET_CONTEXT):
        raise IntegrityError(
            "CKKS key context is labelled "
            f"{_KIND_NAMES[kind]!r} but its TenSEAL context is_private() is {ctx.is_private()}."
        )
    ctx.global_scale = 2.0**params.global_scale_bits
    return _KeyMaterial(kind, key_id, params, ctx)


@dataclass(frozen=True)
class CKKSKeySet:
    """The output of key set-up: one secret and one public context, framed as bytes.

    Attributes:
        params: The CKKS parameters of both contexts.
        key_id: 16 random bytes naming this key set; every frame carries it, so ciphertexts
            under different keys are never added (TenSEAL would silently add them to garbage).
        secret_context: Framed TenSEAL context *with* the secret key; for the sites or the key
            holder only. Python cannot zero ``bytes``: drop references when done.
        public_context: Framed TenSEAL context without the secret key (nor Galois or
            relinearization keys, which addition does not need); for the server.

    """

    params: CKKSParams
    key_id: bytes
    secret_context: bytes = field(repr=False)
    public_context: bytes = field(repr=False)


def generate_keys(*, params: CKKSParams | None = None) -> CKKSKeySet:
    """Key set-up: create a fresh CKKS key pair, run by the sites or their trusted key holder.

    Args:
        params: CKKS parameters; the defaults if None.

    Returns:
        The key set. Give ``public_context`` to the server, keep ``secret_context`` private.

    Raises:
        ConfigError: TenSEAL refused the parameters.
        OptionalDependencyError: TenSEAL is not installed.

    """
    params = CKKSParams() if params is None else params
    ctx = params._tenseal_context()
    key_id = secrets.token_bytes(_KEY_ID_BYTES)
    asymmetric = params.encryption == "asymmetric"
    secret_blob = ctx.serialize(
        save_public_key=asymmetric,
        save_secret_key=True,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    public_blob = ctx.serialize(
        save_public_key=asymmetric,
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return CKKSKeySet(
        params=params,
        key_id=key_id,
        secret_context=_key_frame(_KIND_SECRET_CONTEXT, key_id, params, secret_blob),
        public_context=_key_frame(_KIND_PUBLIC_CONTEXT, key_id, params, public_blob),
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite or follow a planted file/symlink; fchmod: umask must not widen or
    # narrow the intended mode.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise ConfigError(f"key file {path} already exists; refusing to overwrite it.") from exc
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_key_files(keys: CKKSKeySet, *, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the secret context (mode 0600) and the public context (0644) as new files.

    Files are named ``ckks-<key id>.secret`` and ``ckks-<key id>.public`` and are created with
    ``O_EXCL``, so an existing file (or a planted symlink) is never overwritten.

    Args:
        keys: The key set from :func:`generate_keys`.
        directory: An existing directory.

    Returns:
        ``(secret_path, public_path)``.

    Raises:
        ConfigError: The directory is missing or a key file already exists.

    """
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"key directory {root} does not exist or is not a directory.")
    stem = f"ckks-{keys.key_id.hex()}"
    secret_path, public_path = root / f"{stem}.secret", root / f"{stem}.public"
    _write_new_file(secret_path, keys.secret_context, 0o600)
    _write_new_file(public_path, keys.public_context, 0o644)
    return secret_path, public_path


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file written by :func:`write_key_files`, checking its frame and permissions.

    Args:
        path: A ``.secret`` or ``.public`` key file.

    Returns:
        The framed context, to pass to :class:`CKKSEncryptor`, :class:`CKKSAggregator` or
        :class:`CKKSDecryptor`.

    Raises:
        ConfigError: The file is missing, or it holds a secret key and is readable or writable by
            group or others (like ssh, refuse rather than warn).
        IntegrityError: The file is not an intact CKKS key frame.

    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {p}: {exc.strerror or exc}.") from exc
    kind, _, _ = _open_frame(
        data, kinds=(_KIND_SECRET_CONTEXT, _KIND_PUBLIC_CONTEXT), what=f"key file {p}"
    )
    if kind == _KIND_SECRET_CONTEXT and os.name == "posix":
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"secret key file {p} is accessible by group or others (mode {mode:04o}); "
                f"run `chmod 600 {p}`."
            )
    return data


# --------------------------------------------------------------------------------------------
# Update and aggregate frames
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameHeader:
    """The clear-text header of an update or aggregate frame (no ciphertext is decoded).

    Attributes:
        kind: ``"update"`` or ``"aggregate"``.
        key_id: The key set the ciphertexts are under.
        round_index: The round the frame belongs to.
        sender: The site id, or None for an aggregate.
        n_values: Encrypted coordinates carried.
        layout_id: Fingerprint of the vector length and coordinate subset.
        slots: Values per ciphertext.
        n_chunks: Number of ciphertexts.
        weighted: Whether the server multiplied by plaintext weights.
        contributors: For an aggregate, the sites summed (as claimed by the server).
        n_bytes: Size of the whole frame.

    """

    kind: str
    key_id: bytes
    round_index: int
    sender: int | None
    n_values: int
    layout_id: bytes
    slots: int
    n_chunks: int
    weighted: bool
    contributors: tuple[int, ...]
    n_bytes: int


def _encode_vector_frame(
    *,
    kind: int,
    key_id: bytes,
    round_index: int,
    sender: int,
    n_values: int,
    layout_id: bytes,
    slots: int,
    weighted: bool,
    contributors: Sequence[int],
    chunks: Sequence[bytes],
) -> bytes:
    parts = [
        _PREFIX.pack(_MAGIC, _VERSION, kind, key_id),
        _VECTOR_BODY.pack(
            round_index, sender, n_values, layout_id, slots, len(chunks), int(weighted)
        ),
        _U32.pack(len(contributors)),
        b"".join(_U32.pack(c) for c in contributors),
    ]
    for blob in chunks:
        parts.append(_U64.pack(len(blob)))
        parts.append(blob)
    return _finish_frame(parts)


def _decode_vector_frame(
    frame: bytes | bytearray | memoryview, *, kinds: Collection[int], what: str
) -> tuple[FrameHeader, list[memoryview]]:
    kind, key_id, r = _open_frame(frame, kinds=kinds, what=what)
    round_index, sender, n_values, layout, slots, n_chunks, weighted = r.unpack(_VECTOR_BODY)
    (n_contrib,) = r.unpack(_U32)
    contributors = tuple(_U32.unpack(r.take(4))[0] for _ in range(n_contrib))
    if slots == 0 or n_values == 0 or n_chunks != -(-n_values // slots):
        raise IntegrityError(
            f"{what} is inconsistent: {n_values} values in {n_chunks} chunks of {slots} slots."
        )
    chunks = []
    for _ in range(n_chunks):
        (length,) = r.unpack(_U64)
        chunks.append(r.take(length))
    r.finish()
    header = FrameHeader(
        kind="update" if kind == _KIND_UPDATE else "aggregate",
        key_id=key_id,
        round_index=round_index,
        sender=None if sender == _AGGREGATOR_ID else sender,
        n_values=n_values,
        layout_id=bytes(layout),
        slots=slots,
        n_chunks=n_chunks,
        weighted=bool(weighted),
        contributors=contributors,
        n_bytes=len(memoryview(frame).cast("B")),
    )
    return header, chunks


def read_frame_header(frame: bytes | bytearray | memoryview) -> FrameHeader:
    """Check an update or aggregate frame's integrity and return its clear-text header.

    Raises:
        IntegrityError: The frame is truncated, tampered with, or malformed.

    """
    header, _ = _decode_vector_frame(
        frame, kinds=(_KIND_UPDATE, _KIND_AGGREGATE), what="CKKS frame"
    )
    return header


def _chunk_sizes(n_values: int, slots: int) -> list[tuple[int, int]]:
    return [(s, min(s + slots, n_values)) for s in range(0, n_values, slots)]


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
        key = _load_key(context, kinds=(_KIND_SECRET_CONTEXT, _KIND_PUBLIC_CONTEXT))
        if key.params.encryption == "symmetric" and key.kind != _KIND_SECRET_CONTEXT:
            raise ProtocolError(
                "symmetric CKKS encryption needs the secret context; the public context can "
                "only add ciphertexts."
            )
        self._key = key
        ts = _tenseal()
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
        sender = _check_site_id(site_id)
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
        for start, end in _chunk_sizes(selected.shape[0], slots):
            chunks.append(self._encrypt_list(selected[start:end].tolist()).serialize())
        return _encode_vector_frame(
            kind=_KIND_UPDATE,
            key_id=self.key_id,
            round_index=round_index,
            sender=sender,
            n_values=selected.shape[0],
            layout_id=_layout_id(values.shape[0], idx),
            slots=slots,
            weighted=False,
            contributors=(sender,),
            chunks=chunks,
        )


def select_coordinates(values: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
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
        kinds = (_KIND_SECRET_CONTEXT, _KIND_PUBLIC_CONTEXT)
        key = _load_key(public_context, kinds=kinds)
        if key.kind == _KIND_SECRET_CONTEXT or key.context.is_private():
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
        self._ts = _tenseal()

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
        header, chunks = _decode_vector_frame(frame, kinds=(_KIND_UPDATE,), what="CKKS update")
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
            zip(loaded, _chunk_sizes(header.n_values, header.slots), strict=True)
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
        return _encode_vector_frame(
            kind=_KIND_AGGREGATE,
            key_id=self._key.key_id,
            round_index=self._round,
            sender=_AGGREGATOR_ID,
            n_values=self._n_values,
            layout_id=self._layout or b"",
            slots=self._key.params.slots,
            weighted=self._weighted,
            contributors=self._contributors,
            chunks=[vec.serialize() for vec in self._sum],
        )


class CKKSDecryptor:
    """The key holder's side: decrypt an aggregate (never a single site's update).

    Args:
        secret_context: The framed secret context.
        min_contributors: Refuse aggregates that claim fewer summed sites than this. The claim
            is the server's, so this guards against mistakes, not a malicious server.

    Raises:
        ProtocolError: A public context was given.
        ConfigError: ``min_contributors`` below 1.

    """

    def __init__(
        self, secret_context: bytes | bytearray | memoryview, *, min_contributors: int = 1
    ) -> None:
        key = _load_key(secret_context, kinds=(_KIND_SECRET_CONTEXT, _KIND_PUBLIC_CONTEXT))
        if key.kind != _KIND_SECRET_CONTEXT:
            raise ProtocolError("decryption needs the secret context; got the public context.")
        if min_contributors < 1:
            raise ConfigError(f"`min_contributors` must be at least 1 (got {min_contributors}).")
        self._key = key
        self._min = min_contributors
        self._ts = _tenseal()

    def decrypt(
        self, frame: bytes | bytearray | memoryview, *, round_index: int | None = None
    ) -> np.ndarray:
        """Decrypt an aggregate frame to the float64 sum over its encrypted coordinates.

        Args:
            frame: The server's aggregate frame.
            round_index: If given, the round the aggregate must belong to.

        Returns:
            The sum, one entry per encrypted coordinate (subset order).

        Raises:
            IntegrityError: The frame is damaged.
            ProtocolError: A site update instead of an aggregate, another key set or round, or
                too few contributors.

        """
        header, chunks = _decode_vector_frame(
            frame, kinds=(_KIND_AGGREGATE,), what="CKKS aggregate"
        )
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
        out = np.empty(header.n_values, dtype=np.float64)
        for i, (blob, (start, end)) in enumerate(
            zip(chunks, _chunk_sizes(header.n_values, header.slots), strict=True)
        ):
            try:
                vec = self._ts.ckks_vector_from(self._key.context, bytes(blob))
                values = vec.decrypt()
            except (ValueError, RuntimeError, TypeError) as exc:
                raise IntegrityError(
                    f"chunk {i} of the aggregate does not decrypt under this key: {exc}"
                ) from exc
            if len(values) != end - start:
                raise IntegrityError(
                    f"chunk {i} of the aggregate holds {len(values)} values, "
                    f"expected {end - start}."
                )
            out[start:end] = values
        return out


# --------------------------------------------------------------------------------------------
# In-process driver and reference timing
# --------------------------------------------------------------------------------------------


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


def raw_tenseal_reference(
    vector: np.ndarray,
    *,
    n_clients: int,
    params: CKKSParams | None = None,
    include_serialization: bool = False,
) -> float:
    """Time plain TenSEAL on the work :func:`he_sum` does, as the baseline for benchmarks.

    Each of ``n_clients`` clients encrypts ``vector`` chunk by chunk with the public
    ``ts.ckks_vector`` (same parameters and encryption type), the chunks are added across
    clients, and the sums decrypted. Key generation is not timed.

    Args:
        vector: Flat float64 vector every client encrypts.
        n_clients: Number of clients.
        params: CKKS parameters; defaults if None.
        include_serialization: Also serialize each client's ciphertexts, load them in a public
            context for the additions, and serialize/load the sum for decryption, i.e. plain
            TenSEAL with the same transport steps but none of this module's framing or checks.

    Returns:
        Wall-clock seconds.

    """
    if n_clients < 1:
        raise ConfigError(f"`n_clients` must be at least 1 (got {n_clients}).")
    params = CKKSParams() if params is None else params
    values = as_vector(vector, "`vector`")
    ts = _tenseal()
    ctx = params._tenseal_context()
    public = None
    if include_serialization:
        public = ts.context_from(
            ctx.serialize(
                save_public_key=params.encryption == "asymmetric",
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            ),
            n_threads=1,
        )
    bounds = _chunk_sizes(values.shape[0], params.slots)
    start = time.perf_counter()
    sums: list[Any] = [None] * len(bounds)
    for _ in range(n_clients):
        for i, (a, b) in enumerate(bounds):
            vec = ts.ckks_vector(ctx, values[a:b])
            if public is not None:
                vec = ts.ckks_vector_from(public, vec.serialize())
            if sums[i] is None:
                sums[i] = vec
            else:
                sums[i].add_(vec)
    out = np.empty(values.shape[0], dtype=np.float64)
    for (a, b), vec in zip(bounds, sums, strict=True):
        if public is not None:
            vec = ts.ckks_vector_from(ctx, vec.serialize())
        out[a:b] = vec.decrypt()
    return time.perf_counter() - start


def __getattr__(name: str) -> Any:
    """``he_sum`` moved to :mod:`securefed.protocol.harness`; the old path still works.

    It runs the CKKS mode over an in-process link, so it lives above this layer; resolving it
    on first access keeps ``securefed.crypto`` free of any import of ``securefed.protocol``.
    """
    if name == "he_sum":
        from securefed.protocol.harness import he_sum

        return he_sum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
