"""Convergence detection (schema 2.3: trend over a window) on recorded and constructed curves.

The recorded curves are the global held-out test loss and accuracy per round of 10-round
PneumoniaMNIST runs (5 label-skewed sites) on the development machine, copied here as literals
(rounded to 4 decimals) so that the tests never read a run folder.
"""

import dataclasses
import json

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.errors import ConfigError, DataError
from securefed.metrics import (
    CONV_ACC_TOL,
    CONV_LOSS_TOL,
    CONV_PATIENCE,
    CONV_WINDOW,
    convergence_criteria,
    detect_convergence,
    flat_windows,
)

# DP-SGD, lr 0.5, seed 1: the loss alternates between ~1.6 and ~0.65 while the accuracy sits
# at the majority-class rate (0.625): flat accuracy, swinging loss.
DP_LOSS = [1.9443, 0.6966, 1.685, 0.7024, 1.6137, 0.6222, 1.5265, 0.6025, 1.6391, 0.6295]
DP_ACC = [0.625, 0.625, 0.625, 0.625, 0.625, 0.625, 0.625, 0.6266, 0.625, 0.6266]
# DP-SGD, seed 0: the same swing, with the accuracy leaving the majority rate twice.
DP2_LOSS = [1.6644, 0.6835, 1.4924, 0.7473, 0.9268, 0.5793, 0.9039, 0.4084, 1.1409, 0.5917]
DP2_ACC = [0.625, 0.625, 0.625, 0.625, 0.625, 0.625, 0.625, 0.8542, 0.625, 0.6715]
# No DP, seed 1: still jumping between rounds.
NODP_LOSS = [1.0437, 0.5924, 1.1494, 0.786, 0.4691, 1.5357, 0.4973, 0.7672, 0.4298, 0.4768]
NODP_ACC = [0.625, 0.7051, 0.625, 0.625, 0.8173, 0.625, 0.8029, 0.6234, 0.7853, 0.7228]

# From benchmarks/results/strategies.json (the strategies suite, PneumoniaMNIST, 5 sites):
# FTL without DP, seed 2, flat from round ~4 with a dip in round 6; FL at epsilon 8, seed 1,
# whose loss swings between ~3 and ~0.7.
FTL_ACC = [0.8574, 0.851, 0.8381, 0.8558, 0.8574, 0.8253, 0.859, 0.851, 0.8606, 0.8654]
FTL_LOSS = [0.3865, 0.3974, 0.4156, 0.3383, 0.3249, 0.4341, 0.3783, 0.3867, 0.3477, 0.3138]
FL_DP_ACC = [0.625, 0.492, 0.625, 0.375, 0.625, 0.6442, 0.625, 0.6218, 0.625, 0.6154]
FL_DP_LOSS = [3.4583, 0.7367, 3.3734, 1.1626, 2.2976, 0.6379, 1.7621, 0.6149, 2.3558, 0.6515]

ROUNDS = np.arange(1, 11)


def _converge(acc, loss, seconds=None, **kwargs):
    seconds = [1.0] * len(acc) if seconds is None else seconds
    params = {
        "acc_tol": CONV_ACC_TOL,
        "loss_tol": CONV_LOSS_TOL,
        "patience": CONV_PATIENCE,
        "window": CONV_WINDOW,
    } | kwargs
    return detect_convergence(accuracies=acc, losses=loss, seconds=seconds, **params)


def _old_rule(acc, loss, *, acc_tol=0.005, loss_tol=0.01, patience=3):
    """The rule before schema 2.3 (consecutive-round changes), kept here for comparison."""
    stable = (np.abs(np.diff(acc)) < acc_tol) & (np.abs(np.diff(loss)) < loss_tol)
    run = 0
    for i, ok in enumerate(stable):
        run = run + 1 if ok else 0
        if run == patience:
            return i + 2 - patience
    return None


def _saturating(seed):
    """A curve that rises and flattens by round ~5, plus uniform noise of +-0.02 per round."""
    rng = np.random.default_rng(seed)
    acc = 0.85 - 0.35 * np.exp(-(ROUNDS - 1) / 1.5) + rng.uniform(-0.02, 0.02, ROUNDS.size)
    loss = 0.35 + 0.6 * np.exp(-(ROUNDS - 1) / 1.5) + rng.uniform(-0.02, 0.02, ROUNDS.size)
    return acc.tolist(), loss.tolist()


