"""CKKS key set-up: one secret and one public context, framed; key files written 0600."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from securefed.crypto.ckks.framing import (
    KEY_BODY,
    KEY_ID_BYTES,
    KEY_TAIL,
    KIND_NAMES,
    KIND_PUBLIC_CONTEXT,
    KIND_SECRET_CONTEXT,
    MAGIC,
    PREFIX,
    U64,
    VERSION,
    open_frame,
)
from securefed.crypto.ckks.params import ENCRYPTION_TYPES, CKKSParams, load_tenseal
from securefed.crypto.framing import seal_frame
from securefed.errors import ConfigError, IntegrityError

if TYPE_CHECKING:  # pragma: no cover - typing only; TenSEAL is imported lazily
    import tenseal

__all__ = [
    "CKKSKeySet",
    "KeyMaterial",
    "generate_keys",
    "load_key",
    "public_context_of",
    "read_key_file",
    "write_key_files",
]


def key_frame(kind: int, key_id: bytes, params: CKKSParams, context_bytes: bytes) -> bytes:
    sizes = params.coeff_mod_bit_sizes
    parts = [
        PREFIX.pack(MAGIC, VERSION, kind, key_id),
        KEY_BODY.pack(params.poly_modulus_degree, len(sizes)),
        bytes(sizes),
        KEY_TAIL.pack(params.global_scale_bits, ENCRYPTION_TYPES.index(params.encryption)),
        U64.pack(len(context_bytes)),
        context_bytes,
    ]
    return seal_frame(parts)


@dataclass(frozen=True)
class KeyMaterial:
    """A loaded key context: its frame kind, key id, parameters and TenSEAL context."""

    kind: int
    key_id: bytes
    params: CKKSParams
    context: tenseal.Context


def load_key(frame: bytes | bytearray | memoryview, *, kinds: Collection[int]) -> KeyMaterial:
    """Check a key-context frame and load its TenSEAL context.

    Raises:
        IntegrityError: The frame is damaged, or its label and its context disagree.
        ProtocolError: A frame of another kind than ``kinds``.

    """
    kind, key_id, r = open_frame(frame, kinds=kinds, what="CKKS key context")
    degree, n_primes = r.unpack(KEY_BODY)
    sizes = tuple(r.take(n_primes))
    scale_bits, enc = r.unpack(KEY_TAIL)
    if enc >= len(ENCRYPTION_TYPES):
        raise IntegrityError(f"CKKS key context names unknown encryption type {enc}.")
    try:
        params = CKKSParams(degree, sizes, scale_bits, ENCRYPTION_TYPES[enc])
    except ConfigError as exc:
        raise IntegrityError(f"CKKS key context carries invalid parameters: {exc}") from exc
    (length,) = r.unpack(U64)
    blob = bytes(r.take(length))
    r.finish()
    ts = load_tenseal()
    try:
        ctx = ts.context_from(blob, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise IntegrityError(f"TenSEAL could not load the CKKS key context: {exc}") from exc
    if ctx.is_private() != (kind == KIND_SECRET_CONTEXT):
        raise IntegrityError(
            "CKKS key context is labelled "
            f"{KIND_NAMES[kind]!r} but its TenSEAL context is_private() is {ctx.is_private()}."
        )
    ctx.global_scale = 2.0**params.global_scale_bits
    return KeyMaterial(kind, key_id, params, ctx)


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
    key_id = secrets.token_bytes(KEY_ID_BYTES)
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
        secret_context=key_frame(KIND_SECRET_CONTEXT, key_id, params, secret_blob),
        public_context=key_frame(KIND_PUBLIC_CONTEXT, key_id, params, public_blob),
    )


def public_context_of(secret_context: bytes | bytearray | memoryview) -> bytes:
    """The framed public context of a framed secret context (same key id and parameters).

    The key holder adds the contributors' ciphertexts itself before decrypting; it does so
    under the public half, like the server, so the sum never touches the secret key.

    Raises:
        IntegrityError: The frame is damaged.
        ProtocolError: It is not a secret context.

    """
    key = load_key(secret_context, kinds=(KIND_SECRET_CONTEXT,))
    blob = key.context.serialize(
        save_public_key=key.params.encryption == "asymmetric",
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return key_frame(KIND_PUBLIC_CONTEXT, key.key_id, key.params, blob)


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
    kind, _, _ = open_frame(
        data, kinds=(KIND_SECRET_CONTEXT, KIND_PUBLIC_CONTEXT), what=f"key file {p}"
    )
    if kind == KIND_SECRET_CONTEXT and os.name == "posix":
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"secret key file {p} is accessible by group or others (mode {mode:04o}); "
                f"run `chmod 600 {p}`."
            )
    return data
