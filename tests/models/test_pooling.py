"""MaxPool2x is PyTorch's window-2 max pooling, outputs and gradients, on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from securefed.models import pooling
from securefed.models.cnn import SmallCNN
from securefed.models.pooling import MaxPool2x


@pytest.fixture(autouse=True)
def _own_kernel_for_small_inputs(monkeypatch):
    # Inputs this small would go to PyTorch's pooling; the tests are about the module's own.
    monkeypatch.setattr(pooling, "_SMALL", 0)


def _both(x: torch.Tensor, g_seed: int = 1):
    nd = x.dim() - 2
    ref = nn.MaxPool2d(2) if nd == 2 else nn.MaxPool3d(2)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    ya, yb = ref(xa), MaxPool2x(nd)(xb)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(g_seed))
    ya.backward(g)
    yb.backward(g)
    return ya, yb, xa.grad, xb.grad


@pytest.mark.parametrize(
    "shape",
    [(4, 3, 28, 28), (2, 5, 7, 9), (3, 2, 2, 2), (2, 3, 8, 7, 9), (1, 2, 5, 4, 4)],
)
def test_equals_pytorch_pooling_with_ties_and_odd_sizes(shape):
    gen = torch.Generator().manual_seed(0)
    # Rounded values: most windows hold ties, where the gradient must go to the first
    # maximum in scan order, as PyTorch's kernel routes it.
    for x in (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen).round()):
        ya, yb, ga, gb = _both(x)
        assert torch.equal(ya, yb)
        assert torch.equal(ga, gb)


def test_saturated_tanh_ties_route_like_pytorch():
    # After tanh, large pre-activations are exactly +-1: whole windows of ties.
    x = torch.tanh(torch.randn(2, 4, 6, 6) * 50)
    assert (x.abs() == 1).float().mean() > 0.5
    ya, yb, ga, gb = _both(x)
    assert torch.equal(ya, yb) and torch.equal(ga, gb)


def test_gradcheck_on_distinct_values():
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: MaxPool2x(2)(t), (x,))


def test_no_grad_forward_matches():
    x = torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        assert torch.equal(MaxPool2x(2)(x), nn.MaxPool2d(2)(x))


def test_large_inputs_use_the_own_kernel_and_small_ones_pytorchs(monkeypatch):
    monkeypatch.setattr(pooling, "_SMALL", 1 << 15)
    calls = []
    real = pooling._pool
    monkeypatch.setattr(pooling, "_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(64, 32, 28, 28, requires_grad=True)
    assert torch.equal(MaxPool2x(2)(x), nn.MaxPool2d(2)(x))
    assert calls
    calls.clear()
    MaxPool2x(2)(torch.randn(2, 3, 8, 8))
    assert not calls


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="spatial_dims"):
        MaxPool2x(1)
    with pytest.raises(ValueError, match="4-d input"):
        MaxPool2x(2)(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="below 2"):
        MaxPool2x(2)(torch.zeros(2, 3, 1, 4))


def test_small_cnn_trains_as_with_pytorch_pooling():
    """The CNN's loss and every weight gradient equal those of the same net on nn.MaxPool2d."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=3, width=4)
    reference = SmallCNN(in_channels=1, num_classes=3, width=4)
    reference.load_state_dict(model.state_dict())
    for i, m in enumerate(reference.features):
        if isinstance(m, MaxPool2x):
            reference.features[i] = nn.MaxPool2d(2)
    assert sum(isinstance(m, MaxPool2x) for m in model.modules()) == 2
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 3, (8,))
    for net in (model, reference):
        nn.functional.cross_entropy(net(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
