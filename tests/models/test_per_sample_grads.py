"""Opacus' per-sample gradients equal per-example autograd for the less common layers we use."""

import torch

from securefed.models import ModelSpec, build_model
from securefed.models.vit_unet import ViTUNet
from tests.models.helpers import max_per_sample_error

TOL = 1e-5


def _weighted_sum(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # A random direction per output element and example: sensitive to every output value.
    return (logits * w).sum()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def test_vit_unet_per_sample_gradients_are_exact():
    # Prepare: patch embedding holding its positional-embedding parameter (Opacus' functorch
    # fallback), attention, LayerNorm, GroupNorm, interpolation + conv upsampling
    torch.manual_seed(0)
    model = ViTUNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        img_size=(8, 8, 8),
        feature_size=8,
        depth=1,
        patch_size=2,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        mlp_dim=32,
        num_groups=4,
    ).double()
    with torch.no_grad():  # move zero biases and unit norm weights off their symmetric init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 2, 8, 8, 8, dtype=torch.float64)
    w = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)

    # Execute
    err, scale, missing = max_per_sample_error(model, x, w, _weighted_sum)

    # Assert
    assert missing == []
    assert scale > 1e-3
    assert err < TOL


def test_registered_unet_per_sample_gradients_are_exact():
    # Prepare: nontrainable upsampling with its 1x1 pre-conv, GroupNorm, replicate padding
    # (2D; the 3D variants of conv, norm and interpolation are covered by the ViT-UNet above)
    torch.manual_seed(0)
    shape = (16, 16)
    spec = ModelSpec(in_channels=1, num_classes=2, task="segmentation")
    model = build_model(name="unet", spec=spec).module.double()
    x = torch.randn(2, 1, *shape, dtype=torch.float64)
    w = torch.randn(2, 2, *shape, dtype=torch.float64)

    # Execute
    err, scale, missing = max_per_sample_error(model, x, w, _weighted_sum)

    # Assert
    assert missing == []
    assert scale > 1e-3
    assert err < TOL


def test_late_fusion_per_sample_gradients_are_exact():
    # Prepare: LateFusion slices the input per branch and averages the branches
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=2, num_classes=3, fusion="late")
    model = build_model(name="cnn", spec=spec).module.double()
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 2])

    # Execute
    err, scale, missing = max_per_sample_error(model, x, y, _cross_entropy)

    # Assert
    assert missing == []
    assert scale > 1e-3
    assert err < TOL


def test_resnet_small_per_sample_gradients_are_exact():
    # Prepare: strided convs, 1x1 projection shortcuts and GroupNorm, as --model auto builds
    # them above 64 px
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=1, num_classes=3, image_shape=(80, 80))
    model = build_model(name="resnet-small", spec=spec).module.double()
    x = torch.randn(2, 1, 80, 80, dtype=torch.float64)
    y = torch.tensor([0, 2])

    # Execute
    err, scale, missing = max_per_sample_error(model, x, y, _cross_entropy)

    # Assert
    assert missing == []
    assert scale > 1e-3
    assert err < TOL
