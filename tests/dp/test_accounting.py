import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.dp.accounting import (
    calibrate_noise,
    compute_epsilon,
    default_delta,
    sample_rate,
    site_delta,
    steps_per_epoch,
)
from securefed.errors import ConfigError, PrivacyBudgetError


@settings(max_examples=8, deadline=None)
@given(
    eps=st.sampled_from([1.0, 2.0, 4.0, 8.0]),
    n=st.integers(50, 5000),
    batch=st.integers(8, 256),
    steps_mult=st.integers(1, 20),
)
def test_calibrated_noise_never_overshoots_target(eps, n, batch, steps_mult):
    q = sample_rate(num_samples=n, batch_size=batch)
    steps = steps_mult * steps_per_epoch(num_samples=n, batch_size=batch)
    sigma = calibrate_noise(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps)
    spent = compute_epsilon(history=[(sigma, q, steps)], delta=1e-5)
    assert spent <= eps
    # and it is not wastefully loose (bisection stops within 0.01 in epsilon)
    assert spent >= eps - 0.05


def test_replace_one_costs_more_than_add_remove_for_the_same_noise():
    # The adjacency matters: q and the rounds' sample totals disclose n, so securefed states
    # replace-one; for the same sigma it is a larger epsilon than Opacus' add/remove figure.
    from dp_accounting import dp_event, pld

    sigma, q, steps = 1.0, 1 / 9, 180
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
        )
    )
    add_remove = acc.get_epsilon(1e-5)
    replace_one = compute_epsilon(history=[(sigma, q, steps)], delta=1e-5)
    assert replace_one > 1.3 * add_remove


def test_every_entry_of_a_history_is_composed():
    # Opacus' GaussianAccountant kept only the last entry of a multi-round history: five
    # rounds of 4 steps must cost what 20 steps cost, not what 4 cost.
    rounds = [(1.2, 0.25, 4)] * 5
    five = compute_epsilon(history=rounds, delta=1e-5)
    assert math.isclose(five, compute_epsilon(history=[(1.2, 0.25, 20)], delta=1e-5))
    assert five > 1.5 * compute_epsilon(history=rounds[-1:], delta=1e-5)


def test_epsilon_grows_with_steps_and_is_zero_without():
    q, sigma = 0.05, 1.0
    eps = [compute_epsilon(history=[(sigma, q, s)], delta=1e-5) for s in (0, 10, 100, 1000)]
    assert eps[0] == 0.0
    assert eps[1] < eps[2] < eps[3]


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_add_remove_accountants_are_refused(name):
    with pytest.raises(ConfigError, match="replace-one"):
        compute_epsilon(history=[(1.0, 0.1, 10)], delta=1e-5, accountant=name)


def test_unreachable_epsilon_says_what_to_change():
    with pytest.raises(PrivacyBudgetError, match="raise --dp-epsilon, or lower --rounds"):
        calibrate_noise(target_epsilon=1e-4, delta=1e-5, sample_rate=1.0, steps=10_000)


def test_delta_is_below_one_over_ten_n_for_very_unequal_sites():
    # min(1e-5, 1/(10 n_min)) gave 1e-5 to a site of 200,000 records: delta > 1/n there.
    sizes = [500, 200_000, 3, 10**7]
    deltas = [site_delta(num_samples=n) for n in sizes]
    for n, d in zip(sizes, deltas):
        assert d <= 1 / (10 * n) and d <= 1e-5
    assert deltas[1] == 1e-7
    assert default_delta(largest_site=max(sizes)) <= min(deltas)


def test_site_delta_never_loosens_the_runs_delta():
    assert site_delta(num_samples=100, run_delta=1e-7) == 1e-7
    assert site_delta(num_samples=10**6, run_delta=1e-5) == 1e-7
    with pytest.raises(ConfigError):
        site_delta(num_samples=100, run_delta=1.5)


def test_sample_rate_makes_an_epoch_a_whole_number_of_steps():
    assert sample_rate(num_samples=100, batch_size=32) == 1 / 4
    assert steps_per_epoch(num_samples=100, batch_size=32) == 4
    assert math.isclose(sample_rate(num_samples=64, batch_size=64), 1.0)
    # ceil(744 / 8) = 93: int(1 / q) would be 92 in float arithmetic for some such counts.
    q = sample_rate(num_samples=744, batch_size=8)
    assert round(1 / q) == 93


def test_cached_composition_equals_dp_accounting_from_scratch():
    """The cached pieces compose to dp_accounting's own figure for a multi-group history."""
    from dp_accounting import NeighboringRelation, dp_event, pld

    from securefed.dp.accounting import _group_pld, _pld_cached, pld_epsilon

    _pld_cached.cache_clear()
    _group_pld.cache_clear()
    # Three rounds of two sigmas and a calibration release, in an order the grouping sorts.
    history = [(1.3, 0.25, 4), (8.0, 1.0, 1), (0.9, 0.125, 8), (1.3, 0.25, 4), (0.9, 0.125, 8)]
    acc = pld.PLDAccountant(
        neighboring_relation=NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-3
    )
    for sigma, q, steps in history:
        acc.compose(
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
        )
    reference = acc.get_epsilon(1e-5)
    assert pld_epsilon(history=history, delta=1e-5) == pytest.approx(reference, rel=1e-9)
    # A later round reuses the one-step PLDs: the group pieces are built once per length.
    built = _group_pld.cache_info().misses
    longer = [*history, (1.3, 0.25, 4)]
    assert pld_epsilon(history=longer, delta=1e-5) > pld_epsilon(history=history, delta=1e-5)
    assert _group_pld.cache_info().misses == built + 1


def test_degenerate_events_follow_dp_accounting():
    from securefed.dp.accounting import pld_epsilon

    # q = 0 releases nothing; sigma = 0 releases the sum in clear.
    assert pld_epsilon(history=[(0.0, 0.0, 5), (1.0, 0.5, 2)], delta=1e-5) == pytest.approx(
        pld_epsilon(history=[(1.0, 0.5, 2)], delta=1e-5)
    )
    assert pld_epsilon(history=[(0.0, 0.5, 1), (1.0, 0.5, 2)], delta=1e-5) == math.inf
