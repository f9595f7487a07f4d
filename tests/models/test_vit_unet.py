"""ViT-UNet: shapes, the image-shape requirement, and no parameter left without a gradient."""

import pytest
import torch

from securefed.errors import ConfigError, DataError
from securefed.models import ModelSpec, build_model
from securefed.models.vit_unet import ViTUNet


def _spec(shape, spatial_dims=3):
    return ModelSpec(
        in_channels=4,
        num_classes=3,
        spatial_dims=spatial_dims,
        task="segmentation",
        image_shape=shape,
    )


def test_segments_a_non_cubic_volume():
    model = build_model(name="vit-unet", spec=_spec((16, 32, 48))).module

    out = model(torch.rand(1, 4, 16, 32, 48))

    assert out.shape == (1, 3, 16, 32, 48)
    assert model.embed.position_embeddings.shape == (1, 1 * 2 * 3, 128)


def test_vit_unet_needs_image_shape():
    spec = ModelSpec(in_channels=1, num_classes=2, spatial_dims=3, task="segmentation")
    with pytest.raises(ConfigError, match="vit-unet needs `image_shape`"):
        build_model(name="vit-unet", spec=spec)


def test_vit_unet_needs_image_shape_divisible_by_16():
    with pytest.raises(ConfigError, match=r"multiple of 16 .*got \(16, 24, 16\)"):
        build_model(name="vit-unet", spec=_spec((16, 24, 16)))


def test_input_of_another_shape_is_a_data_error():
    model = build_model(name="vit-unet", spec=_spec((16, 16), spatial_dims=2)).module
    with pytest.raises(DataError, match=r"built for image_shape \(16, 16\).*\(32, 32\)"):
        model(torch.rand(1, 4, 32, 32))


def test_every_parameter_is_used():
    # An unused trainable parameter gets no per-sample gradient and Opacus refuses to step
    # (MONAI's TransformerBlock creates an unused cross-attention LayerNorm).
    model = ViTUNet(spatial_dims=2, in_channels=1, out_channels=2, img_size=(16, 16), num_layers=2)

    model(torch.rand(2, 1, 16, 16)).sum().backward()

    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"feature_size": 12}, "`feature_size` must be divisible by `num_groups`"),
        ({"num_heads": 3}, "`hidden_size` must be divisible by `num_heads`"),
        ({"depth": 0}, "at least 1"),
        ({"img_size": (16, 16, 16)}, "must have 2 sides"),
    ],
)
def test_invalid_arguments_are_config_errors(kwargs, match):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "img_size": (16, 16)}
    with pytest.raises(ConfigError, match=match):
        ViTUNet(**(args | kwargs))
