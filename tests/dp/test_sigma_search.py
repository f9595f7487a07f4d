"""Schemas 3.10 and 3.11: each run's sigma is audited with the search that found it, and its
decision calibration's release with the clipping bound R it planned."""

from __future__ import annotations

import json

import pytest

from securefed.config import RunConfig
from securefed.dp.accounting import calibrate_noise
from securefed.dp.report import read_json, write_json
from securefed.errors import ConfigError
from tests.dp.audit_fixtures import (
    ABSENT,
    as_older_release,
    audit_json,
    copy_run,
    relabel,
    resign,
    tiny_run,
)

SIGMA_CHECK = "site 0: sigma = calibrate_noise(target, delta, q, planned steps)"


@pytest.fixture(scope="module")
def bisected(tmp_path_factory):
    """A run whose sigma was bisected and whose run has no `sigma_search`, as a 3.9 release
    wrote it (it keeps 3.11's unset `calibration_clip`: a scatter-linear release at R = 16)."""
    d = tiny_run(tmp_path_factory.mktemp("bisected"), sigma_search=1)
    # The 3.9 release signed the run dict without the key (resign rehashes too).
    value, keys = as_older_release(d, without="sigma_search", schema="3.9")
    assert value == 1
    path = d / "keys.json"
    path.write_text(json.dumps({str(k): v for k, v in keys.items()}))
    return d, path


def audit(d, *args, checks=None):
    return audit_json(d, *args, checks=checks)


def _sigma_and_plan(d):
    privacy = read_json(d / "privacy.json")
    c = privacy["clients"][0]
    run = read_json(d / "config.json")["run"]
    from securefed.dp import releases

    plan = {
        "target_epsilon": run["dp_epsilon"],
        "delta": c["delta"],
        "sample_rate": c["sample_rate"],
        "steps": c["planned_steps"],
        "extra": releases.entries(run),
    }
    return c["noise_multiplier"], plan


def test_a_report_from_before_3_10_is_audited_with_its_bisection(bisected):
    d, keys = bisected
    sigma, plan = _sigma_and_plan(d)
    assert sigma == calibrate_noise(**plan, search=1) != calibrate_noise(**plan, search=2)
    checks = {}
    assert audit(d, "--site-keys", str(keys), checks=checks) == (0, [])
    # Review 38: a run without the newer key was "not compared" against its disclosures.
    assert (
        "releases, each listed"
        in checks["disclosures list every release the configuration implies"]
    )


def test_relabelling_the_search_fails_the_sigma_check(bisected, tmp_path):
    # A 3.9 run relabelled as searched by the secant (re-signed, as a rewriter holding the
    # site keys could): its bisected sigma is not the secant's, and the audit says so.
    d = copy_run(bisected[0], tmp_path)
    config = read_json(d / "config.json")
    config["run"]["sigma_search"] = 2
    write_json(d / "config.json", config)
    keys = resign(d)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({str(k): v for k, v in keys.items()}))
    code, failed = audit(d, "--site-keys", str(path))
    assert code == 1 and SIGMA_CHECK in failed


@pytest.mark.parametrize("value", [3, "2", [2], None])
def test_an_unknown_search_fails_the_audit_in_checks_not_a_traceback(bisected, tmp_path, value):
    code, failed = audit(relabel(bisected[0], tmp_path, "sigma_search", value))
    assert code == 1 and SIGMA_CHECK in failed


def test_a_recorded_run_without_the_key_replays_with_bisection_and_a_new_one_with_the_secant():
    recorded = RunConfig(dp_epsilon=8.0).to_dict()
    assert recorded["sigma_search"] == 2
    del recorded["sigma_search"]
    assert RunConfig.from_recorded(recorded).sigma_search == 1
    with pytest.raises(ConfigError, match="sigma_search"):
        RunConfig(sigma_search=0)


CAL_CHECK = (
    "site 0: decision calibration: one release iff metrics.json accounts one, after the last "
    "round, as planned"
)


def test_a_scatter_linear_run_releases_its_calibration_at_r_16(bisected):
    d, _ = bisected
    metrics = read_json(d / "metrics.json")
    assert read_json(d / "config.json")["resolved"]["model"]["name"] == "scatter-linear"
    assert metrics["rounds"][-1]["decision_calibration"]["clip"] == 16.0
    events = read_json(d / "privacy.json")["events"]
    assert {e["max_grad_norm"] for e in events if e["phase"] == "calibrate"} == {16.0}


@pytest.mark.parametrize("recorded", [8.0, ABSENT])
def test_a_release_at_another_clip_than_the_run_records_fails_the_audit(
    bisected, tmp_path, recorded
):
    # Absent: a run recorded before 3.11, which released at R = 4, not 16.
    code, failed = audit(relabel(bisected[0], tmp_path, "calibration_clip", recorded))
    assert code == 1 and CAL_CHECK in failed


def test_a_cnn_run_releases_its_calibration_at_r_4_and_not_16(tmp_path_factory, tmp_path):
    d = tiny_run(tmp_path_factory.mktemp("cnn"), model="cnn")
    events = read_json(d / "privacy.json")["events"]
    assert {e["max_grad_norm"] for e in events if e["phase"] == "calibrate"} == {4.0}
    assert read_json(d / "metrics.json")["rounds"][-1]["decision_calibration"]["clip"] == 4.0
    assert audit(d) == (0, [])
    # Rewritten to 16, as a scatter-linear run would release: the named model says 4.
    d = copy_run(d, tmp_path)
    privacy = read_json(d / "privacy.json")
    for e in privacy["events"]:
        if e["phase"] == "calibrate":
            e["max_grad_norm"] = 16.0
    write_json(d / "privacy.json", privacy)
    resign(d)
    code, failed = audit(d)
    assert code == 1 and CAL_CHECK in failed
