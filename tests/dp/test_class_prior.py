"""Logit adjustment's class prior: its bound, its use in training, the claim book and the audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from securefed.config import RunConfig
from securefed.dp import class_prior
from securefed.dp.audit import audit_run
from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
from securefed.dp.report import read_json, write_json
from securefed.dp.trainer import SiteTrainer
from securefed.errors import ConfigError, ProtocolError
from securefed.fl.params import ParamLayout
from securefed.fl.planning import plan_site_privacy
from securefed.fl.site_runtime import local_update
from tests.dp.audit_fixtures import (
    book_and_reply,
    checkpoint_restores_and_refuses_a_rewrite,
    copy_run,
    reclaim,
    rehash,
    resign,
    tiny_run,
)

SQRT2 = math.sqrt(2.0)


def test_replacing_one_record_or_patient_moves_the_counts_by_at_most_sqrt2():
    # Sensitivity sqrt(2) = 2C with C = sqrt(2)/2: what the ledger event (sigma, 1, 1, C) accounts.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=40)
    worst = 0.0
    for i in range(5):
        for new in range(3):
            other = labels.copy()
            other[i] = new
            a = class_prior.class_mass(labels, num_classes=3)
            b = class_prior.class_mass(other, num_classes=3)
            worst = max(worst, float(np.linalg.norm(a - b)))
    assert worst == pytest.approx(SQRT2) and class_prior.CLIP * 2 == pytest.approx(SQRT2)
    # A patient of three records becomes a patient of five records of another class.
    units = np.repeat(np.arange(10), 4)
    a = class_prior.class_mass(labels, num_classes=3, units=units)
    other_labels = np.concatenate([labels[4:], np.full(5, 2)])
    other_units = np.concatenate([units[4:], np.full(5, 99)])
    b = class_prior.class_mass(other_labels, num_classes=3, units=other_units)
    assert float(np.linalg.norm(a - b)) <= SQRT2 + 1e-12
    assert a.sum() == pytest.approx(10.0)  # each patient is a mass of 1


def test_the_log_prior_is_finite_whatever_the_noise():
    prior = class_prior.log_prior(np.array([-30.0, 50.0, np.nan]))
    assert np.isfinite(prior).all() and prior.dtype == np.float32
    assert np.exp(prior).sum() == pytest.approx(1.0, rel=1e-5)
    assert prior[1] > prior[0] == prior[2]  # floored at one record's share
    with pytest.raises(ValueError, match="lie in"):
        class_prior.class_mass(np.array([0, 3]), num_classes=3)


def _run(**changes):
    return RunConfig(**{"dp_epsilon": 8.0, "logit_adjust": True, "rounds": 10, **changes})


def test_the_plan_holds_one_release_only_for_dp_runs_that_adjust():
    cfg = _run()
    assert class_prior.planned_entries(cfg.to_dict()) == ((class_prior.NOISE_MULTIPLIER, 1.0, 1),)
    assert class_prior.planned_entries(cfg.replace(dp_epsilon=None).to_dict()) == ()
    assert class_prior.planned_entries(cfg.replace(logit_adjust=False).to_dict()) == ()
    adjusted = plan_site_privacy(cfg, num_samples=900)
    plain = plan_site_privacy(cfg.replace(logit_adjust=False), num_samples=900)
    assert adjusted.noise_multiplier > plain.noise_multiplier
    with pytest.raises(ValueError, match="below"):
        class_prior.planned_entries({**cfg.to_dict(), "prior_noise": 0.5})
    with pytest.raises(ConfigError, match="at least 1"):
        _run(prior_noise=0.5)
    with pytest.raises(ConfigError, match="classification"):
        _run(task="segmentation")
    # Counts disclosed exactly need no DP release: the pair is refused, not paid for twice.
    with pytest.raises(ConfigError, match="for nothing"):
        _run(disclose_site_sizes=True)
    assert not cfg.replace(dp_epsilon=None, disclose_site_sizes=True).dp_enabled
    old = cfg.to_dict()
    del old["logit_adjust"], old["prior_noise"]
    assert RunConfig.from_recorded(old).logit_adjust is False


def _one_class_site_update(log_prior):
    torch.manual_seed(0)
    n = 32
    data = torch.utils.data.TensorDataset(torch.randn(n, 4), torch.zeros(n, dtype=torch.long))
    config = RunConfig(dp_epsilon=None, rounds=2, local_epochs=1, lr=0.5, momentum=0.0)
    trainer = SiteTrainer(
        client_id=0,
        dataset=data,
        plan=None,
        ledger=PrivacyLedger(),
        batch_size=n,
        lr=0.5,
        momentum=0.0,
        device=torch.device("cpu"),
        min_steps=1,
    )
    model = nn.Linear(4, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    layout = ParamLayout(model.state_dict())
    vec = local_update(
        config, trainer=trainer, layout=layout, model=model, round_index=1, log_prior=log_prior
    )[0]
    return vec, layout


def test_a_site_of_one_class_barely_pushes_the_shared_model_once_its_prior_is_added():
    # The failure logit adjustment stops: a site holding one class teaches the shared model
    # "everything is my class". With its prior (one floored record of the other class in 32)
    # its loss is already small, so its update is a fraction of the unadjusted one.
    plain, layout = _one_class_site_update(None)
    prior = class_prior.log_prior(class_prior.class_mass(np.zeros(32), num_classes=2))
    adjusted, _ = _one_class_site_update(prior)
    assert adjusted.shape == plain.shape == (layout.size + 1,)  # nothing extra is sent
    assert np.linalg.norm(adjusted[:-1]) < 0.1 * np.linalg.norm(plain[:-1])
    assert np.linalg.norm(adjusted[:-1]) > 0


def _prior_event(round_index=1, sigma=class_prior.NOISE_MULTIPLIER, clip=class_prior.CLIP):
    return PrivacyEvent(round_index, 0, sigma, 1.0, 1, clip, phase=class_prior.PHASE)


def test_the_claim_book_takes_one_planned_release_and_refuses_any_other():
    cfg = _run(rounds=2)
    book, reply = book_and_reply(cfg, [_prior_event()])
    book.account(0, reply, round_index=1)
    assert [e.phase for e in book.ledger.for_client(0)] == [class_prior.PHASE, "federated"]
    for why, cfg_, priors in (
        ("missing from the first fit", cfg, []),
        ("less noise than planned", cfg, [_prior_event(sigma=2.0)]),
        ("another bound", cfg, [_prior_event(clip=0.1)]),
        ("two", cfg, [_prior_event(), _prior_event()]),
        ("unplanned", cfg.replace(logit_adjust=False), [_prior_event()]),
    ):
        book, reply = book_and_reply(cfg_, priors)
        with pytest.raises(ProtocolError, match="class prior"):
            book.account(0, reply, round_index=1)
        assert why


def test_a_site_releases_its_prior_once_and_keeps_it_for_later_rounds(small_config):
    from securefed.fl.simulation import Federation

    site = Federation(small_config.replace(logit_adjust=True)).sites[0]
    first = site._class_prior(1)
    again = site._class_prior(2)
    np.testing.assert_array_equal(first, again)
    events = [e for e in site.ledger.for_client(site.client_id) if e.phase == class_prior.PHASE]
    assert len(events) == 1 and events[0].round == 1
    # A site whose store lost its prior, but whose ledger shows the release, will not
    # release it a second time (a server that wiped nothing cannot make it).
    del site.persistent["fit.log_prior"]
    with pytest.raises(ProtocolError, match="not release it a second time"):
        site._class_prior(3)


@pytest.fixture(scope="module")
def adjusted_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("prior"), logit_adjust=True, secure_agg="mask")


@pytest.mark.slow
def test_a_masked_dp_run_with_logit_adjustment_audits_clean(adjusted_run):
    privacy = read_json(adjusted_run / "privacy.json")
    priors = [e for e in privacy["events"] if e["phase"] == class_prior.PHASE]
    assert sorted((e["client_id"], e["round"]) for e in priors) == [(0, 1), (1, 1)]
    assert all(c["class_prior_releases"] == 1 for c in privacy["clients"])
    assert any(d["field"] == "(class prior)" for d in privacy["disclosures"])
    result = audit_run(adjusted_run)
    assert result.ok, [c for c in result.checks if not c.ok]


def _quiet_prior(p):
    for e in p["events"]:
        if e["client_id"] == 0 and e["phase"] == class_prior.PHASE:
            e["noise_multiplier"] *= 4
    reclaim(p)


def _drop_the_prior(p):
    p["events"] = [
        e for e in p["events"] if not (e["client_id"] == 0 and e["phase"] == class_prior.PHASE)
    ]
    reclaim(p)


_PRIOR_CHECK = (
    "site 0: class-prior release: one, by its first training, iff the run adjusts logits and "
    "the site trained, as planned"
)


@pytest.mark.slow
@pytest.mark.parametrize("tamper", [_quiet_prior, _drop_the_prior])
def test_a_rewritten_prior_release_fails_the_audit_after_resigning(adjusted_run, tmp_path, tamper):
    d = copy_run(adjusted_run, tmp_path)
    privacy = read_json(d / "privacy.json")
    tamper(privacy)
    write_json(d / "privacy.json", privacy)
    resign(d)  # fresh keys: the signatures verify, the binding must catch it
    result = audit_run(d)
    assert _PRIOR_CHECK in {c.name for c in result.checks if not c.ok}
    d2 = copy_run(adjusted_run, tmp_path / "b")
    privacy = read_json(d2 / "privacy.json")
    tamper(privacy)
    write_json(d2 / "privacy.json", privacy)
    rehash(d2)
    assert not audit_run(d2).ok


def test_a_checkpointed_book_with_a_prior_release_restores_and_refuses_a_rewritten_one():
    checkpoint_restores_and_refuses_a_rewrite(
        _run(rounds=2),
        _prior_event(),
        phase=class_prior.PHASE,
        sigma=2.0,
        match="class-prior event",
    )


def test_a_site_holding_its_prior_refuses_a_history_that_hides_the_release(small_config):
    # Review attack: a server that drops the class-prior event from the history it sends
    # would get a signed epsilon claim without that release.
    from securefed.fl.simulation import Federation

    cfg = small_config.replace(logit_adjust=True)
    site = Federation(cfg).sites[0]
    site._class_prior(1)
    plan = site.plan
    steps = cfg.local_epochs * site.trainer.steps_per_epoch
    fed = PrivacyEvent(1, 0, plan.noise_multiplier, plan.sample_rate, steps, plan.max_grad_norm)
    fresh = Federation(cfg).sites[0]
    fresh.persistent["fit.log_prior"] = site.persistent["fit.log_prior"]
    with pytest.raises(ProtocolError, match="without the class-prior release"):
        fresh.restore_events([fed.to_dict()])


def test_an_in_process_dp_run_with_logit_adjustment_is_not_resumed(tmp_path):
    # The sites' released priors never leave them, so the checkpoint cannot hold them; a
    # resume would have every site refuse every round. Refused up front, in one line.
    from securefed.run import RunInterrupted, train
    from tests.conftest import write_small_npz
    from tests.fl.test_resume import _config, _partials, _StopAt

    npz = write_small_npz(tmp_path / "t.npz", n_train=120, n_val=30, n_test=40)
    cfg = _config(npz, logit_adjust=True)
    with pytest.raises(RunInterrupted):
        train(
            cfg,
            out_dir=tmp_path / "cut",
            federation=_StopAt(cfg, stop_at=2, exc=KeyboardInterrupt()),
            progress=False,
        )
    (partial,) = _partials(tmp_path)
    with pytest.raises(ConfigError, match="cannot be resumed in-process"):
        train(resume=partial, progress=False)


@pytest.mark.slow
def test_a_report_without_its_prior_count_fails_the_audit(adjusted_run, tmp_path):
    d = copy_run(adjusted_run, tmp_path)
    privacy = read_json(d / "privacy.json")
    del privacy["clients"][0]["class_prior_releases"]
    write_json(d / "privacy.json", privacy)
    resign(d)
    failed = {c.name for c in audit_run(d).checks if not c.ok}
    assert "site 0: reported steps and rounds = ledger" in failed
