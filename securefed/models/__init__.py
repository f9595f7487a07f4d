"""Model registry: every model is built, then made Opacus-compatible, in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from securefed.errors import ConfigError

__all__ = ["ModelSpec", "BuiltModel", "available_models", "build_model", "register_model"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model factory needs to know about the data."""

    in_channels: int
    num_classes: int
    spatial_dims: int = 2


@dataclass(frozen=True)
class BuiltModel:
    """A DP-compatible model and the changes Opacus' validator made to get there."""

    module: nn.Module
    changes: tuple[str, ...]
    num_parameters: int


_REGISTRY: dict[str, Callable[[ModelSpec], nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Register a factory ``f(spec) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    """Names accepted by ``--model``."""
    return sorted(_REGISTRY)


@register_model("cnn")
def _cnn(spec: ModelSpec) -> nn.Module:
    from securefed.models.cnn import SmallCNN

    return SmallCNN(
        in_channels=spec.in_channels, num_classes=spec.num_classes, spatial_dims=spec.spatial_dims
    )


@register_model("densenet121")
def _densenet121(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.num_classes,
    )


@register_model("resnet18")
def _resnet18(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import resnet18

    return resnet18(
        spatial_dims=spec.spatial_dims,
        n_input_channels=spec.in_channels,
        num_classes=spec.num_classes,
    )


def build_model(*, name: str, spec: ModelSpec) -> BuiltModel:
    """Build ``name`` for ``spec`` and make it DP-compatible with Opacus' validator.

    Every model goes through ``ModuleValidator.fix`` (BatchNorm -> GroupNorm, and whatever
    else Opacus flags) whether or not DP is on, so private and non-private runs train the
    same architecture and their figures compare.

    Raises:
        ConfigError: ``name`` is unknown, or the fixed model still fails validation.

    """
    from opacus.validators import ModuleValidator

    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    module = _REGISTRY[name](spec)
    before = {n: type(m).__name__ for n, m in module.named_modules()}
    fixed = ModuleValidator.fix(module)
    after = {n: type(m).__name__ for n, m in fixed.named_modules()}
    changes = tuple(
        f"{n}: {before[n]} -> {after[n]}" for n in before if n in after and before[n] != after[n]
    )
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ConfigError(f"model {name!r} is not DP-compatible after fixing: {errors[0]}")
    n_params = sum(p.numel() for p in fixed.parameters() if p.requires_grad)
    return BuiltModel(module=fixed, changes=changes, num_parameters=n_params)
