"""Max pooling over 2-wide windows, from element-wise maxima, for CPUs.

On a CPU, PyTorch's max-pooling kernel for NCHW tensors is slow: on the quick start's CNN its
forward pass was the costliest single op of a DP-SGD run, above the convolutions. Window 2
and stride 2 need nothing more than element-wise maxima of neighbouring pairs, one spatial
dimension at a time, plus one bit per pair saying which won; the bits give the flat index of
each window's winner exactly as PyTorch's kernel records it (its first maximum in scan
order), so the backward pass is PyTorch's own ``max_pool{2,3}d_with_indices_backward``.
Outputs and gradients equal ``nn.MaxPool2d(2)`` / ``nn.MaxPool3d(2)`` exactly for finite
inputs, ties included (``tests/models/test_pooling.py``), with one difference in sign only:
a window holding both -0.0 and +0.0 gives +0.0 (``torch.maximum``) where PyTorch's gives its
first, possibly -0.0; the value and the gradient are the same. A NaN window's output is NaN
in both, but its gradient goes to another position. Odd sizes are cropped as the floor mode
does. Small inputs and other devices than the CPU go to PyTorch's pooling.

    python benchmarks/dp_step.py --batches 64 --modes plain,plain-torchpool,bk,bk-torchpool
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxPool2x"]

# Below this many elements PyTorch's kernel wins: its fixed cost is lower than a few ops'.
_SMALL = 1 << 15


def _pool(x: torch.Tensor, nd: int, want_index: bool):
    """The window maxima of ``x`` and, if wanted, the flat index of each window's winner.

    One spatial dimension at a time, the innermost first: split it into pairs, keep the
    larger of each pair (the later one only if strictly larger) and a bit saying which won.
    Innermost-first merges neighbouring blocks of the window's scan order, so the winner is
    the window's first maximum, as in PyTorch's kernel (which updates on ``val > maxval``).
    """
    spatial = list(x.shape[2:])
    half = [s // 2 for s in spatial]
    strides = [1] * nd
    for i in reversed(range(nd - 1)):
        strides[i] = strides[i + 1] * spatial[i + 1]
    crop = (slice(None), slice(None)) + tuple(slice(0, 2 * h) for h in half)
    cur = x[crop].contiguous()  # no copy for a contiguous input of even sizes
    bits: list[torch.Tensor] = []  # per reduced dimension: the odd position won
    for k in reversed(range(nd)):
        axis = 2 + k
        shape = list(cur.shape)
        shape[axis : axis + 1] = [half[k], 2]
        pair = cur.view(shape)
        a, b = pair.select(axis + 1, 0), pair.select(axis + 1, 1)
        if want_index:
            later = b > a
            # The bits of inner dimensions follow this dimension's winner: p1 where the later
            # half won, else p0, by boolean ops (cheaper than torch.where on this CPU).
            kept = []
            for q in bits:
                halves = q.view(shape)
                p0, p1 = halves.select(axis + 1, 0), halves.select(axis + 1, 1)
                kept.append(p0 ^ (later & (p0 ^ p1)))
            bits = [*kept, later]
        cur = torch.maximum(a, b)
    y = cur
    if not want_index:
        return y, None
    # bits[j] belongs to dimension nd - 1 - j.
    index = torch.zeros(y.shape, dtype=torch.int64, device=x.device)
    for j, bit in enumerate(bits):
        d = nd - 1 - j
        index.add_(bit.to(torch.int64), alpha=strides[d])
    for d in range(nd):
        view = [1] * nd
        view[d] = half[d]
        step = torch.arange(half[d], device=x.device, dtype=torch.int64) * (2 * strides[d])
        index.add_(step.view(view))
    return y, index


class _MaxPool2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, nd: int) -> torch.Tensor:  # noqa: D102
        y, index = _pool(x, nd, want_index=x.requires_grad)
        ctx.nd = nd
        if index is not None:
            ctx.save_for_backward(x, index)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        x, index = ctx.saved_tensors
        nd = ctx.nd
        back = (
            torch.ops.aten.max_pool2d_with_indices_backward
            if nd == 2
            else torch.ops.aten.max_pool3d_with_indices_backward
        )
        gx = back(g.contiguous(), x, [2] * nd, [2] * nd, [0] * nd, [1] * nd, False, index)
        return gx, None


class MaxPool2x(nn.Module):
    """``nn.MaxPool{2,3}d(2)`` (window 2, stride 2, floor mode), faster on CPUs.

    Args:
        spatial_dims: 2 for images, 3 for volumes.

    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected a {self.spatial_dims + 2}-d input (batch, channels, "
                f"{self.spatial_dims} spatial), got shape {tuple(x.shape)}"
            )
        if any(s < 2 for s in x.shape[2:]):
            raise ValueError(f"cannot pool a spatial size below 2: {tuple(x.shape)}")
        if x.device.type != "cpu" or x.numel() < _SMALL:  # PyTorch's is the faster there
            pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
            return pool(x, 2)
        return _MaxPool2x.apply(x, self.spatial_dims)

    def extra_repr(self) -> str:  # noqa: D102
        return "kernel_size=2, stride=2"
