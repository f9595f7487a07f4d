"""Foreign weight files: torchvision/timm/MONAI names mapped onto securefed's GroupNorm models."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from securefed.errors import ConfigError, DataError
from securefed.models import ModelSpec, build_model, register_model
from securefed.models.transfer import PretrainedLoad, freeze, load_pretrained
from securefed.models.weights import map_keys, read_weight_file
from tests.models.foreign_weights import torchvision_densenet121, torchvision_resnet

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _built(name, *, in_channels=1, num_classes=2, seed=0):
    torch.manual_seed(seed)
    return build_model(name=name, spec=ModelSpec(in_channels=in_channels, num_classes=num_classes))


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tv_resnet18():
    return torchvision_resnet()


def _write(kind, state, path):
    if kind == "safetensors":
        save_file(state, path)
    elif kind == "pth":
        torch.save(state, path)
    elif kind == "ddp-checkpoint":  # a training checkpoint: wrapped, with DDP's prefix
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({"epoch": 90, "arch": "resnet18", "state_dict": wrapped}, path)
    return path


# --- ResNet-18 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, name",
    [("pth", "tv_resnet18.pth"), ("safetensors", "tv.safetensors"), ("ddp-checkpoint", "c.bin")],
)
def test_torchvision_resnet18_loads_into_a_grayscale_two_class_model(
    tmp_path, tv_resnet18, kind, name
):
    # Prepare: torchvision's RGB, 1000-class ResNet-18 and our 1-channel, 2-class one
    path = _write(kind, tv_resnet18, tmp_path / name)
    built = _built("resnet18")
    fresh = _snapshot(built.module)

    # Execute
    result = load_pretrained(built.module, path=path, head_prefixes=built.head_prefixes)

    # Assert
    state = built.module.state_dict()
    assert result.convention == "torchvision/timm"
    assert result.file_format == ("safetensors" if kind == "safetensors" else "torch")
    # The stem sums the RGB filters: a gray image replicated to RGB gives the same response.
    assert result.adapted == ("conv1.weight",)
    assert torch.allclose(state["conv1.weight"], tv_resnet18["conv1.weight"].sum(1, keepdim=True))
    # BatchNorm weight/bias are the GroupNorm's affine parameters; statistics are dropped.
    assert torch.equal(state["layer3.1.bn2.weight"], tv_resnet18["layer3.1.bn2.weight"])
    assert torch.equal(state["bn1.bias"], tv_resnet18["bn1.bias"])
    assert result.dropped == tuple(sorted(k for k in tv_resnet18 if k.endswith(BN_STATS)))
    for key in result.loaded:
        if key != "conv1.weight":
            assert torch.equal(state[key], tv_resnet18[key]), key
    # The 1000-class head does not fit 2 classes: it keeps its fresh initialisation.
    assert result.reinitialised == ("fc.bias", "fc.weight")
    assert torch.equal(state["fc.weight"], fresh["fc.weight"])
    # torchvision's downsample convolutions have no bias; MONAI's are zeroed to match.
    assert result.zeroed == tuple(f"layer{i}.0.downsample.0.bias" for i in (2, 3, 4))
    assert all(not state[k].any() for k in result.zeroed)
    assert set(result.loaded) | set(result.reinitialised) | set(result.zeroed) == set(state)


def test_the_adapted_stem_answers_a_gray_image_as_the_rgb_stem_answers_it_replicated(
    tmp_path, tv_resnet18
):
    torch.save(tv_resnet18, tmp_path / "tv.pth")
    built = _built("resnet18")
    load_pretrained(built.module, path=tmp_path / "tv.pth", head_prefixes=built.head_prefixes)
    gray = torch.rand(2, 1, 16, 16)

    ours = torch.nn.functional.conv2d(gray, built.module.conv1.weight)
    theirs = torch.nn.functional.conv2d(gray.expand(-1, 3, -1, -1), tv_resnet18["conv1.weight"])

    assert torch.allclose(ours, theirs, atol=1e-5)


def test_four_channel_model_shares_the_summed_rgb_filter_equally(tmp_path, tv_resnet18):
    # Mean-replication: each of the C channels gets sum_rgb / C (= mean filter x 3 / C), so
    # four equal channels answer like one gray image replicated to RGB.
    torch.save(tv_resnet18, tmp_path / "tv.pth")
    built = _built("resnet18", in_channels=4)

    result = load_pretrained(built.module, path=tmp_path / "tv.pth", head_prefixes=("fc",))

    expected = (tv_resnet18["conv1.weight"].sum(1, keepdim=True) / 4).repeat(1, 4, 1, 1)
    assert result.adapted == ("conv1.weight",)
    assert torch.allclose(built.module.conv1.weight, expected)


def test_timm_resnet18_safetensors_with_a_fitting_head_loads_it(tmp_path):
    # timm's resnet18 uses torchvision's names; Hugging Face ships it as model.safetensors,
    # here fine-tuned to 2 classes on grayscale data (so the head and stem fit as they are).
    timm = torchvision_resnet(in_channels=1, num_classes=2)
    (tmp_path / "model.safetensors").write_bytes(save(timm, metadata={"format": "pt"}))
    built = _built("resnet18")

    result = load_pretrained(
        built.module, path=tmp_path / "model.safetensors", head_prefixes=("fc",)
    )

    assert result.convention == "torchvision/timm"
    assert result.reinitialised == () and result.adapted == ()
    assert result.metadata == {"format": "pt"}
    assert torch.equal(built.module.fc.weight, timm["fc.weight"])


def test_monai_resnet18_with_batchnorm_loads_as_monai(tmp_path):
    from monai.networks.nets import resnet18

    torch.manual_seed(3)
    monai_state = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2).state_dict()
    torch.save(monai_state, tmp_path / "monai.pt")
    built = _built("resnet18")

    result = load_pretrained(built.module, path=tmp_path / "monai.pt", head_prefixes=("fc",))

    assert result.convention == "monai"
    assert result.zeroed == () and result.renamed == {}
    assert result.dropped == tuple(sorted(k for k in monai_state if k.endswith(BN_STATS)))
    assert set(result.loaded) == set(built.module.state_dict())


def test_a_resnet34_file_is_refused_naming_the_first_extra_key(tmp_path):
    torch.save(torchvision_resnet(blocks=(3, 4, 6, 3)), tmp_path / "resnet34.pth")
    built = _built("resnet18")
    before = _snapshot(built.module)

    with pytest.raises(
        ConfigError, match=r"has tensor 'layer1\.2\.bn1\.bias' that the model lacks"
    ):
        load_pretrained(built.module, path=tmp_path / "resnet34.pth", head_prefixes=("fc",))

    assert all(torch.equal(v, built.module.state_dict()[k]) for k, v in before.items())


def test_a_3d_monai_file_for_a_2d_model_is_refused_naming_the_key(tmp_path):
    from monai.networks.nets import resnet18

    volume_net = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)
    torch.save(volume_net.state_dict(), tmp_path / "r3d.pth")
    built = _built("resnet18")

    with pytest.raises(ConfigError) as info:
        load_pretrained(built.module, path=tmp_path / "r3d.pth", head_prefixes=("fc",))

    assert "'conv1.weight' has shape (64, 1, 7, 7, 7) in the file but (64, 1, 7, 7)" in str(
        info.value
    )
    assert "\n" not in str(info.value)


def test_unknown_naming_is_refused(tmp_path):
    # Hugging Face transformers' ResNet: the same network, names no rule maps.
    hf = {
        "resnet.embedder.embedder.convolution.weight": torch.zeros(64, 3, 7, 7),
        "resnet.embedder.embedder.normalization.weight": torch.ones(64),
        "classifier.1.weight": torch.zeros(1000, 512),
    }
    save_file(hf, tmp_path / "hf.safetensors")
    built = _built("resnet18")

    with pytest.raises(ConfigError, match="naming is none of securefed, monai, torchvision/timm"):
        load_pretrained(built.module, path=tmp_path / "hf.safetensors", head_prefixes=("fc",))


def test_securefed_files_never_get_their_input_channels_adapted(tmp_path):
    # Our own files were trained on the data's channels: a mismatch means the wrong data set.
    from securefed.models.transfer import save_weights

    save_weights(_built("resnet18", in_channels=3).module, path=tmp_path / "w.st", metadata={})

    with pytest.raises(ConfigError, match=r"'conv1.weight' has shape \(64, 3, 7, 7\)"):
        load_pretrained(_built("resnet18").module, path=tmp_path / "w.st", head_prefixes=("fc",))


# --- DenseNet-121 -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def densenet():
    # Built once (slow on a loaded CPU); every load replaces or re-checks all of its tensors.
    return _built("densenet121")


@pytest.mark.parametrize("old_style", [False, True])
def test_torchvision_densenet121_new_and_old_style_keys_map_onto_monai(
    tmp_path, densenet, old_style
):
    # Prepare: old style (torchvision < 0.3) names a dense layer's modules "norm.1"; its head
    # here has our 2 classes, so `classifier` must land on `class_layers.out`.
    tv = torchvision_densenet121(old_style=old_style, num_classes=2 if old_style else 1000)
    path = tmp_path / ("old.pth" if old_style else "new.safetensors")
    _write("pth" if old_style else "safetensors", tv, path)
    fresh_head = densenet.module.class_layers.out.weight.detach().clone()

    # Execute
    result = load_pretrained(densenet.module, path=path, head_prefixes=densenet.head_prefixes)

    # Assert
    state = densenet.module.state_dict()
    sep = "." if old_style else ""
    layer = "features.denseblock2.denselayer7"
    assert result.convention == "torchvision/timm"
    assert result.renamed[f"{layer}.norm{sep}2.weight"] == f"{layer}.layers.norm2.weight"
    assert torch.equal(state[f"{layer}.layers.conv1.weight"], tv[f"{layer}.conv{sep}1.weight"])
    assert torch.equal(state["features.norm5.bias"], tv["features.norm5.bias"])
    assert torch.equal(
        state["features.transition3.conv.weight"], tv["features.transition3.conv.weight"]
    )
    assert torch.allclose(
        state["features.conv0.weight"], tv["features.conv0.weight"].sum(1, keepdim=True)
    )
    assert len(result.dropped) == sum(k.endswith(BN_STATS) for k in tv) == 3 * 121  # 121 BatchNorms
    assert not result.zeroed
    if old_style:
        assert result.renamed["classifier.weight"] == "class_layers.out.weight"
        assert result.reinitialised == ()
        assert torch.equal(state["class_layers.out.weight"], tv["classifier.weight"])
    else:
        assert result.reinitialised == ("class_layers.out.bias", "class_layers.out.weight")
        assert torch.equal(state["class_layers.out.weight"], fresh_head)


def test_map_keys_detects_each_convention():
    built_keys = dict.fromkeys(["a.conv.weight", "a.norm.weight", "a.norm.bias"])

    own = map_keys({"a.norm.weight": torch.ones(1)}, model_keys=built_keys)
    monai = map_keys(
        {"a.norm.weight": torch.ones(1), "a.norm.running_var": torch.ones(1)},
        model_keys=built_keys,
    )
    other = map_keys({"b.weight": torch.ones(1)}, model_keys=built_keys)

    assert (own.convention, own.dropped) == ("securefed", ())
    assert (monai.convention, monai.dropped, monai.unexpected) == (
        "monai",
        ("a.norm.running_var",),
        (),
    )
    assert other.unexpected == ("b.weight",) and other.tensors == {}


# --- refusing files ----------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path, writer):
    # Prepare: the classic attack, in torch.save's zip format and as a bare pickle stream
    path = tmp_path / "resnet18.pth"
    payload = {"state_dict": {"conv1.weight": _Payload(str(tmp_path / "pwned"))}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    # Execute
    with pytest.raises(DataError, match="resnet18.pth was refused: not a weights-only"):
        load_pretrained(_built("cnn").module, path=path, head_prefixes=("head",))

    # Assert
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ([torch.zeros(1)], "holds a list, not a state dict"),
        ({"conv1.weight": torch.zeros(1), "epoch": 3}, "entry 'epoch' is a int, not a tensor"),
        ({"w": torch.tensor([float("inf")])}, "'w' holds non-finite"),
    ],
)
def test_torch_files_that_are_not_state_dicts_are_data_errors(tmp_path, content, match):
    torch.save(content, tmp_path / "x.pt")

    with pytest.raises(DataError, match=match):
        read_weight_file(tmp_path / "x.pt")


def test_a_checkpoint_under_model_is_unwrapped(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {"lr": 0.1}}, tmp_path / "c.pt")

    assert read_weight_file(tmp_path / "c.pt").tensors.keys() == {"w"}


def test_pretrained_load_validates_the_new_fields():
    ok = {"loaded": ("a",), "reinitialised": (), "metadata": {}, "sha256": "0" * 64}
    with pytest.raises(ConfigError, match="`convention`"):
        PretrainedLoad(**ok, convention="keras")
    with pytest.raises(ConfigError, match="`file_format`"):
        PretrainedLoad(**ok, file_format="onnx")
    with pytest.raises(ConfigError, match="`adapted`"):
        PretrainedLoad(**ok, adapted=("b",))
    with pytest.raises(ConfigError, match="`zeroed`"):
        PretrainedLoad(**ok, zeroed=("a",))


# --- freeze backbone-except-last ---------------------------------------------------------


def _trainable(module):
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name, kept",
    [("cnn", ("features.8.", "features.9.", "head.")), ("resnet18", ("layer4.", "fc."))],
)
def test_backbone_except_last_trains_exactly_the_head_and_the_last_block(name, kept):
    built = _built(name)
    every = [n for n, _ in built.module.named_parameters()]

    frozen = freeze(
        built.module,
        spec="backbone-except-last",
        head_prefixes=built.head_prefixes,
        last_block_prefixes=built.last_block_prefixes,
    )

    assert _trainable(built.module) == sorted(n for n in every if n.startswith(kept))
    assert set(frozen) == set(every) - set(_trainable(built.module))
    assert any(n.startswith(kept[0]) for n in every) and frozen


def test_backbone_except_last_of_a_late_fusion_model_keeps_each_branch_last_block():
    built = build_model(name="cnn", spec=ModelSpec(in_channels=2, num_classes=3, fusion="late"))

    freeze(
        built.module,
        spec="backbone-except-last",
        head_prefixes=built.head_prefixes,
        last_block_prefixes=built.last_block_prefixes,
    )

    assert {n.split(".")[1] for n in _trainable(built.module)} == {"0", "1"}
    assert all(
        ".features.8." in n or ".features.9." in n or ".head." in n
        for n in _trainable(built.module)
    )


def test_a_model_without_a_last_block_refuses_the_keyword():
    @register_model("test-no-last-block", head_prefixes=("1",))
    def _factory(spec):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, spec.num_classes))

    built = build_model(name="test-no-last-block", spec=ModelSpec(in_channels=1, num_classes=2))

    with pytest.raises(ConfigError, match="'backbone-except-last' needs the model's last block"):
        freeze(built.module, spec="backbone-except-last", head_prefixes=built.head_prefixes)
    assert all(p.requires_grad for p in built.module.parameters())


@pytest.mark.parametrize(
    "name, spec, last",
    [
        (
            "densenet121",
            ModelSpec(in_channels=1, num_classes=2),
            ("features.denseblock4", "features.norm5"),
        ),
        ("unet", ModelSpec(in_channels=1, num_classes=2, task="segmentation"), ("upcat_1",)),
        (
            "vit-unet",
            ModelSpec(in_channels=1, num_classes=2, task="segmentation", image_shape=(16, 16)),
            ("decoders.3",),
        ),
    ],
)
def test_every_builtin_model_registers_a_last_block_that_matches_parameters(
    name, spec, last, request
):
    if name == "densenet121":
        built = request.getfixturevalue("densenet")
    else:
        built = build_model(name=name, spec=spec)

    assert built.last_block_prefixes == last  # build_model checks each matches a parameter


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4, 4).to_sparse(),
        lambda: torch.complex(torch.tensor([float("nan")]), torch.tensor([0.0])),
        lambda: torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8),
        lambda: torch.zeros(4, device="meta"),
    ],
    ids=["sparse", "complex-nan", "quantized", "meta"],
)
def test_unusual_tensors_are_refused_in_one_line(tmp_path, make):
    from securefed.models.weights import read_weight_file

    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": make()}, path)
    with pytest.raises(DataError, match="'conv1.weight'"):
        read_weight_file(path)


def test_a_file_with_two_names_for_one_tensor_says_so():
    spec = ModelSpec(in_channels=1, num_classes=2, image_shape=(32, 32))
    built = build_model(name="densenet121", spec=spec)
    state = built.module.state_dict()
    tensors = {k: v.clone() for k, v in state.items()}
    # torchvision's name for the classifier beside securefed's own
    tensors["classifier.weight"] = state["class_layers.out.weight"].clone()
    with pytest.raises(
        ConfigError,
        match="'classifier.weight'.*'class_layers.out.weight'|"
        "'class_layers.out.weight'.*'classifier.weight'",
    ):
        map_keys(tensors, model_keys=state)
