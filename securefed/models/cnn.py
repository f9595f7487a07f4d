"""A small convolutional classifier for 2D or 3D images, sized for DP-SGD on CPUs."""

from __future__ import annotations

from torch import nn

from securefed.models.pooling import MaxPool2x

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; works for any input size >= 8 pixels a side.

    DP-SGD favours small models (noise grows with the parameter count, Tramer & Boneh 2021,
    "Differentially Private Learning Needs Better Features"), so this stays near 60k weights.
    It is written with BatchNorm, the usual choice, and made DP-compatible by Opacus'
    ``ModuleValidator.fix`` like any other model (see :func:`securefed.models.build_model`).

    Args:
        in_channels: Image channels.
        num_classes: Output classes.
        spatial_dims: 2 for images, 3 for volumes.
        width: Channels of the first block; later blocks double it once.

    """

    def __init__(
        self, *, in_channels: int, num_classes: int, spatial_dims: int = 2, width: int = 32
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        gap = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
        widths = (width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [conv(prev, w, kernel_size=3, padding=1), norm(w), nn.Tanh()]
            if i < len(widths) - 1:
                # nn.MaxPool{2,3}d(2)'s result, without its slow CPU kernel.
                layers.append(MaxPool2x(spatial_dims))
            prev = w
        layers += [gap(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):  # noqa: D102
        return self.head(self.features(x))
