import json

import pytest

from securefed.dp.audit import audit_run
from securefed.dp.report import read_json, write_json
from securefed.errors import AuditError
from tests.dp.audit_fixtures import copy_run, rehash, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("audit"))


def _copy(run_dir, tmp_path):
    return copy_run(run_dir, tmp_path)


def _rehash(d):
    rehash(d)


def test_audit_passes_on_a_real_run(run_dir):
    result = audit_run(run_dir)
    assert result.ok, [c for c in result.checks if not c.ok]
    assert len(result.rows) == 2
    assert result.exit_code == 0 and result.dp_claim
    for row in result.rows:
        # the independent replace-one PLD figure is close to the claim; no RDP column
        assert abs(row["pld"] - row["claimed"]) < 0.05 * row["claimed"] + 0.02
        assert "rdp" not in row


def test_tampered_metrics_break_the_hash(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    metrics = read_json(d / "metrics.json")
    metrics["final"]["accuracy"] = 0.99
    write_json(d / "metrics.json", metrics)
    result = audit_run(d)
    assert not result.ok
    assert any("sha256" in c.name and not c.ok for c in result.checks)


def test_under_reported_epsilon_fails_even_with_a_fixed_hash(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    for c in privacy["clients"]:
        c["epsilon"] = c["epsilon"] / 2
        c["epsilon_per_round"] = [e / 2 for e in c["epsilon_per_round"]]
    privacy["epsilon"] = max(c["epsilon"] for c in privacy["clients"])
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    result = audit_run(d)
    failed = [c.name for c in result.checks if not c.ok]
    assert "site 0: claimed epsilon >= independent PLD epsilon - tolerance" in failed, failed
    assert "site 0: signed claim verifies" in failed


def test_hidden_steps_are_caught(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["clients"][0]["steps"] -= 5
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    assert any(
        "reported steps and rounds = ledger" in c.name and not c.ok for c in audit_run(d).checks
    )


def test_noise_inflated_in_the_ledger_is_caught(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    for e in privacy["events"]:
        e["noise_multiplier"] *= 0.5  # less noise than claimed -> more epsilon
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    assert not audit_run(d).ok


def test_unreadable_input_is_an_audit_error(tmp_path):
    with pytest.raises(AuditError, match="not a run directory"):
        audit_run(tmp_path / "nope")
    (tmp_path / "privacy.json").write_text("{not json")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(AuditError, match="privacy.json: not readable JSON"):
        audit_run(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps({"schema_version": "1.0"}))
    with pytest.raises(AuditError, match="1.0 predates secret noise"):
        audit_run(tmp_path)
    for readable in ("2.0", "3.0"):  # 3.0 changed only `transfer` counts, which no check reads
        (tmp_path / "privacy.json").write_text(json.dumps({"schema_version": readable}))
        with pytest.raises(AuditError, match="missing key 'sha256'"):
            audit_run(tmp_path)
    (tmp_path / "privacy.json").write_text(json.dumps({"schema_version": "4.0"}))
    with pytest.raises(AuditError, match="schema 4.0; this auditor reads 2.x and 3.x"):
        audit_run(tmp_path)


def test_inconsistent_secure_aggregation_claims_are_caught(run_dir, tmp_path):
    from securefed.crypto.secagg import SecAggConfig

    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    params = SecAggConfig(n_clients=2).describe()
    params["threshold"] = 1  # 1 of 2 is no majority: one site alone could unmask
    privacy["secure_aggregation"] = "mask"
    privacy["secure_aggregation_params"] = params
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    failed = {c.name for c in audit_run(d).checks if not c.ok}
    assert "secure aggregation matches the configuration" in failed
    assert "masking: threshold is a strict majority of a neighbourhood" in failed


@pytest.mark.parametrize("rewrite", ["drop", "soften", "contradict", "relabel"])
def test_a_dropped_or_softened_disclosure_fails_even_with_a_fixed_hash(run_dir, tmp_path, rewrite):
    # The signed claims bind config.json's run, not the disclosures: without this check a
    # publisher could hide a release (or call a clear one secure) and recompute the hash.
    # The schema label is not signed, so relabelling the report must not skip the check.
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    clear = next(i for i, e in enumerate(privacy["disclosures"]) if e["protection"] == "clear")
    if rewrite == "drop":
        del privacy["disclosures"][clear]
    elif rewrite == "soften":
        privacy["disclosures"][clear]["protection"] = "secure-sum"
    elif rewrite == "contradict":
        privacy["disclosures"].append({**privacy["disclosures"][clear], "protection": "secure-sum"})
    else:
        del privacy["disclosures"][clear]
        privacy["schema_version"] = "3.4"
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    result = audit_run(d)
    failed = [c.name for c in result.checks if not c.ok]
    assert failed == ["disclosures list every release the configuration implies"], failed
    # Declaring more than the configuration implies hides nothing.
    d2 = _copy(run_dir, tmp_path / "more")
    privacy = read_json(d2 / "privacy.json")
    privacy["disclosures"].append({**privacy["disclosures"][0], "field": "extra"})
    write_json(d2 / "privacy.json", privacy)
    _rehash(d2)
    assert audit_run(d2).ok


def test_a_configuration_the_auditor_cannot_build_is_not_compared_but_still_bound(
    run_dir, tmp_path
):
    # A plug-in strategy the auditor lacks: the list cannot be derived (said, not failed);
    # the configuration itself is still bound by the sites' signatures.
    d = _copy(run_dir, tmp_path)
    config = read_json(d / "config.json")
    config["run"]["strategy"] = "a-plugin-this-auditor-lacks"
    write_json(d / "config.json", config)
    _rehash(d)
    checks = {c.name: c for c in audit_run(d).checks}
    line = checks["disclosures list every release the configuration implies"]
    assert line.ok and line.detail.startswith("not compared")
    assert not checks["site 0: signed claim verifies"].ok


def test_an_invalid_configuration_fails_the_disclosures_check(run_dir, tmp_path):
    # Only a plug-in name this auditor lacks is "not compared"; any other unbuildable run is
    # a failure, not a way around the check.
    d = _copy(run_dir, tmp_path)
    config = read_json(d / "config.json")
    config["run"]["dropout_clients"] = None
    write_json(d / "config.json", config)
    _rehash(d)
    checks = {c.name: c for c in audit_run(d).checks}
    assert not checks["disclosures list every release the configuration implies"].ok


def _progress(d, scale_round_1: float) -> None:
    """Rewrite round 1's epsilon in both files by ``scale_round_1``, claims untouched."""
    privacy = read_json(d / "privacy.json")
    metrics = read_json(d / "metrics.json")
    for c in privacy["clients"]:
        c["epsilon_per_round"][0] *= scale_round_1
    for entry in metrics["rounds"][0]["clients"]:
        entry["epsilon"] *= scale_round_1
    write_json(d / "privacy.json", privacy)
    write_json(d / "metrics.json", metrics)
    _rehash(d)


def test_an_understated_epsilon_curve_fails_while_every_signed_claim_holds(run_dir, tmp_path):
    # What a reader plots against accuracy: "round 1 cost epsilon 0.5". The signed claims
    # (the end of the run) are untouched, so before the per-round recomputation every line
    # of the audit passed.
    d = _copy(run_dir, tmp_path)
    _progress(d, 0.25)
    result = audit_run(d)
    failed = [c for c in result.checks if not c.ok]
    assert [c.name for c in failed] == [
        "site 0: epsilon after each round >= independent PLD epsilon - tolerance",
        "site 1: epsilon after each round >= independent PLD epsilon - tolerance",
    ]
    assert "understated: round 1 states" in failed[0].detail


def test_an_overstated_epsilon_curve_is_conservative_and_passes(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    _progress(d, 1.1)  # round 1 still below round 2's: the curve stays non-decreasing
    result = audit_run(d)
    assert result.ok, [c for c in result.checks if not c.ok]


def test_metrics_and_privacy_must_state_the_same_epsilon_curve(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    metrics = read_json(d / "metrics.json")
    metrics["rounds"][0]["clients"][1]["epsilon"] *= 0.5
    write_json(d / "metrics.json", metrics)
    _rehash(d)
    failed = {c.name: c.detail for c in audit_run(d).checks if not c.ok}
    label = "site 1: epsilon after each round >= independent PLD epsilon - tolerance"
    assert list(failed) == [label]
    assert "round 1: metrics.json states" in failed[label]


def test_the_epsilon_curve_is_recomputed_round_by_round():
    from securefed.dp.accounting import pld_epsilon
    from securefed.dp.audit import independent_epsilon, independent_epsilons_by_round

    rounds = [[(1.2, 0.1, 10)], [], [(1.2, 0.1, 10), (2.0, 0.5, 3)]]
    curve = independent_epsilons_by_round(rounds=rounds, delta=1e-5)
    prefixes = [rounds[0], rounds[0], [e for r in rounds for e in r]]
    for eps, events in zip(curve, prefixes):
        # The training's grid (what an honest site claims), composed round by round ...
        assert eps == pytest.approx(pld_epsilon(history=events, delta=1e-5), rel=1e-6)
        # ... and never below the final claim's finer grid (pessimistic, so only stricter).
        assert eps >= independent_epsilon(events=events, delta=1e-5) - 1e-9
    assert curve[1] == curve[0]  # a round without events spends nothing
    assert independent_epsilons_by_round(rounds=[[], []], delta=1e-5) == [0.0, 0.0]


def _progress_lines(**kwargs):
    from securefed.dp.audit import AuditResult, _check_progress

    result = AuditResult()
    args = dict(name="site 0", delta=1e-5, accountable=True, budget={"left": 100, "seen": set()})
    args.update(kwargs)
    _check_progress(result, **args)
    return result.checks


def _event(r, steps=4):
    return {"round": r, "noise_multiplier": 1.0, "sample_rate": 0.25, "steps": steps}


def test_a_ledger_event_beyond_the_listed_rounds_fails_without_a_traceback():
    # Review 34: a calibration event at the configured last round, metrics.json cut shorter,
    # indexed past the per-round list (IndexError, a traceback and exit 1).
    (check,) = _progress_lines(
        events=[_event(1), _event(3)], per_round=[5.0, 9.0], reported=[5.0, 9.0], rounds=2
    )
    assert not check.ok and "rounds [3] beyond" in check.detail


def test_a_curve_may_be_unknown_only_before_anything_is_spent():
    late = [_event(2)]
    (check,) = _progress_lines(events=late, per_round=[None, 99.0], reported=[None, 99.0], rounds=2)
    assert check.ok, check.detail
    # Review 34b: a null over a spent round hid it as surely as a smaller number.
    early = [_event(1), _event(2)]
    (check,) = _progress_lines(
        events=early, per_round=[None, 99.0], reported=[None, 99.0], rounds=2
    )
    assert not check.ok and "round 1 states null" in check.detail
    (check,) = _progress_lines(events=late, per_round=[None, 0.1], reported=[None, 0.1], rounds=2)
    assert not check.ok and "round 2 states 0.1000" in check.detail
    (check,) = _progress_lines(events=late, per_round=[99.0, 99.0], reported=[None, 99.0], rounds=2)
    assert not check.ok and "round 1: metrics.json states None" in check.detail


def test_the_report_wide_budget_bounds_distinct_ledgers_only(monkeypatch):
    from securefed.dp import audit

    monkeypatch.setattr(audit, "_CURVE_EVENT_BUDGET", 3)
    budget = {"left": 3, "seen": set()}
    args = dict(per_round=[9.0, 9.0], reported=[9.0, 9.0], rounds=2, budget=budget)
    (first,) = _progress_lines(events=[_event(1), _event(2)], **args)
    (same,) = _progress_lines(events=[_event(1), _event(2)], **args)  # one ledger: free
    (other,) = _progress_lines(events=[_event(1), _event(2, steps=8)], **args)
    assert first.ok and same.ok, (first.detail, same.detail)
    assert not other.ok and "budget of 3 events" in other.detail


def test_a_curve_longer_than_the_cap_is_not_recomputed_and_says_so(monkeypatch):
    from securefed.dp import audit

    monkeypatch.setattr(audit, "_MAX_CURVE_ROUNDS", 1)
    (check,) = _progress_lines(
        events=[_event(1), _event(2)], per_round=[9.0, 9.0], reported=[9.0, 9.0], rounds=2
    )
    assert not check.ok and "not recomputed: 2 rounds, more than 1" in check.detail


def test_a_null_over_a_spent_round_fails_and_a_string_is_malformed(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    metrics = read_json(d / "metrics.json")
    privacy["clients"][0]["epsilon_per_round"][0] = None
    metrics["rounds"][0]["clients"][0]["epsilon"] = None
    write_json(d / "privacy.json", privacy)
    write_json(d / "metrics.json", metrics)
    _rehash(d)
    failed = {c.name: c.detail for c in audit_run(d).checks if not c.ok}
    label = "site 0: epsilon after each round >= independent PLD epsilon - tolerance"
    assert list(failed) == [label] and "round 1 states null" in failed[label]
    privacy["clients"][0]["epsilon_per_round"][0] = "0.5"
    metrics["rounds"][0]["clients"][0]["epsilon"] = "0.5"
    write_json(d / "privacy.json", privacy)
    write_json(d / "metrics.json", metrics)
    _rehash(d)
    with pytest.raises(AuditError, match="must be a number or null"):
        audit_run(d)


def test_a_key_written_twice_is_malformed(run_dir, tmp_path):
    # Review 34b: Python keeps the last of two keys, other readers the first; the hash is taken
    # over what Python parsed, so one file could carry two curves.
    d = _copy(run_dir, tmp_path)
    text = (d / "metrics.json").read_text()
    (d / "metrics.json").write_text(text.replace('"epsilon":', '"epsilon": 0.1, "epsilon":', 1))
    with pytest.raises(AuditError, match="appears twice"):
        audit_run(d)


def test_zero_records_is_a_one_line_error_not_a_traceback(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["clients"][0]["num_samples"] = 0
    write_json(d / "privacy.json", privacy)
    _rehash(d)
    with pytest.raises(AuditError, match="malformed entry"):
        audit_run(d)