def _climbing(seed):
    """Still improving: +0.03 accuracy and -0.06 loss per round, same noise."""
    rng = np.random.default_rng(seed)
    acc = 0.5 + 0.03 * (ROUNDS - 1) + rng.uniform(-0.02, 0.02, ROUNDS.size)
    loss = 1.0 - 0.06 * (ROUNDS - 1) + rng.uniform(-0.02, 0.02, ROUNDS.size)
    return acc.tolist(), loss.tolist()


@pytest.mark.parametrize(
    ("acc", "loss"),
    [(DP_ACC, DP_LOSS), (DP2_ACC, DP2_LOSS), (NODP_ACC, NODP_LOSS), (FL_DP_ACC, FL_DP_LOSS)],
    ids=["dp-lr05-s1", "dp-s0", "nodp-s1", "suite-fl-eps8-s1"],
)
def test_recorded_oscillating_runs_have_not_converged(acc, loss):
    # Execute / Assert
    assert _converge(acc, loss) is None


def test_a_swinging_loss_is_what_refuses_the_recorded_dp_run():
    # Prepare: the accuracy alone is as flat as it gets (the model predicts the majority)
    flat_loss = [1.0] * len(DP_ACC)

    # Execute / Assert: with a flat loss the same accuracy converges at once; with the
    # recorded loss, whose slope over a window is near zero, the scatter bound refuses it
    assert _converge(DP_ACC, flat_loss) == {"round": 1, "seconds": 1.0}
    assert not flat_windows(DP_LOSS, tol=CONV_LOSS_TOL, window=CONV_WINDOW).any()


def test_a_noisy_curve_that_has_flattened_converges():
    # Prepare
    acc, loss = _saturating(seed=7)

    # Execute
    result = _converge(acc, loss)

    # Assert: found, on the plateau (the rise is over by round ~5 of 10)
    assert result is not None
    assert 3 <= result["round"] <= 6
    assert result["seconds"] == float(result["round"])


def test_noisy_flattened_curves_converge_and_climbing_ones_do_not_across_seeds():
    # Execute
    flattened = [_converge(*_saturating(seed)) for seed in range(100)]
    climbing = [_converge(*_climbing(seed)) for seed in range(100)]

    # Assert: the noise draws decide the exact round, not whether a plateau is seen
    assert sum(r is not None for r in flattened) >= 85
    assert all(r is None for r in climbing)


def test_the_old_rule_misses_a_flattened_noisy_curve_the_new_rule_finds():
    # Prepare
    acc, loss = _saturating(seed=7)

    # Execute / Assert: every round jitters by more than 0.005, so the old rule never fires
    assert _old_rule(acc, loss) is None
    assert _converge(acc, loss) is not None


def test_a_steadily_improving_curve_does_not_converge():
    # Prepare: no noise at all, +0.02 per round (0.08 across a window of 5)
    acc = [0.5 + 0.02 * r for r in range(10)]
    loss = [1.0 - 0.06 * r for r in range(10)]

    # Execute / Assert
    assert _converge(acc, loss) is None
    assert _converge(*_climbing(seed=3)) is None


def test_the_docstring_example():
    # Prepare
    acc = [0.50, 0.70, 0.80, 0.83, 0.81, 0.84, 0.82, 0.83]

    # Execute
    windows = flat_windows(acc, tol=0.02, window=4)
    result = _converge(acc, [1.0] * 8, window=4, acc_tol=0.02, patience=2)

    # Assert
    assert windows.tolist() == [False, False, True, True, True]
    assert result == {"round": 3, "seconds": 3.0}
    assert _old_rule(acc, [1.0] * 8, acc_tol=0.02, patience=2) is None


def test_too_few_rounds_is_none_and_just_enough_is_round_one():
    # Prepare: window 5 and patience 2 need 6 rounds
    flat = [0.9] * 6

    # Execute / Assert
    assert _converge(flat[:5], flat[:5]) is None
    assert _converge(flat, flat, seconds=[1.5, 1, 1, 1, 1, 1]) == {"round": 1, "seconds": 1.5}
    assert _converge([], []) is None


