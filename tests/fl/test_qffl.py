"""q-FFL (q-FedAvg) as one secure sum: the server's step, q = 0, the bound, the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.dp import fair_loss
from securefed.errors import ConfigError
from securefed.fl import qffl
from securefed.fl.bounds import aggregate_violation, coordinate_slack, site_violation


def _sites(rng, k=4, dim=7):
    updates = [rng.normal(scale=0.05, size=dim) for _ in range(k)]
    losses = [float(x) for x in rng.uniform(0.05, 3.0, size=k)]
    return updates, losses


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, 5.0])
def test_the_sum_of_fair_vectors_steps_exactly_as_the_papers_q_fedavg(q):
    # The server applies total[:-1] / total[-1] (Engine._server_step) to whatever the sum is:
    # the vectors must make that q-FedAvg's w - sum(Delta_k) / sum(h_k) (Algorithm 2).
    rng = np.random.default_rng(0)
    w = rng.normal(size=7)
    updates, losses = _sites(rng)
    lr = 0.3
    total = sum(
        qffl.fair_vector(u, weight=1.0, loss=f, q=q, lipschitz=1 / lr, max_weight=1e9)
        for u, f in zip(updates, losses)
    )
    stepped = w + total[:-1] / total[-1]
    want = qffl.server_step(w, updates, losses, q=q, lr=lr)
    np.testing.assert_allclose(stepped, want, rtol=1e-12, atol=1e-14)
    # And it is not FedAvg: the sites with larger losses pull harder.
    assert not np.allclose(stepped, w + np.mean(updates, axis=0), rtol=1e-6)


@pytest.mark.parametrize("q", [1.0, 3.0])
def test_the_fedavg_step_applies_loss_weighted_fedavg(q):
    # --fair-step fedavg: the same sum, without q-FedAvg's |u|^2 term in the denominator.
    rng = np.random.default_rng(3)
    updates, losses = _sites(rng)
    sizes = [10.0, 200.0, 35.0, 80.0]
    total = sum(
        qffl.fair_vector(u, weight=n, loss=f, q=q, lipschitz=0.5, max_weight=1e5, adaptive=False)
        for u, f, n in zip(updates, losses, sizes)
    )
    weights = [n * f**q for n, f in zip(sizes, losses)]
    want = sum(w * u for w, u in zip(weights, updates)) / sum(weights)
    np.testing.assert_allclose(total[:-1] / total[-1], want, rtol=1e-12, atol=1e-15)
    assert RunConfig(fair_q=1.0).fair_step == "fedavg"


def test_q_zero_is_todays_fedavg_vector_bit_for_bit():
    rng = np.random.default_rng(1)
    update = rng.normal(size=11)
    for loss in (0.01, 0.7, 4.0):
        for adaptive in (True, False):
            got = qffl.fair_vector(
                update,
                weight=37.0,
                loss=loss,
                q=0.0,
                lipschitz=5.0,
                max_weight=1e5,
                adaptive=adaptive,
            )
            assert np.array_equal(got, np.concatenate([37.0 * update, [37.0]]))
    cfg = RunConfig(dp_epsilon=8.0)
    assert cfg.fair_q == 0 and qffl.least_weight(cfg) == 1.0
    assert fair_loss.planned_entries(cfg.to_dict()) == ()


def test_a_site_caps_its_last_coordinate_at_the_secure_sums_range():
    # A large q-FFL h' would otherwise push the last coordinate past N_max, where masking's
    # fixed-point codec clips it and the sum's ratio breaks.
    u = np.full(4, 0.5)
    vec = qffl.fair_vector(u, weight=90.0, loss=4.0, q=2.0, lipschitz=100.0, max_weight=100.0)
    assert vec[-1] == pytest.approx(100.0)
    assert np.linalg.norm(vec[:-1]) <= vec[-1] * np.linalg.norm(u) + 1e-12


def test_the_update_bound_accepts_honest_fair_sums_and_refuses_what_no_site_can_send():
    cfg = RunConfig(dp_epsilon=8.0, fair_q=2.0)
    least = qffl.least_weight(cfg)
    assert least == pytest.approx((fair_loss.FLOOR / fair_loss.BOUND) ** 2)
    rng = np.random.default_rng(2)
    clip = 0.5
    vectors = []
    for f in (fair_loss.FLOOR, 0.3, 4.0):
        u = rng.normal(size=9)
        u *= clip / np.linalg.norm(u)  # at the bound C_u
        vectors.append(qffl.fair_vector(u, weight=1.0, loss=f, q=2.0, lipschitz=3.0, max_weight=50))
    kw = dict(contributors=3, clip=clip, max_weight=50.0, slack=0.0)
    for v in vectors:
        assert site_violation(v, clip=clip, max_weight=50.0, least_weight=least) is None
        # FedAvg's check (a whole count n >= 1) would refuse every honest q-FFL vector.
        assert site_violation(v, clip=clip, max_weight=50.0) is not None
    total = sum(vectors)
    assert aggregate_violation(total, least_weight=least, **kw) is None
    assert aggregate_violation(total, **kw) is not None  # weights below FedAvg's least
    # A sum whose update is longer than its last coordinate allows is still refused.
    over = np.concatenate([total[:-1] * 10, total[-1:]])
    assert "L2 norm" in aggregate_violation(over, least_weight=least, **kw)
    tiny = np.concatenate([total[:-1] * 0, [least * 3 * 0.5]])
    assert "weights" in aggregate_violation(tiny, least_weight=least, **kw)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"schedule": "cyclic"}, "parallel schedule"),
        ({"strategy": "cfl", "dp_epsilon": None}, "not --strategy cfl"),
        ({"server_opt": "avgm", "fair_step": "qffl"}, "--server-opt none"),
        ({"fair_step": "paper"}, "must be one of fedavg, qffl"),
        ({"task": "segmentation"}, "not segmentation"),
        ({"fair_q": -1.0}, "must be in [0, 10]"),
        ({"fair_q": float("nan")}, "must be in [0, 10]"),
        ({"fair_loss_noise": 0.5}, "must be at least 1"),
    ],
)
def test_unsupported_combinations_are_one_line_config_errors(changes, needle):
    base = {"dp_epsilon": 8.0, "fair_q": 1.0}
    with pytest.raises(ConfigError) as info:
        RunConfig(**{**base, **changes})
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert "fair" in message


def test_a_record_without_fair_q_reads_as_fedavg():
    data = RunConfig(dp_epsilon=8.0).to_dict()
    del data["fair_q"], data["fair_loss_noise"]
    recorded = RunConfig.from_recorded(data)
    assert recorded.fair_q == 0.0 and recorded.fair_loss_noise == fair_loss.NOISE_MULTIPLIER


def test_a_segmentation_data_set_is_refused_at_the_engine(tmp_path):
    from securefed.fl.simulation import Federation

    cfg = RunConfig(
        dataset="synthetic-seg",
        data_options={"n_train": 18, "n_val": 4, "n_test": 4, "image_size": 16},
        clients=2,
        rounds=1,
        device="cpu",
        fair_q=1.0,
    )
    with pytest.raises(ConfigError, match="classification losses"):
        Federation(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["qffl", "fedavg"])
def test_a_masked_round_applies_q_fedavg_of_what_the_sites_put_into_the_sum(
    small_config, monkeypatch, step
):
    # End to end through masking's fixed-point sum: the new global model is the size-weighted
    # q-FedAvg step of the sites' clipped updates and released losses.
    from securefed.fl.simulation import Federation

    seen = []
    real = qffl.fair_vector

    def spy(update, **kw):
        seen.append((np.array(update), kw))
        return real(update, **kw)

    monkeypatch.setattr(qffl, "fair_vector", spy)
    cfg = small_config.replace(
        rounds=1, fair_q=1.0, fair_step=step, secure_agg="mask", calibrate=False
    )
    fed = Federation(cfg)
    before = fed.layout.flatten(fed.global_model.state_dict())
    record = fed.run_round(1)
    assert record.applied and len(seen) == 3
    after = fed.layout.flatten(fed.global_model.state_dict())
    big_l = 1.0 / cfg.effective_lr
    num = sum(kw["weight"] * (kw["loss"] / 4) * u for u, kw in seen)
    curvature = 1.0 if step == "qffl" else 0.0
    den = sum(
        kw["weight"] * ((kw["loss"] / 4) + curvature * big_l / 4 * float(u @ u)) for u, kw in seen
    )
    # Up to masking's fixed-point rounding (one quantum per site), divided by the weight sum.
    tol = 2 * coordinate_slack(cfg, 3) / den + 1e-6
    np.testing.assert_allclose(after - before, num / den, atol=tol, rtol=0)
    assert np.abs(num / den).max() > 50 * tol  # a step far above the rounding
    # Each loss is the site's released one: within [FLOOR, B], and not all equal.
    losses = [kw["loss"] for _, kw in seen]
    assert all(fair_loss.FLOOR <= f <= fair_loss.BOUND for f in losses)
    assert len(set(losses)) == 3


def test_a_non_private_plaintext_run_uses_the_exact_loss_and_keeps_every_site(small_config):
    # Without DP nothing is released or accounted, and without secure aggregation the server
    # screens each site's own q-FFL vector: an honest one (a real-valued last coordinate) must
    # pass, or every site would be dropped.
    from securefed.fl.simulation import Federation

    cfg = small_config.replace(dp_epsilon=None, fair_q=2.0, calibrate=False)
    fed = Federation(cfg)
    records = [fed.run_round(r) for r in (1, 2)]
    assert all(r.applied and r.data["dropped"] == [] for r in records)
    assert not fed.ledger.events
    assert all(not site.ledger.events for site in fed.sites)


def test_a_q_whose_honest_weights_the_masked_sum_cannot_resolve_is_refused(small_config):
    # Review attack: at q = 5 under a 32-bit ring, five well-fitted sites (loss 0.05) sent
    # weights of 6e-8, below the codec's quantum; the decoded weight sum was 0 and the server's
    # step NaN. Such a q is refused before any round; a q the ring resolves is not.
    from securefed.fl.simulation import Federation

    masked = small_config.replace(secure_agg="mask", secagg_ring_bits=32)
    with pytest.raises(ConfigError, match="--secagg-ring-bits 64"):
        Federation(masked.replace(fair_q=5.0))
    Federation(masked.replace(fair_q=1.0))  # 0.0025 >> the quantum


def test_a_weight_sum_within_the_secure_sums_error_is_never_a_step():
    # However small least_weight is, a decoded weight at or below the slack is refused.
    total = np.zeros(4)
    for weight in (0.0, 1e-9, -1e-3):
        total[-1] = weight
        why = aggregate_violation(
            total, contributors=5, clip=1.0, max_weight=100.0, slack=1e-3, least_weight=1e-13
        )
        assert why is not None and "weights" in why
