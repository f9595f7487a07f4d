import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.dp.accounting import (
    calibrate_noise,
    compute_epsilon,
    default_delta,
    sample_rate,
    steps_per_epoch,
)
from securefed.errors import PrivacyBudgetError


@settings(max_examples=15, deadline=None)
@given(
    eps=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]),
    n=st.integers(50, 5000),
    batch=st.integers(8, 256),
    steps_mult=st.integers(1, 20),
)
def test_calibrated_noise_never_overshoots_target(eps, n, batch, steps_mult):
    q = sample_rate(num_samples=n, batch_size=batch)
    steps = steps_mult * steps_per_epoch(num_samples=n, batch_size=batch)
    sigma = calibrate_noise(
        target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )
    spent = compute_epsilon(history=[(sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert spent <= eps
    # and it is not wastefully loose (binary search tolerance 0.01 in epsilon)
    assert spent >= eps - 0.05 or q == 1.0


def test_prv_calibration_is_tight_and_below_target():
    q, steps = 1 / 15, 300
    sigma = calibrate_noise(
        target_epsilon=4.0, delta=1e-5, sample_rate=q, steps=steps, accountant="prv"
    )
    eps = compute_epsilon(history=[(sigma, q, steps)], delta=1e-5, accountant="prv")
    assert 3.95 <= eps <= 4.0


def test_epsilon_grows_with_steps_and_is_zero_without():
    q, sigma = 0.05, 1.0
    eps = [
        compute_epsilon(history=[(sigma, q, s)], delta=1e-5, accountant="rdp")
        for s in (0, 10, 100, 1000)
    ]
    assert eps[0] == 0.0
    assert eps[1] < eps[2] < eps[3]


def test_unreachable_epsilon_says_what_to_change():
    with pytest.raises(PrivacyBudgetError, match="raise --dp-epsilon, or lower --rounds"):
        calibrate_noise(
            target_epsilon=1e-4, delta=1e-5, sample_rate=1.0, steps=10_000, accountant="rdp"
        )


def test_default_delta_is_below_one_over_n():
    for n in (10, 1000, 10**6):
        d = default_delta(smallest_site=n)
        assert d < 1 / n and d <= 1e-5


def test_sample_rate_matches_opacus_dataloader_convention():
    assert sample_rate(num_samples=100, batch_size=32) == 1 / 4
    assert steps_per_epoch(num_samples=100, batch_size=32) == 4
    assert math.isclose(sample_rate(num_samples=64, batch_size=64), 1.0)
