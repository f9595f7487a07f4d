"""Server optimizers are post-processing of the average update: exact formulas, own state."""

import numpy as np
import pytest

from securefed.errors import ConfigError
from securefed.fl.strategies import FedAdam, FedAvg, FedAvgM, build_server_optimizer


def test_fedavg_applies_the_average_update_scaled_by_the_server_lr():
    w, d = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    np.testing.assert_allclose(FedAvg(lr=1.0).step(current=w, delta=d), [1.5, -1.75])
    np.testing.assert_allclose(FedAvg(lr=0.5).step(current=w, delta=d), [1.25, -1.875])


def test_fedavgm_accumulates_momentum_across_rounds():
    opt = FedAvgM(lr=1.0, momentum=0.9)
    w, d = np.zeros(2), np.ones(2)
    w1 = opt.step(current=w, delta=d)
    w2 = opt.step(current=w1, delta=d)
    np.testing.assert_allclose(w1, [1.0, 1.0])
    # v2 = 0.9 * 1 + 1 = 1.9
    np.testing.assert_allclose(w2, [2.9, 2.9])


def test_fedadam_matches_reddi_et_al_algorithm_2_by_hand():
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w, d = np.array([0.0]), np.array([0.2])
    m = 0.1 * 0.2
    v = 0.99 * 1e-6 + 0.01 * 0.04
    expected = 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(opt.step(current=w, delta=d), [expected])


def test_step_does_not_modify_the_current_vector():
    w = np.ones(3)
    FedAdam(lr=0.1).step(current=w, delta=np.ones(3))
    np.testing.assert_array_equal(w, np.ones(3))


def test_unknown_server_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="known: none, avgm, adam"):
        build_server_optimizer(name="sgdx", lr=1.0)
