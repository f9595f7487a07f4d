"""Transfer learning: freezing, and safetensors weights that load only into the right model."""

import hashlib
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from securefed.errors import ConfigError, DataError
from securefed.models import ModelSpec, build_model
from securefed.models.transfer import PretrainedLoad, freeze, load_pretrained, save_weights
from tests.models.helpers import dp_step

HEAD = ("head",)


def _cnn(in_channels=1, num_classes=3, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(in_channels=in_channels, num_classes=num_classes)
    return build_model(name="cnn", spec=spec).module


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- freeze -------------------------------------------------------------------------------


def test_frozen_backbone_is_bit_identical_after_a_dp_step_and_the_head_moves():
    # Prepare
    model = _cnn()
    frozen = freeze(model, spec="backbone", head_prefixes=HEAD)
    x, y = torch.rand(4, 1, 16, 16), torch.randint(0, 3, (4,))

    # Execute
    before = dp_step(model, x, y)

    # Assert
    params = dict(model.named_parameters())
    assert frozen == tuple(sorted(n for n in params if not n.startswith("head.")))
    assert all(torch.equal(before[n], params[n]) for n in frozen)
    assert all(not torch.equal(before[n], params[n]) for n in ("head.weight", "head.bias"))


def test_backbone_of_a_late_fusion_model_keeps_every_branch_head_trainable():
    built = build_model(name="cnn", spec=ModelSpec(in_channels=2, num_classes=3, fusion="late"))

    freeze(built.module, spec="backbone", head_prefixes=built.head_prefixes)

    trainable = sorted(n for n, p in built.module.named_parameters() if p.requires_grad)
    assert trainable == [f"branches.{i}.head.{w}" for i in (0, 1) for w in ("bias", "weight")]


def test_freeze_by_prefix_and_none():
    model = _cnn()

    assert freeze(model, spec="none", head_prefixes=HEAD) == ()
    assert all(p.requires_grad for p in model.parameters())
    frozen = freeze(model, spec=" features.0 , features.1", head_prefixes=HEAD)

    assert frozen == (
        "features.0.bias",
        "features.0.weight",
        "features.1.bias",
        "features.1.weight",
    )
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == list(frozen)


@pytest.mark.parametrize(
    "spec, head, match",
    [
        ("feat", HEAD, "prefix 'feat' matches no parameter"),
        ("features.0,classifier", HEAD, "prefix 'classifier' matches no parameter"),
        (" , ", HEAD, "comma-separated"),
        ("features,head", HEAD, "no trainable parameter"),
        ("backbone", (), "no trainable parameter"),
        ("backbone", ("fc",), "head prefix 'fc' matches no parameter"),
    ],
)
def test_freeze_errors_change_nothing(spec, head, match):
    model = _cnn()

    with pytest.raises(ConfigError, match=match):
        freeze(model, spec=spec, head_prefixes=head)

    assert all(p.requires_grad for p in model.parameters())


# --- save / load --------------------------------------------------------------------------


def test_roundtrip_restores_every_tensor_and_reports_provenance(tmp_path):
    # Prepare
    source, target = _cnn(seed=0), _cnn(seed=1)
    path = tmp_path / "w.safetensors"
    digest = save_weights(source, path=path, metadata={"round": "7", "site": "a"})

    # Execute
    result = load_pretrained(target, path=path, head_prefixes=HEAD)

    # Assert
    assert result == PretrainedLoad(
        loaded=tuple(sorted(source.state_dict())),
        reinitialised=(),
        metadata={"round": "7", "site": "a"},
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    assert digest == result.sha256
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left


def test_other_number_of_classes_reinitialises_only_the_head(tmp_path):
    # Prepare
    source, target = _cnn(num_classes=3, seed=0), _cnn(num_classes=5, seed=1)
    fresh_head = _state(target.head)
    save_weights(source, path=tmp_path / "w.safetensors", metadata={})

    # Execute
    result = load_pretrained(target, path=tmp_path / "w.safetensors", head_prefixes=HEAD)

    # Assert
    assert result.reinitialised == ("head.bias", "head.weight")
    assert set(result.loaded) == set(source.state_dict()) - {"head.bias", "head.weight"}
    for k in result.loaded:
        assert torch.equal(source.state_dict()[k], target.state_dict()[k])
    for k, v in fresh_head.items():
        assert torch.equal(v, target.head.state_dict()[k])


def test_a_backbone_only_file_loads_and_keeps_the_fresh_head(tmp_path):
    source, target = _cnn(seed=0), _cnn(seed=1)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    (tmp_path / "b.safetensors").write_bytes(save(backbone))

    result = load_pretrained(target, path=tmp_path / "b.safetensors", head_prefixes=HEAD)

    assert result.reinitialised == ("head.bias", "head.weight")
    assert result.metadata == {}


def test_wrong_architecture_names_the_key_and_both_shapes_and_changes_nothing(tmp_path):
    # Prepare: a 2-channel model's first conv does not fit a 1-channel model
    save_weights(_cnn(in_channels=2), path=tmp_path / "w.safetensors", metadata={})
    target = _cnn(in_channels=1, seed=1)
    before = _state(target)

    # Execute
    with pytest.raises(ConfigError) as info:
        load_pretrained(target, path=tmp_path / "w.safetensors", head_prefixes=HEAD)

    # Assert
    assert "'features.0.weight'" in str(info.value)
    assert "(32, 2, 3, 3)" in str(info.value) and "(32, 1, 3, 3)" in str(info.value)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_another_model_entirely_is_a_config_error(tmp_path):
    save_weights(_cnn(), path=tmp_path / "cnn.safetensors", metadata={})
    spec = ModelSpec(in_channels=1, num_classes=3, task="segmentation")
    unet = build_model(name="unet", spec=spec).module

    with pytest.raises(ConfigError, match="has tensor 'features.0.bias' that the model lacks"):
        load_pretrained(unet, path=tmp_path / "cnn.safetensors", head_prefixes=("final_conv",))


def test_missing_backbone_tensor_is_a_config_error(tmp_path):
    state = _cnn().state_dict()
    del state["features.4.weight"]
    (tmp_path / "w.safetensors").write_bytes(save(state))

    with pytest.raises(ConfigError, match="backbone tensor 'features.4.weight' .* is missing"):
        load_pretrained(_cnn(), path=tmp_path / "w.safetensors", head_prefixes=HEAD)


def test_loading_into_an_opacus_wrapped_model_uses_the_plain_names(tmp_path):
    from opacus import GradSampleModule

    save_weights(GradSampleModule(_cnn(seed=0)), path=tmp_path / "w.safetensors", metadata={})
    target = GradSampleModule(_cnn(seed=1))

    result = load_pretrained(target, path=tmp_path / "w.safetensors", head_prefixes=HEAD)

    assert "head.weight" in result.loaded


@pytest.fixture(scope="module")
def valid_file_bytes():
    return save(_cnn().state_dict(), metadata={"k": "v"})


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_truncation_is_a_data_error_naming_the_path(tmp_path, valid_file_bytes, data):
    cut = data.draw(st.integers(min_value=0, max_value=len(valid_file_bytes) - 1))
    path = tmp_path / "cut.safetensors"
    path.write_bytes(valid_file_bytes[:cut])

    with pytest.raises(DataError, match="cut.safetensors"):
        load_pretrained(_cnn(), path=path, head_prefixes=HEAD)


def _raw(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a safetensors file"),
        (b"\x00" * 7, "not a safetensors file"),
        (struct.pack("<Q", 2**63) + b"{}", "truncated"),
        (_raw(b"\xff\xfe{}"), "not JSON"),
        (_raw(b"[]"), "not a JSON object"),
        (_raw(b'{"a": 1, "a": 2}'), "duplicated key"),
        (_raw(b'{"__metadata__": {"k": 1}}'), "string-to-string"),
        (_raw(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'), "corrupt"),
    ],
)
def test_malformed_files_are_data_errors(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)

    with pytest.raises(DataError, match=match):
        load_pretrained(_cnn(), path=path, head_prefixes=HEAD)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.safetensors does not exist"):
        load_pretrained(_cnn(), path=tmp_path / "nope.safetensors", head_prefixes=HEAD)


def test_non_finite_weights_are_refused(tmp_path):
    state = _cnn().state_dict()
    state["head.bias"] = torch.tensor([0.0, float("nan"), 0.0])
    (tmp_path / "w.safetensors").write_bytes(save(state))

    with pytest.raises(DataError, match="'head.bias' holds non-finite"):
        load_pretrained(_cnn(), path=tmp_path / "w.safetensors", head_prefixes=HEAD)


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    # Prepare: the classic torch.save / pickle attack
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"state_dict": payload}))

    # Execute
    with pytest.raises(DataError, match="model.pt"):
        load_pretrained(_cnn(), path=path, head_prefixes=HEAD)

    # Assert
    assert not (tmp_path / "pwned").exists()


