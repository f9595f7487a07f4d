"""Secret DP randomness: the samplers' distributions, the keys, and DP-SGD built on them."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from securefed.config import RunConfig
from securefed.deploy.site import NodeSettings
from securefed.dp.accounting import compute_epsilon, sample_rate, steps_per_epoch
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.noise import SecretNoise, SeededNoise
from securefed.dp.trainer import DPPlan, NoiseDPOptimizer, PoissonBatchSampler, SiteTrainer
from securefed.errors import ConfigError, PrivacyBudgetError
from securefed.fl.planning import mechanism_noise


# -- samplers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("draws", [1, 4])
def test_gaussian_is_standard_normal(draws):
    z = SeededNoise(1, draws).gaussian(40_000, draws=draws)
    assert z.dtype == torch.float64 and z.shape == (40_000,)
    x = z.numpy()
    # Moments, with ~5 standard errors of slack, and Kolmogorov-Smirnov against N(0, 1).
    assert abs(x.mean()) < 5 / math.sqrt(len(x))
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / len(x))
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / len(x))
    assert stats.kstest(x, "norm").pvalue > 1e-4


def test_gaussian_shape_and_uniform_range():
    noise = SecretNoise()
    assert noise.gaussian((3, 4, 5)).shape == (3, 4, 5)
    assert noise.gaussian(7, draws=3).shape == (7,)
    u = noise.uniform(100_000)
    assert u.dtype == torch.float64
    assert float(u.min()) > 0 and float(u.max()) <= 1
    with pytest.raises(ValueError, match="draws"):
        noise.gaussian(3, draws=0)


@pytest.mark.parametrize("p", [1e-3, 1 / 93, 0.3, 0.5])
def test_bernoulli_rate(p):
    n = 200_000
    b = SeededNoise(2).bernoulli(n, p)
    assert b.dtype == torch.bool and b.shape == (n,)
    assert abs(float(b.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_bernoulli_edges():
    noise = SecretNoise()
    assert bool(noise.bernoulli(1000, 1.0).all())
    assert not bool(noise.bernoulli(1000, 0.0).any())
    assert noise.bernoulli(0, 0.5).shape == (0,)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            noise.bernoulli(10, bad)


# -- keys -------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_two_secret_sources_differ_even_under_identical_global_seeds():
    _seed_everything(0)
    a = SecretNoise().gaussian(64)
    _seed_everything(0)
    b = SecretNoise().gaussian(64)
    assert not torch.equal(a, b)


def test_the_secret_key_never_depends_on_the_seed():
    # No seed can be handed in at all, and its stream is not the seeded one for any label set
    # the runtime uses.
    with pytest.raises(TypeError):
        SecretNoise(0)  # type: ignore[call-arg]
    secret = SecretNoise().random_bytes(32)
    for labels in [(), (4, 1, 0), (6, 1, 0)]:
        assert SeededNoise(0, *labels).random_bytes(32) != secret
    assert "key" not in repr(SecretNoise()).lower().replace("kind", "")


def test_seeded_noise_is_deterministic_and_separates_labels():
    assert torch.equal(SeededNoise(7, 4, 1, 0).gaussian(32), SeededNoise(7, 4, 1, 0).gaussian(32))
    a = SeededNoise(7, 4, 1, 0).random_bytes(32)
    assert a != SeededNoise(7, 4, 1, 1).random_bytes(32)
    assert a != SeededNoise(8, 4, 1, 0).random_bytes(32)
    assert SeededNoise(1, 23).random_bytes(32) != SeededNoise(12, 3).random_bytes(32)


def test_each_request_gets_fresh_keystream():
    noise = SeededNoise(3)
    assert noise.random_bytes(64) != noise.random_bytes(64)


def test_runtime_hands_out_secret_noise_unless_reproducible_is_asked_for():
    assert mechanism_noise(RunConfig(), 4, 1, 0).kind == "secret"
    seeded = mechanism_noise(RunConfig(reproducible_noise=True), 4, 1, 0)
    assert seeded.kind == "reproducible"
    assert seeded.random_bytes(16) == SeededNoise(0, 4, 1, 0).random_bytes(16)
    with pytest.raises(ConfigError, match="reproducible_noise"):
        RunConfig(reproducible_noise="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("command", ["train", "deploy_run"])
def test_the_reproducible_noise_flag_reaches_the_run_config(command):
    import securefed.cli as cli

    cmd = getattr(cli, command)
    base = ["--out", "x"] if command == "deploy_run" else []

    def config(*args: str) -> RunConfig:
        ctx = cmd.make_context(command, [*base, *args])
        p = dict(ctx.params)
        deploy_only = ("certs", "insecure", "superlink", "federation_key", "roster")
        for key in ("out", "quiet", "resume", "stop_after", "insecure_no_roster", *deploy_only):
            p.pop(key, None)
        for key in [k for k in p if k.endswith("_timeout")]:
            p.pop(key)
        return cli._config_from_flags(p.pop("config_file"), p.pop("no_dp"), p.pop("data_option"), p)

    assert config().reproducible_noise is False
    assert config("--reproducible-noise").reproducible_noise is True


def test_a_site_refuses_reproducible_noise_unless_it_allows_it():
    config = RunConfig(reproducible_noise=True)
    with pytest.raises(PrivacyBudgetError, match="allow-reproducible-noise"):
        NodeSettings.from_node_config({"site-id": 0}).check_policy(config)
    allowed = NodeSettings.from_node_config({"site-id": 0, "allow-reproducible-noise": True})
    assert allowed.allow_reproducible_noise
    allowed.check_policy(config)
    NodeSettings(site_id=0).check_policy(RunConfig())  # the default run needs no permission
    with pytest.raises(ConfigError, match="allow-reproducible-noise"):
        NodeSettings.from_node_config({"site-id": 0, "allow-reproducible-noise": "yes"})


# -- DP-SGD on top ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # no input needs a grad
def test_dp_optimizer_adds_noise_of_std_sigma_c_over_the_expected_batch():
    torch.manual_seed(0)
    model = GradSampleModule(nn.Linear(100, 100))
    sigma, c, batch = 2.0, 0.5, 8.0
    opt = NoiseDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise=SecretNoise(),
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=batch,
    )
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # An empty Poisson batch: the step is noise only.
    model(torch.zeros(0, 100)).sum().backward()
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (before - after).double()
    assert moved.numel() == 100 * 100 + 100
    assert abs(float(moved.std()) / (sigma * c / batch) - 1) < 0.05
    assert abs(float(moved.mean())) < 5 * sigma * c / batch / math.sqrt(moved.numel())


def _tiny_trainer(n: int, batch: int, *, ledger=None, accountant: str = "pld") -> SiteTrainer:
    g = torch.Generator().manual_seed(n)
    data = TensorDataset(torch.randn(n, 2, generator=g), torch.randint(0, 2, (n,), generator=g))
    steps = steps_per_epoch(num_samples=n, batch_size=batch)
    plan = DPPlan(
        noise_multiplier=1.0,
        sample_rate=sample_rate(num_samples=n, batch_size=batch),
        max_grad_norm=1.0,
        planned_steps=steps,
        delta=1e-5,
        accountant=accountant,
    )
    return SiteTrainer(
        client_id=0,
        dataset=data,
        plan=plan,
        ledger=ledger or PrivacyLedger(),
        batch_size=batch,
        lr=0.1,
        momentum=0.0,
        device=torch.device("cpu"),
    )


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 400), batch=st.integers(1, 64))
@example(n=744, batch=8)  # ceil(n/B) = 93: Opacus took int(1/q) = 92 steps and aborted
@example(n=1, batch=1)
def test_poisson_loader_runs_ceil_n_over_b_steps_at_the_planned_rate(n, batch):
    trainer = _tiny_trainer(n, batch)
    steps = math.ceil(n / batch)
    sampler = PoissonBatchSampler(
        num_samples=n, sample_rate=trainer.plan.sample_rate, steps=steps, noise=SeededNoise(n)
    )
    assert len(sampler) == steps
    batches = list(sampler)
    assert len(batches) == steps
    assert all(0 <= i < n for b in batches for i in b)
    result = trainer.train_round(
        model=nn.Linear(2, 2),
        round_index=1,
        epochs=1,
        generator=torch.Generator(),
        noise=SeededNoise(n, batch),
    )
    (event,) = trainer.ledger.events
    assert result.steps == event.steps == steps == trainer.plan.planned_steps
    assert event.sample_rate == trainer.plan.sample_rate == 1 / steps


def test_dp_training_needs_a_noise_source():
    with pytest.raises(ValueError, match="NoiseSource"):
        _tiny_trainer(20, 5).train_round(
            model=nn.Linear(2, 2), round_index=1, epochs=1, generator=torch.Generator()
        )


def test_epsilon_comes_from_the_ledger_and_resumed_rounds_stay_on_it():
    # Opacus' GaussianAccountant replaced its history when a step had new (sigma, q); the
    # trainer keeps no accountant, only the ledger, which never forgets.
    accountant = "pld"
    trainer = _tiny_trainer(40, 8, accountant=accountant)
    plan = trainer.plan
    earlier = PrivacyEvent(
        round=1,
        client_id=0,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=5,
        max_grad_norm=plan.max_grad_norm,
    )
    trainer.resume_accounting([earlier])
    trainer.train_round(
        model=nn.Linear(2, 2),
        round_index=2,
        epochs=2,
        generator=torch.Generator(),
        noise=SecretNoise(),
    )
    history = trainer.ledger.history(0)
    assert [h[2] for h in history] == [5, 10]
    assert trainer.epsilon() == compute_epsilon(history=history, delta=1e-5, accountant=accountant)
    assert trainer.epsilon() > compute_epsilon(
        history=history[1:], delta=1e-5, accountant=accountant
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_noise_drawn_on_cpu_reaches_gradients_on_cuda():
    trainer = _tiny_trainer(40, 8)
    trainer.device = torch.device("cuda")
    result = trainer.train_round(
        model=nn.Linear(2, 2),
        round_index=1,
        epochs=1,
        generator=torch.Generator(),
        noise=SecretNoise(),
    )
    assert trainer.ledger.events[0].steps == 5
    assert all(v.device.type == "cpu" and bool(v.isfinite().all()) for v in result.state.values())