def test_the_plateau_round_is_the_first_round_of_the_first_flat_window():
    # Prepare: a rise, then a flat stretch from round 4
    acc = [0.2, 0.5, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    seconds = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]

    # Execute / Assert
    assert _converge(acc, [1.0] * 9, seconds=seconds) == {"round": 4, "seconds": 10.0}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_value_is_never_flat(bad):
    # Prepare: a perfectly flat run but for one value in round 5
    loss = [0.5] * 10
    loss[4] = bad

    # Execute
    windows = flat_windows(loss, tol=CONV_LOSS_TOL, window=5)

    # Assert: every window holding round 5 is not flat; only the last one (rounds 6-10) is
    assert windows.tolist() == [False] * 5 + [True]
    assert _converge([0.8] * 10, loss) is None


def test_scatter_above_the_tolerance_is_not_flat_even_without_a_trend():
    # Prepare: symmetric jitter of +-0.04 around 0.8, no trend
    acc = [0.76, 0.84, 0.76, 0.84, 0.76, 0.84, 0.76, 0.84]

    # Execute / Assert
    assert not flat_windows(acc, tol=0.025, window=4).any()
    assert flat_windows(acc, tol=0.06, window=4).all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"acc_tol": float("nan")}, ConfigError),
        ({"loss_tol": -1.0}, ConfigError),
        ({"patience": 0}, ConfigError),
        ({"window": 2}, ConfigError),
        ({"window": True}, ConfigError),
        ({"loss": [1.0]}, DataError),
        ({"seconds": [1.0, -1.0, 1.0]}, DataError),
    ],
)
def test_convergence_rejects_bad_arguments(kwargs, error):
    # Prepare
    call = {"acc": [0.5, 0.5, 0.5], "loss": [1.0, 1.0, 1.0]} | kwargs

    # Execute / Assert
    with pytest.raises(error):
        _converge(**call)


def test_criteria_name_the_rule_and_every_parameter():
    # Execute
    criteria = convergence_criteria(
        metric="mean_dice", acc_tol=0.03, loss_tol=0.1, patience=3, window=6
    )

    # Assert
    assert criteria == {
        "rule": "trend-window",
        "metric": "mean_dice",
        "window": 6,
        "patience": 3,
        "acc_tol": 0.03,
        "loss_tol": 0.1,
        "noise_sigmas": 2.0,
    }


def test_a_config_file_from_before_the_window_setting_still_loads(tmp_path):
    # Prepare: a 2.2-era configuration (no conv_window; the old tolerances)
    old = dataclasses.asdict(RunConfig())
    del old["conv_window"]
    old |= {"conv_acc_tol": 0.005, "conv_loss_tol": 0.01, "conv_patience": 3}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"run": old}))

    # Execute
    config = RunConfig.from_json(path)

    # Assert
    assert config.conv_window == CONV_WINDOW
    assert (config.conv_acc_tol, config.conv_patience) == (0.005, 3)


def test_a_window_below_three_is_refused_by_the_config():
    # Execute / Assert
    with pytest.raises(ConfigError, match="conv"):
        RunConfig(conv_window=2)


def test_suites_recompute_convergence_by_the_same_rule():
    # Prepare: a suite sees a run's rounds as metrics.json records them
    from securefed.bench.common import curve_convergence
    from securefed.bench.privacy_utility import PrivacyUtilityGrid
    from securefed.bench.strategies import ComparisonGrid

    acc, loss = _saturating(seed=7)
    rounds = [{"global": {"accuracy": a, "loss": lo}, "seconds": 2.0} for a, lo in zip(acc, loss)]

    # Execute
    for grid in (PrivacyUtilityGrid(), ComparisonGrid()):
        params = {
            "acc_tol": grid.conv_acc_tol,
            "loss_tol": grid.conv_loss_tol,
            "patience": grid.conv_patience,
            "window": grid.conv_window,
        }
        suite = curve_convergence(rounds, **params)
        run = _converge(acc, loss, seconds=[2.0] * len(acc), **params)

        # Assert: a run's defaults, and the run's answer
        assert params == {
            "acc_tol": RunConfig().conv_acc_tol,
            "loss_tol": RunConfig().conv_loss_tol,
            "patience": RunConfig().conv_patience,
            "window": RunConfig().conv_window,
        }
        assert run is not None
        assert suite == run


def test_a_recorded_plateau_is_found_where_it_begins_not_three_rounds_later():
    # Execute / Assert: the old rule waits for three calm rounds in a row (round 7); the trend
    # over windows sees the plateau from round 4 despite the round-6 dip
    assert _converge(FTL_ACC, FTL_LOSS)["round"] == 4
    assert _old_rule(FTL_ACC, FTL_LOSS, acc_tol=0.01, loss_tol=0.05) == 7
