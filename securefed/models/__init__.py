"""Model registry: every model is built, then made Opacus-compatible, in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from torch import nn

from securefed.config import AUTO_RULE
from securefed.errors import ConfigError
from securefed.plugins import import_callable

__all__ = [
    "TASKS",
    "FUSIONS",
    "ModelSpec",
    "BuiltModel",
    "AUTO",
    "auto_model",
    "available_models",
    "models_for_task",
    "build_model",
    "register_model",
    "resolve_model",
]

TASKS = ("classification", "segmentation")
#: ``--model auto``: the registered model is picked from the data by :func:`auto_model`.
AUTO = "auto"
#: Largest image side (2D) the default ``cnn`` is picked for (without DP, or under rules 1-2);
#: above it, ``resnet-small``.
AUTO_CNN_MAX_SIDE = 64
FUSIONS = ("early", "late")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{name}` must be a positive integer (got {value!r}).")


@dataclass(frozen=True)
class ModelSpec:
    """What a model factory needs to know about the data.

    Attributes:
        in_channels: Input channels; with several modalities (T1, T1ce, T2, FLAIR), one each.
        num_classes: Classes; for segmentation, output channels (background included).
        spatial_dims: 2 for images, 3 for volumes.
        task: ``"classification"`` (one label per image) or ``"segmentation"`` (per voxel).
        image_shape: Spatial shape (H, W) or (D, H, W). Optional, except for models whose
            parameters depend on it (``vit-unet``); when given, models check their minimum size.
        fusion: ``"early"`` stacks modalities as channels of one network; ``"late"`` builds one
            network per modality (``in_channels`` branches of one channel) and averages logits.

    Raises:
        ConfigError: A field is out of range.

    """

    in_channels: int
    num_classes: int
    spatial_dims: int = 2
    task: str = "classification"
    image_shape: tuple[int, ...] | None = None
    fusion: str = "early"

    def __post_init__(self) -> None:
        _positive_int("in_channels", self.in_channels)
        _positive_int("num_classes", self.num_classes)
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"`spatial_dims` must be 2 or 3 (got {self.spatial_dims!r}).")
        if self.task not in TASKS:
            raise ConfigError(f"`task` must be one of {', '.join(TASKS)} (got {self.task!r}).")
        if self.fusion not in FUSIONS:
            raise ConfigError(
                f"`fusion` must be one of {', '.join(FUSIONS)} (got {self.fusion!r})."
            )
        if self.fusion == "late" and self.in_channels < 2:
            raise ConfigError(
                f"late fusion needs at least 2 modalities (got in_channels={self.in_channels})."
            )
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) != self.spatial_dims:
                raise ConfigError(
                    f"`image_shape` must have {self.spatial_dims} sides for "
                    f"spatial_dims={self.spatial_dims} (got {shape})."
                )
            for side in shape:
                _positive_int("image_shape", side)
            object.__setattr__(self, "image_shape", shape)


@dataclass(frozen=True)
class BuiltModel:
    """A DP-compatible model and the changes Opacus' validator made to get there.

    Attributes:
        module: The model, ready for Opacus.
        name: The registered name built (what ``auto`` resolved to).
        changes: ``"name: OldType -> NewType"`` for each layer Opacus' fixer replaced.
        num_parameters: Trainable parameters.
        head_prefixes: Module-name prefixes (as in ``named_parameters()``) of the task head
            (final classifier or final 1x1 conv; for late fusion, every branch's). Everything
            else is the backbone, for :func:`securefed.models.transfer.freeze` and
            :func:`securefed.models.transfer.load_pretrained`.
        last_block_prefixes: Module-name prefixes of the backbone's last block (for late
            fusion, every branch's), which ``--freeze backbone-except-last`` leaves trainable
            with the head; empty when the model registers none.

    """

    module: nn.Module
    changes: tuple[str, ...]
    num_parameters: int
    head_prefixes: tuple[str, ...] = ()
    last_block_prefixes: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class _Entry:
    factory: Callable[[ModelSpec], nn.Module]
    tasks: tuple[str, ...]
    head_prefixes: tuple[str, ...]
    last_block_prefixes: tuple[str, ...] = ()


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    *,
    tasks: Iterable[str] = ("classification",),
    head_prefixes: Iterable[str] = (),
    last_block_prefixes: Iterable[str] = (),
) -> Callable:
    """Register a factory ``f(spec) -> nn.Module`` under ``name`` (a decorator).

    The factory gets a :class:`ModelSpec` (channels, classes, spatial dims, task, image
    shape) and returns a fresh, randomly initialised ``nn.Module``. Like every built-in model
    it then goes through Opacus' ``ModuleValidator`` (fixed, then validated) in
    :func:`build_model`, so a user's model cannot bypass DP-SGD's checks.

    Example::

        @securefed.register_model("tiny")
        def tiny(spec):
            inputs = spec.in_channels * math.prod(spec.image_shape)
            return nn.Sequential(nn.Flatten(), nn.Linear(inputs, spec.num_classes))

    Args:
        name: The ``--model`` name.
        tasks: Tasks the factory supports (a subset of :data:`TASKS`).
        head_prefixes: Module-name prefixes of the task head in the factory's module.
        last_block_prefixes: Module-name prefixes (after Opacus' fix) of the backbone's last
            block, the part nearest the head; optional, needed by ``--freeze
            backbone-except-last``.

    Raises:
        ConfigError: ``tasks`` is empty or names an unknown task.

    """
    tasks = tuple(tasks)
    if not tasks or any(t not in TASKS for t in tasks):
        raise ConfigError(f"`tasks` of model {name!r} must be a non-empty subset of {TASKS}.")
    head = tuple(head_prefixes)
    last = tuple(last_block_prefixes)

    def deco(fn: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        _REGISTRY[name] = _Entry(
            factory=fn, tasks=tasks, head_prefixes=head, last_block_prefixes=last
        )
        return fn

    return deco


def available_models() -> list[str]:
    """Names accepted by ``--model``."""
    return sorted(_REGISTRY)


def models_for_task(task: str) -> list[str]:
    """Names of the models that support ``task``.

    Raises:
        ConfigError: ``task`` is unknown.

    """
    if task not in TASKS:
        raise ConfigError(f"`task` must be one of {', '.join(TASKS)} (got {task!r}).")
    return sorted(n for n, e in _REGISTRY.items() if task in e.tasks)


def _check_min_side(name: str, spec: ModelSpec, minimum: int) -> None:
    if spec.image_shape is not None and min(spec.image_shape) < minimum:
        raise ConfigError(
            f"{name} needs every side of `image_shape` to be at least {minimum} "
            f"(got {spec.image_shape})."
        )


# The last conv block: features.8 (conv) and features.9 (its norm); features.10+ hold no
# parameters (tanh, pooling, flatten).
@register_model("cnn", head_prefixes=("head",), last_block_prefixes=("features.8", "features.9"))
def _cnn(spec: ModelSpec) -> nn.Module:
    from securefed.models.cnn import SmallCNN

    # Two 2x max-pools.
    _check_min_side("cnn", spec, 4)
    return SmallCNN(
        in_channels=spec.in_channels, num_classes=spec.num_classes, spatial_dims=spec.spatial_dims
    )


@register_model("resnet-small", head_prefixes=("head",), last_block_prefixes=("stages.3",))
def _resnet_small(spec: ModelSpec) -> nn.Module:
    from securefed.models.resnet_small import SmallResNet

    if spec.spatial_dims != 2:
        raise ConfigError("resnet-small is a 2D model; for volumes use cnn, resnet18 or unet.")
    return SmallResNet(in_channels=spec.in_channels, num_classes=spec.num_classes)


@register_model("scatter-linear", head_prefixes=("head",), last_block_prefixes=("norm",))
def _scatter_linear(spec: ModelSpec) -> nn.Module:
    from securefed.models.scatter import MIN_SIDE, ScatterLinear

    if spec.spatial_dims != 2:
        raise ConfigError("scatter-linear is a 2D model; for volumes use cnn or resnet18.")
    if spec.image_shape is None:
        raise ConfigError("scatter-linear needs the image size (its filters depend on it).")
    _check_min_side("scatter-linear", spec, MIN_SIDE)
    return ScatterLinear(
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_shape=(spec.image_shape[0], spec.image_shape[1]),
    )


def auto_model(
    spec: ModelSpec, *, private: bool = False, pretrained: bool = False, rule: int = AUTO_RULE
) -> str:
    """The model ``--model auto`` builds for ``spec``: a rule fixed in advance, not tuned.

    Rule 3 (today's):

    - segmentation: ``unet``;
    - classification of volumes: ``cnn``;
    - DP classification of 2D images, with no pretrained weights: ``scatter-linear``
      (fixed ScatterNet features and a linear classifier, a few thousand weights: Tramer &
      Boneh 2021 find it beats end-to-end CNNs under DP-SGD, on 28-32 px images, and more so
      the less data there is, see :mod:`securefed.models.scatter`);
    - other classification of images at most 64 px a side: ``cnn`` (full resolution through
      its first block, which small images need);
    - other classification of larger images (or of unknown size): ``resnet-small`` (a
      stride-2 stem and four halving stages: fast on CPUs, and its receptive field covers
      the image).

    Rules 2 and 1 are the rules before it, with which runs recorded then are replayed and
    resumed (``RunConfig.auto_rule``): rule 2 picked ``scatter-linear`` only above 64 px,
    rule 1 never.

    Args:
        spec: The data's shape.
        private: Whether the model is trained with DP-SGD.
        pretrained: Whether pretrained weights will be loaded (their architecture is then
            the non-private one, which ``securefed pretrain --model auto`` also picks; for a
            ``scatter-linear`` file, name it: ``--model scatter-linear``).
        rule: The rule to follow: 3, 2 or 1 (above).

    """
    if spec.task == "segmentation":
        return "unet"
    if spec.spatial_dims == 3:
        return "cnn"
    scatter = private and not pretrained and _scatter_fits(spec)
    if rule >= 3 and scatter:
        return "scatter-linear"
    if spec.image_shape is not None and max(spec.image_shape) <= AUTO_CNN_MAX_SIDE:
        return "cnn"
    if rule >= 2 and scatter:
        return "scatter-linear"
    return "resnet-small"


# The last dense block and the norm after it (a GroupNorm once Opacus has fixed the model).
@register_model(
    "densenet121",
    head_prefixes=("class_layers.out",),
    last_block_prefixes=("features.denseblock4", "features.norm5"),
)
def _densenet121(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import DenseNet121

    # Stride-2 stem, max-pool and three average-pooling transitions: below 29 pixels a side
    # the last transition sees an empty feature map (MedMNIST's 28x28 must be resized).
    _check_min_side("densenet121", spec, 29)
    return DenseNet121(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.num_classes,
    )


@register_model("resnet18", head_prefixes=("fc",), last_block_prefixes=("layer4",))
def _resnet18(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import resnet18

    return resnet18(
        spatial_dims=spec.spatial_dims,
        n_input_channels=spec.in_channels,
        num_classes=spec.num_classes,
    )


# The decoder's last (full-resolution) stage, whose output the 1x1 head reads.
@register_model(
    "unet",
    tasks=("segmentation",),
    head_prefixes=("final_conv",),
    last_block_prefixes=("upcat_1",),
)
def _unet(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import BasicUNet

    # Four 2x max-pools.
    _check_min_side("unet", spec, 16)
    # Half MONAI's default widths: DP noise grows with the parameter count (about 1.5M in 3D).
    # Nontrainable (interpolation + 1x1 conv) upsampling: Opacus 1.6 has no grad sampler for
    # ConvTranspose. GroupNorm: BatchNorm and InstanceNorm statistics are not per-sample
    # private. LeakyReLU not in place: Opacus' backward hooks wrap layer outputs.
    return BasicUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.num_classes,
        features=(16, 16, 32, 64, 128, 16),
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": False}),
        norm=("group", {"num_groups": 8}),
        upsample="nontrainable",
    )


# The decoder's last (full-resolution) stage; its upsampling holds no parameters.
@register_model(
    "vit-unet",
    tasks=("segmentation",),
    head_prefixes=("head",),
    last_block_prefixes=("decoders.3",),
)
def _vit_unet(spec: ModelSpec) -> nn.Module:
    from securefed.models.vit_unet import ViTUNet

    if spec.image_shape is None:
        raise ConfigError(
            "vit-unet needs `image_shape` (its positional embeddings are sized to the image)."
        )
    return ViTUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.num_classes,
        img_size=spec.image_shape,
    )


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_model(name: str) -> str:
    """Make sure ``name`` is registered; a ``module:function`` name is imported and registered.

    ``--model my_pkg.models:build`` imports ``my_pkg.models`` (importlib, from ``sys.path``,
    which includes the working directory when run with ``python -m``) and registers
    ``build`` under the name ``my_pkg.models:build`` for both tasks, with no head prefixes.
    Whether it returns an ``nn.Module`` is checked when it is built.

    Returns:
        ``name``, now a registered model.

    Raises:
        ConfigError: (naming ``--model``) the name is unknown, the module cannot be
            imported, or the attribute is missing or not callable.

    """
    if name in _REGISTRY or name == AUTO:
        return name
    if ":" not in name:
        raise ConfigError(
            f"--model {name!r}: unknown model; known models: {', '.join(available_models())}, "
            "or module:function"
        )
    fn = import_callable(name, flag="--model")
    register_model(name, tasks=TASKS)(fn)
    return name


def _scatter_fits(spec: ModelSpec) -> bool:
    from securefed.models.scatter import MIN_SIDE

    return spec.image_shape is not None and min(spec.image_shape) >= MIN_SIDE


def build_model(
    *,
    name: str,
    spec: ModelSpec,
    private: bool = False,
    pretrained: bool = False,
    rule: int = AUTO_RULE,
) -> BuiltModel:
    """Build ``name`` for ``spec`` and make it DP-compatible with Opacus' validator.

    Every model goes through ``ModuleValidator.fix`` (BatchNorm -> GroupNorm, and whatever
    else Opacus flags) whether or not DP is on, so private and non-private runs of one
    ``--model`` train the same architecture and their figures compare (``auto`` may pick a
    different one for each: :func:`auto_model`). In-place operations, which Opacus'
    backward hooks forbid, are replaced by out-of-place ones computing the same function
    (:func:`securefed.models.compat.make_hook_safe`). With ``spec.fusion == "late"`` the model is
    a :class:`~securefed.models.fusion.LateFusion` of ``spec.in_channels`` one-channel
    branches of ``name``.

    Args:
        name: A registered model, ``auto``, or ``module:function``.
        spec: The data's shape.
        private: Whether it trains with DP-SGD (only ``auto`` looks at it).
        pretrained: Whether pretrained weights will be loaded (only ``auto`` looks at it).
        rule: Which rule ``auto`` follows (:func:`auto_model`).

    Raises:
        ConfigError: ``name`` is unknown or does not support ``spec.task``, ``spec`` does not
            fit the model (e.g. image too small), or the fixed model still fails validation.

    """
    from opacus.validators import ModuleValidator

    from securefed.models.compat import make_hook_safe

    if name == AUTO:
        name = auto_model(spec, private=private, pretrained=pretrained, rule=rule)
    if name not in _REGISTRY and ":" in name:
        resolve_model(name)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    entry = _REGISTRY[name]

    def make(s: ModelSpec) -> nn.Module:
        made = entry.factory(s)
        if not isinstance(made, nn.Module):
            raise ConfigError(
                f"--model {name!r}: the factory returned a {type(made).__name__}, "
                "not a torch.nn.Module"
            )
        return made

    if spec.task not in entry.tasks:
        raise ConfigError(
            f"model {name!r} does not support {spec.task}; models that do: "
            f"{', '.join(models_for_task(spec.task))}"
        )
    if spec.fusion == "late":
        from securefed.models.fusion import LateFusion

        branch_spec = replace(spec, in_channels=1, fusion="early")
        module: nn.Module = LateFusion([make(branch_spec) for _ in range(spec.in_channels)])
        head = tuple(
            f"branches.{i}.{p}" for i in range(spec.in_channels) for p in entry.head_prefixes
        )
        last = tuple(
            f"branches.{i}.{p}" for i in range(spec.in_channels) for p in entry.last_block_prefixes
        )
    else:
        module = make(spec)
        head = entry.head_prefixes
        last = entry.last_block_prefixes
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()):
        raise ConfigError(
            f"--model {name!r}: the model has lazy (uninitialized) parameters; size its layers "
            "from the ModelSpec (in_channels, image_shape, num_classes) instead"
        )
    before = {n: type(m).__name__ for n, m in module.named_modules()}
    fixed = ModuleValidator.fix(module)
    make_hook_safe(fixed)
    after = {n: type(m).__name__ for n, m in fixed.named_modules()}
    changes = tuple(
        f"{n}: {before[n]} -> {after[n]}" for n in before if n in after and before[n] != after[n]
    )
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ConfigError(f"model {name!r} is not DP-compatible after fixing: {errors[0]}")
    names = [n for n, _ in fixed.named_parameters()]
    for prefix in head:
        if not any(_under(n, prefix) for n in names):
            raise ConfigError(f"model {name!r}: head prefix {prefix!r} matches no parameter")
    for prefix in last:
        if not any(_under(n, prefix) for n in names):
            raise ConfigError(f"model {name!r}: last-block prefix {prefix!r} matches no parameter")
    n_params = sum(p.numel() for p in fixed.parameters() if p.requires_grad)
    return BuiltModel(
        module=fixed,
        changes=changes,
        num_parameters=n_params,
        head_prefixes=head,
        last_block_prefixes=last,
        name=name,
    )
