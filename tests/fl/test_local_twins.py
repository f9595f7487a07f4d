"""``--twin-privacy local``: digital twins fine-tuned without DP, staying at their site.

Each test names the promise of docs/twins.md it checks, and fails without the behaviour.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from securefed.config import RunConfig
from securefed.deploy.site import NodeSettings
from securefed.dp.disclosures import site_releases
from securefed.errors import ConfigError, PrivacyBudgetError, ProtocolError
from securefed.fl.simulation import Federation
from securefed.protocol.wire import Stage


def _run(cfg):
    fed = Federation(cfg)
    for r in range(1, cfg.rounds + 1):
        fed.run_round(r)
    return fed


def test_local_twins_spend_no_epsilon_and_leave_sigma_as_without_twins(small_config):
    cfg = small_config.replace(personalize=1)
    local = _run(cfg.replace(twin_privacy="local"))
    assert {e.phase for e in local.ledger.events} == {"federated", "calibrate"}
    assert local.personalization_table(), "the twins were still fine-tuned and scored"
    for s in local.sites:
        assert s.twin is not None
    without = Federation(cfg.replace(personalize=0))
    with_dp = Federation(cfg)
    for k in range(cfg.clients):
        # The plan (steps, hence sigma) is the one of a run without twins ...
        assert local.plans[k].planned_steps == without.plans[k].planned_steps
        assert local.plans[k].noise_multiplier == without.plans[k].noise_multiplier
        # ... while DP twins share the budget and need more noise a step.
        assert with_dp.plans[k].noise_multiplier > local.plans[k].noise_multiplier


@torch.no_grad()
def _moved(twin, model):
    return float(
        torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(twin.parameters(), model.parameters())))
    )


def test_a_local_twin_takes_clipped_steps_without_noise(small_config):
    # Without noise each step moves the weights by at most lr * C (the mean of per-record
    # gradients clipped to C), so S steps with momentum m by at most S * lr * C / (1 - m).
    # A DP twin's noise alone, sigma * C * sqrt(d) / batch a step, goes far past that bound.
    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    fed = Federation(cfg)
    site, model = fed.sites[0], fed.models[0]
    t = site.trainer
    bound = t.steps_per_epoch * t.site_lr * fed.plans[0].max_grad_norm / (1 - t.momentum)
    local = _moved(site._fine_tune(model, 1), model)
    assert 0 < local <= bound
    dp = Federation(cfg.replace(twin_privacy="dp"))
    assert _moved(dp.sites[0]._fine_tune(model, 1), model) > bound
    assert not site.ledger.events, "a local twin records nothing in the site's ledger"
    assert dp.sites[0].ledger.events[-1].phase == "personalize"


def test_a_site_answers_for_a_local_twin_once_per_twin_round(small_config):
    # Each answer is a non-DP function of the site's records: a server asking again with
    # other weights would probe them without limit.
    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    fed = Federation(cfg)
    site = fed.sites[0]
    fields = {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": 1,
        "personalize": True,
        "history": [],
    }
    first = site.handle(Stage.EVALUATE, fields)
    assert "twin" in first and "events" not in first
    with pytest.raises(ProtocolError, match="already done once"):
        site.handle(Stage.EVALUATE, fields)


def test_the_release_outside_epsilon_is_declared_and_audited(tmp_path, small_config):
    from securefed.dp.audit import audit_run
    from securefed.run import train

    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    (twin,) = [r for r in site_releases(cfg) if (r.message, r.field) == ("heldout", "twin")]
    assert twin.protection == "clear" and "NOT covered by epsilon" in twin.detail
    held = {r.field for r in site_releases(cfg) if r.message == "heldout"}
    assert held == {"metrics", "twin"}, "a local twin sends no DP claim"

    run = train(cfg, out_dir=tmp_path / "run", progress=False)
    result = audit_run(run)
    assert result.ok, [c for c in result.checks if not c.ok]
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["strategy"]["twin_privacy"] == "local"
    assert "not the digital twins" in privacy["dp_applies_to"]
    assert not [e for e in privacy["events"] if e["phase"] == "personalize"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["personalization"]) == cfg.clients
    assert all(np.isfinite(r["twin_accuracy"]) for r in metrics["personalization"])
    summary = (run / "summary.md").read_text()
    assert "not covered by ε" in summary and "--twin-privacy local" in summary


def test_a_deployed_site_refuses_local_twins_unless_its_policy_allows_them():
    run = RunConfig(dp_epsilon=8.0, personalize=1, twin_privacy="local")
    with pytest.raises(PrivacyBudgetError, match="allow-local-twins"):
        NodeSettings.from_node_config({"site-id": 0}).check_policy(run)
    NodeSettings.from_node_config({"site-id": 0, "allow-local-twins": True}).check_policy(run)
    # Without DP, or with DP twins, nothing leaves outside epsilon: no opt-in needed.
    NodeSettings.from_node_config({"site-id": 0}).check_policy(run.replace(dp_epsilon=None))
    NodeSettings.from_node_config({"site-id": 0}).check_policy(run.replace(twin_privacy="dp"))


def test_twin_privacy_is_checked_and_old_records_read_as_dp():
    with pytest.raises(ConfigError, match="twin_privacy"):
        RunConfig(twin_privacy="none")
    recorded = RunConfig(personalize=1).to_dict()
    del recorded["twin_privacy"]
    assert RunConfig.from_recorded(recorded).twin_privacy == "dp"


def test_local_twins_are_deployable():
    from securefed.deploy.coordinator import check_deployable

    check_deployable(RunConfig(dp_epsilon=8.0, personalize=1, twin_privacy="local"))
