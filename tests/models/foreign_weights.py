"""State dicts with the real key names and shapes of torchvision/timm ResNet-18 and DenseNet-121.

Built by hand (random values): no download, and no torchvision or timm, whose wheels do not
install beside this torch. The layouts are torchvision's ``resnet18`` / ``resnet34`` and
``densenet121`` (timm's use the same names), including BatchNorm running statistics.
"""

from __future__ import annotations

import torch


def _bn(prefix: str, channels: int, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"] = torch.rand(channels) + 0.5
    out[f"{prefix}.bias"] = torch.randn(channels)
    out[f"{prefix}.running_mean"] = torch.randn(channels)
    out[f"{prefix}.running_var"] = torch.rand(channels) + 0.5
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(100, dtype=torch.int64)


def _conv(out_c: int, in_c: int, k: int) -> torch.Tensor:
    return torch.randn(out_c, in_c, k, k) * 0.05


def torchvision_resnet(
    *, blocks: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3, num_classes: int = 1000
) -> dict[str, torch.Tensor]:
    """torchvision's ``resnet18`` (``blocks=(3, 4, 6, 3)``: ``resnet34``) state dict."""
    torch.manual_seed(1)
    sd: dict[str, torch.Tensor] = {"conv1.weight": _conv(64, in_channels, 7)}
    _bn("bn1", 64, sd)
    prev = 64
    for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            sd[f"{p}.conv1.weight"] = _conv(width, prev if j == 0 else width, 3)
            _bn(f"{p}.bn1", width, sd)
            sd[f"{p}.conv2.weight"] = _conv(width, width, 3)
            _bn(f"{p}.bn2", width, sd)
            if j == 0 and prev != width:
                sd[f"{p}.downsample.0.weight"] = _conv(width, prev, 1)
                _bn(f"{p}.downsample.1", width, sd)
        prev = width
    sd["fc.weight"] = torch.randn(num_classes, 512) * 0.01
    sd["fc.bias"] = torch.zeros(num_classes)
    return sd


def torchvision_densenet121(
    *, old_style: bool = False, in_channels: int = 3, num_classes: int = 1000
) -> dict[str, torch.Tensor]:
    """torchvision's ``densenet121`` state dict; ``old_style``: pre-0.3 ``norm.1`` keys."""
    torch.manual_seed(2)
    growth, bottleneck = 32, 4 * 32
    sd: dict[str, torch.Tensor] = {"features.conv0.weight": _conv(64, in_channels, 7)}
    _bn("features.norm0", 64, sd)
    channels = 64
    sep = "." if old_style else ""
    for b, layers in enumerate((6, 12, 24, 16), start=1):
        for n in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{n}"
            _bn(f"{p}.norm{sep}1", channels, sd)
            sd[f"{p}.conv{sep}1.weight"] = _conv(bottleneck, channels, 1)
            _bn(f"{p}.norm{sep}2", bottleneck, sd)
            sd[f"{p}.conv{sep}2.weight"] = _conv(growth, bottleneck, 3)
            channels += growth
        if b < 4:
            _bn(f"features.transition{b}.norm", channels, sd)
            sd[f"features.transition{b}.conv.weight"] = _conv(channels // 2, channels, 1)
            channels //= 2
    _bn("features.norm5", channels, sd)
    sd["classifier.weight"] = torch.randn(num_classes, channels) * 0.01
    sd["classifier.bias"] = torch.zeros(num_classes)
    return sd
