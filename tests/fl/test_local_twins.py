"""``--twin-privacy local``: digital twins fine-tuned without DP, staying at their site.

Each test names the promise of docs/twins.md it checks, and fails without the behaviour.
"""

from __future__ import annotations

import json

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


def _evaluate_fields(fed, round_index):
    return {
        "weights": fed._blobs()[0],
        "layout_keys": list(fed.layout.keys),
        "round": round_index,
        "personalize": True,
        "history": [],
    }


def test_a_local_twin_is_answered_once_with_its_rounded_primary_metric_and_ends_the_site(
    small_config,
):
    # Each answer is a non-DP function of the site's records. Asked again (with other
    # weights), the site would answer a probe of them without limit; answered before a DP
    # release, that release could be chosen by it. So: once, two decimals, and last.
    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    fed = Federation(cfg)
    site = fed.sites[0]
    first = site.handle(Stage.EVALUATE, _evaluate_fields(fed, 1))
    assert set(first["twin"]) == {"accuracy"} and "events" not in first
    assert first["twin"]["accuracy"] == round(first["twin"]["accuracy"], 2)
    assert {"loss", "auc", "confusion_matrix"} <= set(first["metrics"]), "global: unchanged"
    with pytest.raises(ProtocolError, match="already done once"):
        site.handle(Stage.EVALUATE, _evaluate_fields(fed, 1))
    for stage in (Stage.FIT, Stage.CALIBRATE):
        with pytest.raises(ProtocolError, match="answered for its local twin"):
            site.handle(stage, {"round": 1})


def test_an_audit_run_does_not_count_the_local_twin_as_dp(small_config):
    # The gradient canaries measure the DP mechanism; sigma = 0 twin steps are none.
    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local", audit_canaries=50)
    fed = Federation(cfg)
    fed.run_round(1)
    audited = [s for s in fed.sites if getattr(s.trainer, "canaries", None) is not None]
    assert audited
    steps = [e.steps for e in audited[0].ledger.events if e.phase == "federated"]
    assert audited[0].trainer.canaries.steps == sum(steps)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from tests.dp.audit_fixtures import tiny_run

    return tiny_run(
        tmp_path_factory.mktemp("local-twins"), rounds=1, personalize=1, twin_privacy="local"
    )


def test_the_release_outside_epsilon_is_declared_and_audited(local_run):
    from securefed.dp.audit import audit_run

    cfg = RunConfig.from_recorded(json.loads((local_run / "config.json").read_text())["run"])
    (twin,) = [r for r in site_releases(cfg) if (r.message, r.field) == ("heldout", "twin")]
    assert twin.protection == "outside-epsilon" and "NOT covered by epsilon" in twin.detail
    held = {r.field for r in site_releases(cfg) if r.message == "heldout"}
    assert held == {"metrics", "twin"}, "a local twin sends no DP claim"

    result = audit_run(local_run)
    assert result.ok, [c for c in result.checks if not c.ok]
    lines = {c.name: c.detail for c in result.checks}
    assert any("outside epsilon (not DP): heldout twin" in d for d in lines.values())
    assert any("WITHOUT DP" in name for name in lines)
    privacy = json.loads((local_run / "privacy.json").read_text())
    assert privacy["strategy"]["twin_privacy"] == "local"
    assert "not the digital twins" in privacy["dp_applies_to"]
    assert not [e for e in privacy["events"] if e["phase"] == "personalize"]
    metrics = json.loads((local_run / "metrics.json").read_text())
    assert len(metrics["personalization"]) == cfg.clients
    for row in metrics["personalization"]:
        # The twin's figure arrives to two decimals; its gain is against the global figure
        # rounded the same way, so a tie at two decimals is not a win.
        assert row["twin_accuracy"] == round(row["twin_accuracy"], 2)
        assert row["twin_gain"] == pytest.approx(
            row["twin_accuracy"] - round(row["global_accuracy"], 2), abs=1e-12
        )
    summary = (local_run / "summary.md").read_text()
    assert "**not covered** by it" in summary and "not covered by ε" in summary


