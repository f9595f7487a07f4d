"""ScatterNet + linear (Tramer & Boneh 2021): fixed features, cached, never on the wire."""

from __future__ import annotations

import pytest
import torch

from securefed.errors import ConfigError
from securefed.models import ModelSpec, build_model
from securefed.models import scatter as scatter_mod
from securefed.models.scatter import ScatterLinear, _FeatureCache, scatter_channels


def _model(shape=(24, 24), channels=1, classes=3) -> ScatterLinear:
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=channels, num_classes=classes, image_shape=shape)
    return build_model(name="scatter-linear", spec=spec).module


def test_only_the_trained_layers_are_in_the_state_dict():
    # The filters are a function of the image size: sending or saving them would cost
    # bytes every round and let a tampered file change the features silently.
    model = _model()
    assert sorted(model.state_dict()) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert sum(1 for _ in model.scattering.buffers()) > 0
    assert sorted(n for n, _ in model.named_parameters()) == sorted(model.state_dict())


def test_shapes_follow_the_paper_j2_l8_and_an_8x8_grid():
    assert scatter_channels(1) == 81 and scatter_channels(3) == 243
    small = _model(shape=(28, 28))
    large = _model(shape=(96, 64), channels=3)
    assert small.grid == (7, 7)  # 28 / 4
    assert large.grid == (8, 8)  # pooled from 24 x 16
    assert small.head.in_features == 81 * 49
    assert large.head.in_features == 243 * 64
    assert large(torch.rand(2, 3, 96, 64)).shape == (2, 3)


def test_cached_features_equal_fresh_ones_and_distinct_images_differ(monkeypatch):
    model = _model()
    monkeypatch.setattr(scatter_mod, "_CACHE", _FeatureCache())
    x = torch.rand(4, 1, 24, 24)
    calls = []
    compute = model._compute
    monkeypatch.setattr(model, "_compute", lambda b: calls.append(len(b)) or compute(b))

    first = model.features(x)
    again = model.features(x)
    mixed = model.features(torch.cat([x[:2], torch.rand(1, 1, 24, 24)]))

    assert calls == [4, 1]  # the second pass hit the cache; the mix computed only the new one
    assert torch.equal(first, again)
    assert torch.allclose(first, compute(x), atol=1e-6)
    assert torch.equal(mixed[:2], first[:2])
    assert not torch.allclose(mixed[2], first[2])


def test_a_second_model_gets_kymatios_filters_in_buffers_of_its_own(monkeypatch):
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    monkeypatch.setattr(scatter_mod, "_FILTERS", type(scatter_mod._FILTERS)())
    first, second = _model(), _model()
    fresh = ScatteringTorch2D(J=scatter_mod.SCATTER_J, shape=(24, 24), L=scatter_mod.SCATTER_L)
    ours = dict(second.scattering.named_buffers())
    assert list(ours) == [name for name, _ in fresh.named_buffers()]
    for name, buf in fresh.named_buffers():
        assert torch.equal(ours[name], buf), name  # the copy is kymatio's filter bank, exactly
    # Each model owns its filters: changing one model's buffers leaves the other's.
    name, buf = next(iter(first.scattering.named_buffers()))
    buf.zero_()
    assert torch.equal(dict(second.scattering.named_buffers())[name], ours[name])
    assert not torch.equal(buf, ours[name])
    # ... and the next model built for the shape too (the kept module was never handed out).
    assert torch.equal(dict(_model().scattering.named_buffers())[name], ours[name])


def test_the_cache_is_bounded_and_evicts_the_oldest():
    cache = _FeatureCache(max_bytes=3 * 4 * 10)  # three 10-float tensors
    for i in range(5):
        cache.put(bytes([i]), torch.full((10,), float(i)))
    assert cache.get(bytes([0])) is None and cache.get(bytes([1])) is None
    assert float(cache.get(bytes([4]))[0]) == 4.0
    assert cache._bytes <= cache.max_bytes


def test_a_model_file_round_trips_without_the_filters(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = _model()
    other.load_state_dict(load_file(str(path)), strict=True)
    x = torch.rand(3, 1, 24, 24)
    assert torch.equal(model(x), other(x))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ModelSpec(in_channels=1, num_classes=2, spatial_dims=3, image_shape=(16,) * 3), "2D"),
        (ModelSpec(in_channels=1, num_classes=2), "image size"),
        (ModelSpec(in_channels=1, num_classes=2, image_shape=(6, 32)), "at least 8"),
    ],
)
def test_unfit_data_is_refused_in_one_line(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name="scatter-linear", spec=spec)


def test_a_dp_run_on_large_images_trains_scatternet_and_ships_only_trained_weights(tmp_path):
    # `--model auto` under DP above 64 px: scatter-linear, end to end through the engine; the
    # served model file holds the norm and the head, never the scattering's filters.
    import json

    from safetensors.torch import load_file

    out = _dp_run_on_72px(tmp_path)
    resolved = json.loads((out / "config.json").read_text())["resolved"]["model"]
    assert resolved["name"] == "scatter-linear"
    assert sorted(load_file(str(out / "model.safetensors"))) == [
        "head.bias",
        "head.weight",
        "norm.bias",
        "norm.weight",
    ]
    assert json.loads((out / "privacy.json").read_text())["epsilon"] <= 8.0 + 1e-6


