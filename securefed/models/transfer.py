"""Transfer learning: freeze a backbone, load pretrained weights, save safetensors (no pickle)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from securefed.errors import ConfigError, DataError
from securefed.models.weights import CONVENTIONS, map_keys, read_weight_file

__all__ = ["FREEZE_KEYWORDS", "PretrainedLoad", "freeze", "load_pretrained", "save_weights"]

#: The ``--freeze`` keywords; anything else is a list of module prefixes.
FREEZE_KEYWORDS = ("none", "backbone", "backbone-except-last")


def _inner(module: nn.Module) -> nn.Module:
    # An Opacus GradSampleModule prefixes every name with "_module."; head prefixes and
    # weight files use the plain model's names.
    from opacus.grad_sample.gsm_base import AbstractGradSampleModule

    return module._module if isinstance(module, AbstractGradSampleModule) else module


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _under_any(params: Mapping[str, object], prefix: str) -> bool:
    return any(_under(n, (prefix,)) for n in params)


def _check_prefixes(params: Mapping[str, object], prefixes: Sequence[str], what: str) -> None:
    for prefix in prefixes:
        if not _under_any(params, prefix):
            raise ConfigError(f"{what} {prefix!r} matches no parameter of the model.")


def freeze(
    module: nn.Module,
    *,
    spec: str,
    head_prefixes: Sequence[str],
    last_block_prefixes: Sequence[str] = (),
) -> tuple[str, ...]:
    """Freeze part of ``module`` (``requires_grad = False``) for transfer learning.

    Call it before ``PrivacyEngine.make_private``: frozen parameters get no per-sample
    gradient, no clipping share and no noise, so the DP noise is spread over the trainable
    parameters only. Nothing is changed when an error is raised.

    Args:
        module: The model (an Opacus ``GradSampleModule`` is unwrapped).
        spec: ``"none"``; ``"backbone"`` (every parameter not under a head prefix);
            ``"backbone-except-last"`` (every parameter under neither a head prefix nor a
            last-block prefix: the head and the backbone's last block train); or a
            comma-separated list of module-name prefixes, e.g. ``"features.conv0,features.norm0"``.
        head_prefixes: The model's head (:attr:`securefed.models.BuiltModel.head_prefixes`).
        last_block_prefixes: The backbone's last block
            (:attr:`securefed.models.BuiltModel.last_block_prefixes`).

    Returns:
        The names of the parameters frozen, sorted.

    Raises:
        ConfigError: ``spec`` is empty, a prefix matches no parameter, the model has no last
            block for ``"backbone-except-last"``, or nothing would remain trainable.

    """
    module = _inner(module)
    params = dict(module.named_parameters())
    spec = spec.strip()
    if spec == "none":
        return ()
    if spec == "backbone":
        _check_prefixes(params, head_prefixes, "head prefix")
        frozen = sorted(n for n in params if not _under(n, head_prefixes))
    elif spec == "backbone-except-last":
        if not last_block_prefixes:
            raise ConfigError(
                "`freeze` 'backbone-except-last' needs the model's last block, and this model "
                "registers none (register_model(last_block_prefixes=...)); use 'backbone' or "
                "module prefixes."
            )
        _check_prefixes(params, head_prefixes, "head prefix")
        _check_prefixes(params, last_block_prefixes, "last-block prefix")
        keep = (*head_prefixes, *last_block_prefixes)
        frozen = sorted(n for n in params if not _under(n, keep))
    else:
        prefixes = [p.strip() for p in spec.split(",") if p.strip()]
        if not prefixes:
            raise ConfigError(
                f"`freeze` must be one of {', '.join(map(repr, FREEZE_KEYWORDS))} or "
                f"comma-separated module prefixes (got {spec!r})."
            )
        _check_prefixes(params, prefixes, "`freeze` prefix")
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
        loaded: Model state-dict keys set from the file, sorted (``adapted`` included).
        reinitialised: Head keys left at the module's values (fresh initialisation from
            :func:`securefed.models.build_model`) because the file's shape differs (e.g.
            another number of classes) or the file has no head; sorted.
        metadata: The safetensors header's ``__metadata__`` (string to string); empty for a
            torch checkpoint.
        sha256: SHA-256 of the file's bytes, hex; the bytes hashed are the bytes parsed.
        convention: The file's key naming (:data:`securefed.models.weights.CONVENTIONS`).
        file_format: ``"safetensors"`` or ``"torch"`` (read with ``weights_only=True``).
        renamed: File key to model key, where the name changed (e.g. torchvision's
            ``classifier.weight`` to ``class_layers.out.weight``).
        dropped: File keys not used: BatchNorm running statistics and batch counters, which
            the model's GroupNorm layers do not have; sorted.
        adapted: Model keys (the input convolution) whose input channels were adapted from
            the file's, e.g. RGB weights summed for a grayscale model; sorted.
        zeroed: Backbone biases the file's architecture lacks (torchvision's ResNet
            downsample convolutions have none, MONAI's have one), set to zero so the layer
            computes what it computed in the file's network; sorted.

    """

    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]
    metadata: dict[str, str]
    sha256: str
    convention: str = "securefed"
    file_format: str = "safetensors"
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()
    zeroed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if set(self.loaded) & set(self.reinitialised):
            raise ConfigError("`loaded` and `reinitialised` must be disjoint.")
        if set(self.zeroed) & (set(self.loaded) | set(self.reinitialised)):
            raise ConfigError("`zeroed` must be disjoint from `loaded` and `reinitialised`.")
        if not set(self.adapted) <= set(self.loaded):
            raise ConfigError("`adapted` must be a subset of `loaded`.")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(f"`sha256` must be 64 lowercase hex digits (got {self.sha256!r}).")
        if self.convention not in CONVENTIONS:
            raise ConfigError(
                f"`convention` must be one of {', '.join(CONVENTIONS)} (got {self.convention!r})."
            )
        if self.file_format not in ("safetensors", "torch"):
            raise ConfigError(
                f"`file_format` must be 'safetensors' or 'torch' (got {self.file_format!r})."
            )