@pytest.mark.parametrize("rewrite", ["protection", "strategy", "dp_applies_to"])
def test_a_report_that_hides_the_release_outside_epsilon_fails_the_audit(
    local_run, tmp_path, rewrite
):
    # A publisher relabels the non-DP twin release as an ordinary one and recomputes the
    # hash; config.json (signed by the sites) still says local.
    from securefed.dp.audit import audit_run
    from securefed.dp.report import read_json, write_json
    from tests.dp.audit_fixtures import copy_run, rehash

    d = copy_run(local_run, tmp_path)
    privacy = read_json(d / "privacy.json")
    if rewrite == "protection":
        for entry in privacy["disclosures"]:
            if (entry["message"], entry["field"]) == ("heldout", "twin"):
                entry["protection"] = "clear"
    elif rewrite == "strategy":
        privacy["strategy"]["twin_privacy"] = "dp"
    else:
        privacy["dp_applies_to"] = "all model parameters"
    write_json(d / "privacy.json", privacy)
    rehash(d)
    result = audit_run(d)
    assert not result.ok
    bad = [c.name for c in result.checks if not c.ok]
    want = "disclosures list" if rewrite == "protection" else "twin privacy matches"
    assert any(want in name for name in bad), bad


def test_a_deployed_site_refuses_local_twins_unless_its_policy_allows_them():
    run = RunConfig(dp_epsilon=8.0, personalize=1, twin_privacy="local")
    with pytest.raises(PrivacyBudgetError, match="allow-local-twins"):
        NodeSettings.from_node_config({"site-id": 0}).check_policy(run)
    NodeSettings.from_node_config({"site-id": 0, "allow-local-twins": True}).check_policy(run)
    # A site that keeps its twin's metric sends nothing outside epsilon: that policy suffices.
    NodeSettings.from_node_config({"site-id": 0, "keep-twin-metric": True}).check_policy(run)
    # Without DP, or with DP twins, nothing leaves outside epsilon: no opt-in needed.
    NodeSettings.from_node_config({"site-id": 0}).check_policy(run.replace(dp_epsilon=None))
    NodeSettings.from_node_config({"site-id": 0}).check_policy(run.replace(twin_privacy="dp"))


def test_twin_privacy_is_checked_and_old_records_read_as_dp():
    with pytest.raises(ConfigError, match="twin_privacy"):
        RunConfig(twin_privacy="none")
    with pytest.raises(ConfigError, match="needs twins"):
        RunConfig(twin_privacy="local")
    with pytest.raises(ConfigError, match="--personalize-when end"):
        RunConfig(twin_privacy="local", personalize=1, personalize_when="every")
    recorded = RunConfig(personalize=1).to_dict()
    del recorded["twin_privacy"]
    assert RunConfig.from_recorded(recorded).twin_privacy == "dp"


def test_local_twins_are_deployable():
    from securefed.deploy.coordinator import check_deployable

    check_deployable(RunConfig(dp_epsilon=8.0, personalize=1, twin_privacy="local"))


def test_a_site_sends_no_more_of_a_local_twin_than_one_two_decimal_metric():
    from securefed.dp.disclosures import check_reply

    cfg = RunConfig(dp_epsilon=8.0, personalize=1, twin_privacy="local")
    check_reply(cfg, "heldout", {"metrics": {}, "twin": {"accuracy": 0.12}})
    check_reply(cfg, "heldout", {"metrics": {}, "twin": {"accuracy": None}})
    for twin in ({"accuracy": 0.123}, {"accuracy": 0.12, "loss": 1.0}, {}, [0.12]):
        with pytest.raises(ProtocolError, match="one metric to two decimals"):
            check_reply(cfg, "heldout", {"metrics": {}, "twin": twin})
    # DP twins send their full metrics, as before.
    check_reply(cfg.replace(twin_privacy="dp"), "heldout", {"twin": {"accuracy": 0.123, "loss": 1}})


@pytest.mark.parametrize("keep", [False, True])
def test_a_failing_local_twin_gets_the_reply_of_a_failed_twin_not_an_error(small_config, keep):
    # Weights a server crafted could make the twin overflow only after fine-tuning on some
    # record (the third review's attack2.py); an error reply would carry that bit out.
    cfg = small_config.replace(rounds=1, personalize=1, twin_privacy="local")
    fed = Federation(cfg)
    site = fed.sites[0]
    site.keep_twin_metric = keep

    def overflow(model, round_index):
        raise ValueError("`probs` contains NaN or infinite values.")

    site._local_twin = overflow
    reply = site.handle(Stage.EVALUATE, _evaluate_fields(fed, 1))
    assert "metrics" in reply
    if keep:
        assert "twin" not in reply
    else:
        assert reply["twin"] == {"accuracy": None}
