"""Both per-sample weight-gradient kernels of the one-pass clipper equal autograd, per record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefed.dp.clipping import (
    _from_shifted,
    _grouped_grad_sample,
    _shifted_grad_sample,
    _shifted_ok,
)


def _per_record(conv: nn.Module, x: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        w = conv.weight.detach().clone().requires_grad_(True)
        out = conv._conv_forward(x[i : i + 1], w, None)
        (g,) = torch.autograd.grad(out, w, go[i : i + 1])
        rows.append(g)
    return torch.stack(rows)


CASES = [
    pytest.param(nn.Conv2d(3, 5, 3, padding=1), (7, 7), id="2d-3x3-pad1-7x7"),
    pytest.param(nn.Conv2d(3, 5, 3, padding=1), (2, 2), id="2d-3x3-pad1-2x2"),
    pytest.param(nn.Conv2d(3, 5, (3, 2), padding=(1, 0), dilation=(2, 1)), (9, 6), id="2d-dilated"),
    pytest.param(nn.Conv2d(4, 6, 1), (5, 5), id="2d-1x1"),
    pytest.param(nn.Conv3d(2, 3, 3, padding=1), (4, 5, 3), id="3d-3x3x3"),
    pytest.param(nn.Conv1d(2, 3, 5, padding=2), (11,), id="1d-k5"),
]


@pytest.mark.parametrize(("conv", "spatial"), CASES)
def test_grouped_and_shifted_per_sample_gradients_equal_autograd(conv, spatial):
    torch.manual_seed(0)
    x = torch.randn(4, conv.in_channels, *spatial, dtype=torch.float64)
    conv = conv.double()
    go = torch.randn_like(conv(x))
    want = _per_record(conv, x, go)
    grouped = _grouped_grad_sample(conv, x, go)
    # The shifted products write (B, *kernel, Cin, Cout); the clipper's own layout map turns
    # each record's block into the weight's shape.
    shifted = torch.stack([_from_shifted(g) for g in _shifted_grad_sample(conv, x, go)])
    torch.testing.assert_close(grouped, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(shifted, want, rtol=1e-9, atol=1e-9)


def test_the_rule_takes_shifted_products_for_one_tap_kernels_and_tiny_outputs():
    def ok(conv: nn.Module, *spatial: int) -> bool:
        return _shifted_ok(conv, torch.zeros(2, conv.out_channels, *spatial))

    assert ok(nn.Conv2d(4, 4, 1), 28, 28)
    assert ok(nn.Conv3d(4, 4, 1), 8, 8, 8)
    assert ok(nn.Conv2d(4, 4, 3, padding=1), 4, 4)
    assert not ok(nn.Conv2d(4, 4, 3, padding=1), 7, 7)  # the cnn's last block: grouped
    assert not ok(nn.Conv2d(4, 4, 1, stride=2), 4, 4)
    assert not ok(nn.Conv2d(4, 4, 1, groups=2), 4, 4)


def test_group_norm_statistics_read_from_autograd_are_the_forward_pass_own():
    from securefed.dp.clipping import _saved_group_norm_stats

    torch.manual_seed(0)
    m = nn.GroupNorm(2, 6)
    x = torch.randn(3, 6, 4, 4) * 5 + 2
    stats = _saved_group_norm_stats(m(x.requires_grad_(True)))
    assert stats is not None  # the fast path is taken for the native kernel
    _, mean, rstd = torch.ops.aten.native_group_norm(x.detach(), None, None, 3, 6, 16, 2, m.eps)
    assert torch.equal(stats[0], mean) and torch.equal(stats[1], rstd)
    with torch.no_grad():
        assert _saved_group_norm_stats(m(x)) is None  # no graph: recomputed instead
