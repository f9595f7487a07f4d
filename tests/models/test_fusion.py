"""Late fusion: one branch per modality, each sees only its own channel, logits averaged."""

import pytest
import torch

from securefed.errors import ConfigError, DataError
from securefed.models import ModelSpec, build_model
from securefed.models.fusion import LateFusion
from tests.models.helpers import dp_step, labels_for


def test_late_fusion_builds_one_single_channel_branch_per_modality():
    # Prepare
    spec = ModelSpec(in_channels=4, num_classes=3, fusion="late")

    # Execute
    built = build_model(name="cnn", spec=spec)
    out = built.module(torch.rand(2, 4, 28, 28))

    # Assert
    assert isinstance(built.module, LateFusion)
    assert len(built.module.branches) == 4
    assert all(b.features[0].in_channels == 1 for b in built.module.branches)
    assert out.shape == (2, 3)
    assert built.head_prefixes == tuple(f"branches.{i}.head" for i in range(4))


def test_output_is_the_mean_of_the_branch_logits():
    torch.manual_seed(0)
    model = build_model(name="cnn", spec=ModelSpec(in_channels=3, num_classes=2, fusion="late"))
    model = model.module.eval()
    x = torch.rand(2, 3, 16, 16)

    fused = model(x)

    each = [b(x[:, i : i + 1]) for i, b in enumerate(model.branches)]
    torch.testing.assert_close(fused, sum(each) / 3)


def test_branch_i_only_sees_modality_i():
    # Prepare: capture each branch's output inside the fused forward
    torch.manual_seed(0)
    model = build_model(name="cnn", spec=ModelSpec(in_channels=3, num_classes=2, fusion="late"))
    model = model.module
    outputs = {}
    for i, branch in enumerate(model.branches):
        branch.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)

    # Execute
    model(x)
    grads = [torch.autograd.grad(outputs[i].sum(), x, retain_graph=True)[0] for i in range(3)]

    # Assert
    for i, g in enumerate(grads):
        others = [c for c in range(3) if c != i]
        assert g[:, others].abs().max() == 0
        assert g[:, i].abs().max() > 0


@pytest.mark.parametrize(
    "name, task, shape",
    [("cnn", "classification", (16, 16)), ("unet", "segmentation", (16, 16))],
)
def test_late_fusion_takes_a_dp_step(name, task, shape):
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=2, num_classes=3, task=task, fusion="late")
    model = build_model(name=name, spec=spec).module
    x = torch.rand(3, 2, *shape)
    y = labels_for(tuple(model(x).shape), 3, 3)

    before = dp_step(model, x, y)

    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_wrong_number_of_modalities_is_a_data_error():
    model = build_model(name="cnn", spec=ModelSpec(in_channels=2, num_classes=2, fusion="late"))
    with pytest.raises(DataError, match="expects 2 modalities .*got 3"):
        model.module(torch.rand(1, 3, 16, 16))


def test_late_fusion_needs_branches():
    with pytest.raises(ConfigError, match="must not be empty"):
        LateFusion([])
