"""q-FFL's per-round loss release: its bound, its plan, the claim book and the audit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from securefed.config import RunConfig
from securefed.dp import fair_loss
from securefed.dp.accounting import compute_epsilon, pld_epsilon
from securefed.dp.audit import audit_run, independent_epsilon
from securefed.dp.ledger import PrivacyEvent
from securefed.dp.report import read_json, write_json
from securefed.errors import ProtocolError
from securefed.fl.planning import check_site_plan, plan_site_privacy
from tests.dp.audit_fixtures import (
    book_and_reply,
    checkpoint_restores_and_refuses_a_rewrite,
    copy_run,
    reclaim,
    rehash,
    resign,
    tiny_run,
)

B = fair_loss.BOUND


def test_replacing_one_record_moves_the_loss_sum_by_at_most_b():
    # Sensitivity B = 2C with C = B/2: what the ledger event (sigma, 1, 1, C) accounts.
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 6, size=50)
    worst = 0.0
    for value in (-3.0, 0.0, 0.2, 4.0, 1e9, np.inf, -np.inf, np.nan):
        for i in range(3):
            other = base.copy()
            other[i] = value
            a, b = fair_loss.clipped_loss_sum(base), fair_loss.clipped_loss_sum(other)
            assert math.isfinite(b)
            worst = max(worst, abs(a - b))
    assert worst <= B + 1e-12 and worst > B - 0.5  # the bound is met, and is tight
    assert fair_loss.CLIP * 2 == B


def test_replacing_one_patient_moves_the_loss_sum_by_at_most_b():
    rng = np.random.default_rng(1)
    losses = rng.uniform(0, 3, size=30)
    units = np.repeat(np.arange(10), 3)
    a = fair_loss.clipped_loss_sum(losses, units=units)
    # Patient 0's three records become one patient of five records, all at the bound.
    other_losses = np.concatenate([losses[3:], np.full(5, 99.0)])
    other_units = np.concatenate([units[3:], np.full(5, 42)])
    b = fair_loss.clipped_loss_sum(other_losses, units=other_units)
    assert abs(a - b) <= B + 1e-12


def test_the_released_loss_stays_in_floor_to_b():
    assert fair_loss.released_loss(-50.0, size=10) == fair_loss.FLOOR
    assert fair_loss.released_loss(1e9, size=10) == B
    assert fair_loss.released_loss(float("nan"), size=10) == B
    assert fair_loss.released_loss(7.0, size=10) == pytest.approx(0.7)


def _run(**changes):
    return RunConfig(**{"dp_epsilon": 8.0, "fair_q": 1.0, "rounds": 10, **changes})


def test_the_plan_leaves_room_for_every_rounds_release():
    cfg = _run()
    entries = fair_loss.planned_entries(cfg.to_dict())
    assert entries == ((fair_loss.NOISE_MULTIPLIER, 1.0, 10),)
    assert fair_loss.planned_releases(cfg.to_dict()) == {
        (fair_loss.NOISE_MULTIPLIER, 1.0, 1, fair_loss.CLIP)
    }
    fair = plan_site_privacy(cfg, num_samples=900)
    plain = plan_site_privacy(cfg.replace(fair_q=0.0), num_samples=900)
    assert fair.noise_multiplier > plain.noise_multiplier
    # Everything the site may spend, releases and DP-SGD, within the target.
    history = [
        (fair.noise_multiplier, fair.sample_rate, fair.planned_steps),
        *entries,
        (8.0, 1.0, 1),  # the decision calibration
    ]
    assert pld_epsilon(history=history, delta=fair.delta) <= 8.0
    # A plan that left no room for the releases breaks the run's rules.
    with pytest.raises(ProtocolError, match="not the calibrated"):
        check_site_plan(cfg, plain)
    # Without DP or at q = 0 nothing is released, so nothing is budgeted.
    assert fair_loss.planned_entries(cfg.replace(dp_epsilon=None).to_dict()) == ()
    assert fair_loss.planned_entries(cfg.replace(fair_q=0.0).to_dict()) == ()


def test_a_noise_multiplier_no_run_can_have_is_refused_before_any_accountant():
    run = {**_run().to_dict(), "fair_loss_noise": 0.01}
    with pytest.raises(ValueError, match="below"):
        fair_loss.planned_entries(run)


def _loss_event(sigma=fair_loss.NOISE_MULTIPLIER, clip=fair_loss.CLIP):
    return PrivacyEvent(1, 0, sigma, 1.0, 1, clip, phase=fair_loss.PHASE)


def test_the_claim_book_takes_the_planned_release_and_refuses_any_other():
    cfg = _run(rounds=2)
    book, reply = book_and_reply(cfg, [_loss_event()])
    book.account(0, reply, round_index=1)
    assert [e.phase for e in book.ledger.for_client(0)] == [fair_loss.PHASE, "federated"]
    # The release counts in the site's epsilon.
    assert book.epsilon(0) > compute_epsilon(
        history=[book.ledger.history(0)[1]], delta=book.plans[0].delta
    )
    for why, cfg_, losses in (
        ("missing", cfg, []),
        ("less noise than planned", cfg, [_loss_event(sigma=5.0)]),
        ("another clipping bound", cfg, [_loss_event(clip=0.5)]),
        ("two in a round", cfg, [_loss_event(), _loss_event()]),
        ("unplanned (q = 0)", cfg.replace(fair_q=0.0), [_loss_event()]),
        ("unplanned (another noise)", cfg.replace(fair_loss_noise=30.0), [_loss_event()]),
    ):
        book, reply = book_and_reply(cfg_, losses)
        with pytest.raises(ProtocolError, match="q-FFL loss with other DP parameters"):
            book.account(0, reply, round_index=1)
        assert why


@pytest.fixture(scope="module")
def fair_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("fair"), fair_q=1.0, secure_agg="mask")


@pytest.mark.slow
def test_a_masked_dp_run_with_q_ffl_completes_and_audits_clean(fair_run):
    metrics = json.loads((fair_run / "metrics.json").read_text())
    assert all(r["applied"] for r in metrics["rounds"])
    assert "final_fairness" in metrics
    privacy = read_json(fair_run / "privacy.json")
    assert privacy["schema_version"] == "3.12"
    losses = [e for e in privacy["events"] if e["phase"] == fair_loss.PHASE]
    assert sorted((e["client_id"], e["round"]) for e in losses) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(c["fair_loss_releases"] == 2 for c in privacy["clients"])
    assert any(d["field"] == "(q-FFL loss)" for d in privacy["disclosures"])
    result = audit_run(fair_run)
    assert result.ok, [c for c in result.checks if not c.ok]
    # The audit's PLD epsilon includes the releases: without them it would be lower.
    for c in privacy["clients"]:
        ev = [e for e in privacy["events"] if e["client_id"] == c["client_id"]]
        kept = [e for e in ev if e["phase"] != fair_loss.PHASE]
        with_all = independent_epsilon(
            events=[(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ev],
            delta=c["delta"],
        )
        without = independent_epsilon(
            events=[(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in kept],
            delta=c["delta"],
        )
        assert c["epsilon"] >= with_all - 0.02 > without


def _quiet_losses(p):
    # Claim site 0's loss releases had 4x the noise (a smaller epsilon).
    for e in p["events"]:
        if e["client_id"] == 0 and e["phase"] == fair_loss.PHASE:
            e["noise_multiplier"] *= 4
    reclaim(p)


def _drop_a_loss(p):
    p["events"] = [
        e
        for e in p["events"]
        if not (e["client_id"] == 0 and e["phase"] == fair_loss.PHASE and e["round"] == 2)
    ]
    reclaim(p)


_LOSS_CHECK = (
    "site 0: q-FFL loss releases: one per federated round iff the run weighs by loss, as planned"
)


@pytest.mark.slow
@pytest.mark.parametrize("tamper", [_quiet_losses, _drop_a_loss])
@pytest.mark.parametrize("resigned", [False, True])
def test_a_rewritten_loss_release_fails_the_audit_after_rehashing(
    fair_run, tmp_path, tamper, resigned
):
    d = copy_run(fair_run, tmp_path)
    privacy = read_json(d / "privacy.json")
    tamper(privacy)
    write_json(d / "privacy.json", privacy)
    if resigned:
        resign(d)  # fresh keys: the signatures verify, the binding must catch it
    else:
        rehash(d)
    result = audit_run(d)
    failed = {c.name for c in result.checks if not c.ok}
    assert not result.ok
    if resigned:
        assert _LOSS_CHECK in failed
    else:
        assert "site 0: signed claim verifies" in failed


def test_a_checkpointed_book_with_loss_releases_restores_and_refuses_a_rewritten_one():
    checkpoint_restores_and_refuses_a_rewrite(
        _run(rounds=2), _loss_event(), phase=fair_loss.PHASE, sigma=5.0, match="fair-loss event"
    )


def test_a_deployed_site_resumes_a_history_with_releases_and_refuses_a_doubled_one(small_config):
    # A deployed site runs each round in a fresh process and re-reads its own events: the
    # loss releases must be taken as planned (not as DP-SGD steps), and two in one round
    # (the server re-asking a round) refused.
    from securefed.fl.simulation import Federation

    cfg = small_config.replace(fair_q=1.0)

    def history(*losses):
        site = Federation(cfg).sites[0]
        plan = site.plan
        steps = cfg.local_epochs * site.trainer.steps_per_epoch
        fed = PrivacyEvent(1, 0, plan.noise_multiplier, plan.sample_rate, steps, plan.max_grad_norm)
        return site, [*(e.to_dict() for e in losses), fed.to_dict()]

    site, events = history(_loss_event())
    site.restore_events(events)
    assert [e.phase for e in site.ledger.events] == [fair_loss.PHASE, "federated"]
    for losses in ([_loss_event(), _loss_event()], [_loss_event(sigma=2.0)]):
        site, events = history(*losses)
        with pytest.raises(ProtocolError):
            site.restore_events(events)
