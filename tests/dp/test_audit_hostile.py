"""What review 32 did to privacy reports that the audit let through, and must not again.

Each report is rewritten and its unkeyed hash recomputed; where the rewrite touches signed
numbers the sites' claims are re-signed with fresh keys that are then pinned, as a deployed
site running such a plan would publish them.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner

from securefed.cli import cli
from securefed.dp.report import GUARANTEES, read_json, write_json
from tests.dp.audit_fixtures import (
    copy_run,
    pins_of_another_roster,
    reclaim,
    rehash,
    resign,
    tiny_run,
)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("honest"))


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("masked"), clients=3, secure_agg="mask")


def audit(d, *args):
    """``securefed audit --json`` through the CLI: (exit code, failed check names, output)."""
    res = CliRunner().invoke(cli, ["audit", str(d), "--json", *args])
    if res.exit_code != 0 and res.exit_code != 1:
        return res.exit_code, [], res.output
    out = json.loads(res.stdout)
    return res.exit_code, sorted(c["name"] for c in out["checks"] if not c["ok"]), res.output


def _pin(d, tmp_path, keys):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({str(k): v for k, v in keys.items()}))
    return str(path)


def test_a_site_plan_with_a_delta_above_the_runs_bound_fails_signed_and_pinned(honest, tmp_path):
    # Before: delta 0.2 with sigma recalibrated for it (0.54 instead of 1.62) passed every
    # check when the site's n was not disclosed; the run itself refuses such a plan.
    from securefed.dp import accounting, releases

    d = copy_run(honest, tmp_path)
    run = read_json(d / "config.json")["run"]
    privacy = read_json(d / "privacy.json")
    c = privacy["clients"][0]
    sigma = accounting.calibrate_noise(
        target_epsilon=run["dp_epsilon"],
        delta=0.2,
        sample_rate=c["sample_rate"],
        steps=c["planned_steps"],
        accountant="pld",
        extra=releases.entries(run),
    )
    for c in privacy["clients"]:
        c["delta"], c["noise_multiplier"] = 0.2, sigma
    for e in privacy["events"]:
        if e["phase"] == "federated":
            e["noise_multiplier"] = sigma
    privacy["delta"] = 0.2
    reclaim(privacy)
    write_json(d / "privacy.json", privacy)
    keys = resign(d)
    code, failed, _ = audit(d, "--site-keys", _pin(d, tmp_path, keys))
    assert code == 1
    assert "site 0: delta within the run's bound" in failed
    assert "site 1: delta within the run's bound" in failed


def test_a_guarantee_relabelled_per_patient_fails_though_privacy_unit_stays_record(
    honest, tmp_path
):
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["guarantee"] = GUARANTEES["patient"]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, _ = audit(d)
    assert code == 1 and failed == ["fixed texts follow from the run"]


def test_an_overstated_collusion_tolerance_fails(masked, tmp_path):
    # Before: secure_aggregation_params was checked for its ring and a majority threshold
    # only; `tolerated_colluders` raised by one (hash recomputed) passed.
    assert audit(masked)[0] == 0
    for key in ("tolerated_colluders", "tolerated_colluders_full_round", "min_contributors"):
        d = copy_run(masked, tmp_path / key)
        privacy = read_json(d / "privacy.json")
        privacy["secure_aggregation_params"][key] += 1
        write_json(d / "privacy.json", privacy)
        rehash(d)
        code, failed, _ = audit(d)
        assert code == 1
        assert failed == ["masking: stated parameters follow from the run and the roster's pins"]


def test_a_report_without_its_roster_digest_cannot_overstate_the_tolerance(masked, tmp_path):
    # Review 32c: with `roster_sha256` null the rebuild had no tolerance keys to compare, so
    # any figure passed. Every key of either side is compared now.
    d = copy_run(masked, tmp_path)
    privacy = read_json(d / "privacy.json")
    params = privacy["secure_aggregation_params"]
    params["roster_sha256"] = None
    params["tolerated_colluders"] = params["tolerated_colluders_full_round"] = 2
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, _ = audit(d)
    assert code == 1
    assert "masking: stated parameters follow from the run and the roster's pins" in failed


def test_an_in_process_report_cannot_state_other_roster_pins(masked, tmp_path):
    # Review 32c: pins chosen by the rewriter (every site a minimum contributor) and the
    # tolerance that follows from them passed. An in-process run's roster is rebuilt from its
    # site keys and run: its digest is the report's, so the true pins decide.
    d = copy_run(masked, tmp_path)
    privacy, claimed, _ = pins_of_another_roster(d)
    params = privacy["secure_aggregation_params"]
    keys = ("min_contributors", "tolerated_colluders", "tolerated_colluders_full_round")
    assert any(claimed[k] != params[k] for k in keys)
    params.update({k: claimed[k] for k in keys})
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, _ = audit(d)
    assert code == 1
    assert "masking: stated parameters follow from the run and the roster's pins" in failed


@pytest.mark.parametrize("label", ["3.6", "3.5", "3", "2.9"])
def test_relabelling_the_schema_does_not_skip_the_text_comparison(honest, tmp_path, label):
    # Review 32c: the label is not signed; "3.6" (or older) skipped the comparison. The run
    # dict, which the sites sign, has `twin_privacy` (3.6 code): the texts are compared.
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["schema_version"] = label
    privacy["guarantee"] = GUARANTEES["patient"]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, _ = audit(d)
    assert code == 1 and "fixed texts follow from the run" in failed


def test_the_3_6_threat_model_sentence_is_still_accepted(honest, tmp_path):
    from securefed.dp.report import THREAT_MODEL, THREAT_MODEL_3_6
    from securefed.protocol.modes.masking import ACTIVE_THREAT_MODEL, ACTIVE_THREAT_MODEL_3_6

    assert THREAT_MODEL_3_6 != THREAT_MODEL and "m - 1" not in THREAT_MODEL_3_6
    assert "m - 1" in ACTIVE_THREAT_MODEL and "m - 1" not in ACTIVE_THREAT_MODEL_3_6
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["threat_model"] = THREAT_MODEL_3_6
    write_json(d / "privacy.json", privacy)
    rehash(d)
    assert audit(d)[0] == 0


def test_an_event_of_an_unknown_phase_is_not_replayed(honest, tmp_path):
    # Review 32c: such an event failed only the per-round check, which did not keep the ledger
    # from the accountant: sigma 1e-3 asked it for about 40 GB.
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    bogus = dict(next(e for e in privacy["events"] if e["client_id"] == 0))
    bogus.update(phase="bogus", noise_multiplier=1e-3)
    privacy["events"].append(bogus)
    write_json(d / "privacy.json", privacy)
    keys = resign(d)
    code, failed, output = audit(d, "--site-keys", _pin(d, tmp_path, keys))
    assert code == 1
    assert "site 0: claimed epsilon >= independent PLD epsilon - tolerance" in failed
    assert json.loads(output)["sites"][0]["pld"] is None


def test_a_flood_of_twin_events_is_not_replayed(honest, tmp_path):
    # Review 32d: extra fine-tuning events with the site's own sigma, q and steps failed only
    # the twin-events check, which did not keep the ledger from the accountant (100,000 events
    # took 3 GiB; 300,000 ran out of memory). Every check of the site now gates the replay.
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    event = dict(next(e for e in privacy["events"] if e["client_id"] == 0))
    event["phase"] = "personalize"
    privacy["events"] += [dict(event) for _ in range(2000)]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, output = audit(d)
    assert code == 1 and "site 0: twin fine-tuning events as configured" in failed
    assert json.loads(output)["sites"][0]["pld"] is None


def test_the_dp_scope_wording_follows_the_signed_run_not_the_transfer_block(honest, tmp_path):
    # Review 32d: the expected `dp_applies_to` came from privacy.json's unsigned transfer
    # block; claiming frozen tensors there let the frozen wording pass on a run with none.
    from securefed.dp.report import report_texts

    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["transfer"]["frozen_tensors"] = 7
    privacy["dp_applies_to"] = report_texts(
        dp=True, unit="record", frozen=True, teacher_student=False, local_twins=False
    )["dp_applies_to"]
    write_json(d / "privacy.json", privacy)
    rehash(d)
    code, failed, _ = audit(d)
    assert code == 1 and "fixed texts follow from the run" in failed


def _nan(d):
    text = (d / "privacy.json").read_text().replace('"seed": 0', '"seed": NaN')
    assert "NaN" in text
    (d / "privacy.json").write_text(text)


def _deep(d):
    (d / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)


def _digits(d):
    (d / "config.json").write_text('{"run": ' + "9" * 5000 + "}")


def _zero(d):
    (d / "privacy.json").unlink()
    os.symlink("/dev/zero", d / "privacy.json")


def _frac_bits(d):
    privacy = read_json(d / "privacy.json")
    privacy["secure_aggregation"] = "mask"
    privacy["secure_aggregation_params"] = {
        "threshold": 2, "neighbourhood_size": 2, "ring_bits": 32, "frac_bits": 2000,
        "clip_range": 1.0, "max_summands": 2, "quantum": 0.0,
    }  # fmt: skip
    write_json(d / "privacy.json", privacy)
    config = read_json(d / "config.json")
    config["run"]["secure_agg"] = "mask"
    write_json(d / "config.json", config)
    rehash(d)


def _many_clients(d):
    config = read_json(d / "config.json")
    config["run"]["clients"] = 10**15
    write_json(d / "config.json", config)
    rehash(d)


@pytest.mark.parametrize(
    "hostile", [_nan, _deep, _digits, _zero, _frac_bits, _many_clients], ids=lambda f: f.__name__
)
def test_a_hostile_file_is_a_one_line_error_never_a_traceback(honest, tmp_path, hostile):
    # Before: tracebacks (exit 1, the "a claim fails" code, and nothing on stdout with --json),
    # or an attempt to read /dev/zero to the end.
    d = copy_run(honest, tmp_path)
    hostile(d)
    res = CliRunner().invoke(cli, ["audit", str(d)])
    assert isinstance(res.exception, SystemExit) or res.exception is None, res.exception
    if res.exit_code == 2:
        assert res.output.strip().count("\n") == 0 and res.output.startswith("error")
    else:
        assert res.exit_code == 1 and "[FAIL]" in res.output


def test_an_event_the_accountant_cannot_replay_is_not_replayed(honest, tmp_path):
    # Before: sigma 1e-3 in one event (re-signed) made the PLD accountant ask for 38 GiB.
    d = copy_run(honest, tmp_path)
    privacy = read_json(d / "privacy.json")
    next(e for e in privacy["events"] if e["client_id"] == 0)["noise_multiplier"] = 1e-3
    privacy["clients"][0]["epsilon"] = 3.9
    privacy["clients"][0]["epsilon_per_round"] = [3.0, 3.9]
    write_json(d / "privacy.json", privacy)
    keys = resign(d)
    code, failed, output = audit(d, "--site-keys", _pin(d, tmp_path, keys))
    assert code == 1
    assert "site 0: claimed epsilon >= independent PLD epsilon - tolerance" in failed
    rows = json.loads(output)["sites"]
    assert rows[0]["pld"] is None and not math.isnan(rows[1]["pld"])
