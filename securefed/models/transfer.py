"""Transfer learning: freeze a backbone, load and save weights as safetensors (never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from securefed.errors import ConfigError, DataError

__all__ = ["PretrainedLoad", "freeze", "load_pretrained", "save_weights"]

# safetensors layout: 8-byte little-endian header length, a JSON header, then raw tensor bytes.
_HEADER_LEN = struct.Struct("<Q")
# The format's own ceiling on the header (safetensors rejects larger ones); checked before
# reading it so a hostile length cannot make us allocate or parse gigabytes.
_MAX_HEADER = 100_000_000


def _inner(module: nn.Module) -> nn.Module:
    # An Opacus GradSampleModule prefixes every name with "_module."; head prefixes and
    # weight files use the plain model's names.
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    return module._module if isinstance(module, AbstractGradSampleModule) else module


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _under_any(params: Mapping[str, object], prefix: str) -> bool:
    return any(_under(n, (prefix,)) for n in params)


def freeze(module: nn.Module, *, spec: str, head_prefixes: Sequence[str]) -> tuple[str, ...]:
    """Freeze part of ``module`` (``requires_grad = False``) for transfer learning.

    Call it before ``PrivacyEngine.make_private``: frozen parameters get no per-sample
    gradient, no clipping share and no noise, so the DP noise is spread over the trainable
    parameters only. Nothing is changed when an error is raised.

    Args:
        module: The model (an Opacus ``GradSampleModule`` is unwrapped).
        spec: ``"none"``; ``"backbone"`` (every parameter not under a head prefix); or a
            comma-separated list of module-name prefixes, e.g. ``"features.conv0,features.norm0"``.
        head_prefixes: The model's head (:attr:`securefed.models.BuiltModel.head_prefixes`).

    Returns:
        The names of the parameters frozen, sorted.

    Raises:
        ConfigError: ``spec`` is empty, a prefix matches no parameter, or nothing would
            remain trainable.

    """
    module = _inner(module)
    params = dict(module.named_parameters())
    spec = spec.strip()
    if spec == "none":
        return ()
    if spec == "backbone":
        for prefix in head_prefixes:
            if not _under_any(params, prefix):
                raise ConfigError(f"head prefix {prefix!r} matches no parameter of the model.")
        frozen = sorted(n for n in params if not _under(n, head_prefixes))
    else:
        prefixes = [p.strip() for p in spec.split(",") if p.strip()]
        if not prefixes:
            raise ConfigError(
                f"`freeze` must be 'none', 'backbone' or comma-separated module prefixes "
                f"(got {spec!r})."
            )
        for prefix in prefixes:
            if not _under_any(params, prefix):
                raise ConfigError(f"`freeze` prefix {prefix!r} matches no parameter of the model.")
        frozen = sorted(n for n in params if _under(n, prefixes))
    frozen_set = set(frozen)
    if not any(p.requires_grad for n, p in params.items() if n not in frozen_set):
        raise ConfigError(f"`freeze` {spec!r} would leave no trainable parameter.")
    for n in frozen:
        params[n].requires_grad_(False)
    return tuple(frozen)


@dataclass(frozen=True)
class PretrainedLoad:
    """What :func:`load_pretrained` did, for the run's provenance record.

    Attributes:
        loaded: State-dict keys copied from the file, sorted.
        reinitialised: Head keys left at the module's values (fresh initialisation from
            :func:`securefed.models.build_model`) because the file's shape differs (e.g.
            another number of classes) or the file has no head; sorted.
        metadata: The safetensors header's ``__metadata__`` (string to string).
        sha256: SHA-256 of the file's bytes, hex; the bytes hashed are the bytes parsed.

    """

    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]
    metadata: dict[str, str]
    sha256: str

    def __post_init__(self) -> None:
        if set(self.loaded) & set(self.reinitialised):
            raise ConfigError("`loaded` and `reinitialised` must be disjoint.")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(f"`sha256` must be 64 lowercase hex digits (got {self.sha256!r}).")


def _parse_header(data: bytes, path: Path) -> dict[str, str]:
    if len(data) < _HEADER_LEN.size:
        raise DataError(f"{path} is not a safetensors file (only {len(data)} bytes).")
    (n,) = _HEADER_LEN.unpack_from(data)
    if n > min(_MAX_HEADER, len(data) - _HEADER_LEN.size):
        raise DataError(
            f"{path} is not a safetensors file or is truncated (header length {n} exceeds "
            f"the {len(data) - _HEADER_LEN.size} bytes after it)."
        )

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # Two parsers could resolve a duplicated key differently; refuse ambiguity.
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise DataError(f"{path} has a duplicated key in its safetensors header.")
        return dict(pairs)

    try:
        header = json.loads(
            data[_HEADER_LEN.size : _HEADER_LEN.size + n].decode("utf-8"),
            object_pairs_hook=no_duplicates,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a safetensors file (header is not JSON: {exc}).") from None
    if not isinstance(header, dict):
        raise DataError(f"{path} is not a safetensors file (header is not a JSON object).")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise DataError(f"{path} has safetensors metadata that is not a string-to-string map.")
    return dict(metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"pretrained weights file {path} does not exist.") from None
    except OSError as exc:
        raise DataError(f"cannot read pretrained weights file {path}: {exc.strerror}.") from None
    digest = hashlib.sha256(data).hexdigest()
    metadata = _parse_header(data, path)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others)
        raise DataError(f"{path} is a corrupt safetensors file: {exc}.") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DataError(f"{path}: tensor {key!r} holds non-finite values (NaN or inf).")
    return tensors, metadata, digest


def load_pretrained(
    module: nn.Module, *, path: str | os.PathLike[str], head_prefixes: Sequence[str]
) -> PretrainedLoad:
    """Load backbone (and, where shapes match, head) weights from a safetensors file.

    The backbone must match exactly: same keys and shapes (dtypes are cast to the model's).
    Head tensors whose shape differs from the model's, such as a classifier trained for
    another number of classes, or that the file lacks, keep the module's values: pass a
    freshly built model. Everything is checked before anything is copied, so on error the
    module is unchanged. Only safetensors is read; a pickle (``torch.save``) is refused
    unread, because unpickling runs arbitrary code.

    Args:
        module: The model (an Opacus ``GradSampleModule`` is unwrapped).
        path: The ``.safetensors`` file.
        head_prefixes: The model's head (:attr:`securefed.models.BuiltModel.head_prefixes`).

    Returns:
        Which keys were loaded or kept, the file's metadata and its SHA-256.

    Raises:
        DataError: The file is missing, not safetensors, corrupt or holds non-finite values.
        ConfigError: Wrong architecture: a backbone tensor is missing, the file has a tensor
            the model lacks, or a backbone shape differs (the first offending key is named).

    """
    path = Path(path)
    module = _inner(module)
    tensors, metadata, digest = _read_safetensors(path)
    state = module.state_dict()
    extra = sorted(set(tensors) - set(state))
    if extra:
        raise ConfigError(
            f"{path} does not fit the model: it has tensor {extra[0]!r} that the model lacks "
            f"({len(extra)} unexpected in all)."
        )
    merged: dict[str, torch.Tensor] = {}
    loaded: list[str] = []
    reinitialised: list[str] = []
    for key, current in state.items():
        is_head = _under(key, head_prefixes)
        if key not in tensors:
            if not is_head:
                raise ConfigError(
                    f"{path} does not fit the model: backbone tensor {key!r} "
                    f"(shape {tuple(current.shape)}) is missing from the file."
                )
            reinitialised.append(key)
            merged[key] = current
            continue
        got = tensors[key]
        if got.shape != current.shape:
            if not is_head:
                raise ConfigError(
                    f"{path} does not fit the model: backbone tensor {key!r} has shape "
                    f"{tuple(got.shape)} in the file but {tuple(current.shape)} in the model."
                )
            reinitialised.append(key)
            merged[key] = current
            continue
        merged[key] = got
        loaded.append(key)
    module.load_state_dict(merged, strict=True)
    return PretrainedLoad(
        loaded=tuple(sorted(loaded)),
        reinitialised=tuple(sorted(reinitialised)),
        metadata=metadata,
        sha256=digest,
    )


def save_weights(
    module: nn.Module, *, path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> str:
    """Write ``module``'s state dict to ``path`` as safetensors, atomically.

    Tensors are copied to contiguous CPU tensors (safetensors refuses shared or strided
    storage). The file is written under a temporary name in the same directory and renamed,
    so a crash never leaves a truncated file under ``path``.

    Args:
        module: The model (an Opacus ``GradSampleModule`` is unwrapped).
        path: Destination file; its directory must exist.
        metadata: String-to-string provenance (run id, round, data set...), stored in the header.

    Returns:
        SHA-256 (hex) of the bytes written.

    Raises:
        ConfigError: ``metadata`` has a non-string key or value.
        DataError: The directory of ``path`` does not exist.

    """
    from safetensors.torch import save

    path = Path(path)
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(
                f"`metadata` must map strings to strings (got {k!r}: {type(v).__name__})."
            )
    if not path.parent.is_dir():
        raise DataError(f"cannot write {path}: directory {path.parent} does not exist.")
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in _inner(module).state_dict().items()
    }
    data = save(tensors, metadata=dict(metadata))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()
