"""Every rewrite of a run's privacy report that the security review found must fail the audit.

Each tampering recomputes the unkeyed sha256, so the hash alone never catches it. Each runs
twice: rewritten and rehashed (the sites' signatures catch it), and also re-signed with fresh
keys by the rewriter (then the binding to config.json and metrics.json must catch it, with
no pinned keys at all).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from securefed.cli import cli
from securefed.dp.report import read_json, write_json
from tests.dp.audit_fixtures import copy_run, reclaim, rehash, resign, tiny_run


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    # Twin fine-tuning on, so personalize-phase events are part of what is checked.
    return tiny_run(tmp_path_factory.mktemp("honest"), personalize=1)


@pytest.fixture(scope="module")
def no_dp(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("nodp"), dp=False)


@pytest.fixture(scope="module")
def reproducible(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("repro"), noise="reproducible")


def audit(d, *args):
    """Run ``securefed audit --json`` through the CLI; (exit code, {check name: ok})."""
    res = CliRunner().invoke(cli, ["audit", str(d), "--json", *args])
    if res.exit_code == 2:
        return 2, {}
    out = json.loads(res.stdout)
    assert out["exit_code"] == res.exit_code
    return res.exit_code, {c["name"]: c["ok"] for c in out["checks"]}


def failed(checks):
    return sorted(n for n, ok in checks.items() if not ok)


def _edit(d, fn, *, config_fn=None, metrics_fn=None):
    privacy = read_json(d / "privacy.json")
    fn(privacy)
    write_json(d / "privacy.json", privacy)
    for name, f in (("config.json", config_fn), ("metrics.json", metrics_fn)):
        if f:
            obj = read_json(d / name)
            f(obj)
            write_json(d / name, obj)


def quarter_q(p):
    for x in [p["clients"][0], *[e for e in p["events"] if e["client_id"] == 0]]:
        x["sample_rate"] /= 4
    reclaim(p)


def double_sigma(p):
    for x in [p["clients"][0], *[e for e in p["events"] if e["client_id"] == 0]]:
        x["noise_multiplier"] *= 2
    reclaim(p)


def drop_round(p):
    p["events"] = [
        e
        for e in p["events"]
        if not (e["client_id"] == 0 and e["round"] == 2 and e["phase"] == "federated")
    ]
    reclaim(p)


def empty_ledger(p):
    p["events"] = []
    reclaim(p)


def quiet_calibration(p):
    # Claim the decision calibration was released with 4x the noise (a smaller epsilon).
    for e in p["events"]:
        if e["client_id"] == 0 and e["phase"] == "calibrate":
            e["noise_multiplier"] *= 4
    reclaim(p)


def drop_calibration(p):
    # Hide site 0's decision-calibration release (its epsilon drops).
    p["events"] = [
        e for e in p["events"] if not (e["client_id"] == 0 and e["phase"] == "calibrate")
    ]
    reclaim(p)


TAMPERINGS = {
    "calibration noise x 4": quiet_calibration,
    "a calibration release dropped from the ledger": drop_calibration,
    "sample rate / 4": quarter_q,
    "sigma x 2": double_sigma,
    "a round dropped from the ledger": drop_round,
    "empty ledger": empty_ledger,
}

_CALIBRATION_CHECK = (
    "site 0: decision calibration: one release iff metrics.json accounts one, after the last "
    "round, as planned"
)
#: The binding check that stops each rewrite once the rewriter re-signs it.
STOPPED_BY = {
    "calibration noise x 4": _CALIBRATION_CHECK,
    "a calibration release dropped from the ledger": _CALIBRATION_CHECK,
    "sample rate / 4": "site 0: steps per event = epochs x 1/q",
    "sigma x 2": "site 0: sigma = calibrate_noise(target, delta, q, planned steps)",
    "a round dropped from the ledger": (
        "site 0: one federated event per round it took part in (metrics.json)"
    ),
    "empty ledger": "site 0: one federated event per round it took part in (metrics.json)",
}


def test_honest_run_exits_0(honest):
    code, checks = audit(honest)
    assert code == 0, failed(checks)
    assert checks["site 0: signed claim verifies"] and checks["site 1: signed claim verifies"]


@pytest.mark.integration  # its own 3-site run with twins every round: a minute under load
def test_honest_run_with_site_sampling_and_twins_every_round_exits_0(tmp_path_factory):
    # 2 of 3 sites per round: the ledger must follow metrics.json's participants exactly.
    d = tiny_run(
        tmp_path_factory.mktemp("sampled"),
        clients=3,
        client_fraction=0.5,
        personalize=1,
        personalize_when="every",
    )
    code, checks = audit(d)
    assert code == 0, failed(checks)
    rounds = read_json(d / "metrics.json")["rounds"]
    assert any(len(r["participants"]) < 3 for r in rounds)


def test_one_key_for_every_site_fails(honest, tmp_path):
    from securefed.dp.signing import SiteSigner, sign_report

    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    one = SiteSigner.generate()
    sign_report(privacy, run=read_json(d / "config.json")["run"], signers={0: one, 1: one})
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, checks = audit(d)
    assert code == 1 and failed(checks) == ["each site has its own key"]


def test_orphan_ledger_events_fail(honest, tmp_path):
    def add_orphan(p):
        p["events"].append({**p["events"][0], "client_id": 7})

    d = copy_run(honest, tmp_path)
    _edit(d, add_orphan)
    resign(d)
    code, checks = audit(d)
    assert code == 1 and failed(checks) == ["every ledger event belongs to a reported site"]


def test_honest_run_passes_with_its_keys_pinned(honest, tmp_path):
    keys = read_json(honest / "privacy.json")["site_keys"]
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    res = CliRunner().invoke(
        cli, ["audit", str(honest), "--site-keys", str(tmp_path / "keys.json")]
    )
    assert res.exit_code == 0, res.stdout
    assert f"site keys: pinned by {tmp_path / 'keys.json'}" in res.stdout


def test_unpinned_keys_are_reported_as_self_asserted(honest):
    res = CliRunner().invoke(cli, ["audit", str(honest)])
    assert res.exit_code == 0, res.stdout
    assert "self-asserted by the report" in res.stdout


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_rewritten_and_rehashed_report_fails_its_signatures(honest, tmp_path, name):
    d = copy_run(honest, tmp_path)
    _edit(d, TAMPERINGS[name])
    rehash(d)
    code, checks = audit(d)
    assert code == 1
    assert checks["sha256 of report, config and metrics"]  # the hash was made to match
    assert not checks["site 0: signed claim verifies"]


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_rewritten_and_resigned_report_fails_the_binding_checks(honest, tmp_path, name):
    d = copy_run(honest, tmp_path)
    _edit(d, TAMPERINGS[name])
    resign(d)  # fresh keys, unpinned: signatures verify, so they cannot be what catches it
    code, checks = audit(d)
    assert code == 1
    assert checks["sha256 of report, config and metrics"]
    assert checks["site 0: signed claim verifies"]
    assert STOPPED_BY[name] in failed(checks), failed(checks)
    assert all(n.startswith("site ") for n in failed(checks)), failed(checks)


def test_dropped_round_hidden_from_metrics_too_is_caught_by_the_signature(honest, tmp_path):
    def unlist(metrics):
        metrics["rounds"][1]["participants"].remove(0)

    d = copy_run(honest, tmp_path)
    _edit(d, drop_round, metrics_fn=unlist)
    rehash(d)
    code, checks = audit(d)
    assert code == 1
    assert checks["site 0: one federated event per round it took part in (metrics.json)"]
    assert not checks["site 0: signed claim verifies"]


def test_edited_field_with_recomputed_hash_fails(honest, tmp_path):
    # A smaller per-site delta claims a stronger guarantee; nothing else changes.
    def shrink_delta(p):
        p["clients"][0]["delta"] /= 10

    d = copy_run(honest, tmp_path)
    _edit(d, shrink_delta)
    rehash(d)
    code, checks = audit(d)
    assert code == 1 and checks["sha256 of report, config and metrics"]
    assert not checks["site 0: signed claim verifies"]


def test_edited_config_breaks_the_claims_run_binding(honest, tmp_path):
    def fewer_rounds(config):
        config["run"]["seed"] += 1  # any edit of the run changes run_sha256

    d = copy_run(honest, tmp_path)
    _edit(d, lambda p: None, config_fn=fewer_rounds)
    rehash(d)
    code, checks = audit(d)
    assert code == 1
    assert not checks["site 0: signed claim verifies"]
    assert not checks["site 1: signed claim verifies"]


@pytest.mark.parametrize("resigned", [False, True])
def test_no_dp_run_relabelled_as_dp_fails(no_dp, tmp_path, resigned):
    def relabel(p):
        p.update(dp=True, target_epsilon=8.0, epsilon=8.0, noise="secret")
        p.setdefault("adjacency", "replace-one")
        for c in p["clients"]:
            c["epsilon"] = 8.0

    def config_dp(config):
        config["run"]["dp_epsilon"] = 8.0

    d = copy_run(no_dp, tmp_path)
    _edit(d, relabel, config_fn=config_dp)
    if resigned:
        resign(d)
    else:
        rehash(d)
    code, checks = audit(d)
    assert code == 1, failed(checks)
    assert checks["sha256 of report, config and metrics"]
    assert checks["DP on/off matches the configuration"]  # both were relabelled


def test_no_dp_relabelled_in_report_only_fails(no_dp, tmp_path):
    d = copy_run(no_dp, tmp_path)
    _edit(d, lambda p: p.update(dp=True, target_epsilon=8.0, epsilon=8.0))
    rehash(d)
    code, checks = audit(d)
    assert code == 1 and not checks["DP on/off matches the configuration"]


def test_no_dp_run_exits_3(no_dp):
    res = CliRunner().invoke(cli, ["audit", str(no_dp)])
    assert res.exit_code == 3, res.stdout
    assert "no DP claim" in res.stdout


def test_reproducible_noise_fails_unless_allowed(reproducible):
    code, checks = audit(reproducible)
    assert code == 1 and failed(checks) == ["DP noise is secret"]
    code, checks = audit(reproducible, "--allow-reproducible-noise")
    assert code == 0, failed(checks)


def test_relabelling_reproducible_noise_as_secret_fails(reproducible, tmp_path):
    d = copy_run(reproducible, tmp_path)
    _edit(d, lambda p: p.update(noise="secret"))
    rehash(d)
    code, checks = audit(d)
    assert code == 1 and checks["DP noise is secret"]
    assert not checks["site 0: signed claim verifies"]


def test_missing_noise_field_fails(honest, tmp_path):
    d = copy_run(honest, tmp_path)
    _edit(d, lambda p: p.pop("noise"))
    resign(d)
    code, checks = audit(d)
    assert code == 1 and failed(checks) == ["DP noise is secret"]


def test_resigned_report_passes_unpinned_but_fails_pinned(honest, tmp_path):
    original = read_json(honest / "privacy.json")["site_keys"]
    (tmp_path / "keys.json").write_text(json.dumps(original))
    d = copy_run(honest, tmp_path)
    resign(d)
    code, _ = audit(d)
    assert code == 0  # self-asserted keys: a re-signed report is indistinguishable
    code, checks = audit(d, "--site-keys", str(tmp_path / "keys.json"))
    assert code == 1 and failed(checks) == ["site keys equal the pinned keys"]


def test_malformed_site_keys_file_exits_2(honest, tmp_path):
    (tmp_path / "keys.json").write_text(json.dumps({"0": "abc"}))
    res = CliRunner().invoke(
        cli, ["audit", str(honest), "--site-keys", str(tmp_path / "keys.json")]
    )
    assert res.exit_code == 2
    assert "64 hex chars" in res.stderr


def test_schema_1_report_is_refused(honest, tmp_path):
    d = copy_run(honest, tmp_path)
    _edit(d, lambda p: p.update(schema_version="1.1"))
    rehash(d)
    res = CliRunner().invoke(cli, ["audit", str(d)])
    assert res.exit_code == 2
    assert "predates secret noise" in res.stderr


def test_help_states_exit_codes_and_what_is_not_proven():
    out = CliRunner().invoke(cli, ["audit", "--help"]).stdout
    for line in ("0  every claim holds", "1  a claim fails", "2  input unreadable", "3  the run"):
        assert line in out
    assert "Cannot prove: that noise was drawn" in out
    flat = " ".join(out.split())
    # Review 32a: a truncated run passed; 3.8's closing claims prove where a run ended, and the
    # help says so, and that reports before 3.8 cannot show it.
    assert "every DP site signed a closing claim" in flat
    assert "Where a report before 3.8 ended: its sites signed no last round" in flat
    assert "self-asserted" in out


def test_undisclosed_num_samples_is_reported_not_failed(honest, tmp_path):
    def hide_n(p):
        for c in p["clients"]:
            c.pop("num_samples", None)

    d = copy_run(honest, tmp_path)
    _edit(d, hide_n)
    resign(d)  # n is part of a site's claim only when disclosed: the sites sign anew
    res = CliRunner().invoke(cli, ["audit", str(d), "--json"])
    assert res.exit_code == 0, res.stdout
    details = {c["name"]: c["detail"] for c in json.loads(res.stdout)["checks"]}
    assert "n not disclosed" in details["site 0: delta < 1/num_samples"]


def _to_patient(p):
    p["privacy_unit"] = "patient"


def _run_to_patient(c):
    c["run"]["privacy_unit"] = "patient"


def test_relabelling_a_record_level_epsilon_as_per_patient_fails(honest, tmp_path):
    """A rewriter who calls the record-level run patient-level (a k-fold stronger claim)."""
    d = copy_run(honest, tmp_path)
    _edit(d, _to_patient)
    rehash(d)
    code, checks = audit(d)
    assert code == 1 and "privacy unit matches the configuration" in failed(checks)
    # Relabelled in config.json too: the run the sites signed said "record".
    d2 = copy_run(honest, tmp_path / "both")
    _edit(d2, _to_patient, config_fn=_run_to_patient)
    rehash(d2)
    code, checks = audit(d2)
    assert code == 1
    assert "site 0: signed claim verifies" in failed(checks)
