"""Opacus compatibility fixes that ``ModuleValidator.fix`` does not make: in-place operations."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["make_hook_safe"]

# Why any of this: Opacus computes per-sample gradients with full backward hooks, which
# wrap every trainable layer's output in a view created by a custom autograd Function.
# Autograd forbids modifying such a view in place, so a ``ReLU(inplace=True)`` or an
# ``out += residual`` right after a hooked layer fails at the first DP step. MONAI's
# DenseNet, ResNet and UnetResBlock all do one or the other. The out-of-place versions in
# :mod:`securefed.models.monai_blocks` compute the same function with the same parameter
# names, so weights (and pretrained files) are interchangeable with the MONAI originals.


def make_hook_safe(module: nn.Module) -> None:
    """Turn off in-place activations and swap in-place MONAI blocks for out-of-place ones.

    Works in place on ``module``; parameter names and values are unchanged.
    """
    # A MONAI block exists only if MONAI was imported: a model without one (the CNN) never
    # pays MONAI's import (about a second, and matplotlib and scikit-learn with it).
    swaps: dict[type, type] = {}
    if "monai" in sys.modules:
        from securefed.models.monai_blocks import SWAPS as swaps
    for m in module.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
        swap = swaps.get(type(m))
        if swap is not None:
            m.__class__ = swap


def __getattr__(name: str) -> Any:
    """The out-of-place MONAI blocks, still importable from here (imports MONAI on use)."""
    if name in ("OutOfPlaceResNetBlock", "OutOfPlaceUnetResBlock"):
        from securefed.models import monai_blocks

        return getattr(monai_blocks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
