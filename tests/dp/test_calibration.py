"""Decision calibration under DP: its sensitivity, its accounting, and the sites' guards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from securefed.dp import calibration
from securefed.dp.accounting import calibrate_noise, pld_epsilon
from securefed.errors import PrivacyBudgetError, ProtocolError

R = calibration.CLIP


def _worst_pairs(k: int, rng: np.random.Generator):
    """Neighbouring data sets (one record replaced), including the worst cases."""
    for _ in range(200):
        n = int(rng.integers(1, 30))
        logits = rng.normal(0, 50, size=(n, k))  # far past the clip
        labels = rng.integers(0, k, size=n)
        other = logits.copy()
        other_labels = labels.copy()
        i = int(rng.integers(0, n))
        other[i] = -logits[i] * rng.uniform(0.5, 2)  # opposite direction: the worst row change
        other_labels[i] = rng.integers(0, k)
        yield (logits, labels), (other, other_labels)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_replacing_one_record_moves_the_statistics_by_at_most_2r(k):
    # The accounting entry (sigma, q=1, steps=1, C=R) is only right if this holds.
    rng = np.random.default_rng(k)
    worst = 0.0
    for (a, ya), (b, yb) in _worst_pairs(k, rng):
        va = calibration.site_statistics(a, ya, num_classes=k)
        vb = calibration.site_statistics(b, yb, num_classes=k)
        worst = max(worst, float(np.linalg.norm(va - vb)))
    assert worst <= 2 * R + 1e-9
    assert worst > 1.5 * R  # the bound is nearly met: the test exercises the worst case


def test_statistics_refuse_labels_and_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="labels must lie"):
        calibration.site_statistics(np.zeros((2, 2)), np.array([0, 2]), num_classes=2)
    with pytest.raises(ValueError, match="need logits"):
        calibration.site_statistics(np.zeros((2, 3)), np.array([0, 1]), num_classes=2)


def _skewed_scores(rng, n0=1200, n1=3400, m0=1.43, m1=1.93, sd=0.3):
    """A DP-trained binary model as measured on PneumoniaMNIST (seed 1): every logit
    difference is positive, so the raw model calls every image class 1."""
    d = np.concatenate([rng.normal(m0, sd, n0), rng.normal(m1, sd, n1)])
    y = np.concatenate([np.zeros(n0, int), np.ones(n1, int)])
    return np.stack([-d / 2, d / 2], axis=1), y


def _balanced_accuracy(logits, y):
    pred = logits.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def test_noised_statistics_of_five_sites_move_a_one_class_model_to_the_midpoint():
    rng = np.random.default_rng(0)
    logits, y = _skewed_scores(rng)
    assert _balanced_accuracy(logits, y) == 0.5  # one class for everything
    sites = np.array_split(rng.permutation(len(y)), 5)
    sigma = calibration.NOISE_MULTIPLIER
    total = sum(
        calibration.site_statistics(logits[i], y[i], num_classes=2)
        + rng.normal(0, sigma * R, calibration.statistics_size(2))
        for i in sites
    )
    cal = calibration.offsets_from_sum(total, num_classes=2, sites=5, noise_multiplier=sigma)
    assert cal.applied, cal.reason
    threshold = -(cal.offsets[1] - cal.offsets[0])  # logit difference where the call flips
    assert threshold == pytest.approx((1.43 + 1.93) / 2, abs=0.15)
    assert _balanced_accuracy(logits + np.array(cal.offsets), y) > 0.75


def test_calibration_is_skipped_when_noise_would_set_it():
    rng = np.random.default_rng(1)
    logits, y = _skewed_scores(rng, n0=8, n1=40)  # a handful of records of one class
    total = calibration.site_statistics(logits, y, num_classes=2)
    cal = calibration.offsets_from_sum(total, num_classes=2, sites=2, noise_multiplier=8.0)
    assert not cal.applied and "fewer than" in cal.reason and cal.offsets == [0.0, 0.0]
    logits, y = _skewed_scores(rng, m0=1.5, m1=1.5)  # no signal: the means coincide
    total = calibration.site_statistics(logits, y, num_classes=2)
    cal = calibration.offsets_from_sum(total, num_classes=2, sites=5, noise_multiplier=8.0)
    assert not cal.applied and "under twice the noise" in cal.reason


def test_the_plan_leaves_room_for_the_release_and_refuses_a_budget_it_alone_would_pass():
    q, steps = 1 / 12, 240
    plain = calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps)
    entries = calibration.planned_entries({"dp_epsilon": 8.0, "calibrate": True})
    assert entries == ((calibration.NOISE_MULTIPLIER, 1.0, 1),)
    sigma = calibrate_noise(
        target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps, extra=entries
    )
    assert sigma > plain
    # With sigma planned without the release, release and steps together pass the target.
    assert pld_epsilon(history=[(plain, q, steps), *entries], delta=1e-5) > 8.0
    assert pld_epsilon(history=[(sigma, q, steps), *entries], delta=1e-5) <= 8.0
    with pytest.raises(PrivacyBudgetError, match="--no-calibrate"):
        calibrate_noise(target_epsilon=0.5, delta=1e-5, sample_rate=q, steps=steps, extra=entries)


@pytest.mark.parametrize(
    "run",
    [
        {"dp_epsilon": None, "calibrate": True},
        {"dp_epsilon": 8.0, "calibrate": False},
        {"dp_epsilon": 8.0},  # a report from before calibration existed
        {"dp_epsilon": 8.0, "calibrate": True, "task": "segmentation"},
        {"dp_epsilon": 8.0, "calibrate": True, "dataset": "synthetic-seg"},
        {"dp_epsilon": 8.0, "calibrate": True, "strategy": "cfl"},
    ],
)
def test_runs_that_do_not_calibrate_budget_nothing_for_it(run):
    assert calibration.planned_entries(run) == ()


def _final_fields(fed, round_index):
    return {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": round_index,
        "history": fed._history(0),
    }


@pytest.mark.slow
def test_a_site_releases_its_statistics_once_after_the_last_round_only(small_config):
    # Without these guards a server could ask for the statistics of many models (or of the
    # same model twice) and difference the releases beyond what the plan accounted.
    from securefed.fl.simulation import Federation
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=2))
    assert fed.calibrates
    site = fed.sites[0]
    with pytest.raises(ProtocolError, match="only after the last round"):
        site.handle(Stage.CALIBRATE, _final_fields(fed, 1))
    fed.run_round(1)
    fed.run_round(2)  # the engine calibrates here
    events = [e for e in site.ledger.events if e.phase == calibration.PHASE]
    assert len(events) == 1 and events[0].round == 2
    with pytest.raises(ProtocolError, match="already"):
        site.handle(Stage.CALIBRATE, _final_fields(fed, 2))
    assert len([e for e in site.ledger.events if e.phase == calibration.PHASE]) == 1
    # The server's copy holds it, and the site's epsilon over everything stays in budget.
    assert [e.to_dict() for e in fed.ledger.for_client(0)] == site.own_events()
    assert site.trainer.epsilon() <= small_config.dp_epsilon


def test_a_site_in_a_run_without_calibration_refuses_and_may_not_send_statistics(small_config):
    from securefed.dp.disclosures import check_reply
    from securefed.fl.simulation import Federation
    from securefed.protocol.wire import Stage

    cfg = small_config.replace(rounds=1, calibrate=False)
    fed = Federation(cfg)
    assert not fed.calibrates
    with pytest.raises(ProtocolError, match="does not calibrate"):
        fed.sites[0].handle(Stage.CALIBRATE, _final_fields(fed, 1))
    with pytest.raises(ProtocolError):
        check_reply(cfg, "calibrate", {"statistics": [1.0] * 6})


@pytest.mark.slow
def test_a_calibrated_run_is_audited(small_config, tmp_path):
    from securefed.dp.audit import audit_run
    from securefed.run import train

    out = train(small_config.replace(rounds=2), out_dir=tmp_path / "run", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    record = metrics["rounds"][-1]["decision_calibration"]
    assert record["sites"] == [0, 1, 2] and record["noise_multiplier"] == 8.0
    assert metrics["rounds"][-1]["timing"]["calibration"] > 0
    privacy = json.loads((out / "privacy.json").read_text())
    assert any(d["message"] == "calibrate" for d in privacy["disclosures"])
    assert sum(e["phase"] == calibration.PHASE for e in privacy["events"]) == 3
    result = audit_run(out)
    assert result.ok, [c for c in result.checks if not c.ok]


# -- found by the review: each would succeed without its fix ---------------------------------


def test_a_non_finite_logit_cannot_carry_a_record_past_the_noise():
    # A server can craft a model that overflows to inf on one target record. Before the fix
    # its class row became NaN, which noise does not hide (epsilon infinite): the release
    # named the record's class.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(20, 3))
    labels = rng.integers(0, 3, size=20)
    for bad in (np.inf, -np.inf, np.nan):
        crafted = logits.copy()
        crafted[7, 1] = bad
        v = calibration.site_statistics(crafted, labels, num_classes=3)
        assert np.all(np.isfinite(v))
        neighbour = calibration.site_statistics(
            np.delete(crafted, 7, 0), np.delete(labels, 7), num_classes=3
        )
        # The record still counts, and moves nothing else: like a zero-logit record.
        zeroed = logits.copy()
        zeroed[7] = 0.0
        np.testing.assert_allclose(v, calibration.site_statistics(zeroed, labels, num_classes=3))
        assert np.linalg.norm(v - neighbour) <= 2 * R


def test_a_site_refuses_to_calibrate_a_model_with_non_finite_weights(small_config):
    from securefed.fl.simulation import Federation
    from securefed.fl.site_runtime import weights_to_bytes
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=1))
    state = {k: v.clone() for k, v in fed.global_model.state_dict().items()}
    name = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[name].view(-1)[0] = float("inf")
    fields = {**_final_fields(fed, 1), "weights": weights_to_bytes(state)}
    with pytest.raises(ProtocolError, match="non-finite weights"):
        fed.sites[0].handle(Stage.CALIBRATE, fields)
    assert not [e for e in fed.sites[0].ledger.events if e.phase == calibration.PHASE]


def test_a_poisoned_release_is_refused_or_bounded_and_an_overflow_cannot_crash_the_sum():
    # Before the fix one site's huge numbers set offsets of about 5e5 (the model then called
    # one class at will), and an overflowing sum crashed the round.
    rng = np.random.default_rng(4)
    logits, y = _skewed_scores(rng)
    honest = calibration.site_statistics(logits, y, num_classes=2)
    bounds = {"num_classes": 2, "noise_multiplier": 8.0, "max_records": 1e6}
    assert calibration.implausible(honest, **bounds) is None
    greedy = honest.copy()
    greedy[2:] *= 1e3  # scores far beyond what its counts allow
    assert "score sums" in calibration.implausible(greedy, **bounds)
    huge = np.full(calibration.statistics_size(2), 1e12)
    assert "counts" in calibration.implausible(huge, **bounds)
    # A site that stays plausible but claims a million records moves the offsets only within
    # [-R, R]; a sum that is not finite is refused, never applied.
    heavy = np.zeros(calibration.statistics_size(2))
    heavy[:2] = R * 5e5
    heavy[2:] = [-R * 5e5, R * 5e5, -R * 5e5, R * 5e5]
    cal = calibration.offsets_from_sum(honest + heavy, num_classes=2, sites=2, noise_multiplier=8.0)
    assert all(abs(o) <= R for o in cal.offsets)
    with pytest.raises(ValueError):
        calibration.offsets_from_sum(
            np.full(calibration.statistics_size(2), np.inf),
            num_classes=2,
            sites=2,
            noise_multiplier=8.0,
        )


@pytest.mark.slow
def test_a_bad_release_is_still_accounted_and_the_others_calibrate(small_config):
    # Before the fix the reply schema dropped a reply with bad numbers before the claim book
    # saw it: the site had spent the release, the report did not count it.
    from securefed.fl.simulation import Federation
    from securefed.protocol.wire import Stage

    fed = Federation(small_config.replace(rounds=1))

    def tamper(site, change):
        real = site.handle

        def handle(stage, fields):
            reply = real(stage, fields)
            if stage == Stage.CALIBRATE:
                reply["statistics"] = change(reply["statistics"])
            return reply

        site.handle = handle

    tamper(fed.sites[2], lambda v: [float("nan")] * len(v))
    k = fed.spec.num_classes
    tamper(fed.sites[1], lambda v: v[:k] + [x * 1e4 for x in v[k:]])  # scores beyond its counts
    rec = fed.run_round(1)
    cal = rec.data["decision_calibration"]
    assert cal["accounted"] == [0, 1, 2] and cal["sites"] == [0]
    assert "site 2" in cal["site_errors"]["2"]
    assert "refused" in cal["site_errors"]["1"]
    site = fed.sites[2]
    assert [e.to_dict() for e in fed.ledger.for_client(2)] == site.own_events()
    assert any(e.phase == calibration.PHASE for e in fed.ledger.for_client(2))


def test_a_model_whose_last_linear_layer_is_not_its_output_is_left_as_it_was(small_config):
    import torch
    from torch import nn

    from securefed.fl.simulation import Federation

    fed = Federation(small_config.replace(rounds=1))
    model = fed.models[0]
    # A plug-in that registers a K-wide linear layer after its real head, unused by forward.
    model.decoy = nn.Linear(4, fed.spec.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    why = fed._shift_output([0.5, -0.5, 0.25, -0.25])
    assert why is not None and "did not move" in why
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    del model.decoy
    assert fed._shift_output([0.5, -0.5, 0.25, -0.25]) is None  # the real head moves


def test_a_noise_multiplier_below_one_is_refused_before_any_accountant_runs(small_config):
    from securefed.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration_noise"):
        small_config.replace(calibration_noise=1e-3)
    with pytest.raises(ValueError, match="below"):
        calibration.planned_entries(
            {"dp_epsilon": 8.0, "calibrate": True, "calibration_noise": 1e-3}
        )


def test_a_patients_records_move_the_release_by_at_most_2r_under_patient_level_dp():
    """Replacing one patient of 6 records by another of 1: within 2R per patient, not per
    record (record-level weights would let the 6 records move the release by about 6R)."""
    rng = np.random.default_rng(4)
    k = 3
    others = rng.normal(size=(20, k)) * 5
    other_labels = rng.integers(0, k, 20)
    other_ids = np.arange(20) + 100
    big = np.tile(np.array([[9.0, -9.0, 0.0]]), (6, 1))  # one patient, 6 extreme records
    small = np.array([[-9.0, 9.0, 0.0]])

    def release(extra_logits, extra_labels, units):
        logits = np.concatenate([others, extra_logits])
        labels = np.concatenate([other_labels, extra_labels])
        ids = np.concatenate([other_ids, np.zeros(len(extra_labels), dtype=np.int64)])
        return calibration.site_statistics(
            logits, labels, num_classes=k, units=ids if units else None
        )

    a = release(big, np.zeros(6, dtype=np.int64), True)
    b = release(small, np.ones(1, dtype=np.int64), True)
    assert np.linalg.norm(a - b) <= 2 * calibration.CLIP + 1e-9
    a = release(big, np.zeros(6, dtype=np.int64), False)
    b = release(small, np.ones(1, dtype=np.int64), False)
    assert np.linalg.norm(a - b) > 4 * calibration.CLIP


def _large_scores(rng, n0=1200, n1=3400):
    """scatter-linear's logit differences at epsilon 8 (PneumoniaMNIST's training split,
    2026-12-02): class means -13 and +9, standard deviations 7-8."""
    d = np.concatenate([rng.normal(-13.0, 7.7, n0), rng.normal(8.9, 7.2, n1)])
    y = np.concatenate([np.zeros(n0, int), np.ones(n1, int)])
    return np.stack([-d / 2, d / 2], axis=1), y, float((-13.0 + 8.9) / 2)


@pytest.mark.parametrize("clip, finds_midpoint", [(4.0, False), (16.0, True)])
def test_large_logits_need_a_larger_clip_to_find_the_midpoint(clip, finds_midpoint):
    # Review of stop 38: at R = 4 nearly every record of such a model is clipped, both class
    # means sit at the bound and the offset stays near 0; at R = 16 (scatter-linear's default)
    # the noised release finds the midpoint of the class means.
    rng = np.random.default_rng(0)
    logits, y, midpoint = _large_scores(rng)
    sites = np.array_split(rng.permutation(len(y)), 5)
    sigma = calibration.NOISE_MULTIPLIER
    total = sum(
        calibration.site_statistics(logits[i], y[i], num_classes=2, clip=clip)
        + rng.normal(0, sigma * clip, calibration.statistics_size(2))
        for i in sites
    )
    cal = calibration.offsets_from_sum(
        total, num_classes=2, sites=5, noise_multiplier=sigma, clip=clip
    )
    assert cal.applied, cal.reason
    threshold = -(cal.offsets[1] - cal.offsets[0])
    assert bool(abs(threshold - midpoint) < 0.6) == finds_midpoint


def test_the_clip_follows_the_setting_the_model_and_the_runs_schema():
    assert calibration.clip_of({}) == calibration.CLIP == 4.0  # recorded before schema 3.11
    unset = {"calibration_clip": None}
    assert calibration.clip_of(unset, model="scatter-linear") == 16.0
    assert calibration.clip_of(unset, model="cnn") == 4.0
    assert calibration.clip_of({"calibration_clip": 8}, model="scatter-linear") == 8.0
    for bad in (0, 5e-324, 1e-4, -1.0, float("inf"), 1e4, True, "16"):
        with pytest.raises(ValueError, match="calibration_clip"):
            calibration.clip_of({"calibration_clip": bad})
    with pytest.raises(ValueError, match="no model"):
        calibration.clip_of(unset)
    # What a release may carry: a named model's R exactly, either rule's under --model auto.
    assert calibration.allowed_clips({**unset, "model": "cnn"}) == {4.0}
    assert calibration.allowed_clips({**unset, "model": "auto"}) == {4.0, 16.0}
    assert calibration.allowed_clips({"calibration_clip": 8.0, "model": "auto"}) == {8.0}