def test_an_empty_batch_gives_empty_features_and_logits():
    # An empty Poisson batch is a noise-only DP step; Opacus' hooks mode still runs forward.
    model = _model()
    assert model(torch.zeros(0, 1, 24, 24)).shape == (0, 3)


def test_a_double_model_scatters_in_double(monkeypatch):
    monkeypatch.setattr(scatter_mod, "_CACHE", _FeatureCache())
    model = _model().double()
    out = model(torch.rand(2, 1, 24, 24, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_large_batches_are_scattered_in_chunks_with_the_same_result(monkeypatch):
    # Chunks bound the transform's transient memory; they may not change the features: an
    # image's features are the same whatever images share its chunk.
    model = _model()
    x = torch.rand(5, 1, 24, 24)
    monkeypatch.setattr(scatter_mod, "_chunk", lambda *_: 1024)
    whole = model._compute(x)
    monkeypatch.setattr(scatter_mod, "_chunk", lambda *_: 2)
    assert torch.equal(model._compute(x), whole)
    assert torch.equal(model._compute(x[3:4]), whole[3:4])
    # Images too large for 2 a chunk go through kymatio's own loop, CHUNK at a time.
    monkeypatch.setattr(scatter_mod, "_chunk", lambda *_: 1)
    monkeypatch.setattr(scatter_mod, "CHUNK", 2)
    assert torch.allclose(model._compute(x), whole, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "channels", "j", "dtype", "tol"),
    [
        ((28, 28), 1, 2, torch.float32, 1e-6),
        ((30, 33), 3, 2, torch.float32, 1e-6),
        ((17, 20), 2, 2, torch.float64, 1e-12),
        ((40, 40), 1, 3, torch.float64, 1e-12),  # a third scale: second order over j1 < j2
        ((8, 8), 1, 2, torch.float64, 1e-12),  # the smallest image scatter-linear takes
        ((8, 8), 1, 3, torch.float64, 1e-12),  # padding as large as the image (kymatio's branch)
    ],
)
def test_the_batched_transform_is_kymatios(shape, channels, j, dtype, tol):
    # securefed computes every orientation at once; kymatio, one filter at a time, is the
    # reference: same coefficients, same order, to float rounding.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    reference = ScatteringTorch2D(J=j, shape=shape, L=scatter_mod.SCATTER_L, max_order=2)
    reference = reference.to(dtype)
    x = torch.rand(3, channels, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    expected = reference(x)
    got = scatter_mod._scatter(reference, x)
    assert got.dtype == dtype and got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tol * expected.abs().max().item()
    # A wrong order (e.g. theta2 before theta1) would move coefficients, not just round them.
    assert not torch.allclose(got[:, :, 20:], expected[:, :, 20:].flip(2), atol=1e-3)


def test_a_run_ends_with_an_empty_cache(tmp_path):
    _dp_run_on_72px(tmp_path, model="scatter-linear")
    assert scatter_mod._CACHE._bytes == 0 and not scatter_mod._CACHE._items


def test_a_run_recorded_before_rule_2_replays_and_resumes_with_the_model_it_trained():
    # Without the recorded rule, `auto` would now build scatter-linear for a DP run on 96 px
    # images that trained resnet-small: its checkpoint could not be loaded, its replay differ.
    from securefed.config import RunConfig
    from securefed.fl.planning import model_choice
    from securefed.models import auto_model

    run = RunConfig(dp_epsilon=8.0).to_dict()
    del run["auto_rule"]
    old = RunConfig.from_recorded(run)
    new = RunConfig(dp_epsilon=8.0)
    spec = ModelSpec(in_channels=1, num_classes=4, image_shape=(96, 96))
    assert old.auto_rule == 1 and new.auto_rule == 3
    assert auto_model(spec, **model_choice(old)) == "resnet-small"
    assert auto_model(spec, **model_choice(new)) == "scatter-linear"
    # Rule 2 (schema 3.3-3.8) kept the cnn up to 64 px, where rule 3 scatters.
    small = ModelSpec(in_channels=1, num_classes=2, image_shape=(28, 28))
    rule2 = RunConfig.from_recorded({**run, "auto_rule": 2})
    assert auto_model(small, **model_choice(rule2)) == "cnn"
    assert auto_model(small, **model_choice(new)) == "scatter-linear"
    with pytest.raises(ConfigError, match="auto_rule"):
        RunConfig(auto_rule=4)


def _dp_run_on_72px(tmp_path, **changes):
    """A 1-round DP run on 72 px synthetic images (`auto` then picks scatter-linear)."""
    import securefed
    from tests.conftest import dp_72px_config

    return securefed.train(dp_72px_config(**changes), out_dir=tmp_path / "run", progress=False)
