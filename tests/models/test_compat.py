"""The out-of-place MONAI blocks compute the same function, with the same weights, as MONAI's."""

import copy

import pytest
import torch
from monai.networks.blocks import UnetResBlock
from monai.networks.nets.resnet import ResNetBlock
from opacus import GradSampleModule

from securefed.models.compat import make_hook_safe


def _downsample(spatial_dims):
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    return conv(4, 8, kernel_size=1, stride=2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "make",
    [
        lambda d: ResNetBlock(4, 4, spatial_dims=d, norm=("group", {"num_groups": 2})),
        lambda d: ResNetBlock(
            4,
            8,
            spatial_dims=d,
            stride=2,
            downsample=_downsample(d),
            norm=("group", {"num_groups": 2}),
        ),
        lambda d: UnetResBlock(
            d, 4, 4, kernel_size=3, stride=1, norm_name=("group", {"num_groups": 2})
        ),
        lambda d: UnetResBlock(
            d, 4, 8, kernel_size=3, stride=2, norm_name=("group", {"num_groups": 2})
        ),
    ],
    ids=["resnet", "resnet-down", "unetres", "unetres-down"],
)
def test_swapped_block_matches_monai_and_survives_opacus_hooks(make, spatial_dims):
    # Prepare
    torch.manual_seed(0)
    original = make(spatial_dims)
    swapped = copy.deepcopy(original)
    x = torch.randn(2, 4, *(8,) * spatial_dims)
    expected = original(x.clone())

    # Execute
    make_hook_safe(swapped)
    got = swapped(x)
    gsm = GradSampleModule(swapped)
    gsm(x).sum().backward()

    # Assert
    assert type(swapped) is not type(original)
    assert swapped.state_dict().keys() == original.state_dict().keys()
    torch.testing.assert_close(got, expected)
    assert all(p.grad_sample is not None for p in swapped.parameters())


def test_in_place_activations_are_turned_off():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(inplace=True))
    make_hook_safe(model)
    assert model[1].inplace is False
