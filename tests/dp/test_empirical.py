"""The one-run empirical audit: its bound, its canaries, and that it catches a noise bug."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from securefed.bench.privacy_audit import audit_site
from securefed.dp.empirical import (
    GUESS_FRACTIONS,
    GradientCanaries,
    empirical_epsilon,
    epsilon_lower_bound,
    p_value,
)
from securefed.dp.noise import SecretNoise
from securefed.errors import AuditError, ConfigError


class _SilencedNoise(SecretNoise):
    """The planted bug: Poisson coins as usual, Gaussian noise switched off.

    Test-only: injected through ``audit_site``'s internal ``mechanism_noise`` argument, which
    no CLI option reaches. The ledger still records the calibrated sigma, so the analytical
    epsilon still claims the target.
    """

    def gaussian(self, shape, *, draws: int = 4) -> torch.Tensor:
        shape = (int(shape),) if isinstance(shape, int) else tuple(shape)
        return torch.zeros(shape, dtype=torch.float64)


def test_all_guesses_right_gives_the_closed_form_bound_growing_with_r():
    # delta = 0, v = r: p_value = p^r, so the bound solves p^r = 0.05, eps = logit(p).
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        expected = math.log(p / (1 - p))
        assert epsilon_lower_bound(m=r, r=r, v=r) == pytest.approx(expected, abs=1e-5)
    bounds = [epsilon_lower_bound(m=1000, r=r, v=r) for r in (10, 100, 1000)]
    assert bounds[0] < bounds[1] < bounds[2] < 8


def test_chance_level_guesses_prove_nothing():
    assert epsilon_lower_bound(m=1000, r=1000, v=500) == 0.0
    assert epsilon_lower_bound(m=1000, r=1000, v=300) == 0.0
    assert epsilon_lower_bound(m=10, r=0, v=0) == 0.0


def test_delta_weakens_the_bound_and_the_p_value_is_a_tail():
    no_delta = epsilon_lower_bound(m=1000, r=200, v=190)
    with_delta = epsilon_lower_bound(m=1000, r=200, v=190, delta=1e-4)
    assert 0 < with_delta < no_delta
    # At the bound the p-value crosses 1 - confidence.
    assert p_value(m=1000, r=200, v=190, epsilon=no_delta - 1e-3, delta=0) < 0.05
    assert p_value(m=1000, r=200, v=190, epsilon=no_delta + 1e-3, delta=0) >= 0.05
    with pytest.raises(ValueError):
        p_value(m=10, r=20, v=5, epsilon=1.0, delta=0)


def test_empirical_epsilon_separated_scores_versus_independent_scores():
    g = torch.Generator().manual_seed(0)
    # Exactly 200 of each, so the 200 highest and 200 lowest can all be right.
    signs = torch.tensor([1, -1] * 200)[torch.randperm(400, generator=g)]
    perfect = empirical_epsilon(signs.double() + 0.01 * torch.randn(400, generator=g), signs,
                                delta=0.0)  # fmt: skip
    # All 400 guesses right, tested at 0.05 / len(GUESS_FRACTIONS): logit(p) with p^400 = that.
    p = (0.05 / len(GUESS_FRACTIONS)) ** (1 / 400)
    assert perfect.guesses == perfect.correct == 400
    assert perfect.eps_emp == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    blind = empirical_epsilon(torch.randn(400, generator=g), signs, delta=0.0)
    assert blind.eps_emp < 0.5


def test_bad_records_are_one_clear_error():
    with pytest.raises(AuditError, match="3 scores for 2"):
        empirical_epsilon([1.0, 2.0, 3.0], [1, -1], delta=0.0)
    with pytest.raises(AuditError, match="neither"):
        empirical_epsilon([1.0, 2.0], [1, 0], delta=0.0)
    with pytest.raises(AuditError, match="finite"):
        empirical_epsilon([1.0, float("nan")], [1, -1], delta=0.0)


def test_canary_places_and_coins_are_secret_not_seeded():
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        c = GradientCanaries(count=50)
        c._draw(10_000)
        draws.append((c.coordinates.tolist(), c.signs.tolist()))
        assert len(set(draws[-1][0])) == 50  # distinct coordinates
    assert draws[0] != draws[1]
    with pytest.raises(ConfigError, match="needs a trainable parameter of its own"):
        GradientCanaries(count=50)._draw(49)


def _site(n: int = 240) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0.5).long())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 2))


_AUDIT = {"canaries": 300, "epochs": 4, "batch_size": 60}


def test_planted_bug_no_noise_is_caught_above_the_claim():
    """Noise off while the ledger claims eps = 1: eps_emp refutes the claim."""
    out = audit_site(
        dataset=_site(), model=_model(), epsilon=1.0, mechanism_noise=_SilencedNoise, **_AUDIT
    )
    assert out["epsilon_spent"] <= 1.0  # the ledger still claims the target
    assert out["noise_multiplier"] > 1.0
    assert out["eps_emp"] > 1.0, out
    # Nearly every guess right (a real gradient may still mask a canary's coordinate).
    assert out["correct"] >= 0.95 * out["guesses"]


def test_real_noise_stays_below_the_claim_and_no_noise_is_clearly_positive():
    noisy = audit_site(dataset=_site(), model=_model(), epsilon=2.0, **_AUDIT)
    assert noisy["eps_emp"] <= noisy["epsilon_spent"] <= 2.0
    assert noisy["steps"] == 4 * 4  # every noisy step carried the canaries
    bare = audit_site(dataset=_site(), model=_model(), epsilon=None, **_AUDIT)
    assert bare["epsilon_spent"] is None
    assert bare["eps_emp"] > 2.5
