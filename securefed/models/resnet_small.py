"""A small GroupNorm ResNet for 2D images above 64 pixels a side, sized for DP-SGD on CPUs."""

from __future__ import annotations

from torch import nn

__all__ = ["SmallResNet"]


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batch statistics mix records, which per-sample DP forbids.
    # Groups of 8 channels where possible (Wu & He 2018 find group size matters more than count).
    return nn.GroupNorm(max(1, channels // 8), channels)


class _Block(nn.Module):
    """A pre-activation-free basic residual block: conv-norm-act-conv-norm, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.act1 = nn.Tanh()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(cout)
            )
        self.act2 = nn.Tanh()

    def forward(self, x):  # noqa: D102
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A stride-2 stem, four residual stages that each halve the size, pooling and a head.

    Why this shape: the default :class:`~securefed.models.cnn.SmallCNN` keeps the full
    resolution through its first block, so at 128-224 px it is slow on CPUs and its receptive
    field (three 3x3 layers, two pools) covers a few percent of the image. Here the stem and
    every stage halve the size, so the work per image grows slowly with the image and the last
    stage sees the whole of a 128 px image. It stays near 0.2M weights, because DP-SGD's noise
    grows with the parameter count (Tramer & Boneh 2021), and uses GroupNorm and tempered
    (Tanh) activations, which train better than BatchNorm/ReLU under DP-SGD (Papernot et al.
    2021, "Tempered Sigmoid Activations for Deep Learning with Differential Privacy").

    Args:
        in_channels: Image channels.
        num_classes: Output classes.
        widths: Channels of the stem and of each of the four stages.

    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...] = (16, 16, 32, 64, 96),
    ) -> None:
        super().__init__()
        stem, *stages = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
            _norm(stem),
            nn.Tanh(),
        )
        blocks: list[nn.Module] = []
        prev = stem
        for w in stages:
            blocks.append(_Block(prev, w, stride=2))
            prev = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):  # noqa: D102
        return self.head(self.pool(self.stages(self.stem(x))))