def test_save_and_load_never_touch_pickle(tmp_path, monkeypatch):
    # Built first: Opacus' ModuleValidator.fix clones our own fresh module in memory with
    # torch.save/torch.load; only reading and writing weight files must avoid pickle.
    source, target = _cnn(seed=0), _cnn(seed=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used")

    for owner, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "dump"),
        (pickle, "dumps"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch, "save"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)

    save_weights(source, path=tmp_path / "w.safetensors", metadata={})
    result = load_pretrained(target, path=tmp_path / "w.safetensors", head_prefixes=HEAD)

    assert result.reinitialised == () and torch.equal(source.head.weight, target.head.weight)


def test_save_weights_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="`metadata` must map strings to strings"):
        save_weights(_cnn(), path=tmp_path / "w.safetensors", metadata={"round": 3})
    with pytest.raises(DataError, match="does not exist"):
        save_weights(_cnn(), path=tmp_path / "no" / "w.safetensors", metadata={})


def test_pretrained_load_validates_itself():
    with pytest.raises(ConfigError, match="`sha256`"):
        PretrainedLoad(loaded=(), reinitialised=(), metadata={}, sha256="abc")
    with pytest.raises(ConfigError, match="disjoint"):
        PretrainedLoad(loaded=("a",), reinitialised=("a",), metadata={}, sha256="0" * 64)
