"""The model registry: every model x dims x task is DP-compatible and takes a DP step."""

import pytest
import torch
from opacus.validators import ModuleValidator

from securefed.errors import ConfigError
from securefed.models import (
    ModelSpec,
    available_models,
    build_model,
    models_for_task,
    register_model,
)
from tests.models.helpers import dp_step, labels_for

# (model, spatial_dims, task, image shape): small inputs that still fit each architecture.
CASES = [
    ("cnn", 2, "classification", (28, 28)),
    ("cnn", 3, "classification", (16, 16, 16)),
    ("densenet121", 2, "classification", (32, 32)),
    ("densenet121", 3, "classification", (32, 32, 32)),
    ("resnet-small", 2, "classification", (32, 32)),
    ("resnet-small", 2, "classification", (96, 72)),
    ("resnet18", 2, "classification", (28, 28)),
    ("scatter-linear", 2, "classification", (28, 28)),
    ("scatter-linear", 2, "classification", (40, 72)),
    ("resnet18", 3, "classification", (16, 16, 16)),
    ("unet", 2, "segmentation", (16, 16)),
    ("unet", 3, "segmentation", (16, 16, 16)),
    ("vit-unet", 2, "segmentation", (32, 32)),
    ("vit-unet", 3, "segmentation", (16, 16, 16)),
]


def test_cases_cover_every_registered_model():
    assert sorted({c[0] for c in CASES}) == available_models()


@pytest.mark.parametrize("name, spatial_dims, task, shape", CASES, ids=lambda v: str(v))
def test_every_model_is_dp_compatible_and_takes_a_dp_step(name, spatial_dims, task, shape):
    # Prepare
    torch.manual_seed(0)
    spec = ModelSpec(
        in_channels=2, num_classes=3, spatial_dims=spatial_dims, task=task, image_shape=shape
    )
    built = build_model(name=name, spec=spec)
    model = built.module
    x = torch.rand(2, 2, *shape)

    # Execute
    logits = model(x)
    before = dp_step(model, x, labels_for(tuple(logits.shape), 3, 2))

    # Assert
    assert ModuleValidator.validate(model, strict=False) == []
    expected = (2, 3, *shape) if task == "segmentation" else (2, 3)
    assert tuple(logits.shape) == expected
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert sorted(changed) == sorted(before)  # Gaussian noise moves every parameter
    assert built.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, spatial_dims, task, shape", CASES[::2], ids=lambda v: str(v))
def test_head_prefixes_name_the_layer_that_outputs_the_classes(name, spatial_dims, task, shape):
    # Prepare
    spec = ModelSpec(
        in_channels=1, num_classes=7, spatial_dims=spatial_dims, task=task, image_shape=shape
    )

    # Execute
    built = build_model(name=name, spec=spec)

    # Assert: the head is the last layer, whose output dimension is the number of classes
    head = {
        n: p
        for n, p in built.module.named_parameters()
        if any(n.startswith(h + ".") for h in built.head_prefixes)
    }
    assert head and all(p.shape[0] == 7 for p in head.values())
    assert len(head) < len(list(built.module.parameters()))


def test_batchnorm_is_replaced_and_in_place_blocks_are_swapped():
    densenet = build_model(name="densenet121", spec=ModelSpec(in_channels=1, num_classes=2))
    resnet = build_model(name="resnet18", spec=ModelSpec(in_channels=1, num_classes=2))

    assert any("BatchNorm2d -> GroupNorm" in c for c in densenet.changes)
    assert any("ResNetBlock -> OutOfPlaceResNetBlock" in c for c in resnet.changes)
    for built in (densenet, resnet):
        assert not any(getattr(m, "inplace", False) for m in built.module.modules())


def test_segmentation_models_use_no_transposed_conv_and_no_batch_statistics():
    for name in models_for_task("segmentation"):
        spec = ModelSpec(
            in_channels=1, num_classes=2, spatial_dims=3, task="segmentation", image_shape=(16,) * 3
        )
        module = build_model(name=name, spec=spec).module
        kinds = {type(m).__name__ for m in module.modules()}
        assert not any("Transpose" in k or "BatchNorm" in k or "InstanceNorm" in k for k in kinds)


def test_models_for_task_partitions_the_registry():
    classification = models_for_task("classification")
    segmentation = models_for_task("segmentation")

    assert classification == ["cnn", "densenet121", "resnet-small", "resnet18", "scatter-linear"]
    assert segmentation == ["unet", "vit-unet"]
    with pytest.raises(ConfigError, match="`task`"):
        models_for_task("detection")


def test_a_model_asked_for_another_task_names_the_models_that_do_it():
    with pytest.raises(ConfigError, match="does not support segmentation.*unet, vit-unet"):
        build_model(name="cnn", spec=ModelSpec(in_channels=1, num_classes=2, task="segmentation"))
    with pytest.raises(ConfigError, match="does not support classification.*cnn, densenet121"):
        build_model(name="unet", spec=ModelSpec(in_channels=1, num_classes=2))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ConfigError, match="known models: .*cnn"):
        build_model(name="vgg99", spec=ModelSpec(in_channels=1, num_classes=2))
    assert "cnn" in available_models()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_channels": 0}, "`in_channels`"),
        ({"num_classes": True}, "`num_classes`"),
        ({"spatial_dims": 4}, "`spatial_dims`"),
        ({"task": "detection"}, "`task`"),
        ({"fusion": "middle"}, "`fusion`"),
        ({"fusion": "late", "in_channels": 1}, "at least 2 modalities"),
        ({"image_shape": (28, 28, 28)}, "`image_shape` must have 2 sides"),
        ({"image_shape": (28, 0)}, "`image_shape`"),
    ],
)
def test_model_spec_rejects_invalid_fields(kwargs, match):
    args = {"in_channels": 1, "num_classes": 2} | kwargs
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**args)


def test_model_spec_normalises_image_shape_to_a_tuple():
    spec = ModelSpec(in_channels=1, num_classes=2, image_shape=[32, 32])
    assert spec.image_shape == (32, 32)
    assert hash(spec)  # frozen and hashable


def test_densenet_minimum_image_size_is_the_real_one():
    # Prepare: 28 (MedMNIST) is one pixel below what DenseNet121's pooling allows
    from monai.networks.nets import DenseNet121

    raw = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()

    # Execute / Assert
    with pytest.raises(RuntimeError):
        raw(torch.rand(2, 1, 28, 28))
    assert raw(torch.rand(2, 1, 29, 29)).shape == (2, 2)
    with pytest.raises(ConfigError, match=r"densenet121 .* at least 29 \(got \(28, 28\)\)"):
        build_model(
            name="densenet121", spec=ModelSpec(in_channels=1, num_classes=2, image_shape=(28, 28))
        )


def test_unet_rejects_images_smaller_than_its_four_poolings():
    spec = ModelSpec(
        in_channels=1, num_classes=2, spatial_dims=2, task="segmentation", image_shape=(15, 32)
    )
    with pytest.raises(ConfigError, match="unet .* at least 16"):
        build_model(name="unet", spec=spec)


def test_a_registered_model_with_a_wrong_head_prefix_is_refused(monkeypatch):
    import securefed.models as models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("tiny", head_prefixes=("classifier",))
    def _tiny(spec):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, spec.num_classes))

    with pytest.raises(ConfigError, match="'classifier' matches no parameter"):
        build_model(name="tiny", spec=ModelSpec(in_channels=1, num_classes=2))


@pytest.mark.slow
@pytest.mark.integration
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
