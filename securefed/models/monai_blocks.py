"""MONAI blocks with their in-place operations done out of place (see :mod:`.compat`).

A module of its own so that importing :mod:`securefed.models.compat` (every model build
does) does not import MONAI: only a model that holds a MONAI block needs these.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetResBlock
from monai.networks.nets.resnet import ResNetBlock

__all__ = ["SWAPS", "OutOfPlaceResNetBlock", "OutOfPlaceUnetResBlock"]


class OutOfPlaceResNetBlock(ResNetBlock):
    """MONAI's basic ResNet block with the residual addition done out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + residual)


class OutOfPlaceUnetResBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` (nnU-Net residual block) with the addition done out of place."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))
        residual = inp
        if hasattr(self, "conv3"):
            residual = self.conv3(residual)
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        return self.lrelu(out + residual)


SWAPS: dict[type, type] = {
    ResNetBlock: OutOfPlaceResNetBlock,
    UnetResBlock: OutOfPlaceUnetResBlock,
}
