"""Opacus compatibility fixes that ``ModuleValidator.fix`` does not make: in-place operations."""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetResBlock
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

__all__ = ["OutOfPlaceResNetBlock", "OutOfPlaceUnetResBlock", "make_hook_safe"]

# Why any of this: Opacus computes per-sample gradients with full backward hooks, which
# wrap every trainable layer's output in a view created by a custom autograd Function.
# Autograd forbids modifying such a view in place, so a ``ReLU(inplace=True)`` or an
# ``out += residual`` right after a hooked layer fails at the first DP step. MONAI's
# DenseNet, ResNet and UnetResBlock all do one or the other. The out-of-place versions
# below compute the same function with the same parameter names, so weights (and
# pretrained files) are interchangeable with the MONAI originals.


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


_SWAPS: dict[type, type] = {
    ResNetBlock: OutOfPlaceResNetBlock,
    UnetResBlock: OutOfPlaceUnetResBlock,
}


def make_hook_safe(module: nn.Module) -> None:
    """Turn off in-place activations and swap in-place MONAI blocks for out-of-place ones.

    Works in place on ``module``; parameter names and values are unchanged.
    """
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
