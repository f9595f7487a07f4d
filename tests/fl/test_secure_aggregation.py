"""Secure aggregation in a federated run: plaintext FedAvg numbers; failures change nothing."""

import numpy as np
import pytest

from securefed.fl.simulation import Federation


def _final_weights(config, schedule=None):
    fed = Federation(config, dropout_schedule=schedule)
    records = [fed.run_round(r) for r in range(1, config.rounds + 1)]
    return fed.layout.flatten(fed.global_model.state_dict()), records, fed


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mask", "he"])
def test_secure_run_matches_plaintext_fedavg(small_config, mode):
    small_config = small_config.replace(reproducible_noise=True)  # same DP noise in both runs
    plain, _, _ = _final_weights(small_config)
    secure, records, fed = _final_weights(small_config.replace(secure_agg=mode))
    assert all(r.applied for r in records)
    # Same seed, same DP noise: secure aggregation never draws from the training RNG.
    np.testing.assert_allclose(secure, plain, atol=1e-4, rtol=0)
    assert np.abs(secure - plain).max() > 0 or mode == "mask"
    desc = fed.aggregator.describe()
    assert desc["protocol"] in {"secagg", "secagg+", "ckks"} or "protocol" in desc


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["after", "before"])
def test_dropouts_equal_plaintext_fedavg_over_survivors(small_config, phase):
    cfg = small_config.replace(
        clients=4, dropout_clients=1, dropout_phase=phase, rounds=2, reproducible_noise=True
    )
    plain, precs, _ = _final_weights(cfg)
    masked, mrecs, _ = _final_weights(cfg.replace(secure_agg="mask"))
    np.testing.assert_allclose(masked, plain, atol=1e-4, rtol=0)
    for p, m in zip(precs, mrecs):
        assert p.data["survivors"] == m.data["survivors"]
        if phase == "before":
            assert len(m.data["survivors"]) == 3
        else:
            # a site that drops after uploading is recovered: its update is in the sum
            assert len(m.data["survivors"]) == 4


@pytest.mark.slow
def test_too_few_survivors_leave_the_global_model_unchanged(small_config):
    cfg = small_config.replace(secure_agg="mask", clients=3, secagg_threshold=3, rounds=1)
    fed = Federation(cfg, dropout_schedule=lambda r, chosen: ({chosen[0]}, set()))
    before = fed.layout.flatten(fed.global_model.state_dict())
    rec = fed.run_round(1)
    after = fed.layout.flatten(fed.global_model.state_dict())
    assert not rec.applied
    assert "threshold" in rec.data["error"]
    np.testing.assert_array_equal(before, after)
    # privacy spent by the sites that trained is still on the books
    assert all(s.trainer.epsilon() > 0 for s in fed.sites)
