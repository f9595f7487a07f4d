import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from securefed.errors import ConfigError
from securefed.models import ModelSpec, available_models, build_model


@pytest.mark.parametrize("spatial_dims, shape", [(2, (1, 28, 28)), (3, (1, 16, 16, 16))])
def test_cnn_is_made_dp_compatible_and_takes_a_dp_step(spatial_dims, shape):
    built = build_model(
        name="cnn", spec=ModelSpec(in_channels=1, num_classes=3, spatial_dims=spatial_dims)
    )
    assert ModuleValidator.validate(built.module, strict=False) == []
    assert any("BatchNorm" in c and "GroupNorm" in c for c in built.changes)
    model = built.module
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.utils.data.TensorDataset(torch.rand(16, *shape), torch.randint(0, 3, (16,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match="known models: .*cnn"):
        build_model(name="vgg99", spec=ModelSpec(in_channels=1, num_classes=2))
    assert "cnn" in available_models()


@pytest.mark.slow
def test_small_cnn_learns_the_synthetic_set_without_dp():
    from securefed.data.synthetic import make_synthetic

    torch.manual_seed(0)
    b = make_synthetic(seed=0)
    model = build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=4)).module
    x, y = torch.tensor(b.train.images), torch.tensor(b.train.labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (
            (model(torch.tensor(b.test.images)).argmax(1) == torch.tensor(b.test.labels))
            .float()
            .mean()
        )
    assert acc > 0.9
