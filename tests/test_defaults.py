"""Data-aware defaults: each site's batch and lr from its size, the model from the image size,
and a conventional (unclipped) non-private baseline (docs/defaults.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from securefed.config import RunConfig
from securefed.dp.accounting import sample_rate, site_batch, site_lr, steps_per_epoch
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.trainer import SiteTrainer
from securefed.models import ModelSpec, auto_model, build_model
from tests.conftest import tiny_config, write_small_npz


@pytest.mark.parametrize(
    ("n", "batch", "min_steps", "steps", "site_b"),
    [
        (51, 256, 4, 4, 13),  # the CT set's smallest site: 4 steps of ~13, not 1 of 51
        (203, 256, 4, 4, 51),
        (51, 256, 1, 1, 51),  # the old rule: one full-batch step (q = 1)
        (5000, 256, 4, 20, 250),  # a large site keeps its ceil(n/B) steps
        # Not capped at n: q = 1/n would publish a tiny site's exact size.
        (3, 256, 4, 4, 1),
    ],
)
def test_small_sites_take_at_least_min_steps(n, batch, min_steps, steps, site_b):
    got = steps_per_epoch(num_samples=n, batch_size=batch, min_steps=min_steps)
    assert got == steps
    assert sample_rate(num_samples=n, batch_size=batch, min_steps=min_steps) == 1.0 / steps
    assert site_batch(num_samples=n, batch_size=batch, min_steps=min_steps) == site_b


def test_site_lr_scales_only_where_min_steps_set_the_steps():
    assert site_lr(lr=2.0, num_samples=5000, batch_size=256, min_steps=4) == 2.0
    # 3 steps by ceil(n/B) raised to 4: batches of 128, lr scaled to 128/256.
    assert site_lr(lr=2.0, num_samples=512, batch_size=256, min_steps=4) == pytest.approx(1.0)
    # ceil(900/256) = 4 already: min_steps changed nothing, so neither does the lr.
    assert site_lr(lr=2.0, num_samples=900, batch_size=256, min_steps=4) == 2.0
    # The rule before min_steps: one step of 51, at the full lr (recorded runs replay).
    assert site_lr(lr=2.0, num_samples=51, batch_size=256, min_steps=1) == 2.0


@pytest.mark.parametrize(
    ("n", "min_steps", "batches"), [(9, 4, 4), (6, 4, 4), (45, 10, 10), (3, 4, 3)]
)
def test_non_private_sites_take_the_promised_steps(n, min_steps, batches):
    x = torch.randn(n, 4)
    data = torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))
    trainer = SiteTrainer(
        client_id=0,
        dataset=data,
        plan=None,
        ledger=PrivacyLedger(),
        batch_size=64,
        lr=0.1,
        momentum=0.0,
        device=torch.device("cpu"),
        min_steps=min_steps,
    )
    loader = trainer._plain_loader(torch.Generator().manual_seed(0))
    seen = [len(y) for _, y in loader]
    assert len(seen) == batches and sum(seen) == n and max(seen) - min(seen) <= 1


def test_unset_training_flags_follow_dp_or_not():
    dp = RunConfig(dp_epsilon=8.0)
    assert (dp.effective_lr, dp.effective_momentum, dp.effective_max_grad_norm) == (2.0, 0.5, 1.0)
    plain = RunConfig(dp_epsilon=None)
    # No clipping by default: the baseline a user would run without securefed.
    assert plain.effective_max_grad_norm is None
    # A conventional minibatch of 64 at 0.1 per 256 records; DP-SGD's large batch of 256.
    assert plain.effective_batch_size == 64 and dp.effective_batch_size == 256
    assert (plain.effective_lr, plain.effective_momentum) == (pytest.approx(0.025), 0.9)
    assert RunConfig(dp_epsilon=None, batch_size=256).effective_lr == pytest.approx(0.1)
    given = RunConfig(dp_epsilon=None, lr=0.3, momentum=0.0, max_grad_norm=2.0)
    assert (given.effective_lr, given.effective_momentum, given.effective_max_grad_norm) == (
        0.3,
        0.0,
        2.0,
    )
    with pytest.raises(Exception, match="min_steps"):
        RunConfig(min_steps=0)


def _trainer(*, max_grad_norm, lr=1.0):
    torch.manual_seed(0)
    x = torch.randn(8, 4) * 100.0  # large inputs: a gradient far above norm 1
    y = torch.zeros(8, dtype=torch.long)
    data = torch.utils.data.TensorDataset(x, y)
    return SiteTrainer(
        client_id=0,
        dataset=data,
        plan=None,
        ledger=PrivacyLedger(),
        batch_size=8,
        lr=lr,
        momentum=0.0,
        device=torch.device("cpu"),
        max_grad_norm=max_grad_norm,
    )


@pytest.mark.parametrize("clip", [None, 1.0])
def test_non_private_step_is_clipped_only_when_asked(clip):
    model = nn.Linear(4, 2)
    # Zero weights: both classes at p = 0.5, so the gradient is 0.5 x the (large) inputs
    # whatever random state earlier tests left (a random init can already fit y = 0).
    for p in model.parameters():
        nn.init.zeros_(p)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    trainer = _trainer(max_grad_norm=clip)
    trainer.train_round(model=model, round_index=1, epochs=1, generator=torch.Generator())
    moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    if clip is None:
        assert moved > 5.0  # lr 1 x the raw gradient, whose norm is in the tens
    else:
        assert moved <= 1.0 + 1e-5  # lr 1 x a gradient clipped to norm 1


@pytest.mark.parametrize(
    ("shape", "dims", "task", "name"),
    [
        ((28, 28), 2, "classification", "cnn"),
        ((64, 64), 2, "classification", "cnn"),
        ((96, 96), 2, "classification", "resnet-small"),
        ((224, 224), 2, "classification", "resnet-small"),
        ((28, 28, 28), 3, "classification", "cnn"),
        ((64, 64), 2, "segmentation", "unet"),
    ],
)
def test_auto_model_follows_the_data(shape, dims, task, name):
    spec = ModelSpec(in_channels=1, num_classes=2, spatial_dims=dims, task=task, image_shape=shape)
    assert auto_model(spec) == name


@pytest.mark.parametrize(
    ("shape", "dims", "task", "pretrained", "name"),
    [
        ((28, 28), 2, "classification", False, "scatter-linear"),
        ((64, 64), 2, "classification", False, "scatter-linear"),
        ((96, 96), 2, "classification", False, "scatter-linear"),
        ((224, 160), 2, "classification", False, "scatter-linear"),
        ((28, 28), 2, "classification", True, "cnn"),
        ((96, 96), 2, "classification", True, "resnet-small"),
        ((28, 28, 28), 3, "classification", False, "cnn"),
        ((96, 96, 96), 3, "classification", False, "cnn"),
        ((96, 96), 2, "segmentation", False, "unet"),
    ],
)
def test_auto_model_under_dp_picks_scatternet_for_2d_images(shape, dims, task, pretrained, name):
    # DP-SGD's noise grows with the weights: fixed ScatterNet features and a linear layer at
    # every 2D size, unless pretrained weights (the non-private architecture) will be loaded.
    spec = ModelSpec(in_channels=1, num_classes=2, spatial_dims=dims, task=task, image_shape=shape)
    assert auto_model(spec, private=True, pretrained=pretrained) == name


@pytest.mark.parametrize(
    ("shape", "rule", "name"),
    [
        ((28, 28), 2, "cnn"),
        ((64, 64), 2, "cnn"),
        ((96, 96), 2, "scatter-linear"),
        ((28, 28), 1, "cnn"),
        ((96, 96), 1, "resnet-small"),
    ],
)
def test_older_auto_rules_pick_what_they_picked(shape, rule, name):
    # A run recorded under rule 2 (schema 3.3-3.8) or 1 replays with the model it trained.
    spec = ModelSpec(in_channels=1, num_classes=2, image_shape=shape)
    assert auto_model(spec, private=True, rule=rule) == name


def test_resnet_small_is_dp_compatible_and_sized_for_large_images():
    spec = ModelSpec(in_channels=1, num_classes=4, image_shape=(128, 128))
    built = build_model(name="auto", spec=spec)
    assert built.name == "resnet-small"
    assert built.changes == ()  # GroupNorm already: nothing for Opacus to replace
    assert built.num_parameters < 300_000
    out = built.module(torch.zeros(2, 1, 128, 128))
    assert out.shape == (2, 4)


def test_small_sites_warn_only_under_the_old_rule(tmp_path):
    from securefed.fl.simulation import Federation

    npz = write_small_npz(tmp_path / "t.npz", n_train=120, n_val=30, n_test=40)
    # 40 records a site with B = 256: the old rule takes one step an epoch (q = 1).
    old = Federation(tiny_config(npz, batch_size=256, min_steps=1, rounds=1))
    lines = old.batch_warnings()
    assert any("q = 1" in line and "--min-steps" in line for line in lines)
    assert any("steps a round" in line or "step(s) a round" in line for line in lines)
    new = Federation(tiny_config(npz, batch_size=256, rounds=1, local_epochs=1))
    lines = new.batch_warnings()
    assert not any("q = 1" in line for line in lines)
    # 4 steps of ~10 records under DP: the noise warning names what to do instead.
    assert any("DP-SGD batches of about 10 records" in line for line in lines)


def test_cli_run_records_what_the_defaults_resolved_to(tmp_path):
    from securefed.cli import cli

    npz = write_small_npz(tmp_path / "t.npz", n_train=120, n_val=30, n_test=40)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--data",
            str(npz),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--local-epochs",
            "1",
            "--no-dp",
            "--device",
            "cpu",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["model"] == "auto" and config["run"]["lr"] is None
    assert config["resolved"]["model"]["name"] == "cnn"  # 28 px
    assert config["resolved"]["training"] == {
        "batch_size": 64,
        "min_steps": 4,
        "lr": pytest.approx(0.025),
        "momentum": 0.9,
        "max_grad_norm": None,
        "max_physical_batch_size": 64,  # a CPU's default chunk
    }
    assert "no clipping" in (out / "summary.md").read_text()


def test_a_run_recorded_before_min_steps_replays_with_its_own_rule(tmp_path):
    recorded = RunConfig().to_dict()
    del recorded["min_steps"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schema_version": "2.0", "run": recorded}))
    assert RunConfig.from_json(path).min_steps == 1
    # A hand-written file (no "run" block) gets today's default.
    path.write_text(json.dumps({"rounds": 3}))
    assert RunConfig.from_json(path).min_steps == 4


def test_a_cpu_runs_at_most_64_records_at_once_unless_told_and_a_gpu_whole_batches():
    # Memory: whole DP batches of ~200 peaked at 1.16-1.75 GB in the quick start, 64 at 0.75.
    assert RunConfig().physical_batch("cpu") == 64
    assert RunConfig().physical_batch("cuda") is None
    assert RunConfig(max_physical_batch_size=300).physical_batch("cpu") == 300
    assert RunConfig(max_physical_batch_size=8).physical_batch("cuda") == 8


def test_every_simulated_site_trains_in_cpu_chunks_and_the_warning_sees_them(monkeypatch):
    from securefed.dp import memory as memory_mod
    from securefed.fl.simulation import Federation

    config = RunConfig(
        dataset="synthetic",
        data_options={"n_train": 30, "n_val": 6, "n_test": 6},
        clients=2,
        rounds=1,
        dp_epsilon=8.0,
        device="cpu",
    )
    fed = Federation(config)
    assert [s.trainer.max_physical_batch_size for s in fed.sites] == [64, 64]
    seen = {}
    monkeypatch.setattr(
        memory_mod,
        "memory_warning",
        lambda *a, **kw: seen.update(kw) or None,
    )
    fed.memory_warning()
    assert seen["max_physical_batch_size"] == 64


def test_the_cosine_schedule_decays_the_local_lr_over_rounds_and_constant_keeps_it():
    cosine = RunConfig(rounds=10, lr_schedule="cosine")
    factors = [cosine.lr_factor(r) for r in range(1, 11)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:]))
    # The last round still trains (0.024 at R = 10), so no round's privacy is spent for nothing.
    assert factors[-1] == pytest.approx(0.0245, abs=1e-3) and factors[-1] > 0
    assert RunConfig(rounds=4, lr_schedule="cosine").lr_factor(3) == pytest.approx(0.5)
    # The default (DP or not) is constant: measured, cosine did not raise final accuracy.
    for config in (RunConfig(dp_epsilon=8.0), RunConfig(dp_epsilon=None)):
        assert config.lr_schedule == "constant"
        assert {config.lr_factor(r) for r in range(1, 11)} == {1.0}


def test_a_site_trains_each_round_at_the_scheduled_lr():
    from securefed.fl.params import ParamLayout
    from securefed.fl.site_runtime import local_update

    torch.manual_seed(0)
    n = 16
    data = torch.utils.data.TensorDataset(torch.randn(n, 4), torch.randint(0, 2, (n,)))
    config = RunConfig(
        dp_epsilon=None,
        rounds=4,
        local_epochs=1,
        lr=0.1,
        momentum=0.0,
        batch_size=n,
        min_steps=1,
        lr_schedule="cosine",
    )
    trainer = SiteTrainer(
        client_id=0,
        dataset=data,
        plan=None,
        ledger=PrivacyLedger(),
        batch_size=n,
        lr=config.effective_lr,
        momentum=0.0,
        device=torch.device("cpu"),
        min_steps=1,
    )
    model = nn.Linear(4, 2)
    layout = ParamLayout(model.state_dict())
    # One full-batch step (order-free): the update is -lr * gradient, so it scales with lr.
    first = local_update(config, trainer=trainer, layout=layout, model=model, round_index=1)[0]
    third = local_update(config, trainer=trainer, layout=layout, model=model, round_index=3)[0]
    assert first[-1] == third[-1] == n
    assert np.linalg.norm(first[:-1]) > 0
    np.testing.assert_allclose(third[:-1], 0.5 * first[:-1], rtol=1e-4, atol=1e-7)


def test_a_run_recorded_before_lr_schedule_replays_at_a_constant_lr(tmp_path):
    recorded = RunConfig().to_dict()
    del recorded["lr_schedule"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schema_version": "3.3", "run": recorded}))
    old = RunConfig.from_json(path)
    assert old.lr_schedule == "constant" and old.lr_factor(old.rounds) == 1.0


def test_a_dp_twin_drowned_in_noise_warns_and_names_the_way_out(tmp_path):
    from securefed.fl.simulation import Federation

    npz = write_small_npz(tmp_path / "t.npz", n_train=600, n_val=30, n_test=40)
    # ~50-record batches and a 56k-parameter cnn: the twin's noise is ~2x any signal.
    cfg = tiny_config(npz, batch_size=256, rounds=1, local_epochs=1, personalize=1, model="cnn")
    fed = Federation(cfg)
    lines = fed.batch_warnings()
    twin = [line for line in lines if "digital twin" in line]
    assert len(twin) == 3 and all("--freeze" in line for line in twin)
    assert all("--twin-privacy local" in line for line in twin)
    # The ratio it prints is sigma*sqrt(d)/(B*sqrt(S)), from the site's own plan.
    site = fed.sites[0]
    d = sum(p.numel() for p in site._built.module.parameters() if p.requires_grad)
    steps = site.trainer.steps_per_epoch * cfg.personalize
    ratio = site.plan.noise_multiplier * d**0.5 / (site.trainer.site_batch * steps**0.5)
    assert 1 < ratio < 10 and f"about {ratio:.1f}x" in twin[0] and f"its {steps} step(s)" in twin[0]
    # The way out it names: with only the head trainable the same twin is not drowned.
    head_only = Federation(cfg.replace(freeze="backbone")).batch_warnings()
    assert not [x for x in head_only if "twin" in x]
    # No twins, or no DP: nothing to warn about.
    assert not [x for x in Federation(cfg.replace(personalize=0)).batch_warnings() if "twin" in x]
    # Local twins add no noise: nothing to warn about either.
    local = cfg.replace(twin_privacy="local")
    assert not [x for x in Federation(local).batch_warnings() if "twin" in x]
    no_dp = cfg.replace(dp_epsilon=None)
    assert not [x for x in Federation(no_dp).batch_warnings() if "twin" in x]