def _input_conv(module: nn.Module) -> str | None:
    """The state-dict key of the first convolution's weight: the layer that sees the image."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.conv._ConvNd):
            return f"{name}.weight" if name else "weight"
    return None


def _adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    # Sum over the file's input channels, shared equally by the model's: an input whose
    # `channels` channels all equal a gray image g then gives exactly the response the file's
    # network gives to g replicated on all of its channels. For one channel this is the sum
    # of the RGB filters (gray replicated to RGB); for C channels it is the mean filter
    # scaled by C_file / C (timm's `adapt_input_conv` repeats the RGB filters instead, which
    # only keeps this property when C is a multiple of 3).
    summed = weight.sum(dim=1, keepdim=True) / channels
    return summed.repeat(1, channels, *([1] * (weight.dim() - 2))).contiguous()


def _is_conv_bias(module: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    if leaf != "bias":
        return False
    try:
        sub = module.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(sub, nn.modules.conv._ConvNd)


def load_pretrained(
    module: nn.Module, *, path: str | os.PathLike[str], head_prefixes: Sequence[str]
) -> PretrainedLoad:
    """Load backbone (and, where shapes match, head) weights from a weight file.

    The file is safetensors or a torch checkpoint read with ``torch.load(weights_only=True)``
    (:func:`securefed.models.weights.read_weight_file`); a pickle that needs anything but
    tensors is refused unexecuted. Its keys may follow securefed's own names, MONAI's or
    torchvision's/timm's (:func:`securefed.models.weights.map_keys`):

    - securefed's files must match exactly: same keys and shapes (dtypes are cast).
    - Foreign files are renamed to our keys. Their BatchNorm weight and bias become the
      GroupNorm affine weight and bias; running statistics are dropped (``dropped``): the
      normalisation now uses per-sample group statistics instead of ImageNet's running
      ones, so features shift and fine-tuning the last block (``--freeze
      backbone-except-last``) helps the head adapt. An input convolution that differs only
      in input channels is adapted (``adapted``: RGB filters summed for a grayscale model,
      the same as replicating the gray channel to RGB; the summed filter shared equally
      otherwise). A convolution bias the file's network lacks is zero (``zeroed``).

    Head tensors whose shape differs from the model's, such as a classifier trained for
    another number of classes, or that the file lacks, keep the module's values: pass a
    freshly built model. Everything is checked before anything is copied, so on error the
    module is unchanged.

    Args:
        module: The model (an Opacus ``GradSampleModule`` is unwrapped).
        path: The weight file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``).
        head_prefixes: The model's head (:attr:`securefed.models.BuiltModel.head_prefixes`).

    Returns:
        Which keys were loaded, kept, dropped or adapted, the convention, the file's
        metadata and its SHA-256.

    Raises:
        DataError: The file is missing, neither format, corrupt, a refused pickle, or holds
            non-finite values.
        ConfigError: Wrong architecture: the file has a tensor the model lacks (or follows no
            known naming convention), a backbone tensor is missing, or a backbone shape
            differs (the first offending key is named).

    """
    path = Path(path)
    module = _inner(module)
    weights = read_weight_file(path)
    state = module.state_dict()
    mapping = map_keys(weights.tensors, model_keys=state)
    if mapping.unexpected:
        first, n = mapping.unexpected[0], len(mapping.unexpected)
        # No key mapping onto the model at all means the names themselves are foreign.
        unknown = (
            "; no key fits the model, so its naming is none of "
            f"{', '.join(CONVENTIONS)} for this architecture"
            if not mapping.tensors
            else ""
        )
        raise ConfigError(
            f"{path} does not fit the model: it has tensor {first!r} that the model lacks "
            f"({n} unexpected in all{unknown})."
        )
    source = {new: old for old, new in mapping.renamed.items()}
    foreign = mapping.convention != "securefed"
    stem = _input_conv(module) if foreign else None
    merged: dict[str, torch.Tensor] = {}
    loaded: list[str] = []
    reinitialised: list[str] = []
    adapted: list[str] = []
    zeroed: list[str] = []
    for key, current in state.items():
        is_head = _under(key, head_prefixes)
        if key not in mapping.tensors:
            if is_head:
                reinitialised.append(key)
                merged[key] = current
                continue
            weight = key.rpartition(".")[0] + ".weight"
            if foreign and weight in mapping.tensors and _is_conv_bias(module, key):
                zeroed.append(key)
                merged[key] = torch.zeros_like(current)
                continue
            raise ConfigError(
                f"{path} does not fit the model: backbone tensor {key!r} "
                f"(shape {tuple(current.shape)}) is missing from the file."
            )
        got = mapping.tensors[key]
        if got.shape != current.shape:
            if (
                key == stem
                and got.dim() == current.dim()
                and got.shape[0] == current.shape[0]
                and got.shape[2:] == current.shape[2:]
            ):
                merged[key] = _adapt_input_channels(got, current.shape[1])
                loaded.append(key)
                adapted.append(key)
                continue
            if not is_head:
                name = repr(key) if key not in source else f"{key!r} (file key {source[key]!r})"
                raise ConfigError(
                    f"{path} does not fit the model: backbone tensor {name} has shape "
                    f"{tuple(got.shape)} in the file but {tuple(current.shape)} in the model."
                )
            reinitialised.append(key)
            merged[key] = current
            continue
        merged[key] = got
        loaded.append(key)
    module.load_state_dict(merged, strict=True)
    convention = mapping.convention
    if convention == "monai" and zeroed:
        # Same names as MONAI's ResNet but no downsample bias: torchvision's (or timm's).
        convention = "torchvision/timm"
    return PretrainedLoad(
        loaded=tuple(sorted(loaded)),
        reinitialised=tuple(sorted(reinitialised)),
        metadata=weights.metadata,
        sha256=weights.sha256,
        convention=convention,
        file_format=weights.file_format,
        renamed=dict(mapping.renamed),
        dropped=mapping.dropped,
        adapted=tuple(sorted(adapted)),
        zeroed=tuple(sorted(zeroed)),
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
