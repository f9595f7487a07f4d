"""Schema 3.12: `--secagg-ring-bits auto` takes the fewest bits (rule 2); a run recorded before
it chose 32 or 64 bits (rule 1), and the audit rebuilds each run's ring with its own rule."""

from __future__ import annotations

import pytest

from securefed.dp.report import read_json, write_json
from tests.dp.audit_fixtures import (
    ABSENT,
    as_older_release,
    audit_json,
    copy_run,
    relabel,
    resign,
    tiny_run,
)

MASK_CHECK = "masking: stated parameters follow from the run and the roster's pins"
DISCLOSURES = "disclosures list every release the configuration implies"


def _audit(d, checks=None):
    return audit_json(d, checks=checks)


def _mask_params(d):
    return read_json(d / "privacy.json")["secure_aggregation_params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A masked run of today's rule, and one of rule 1 written as a 3.11 release wrote it."""
    today = tiny_run(tmp_path_factory.mktemp("rule2"), secure_agg="mask")
    old = tiny_run(tmp_path_factory.mktemp("rule1"), secure_agg="mask", ring_auto_rule=1)
    assert as_older_release(old, without="ring_auto_rule", schema="3.11")[0] == 1
    return today, old


def test_each_rule_audits_clean_with_its_own_ring(runs):
    today, old = runs
    # 2 sites at clip range 1e5: 2 x 1e5 x 2^10 < 2^28, so 29 bits; rule 1 took 32.
    assert (_mask_params(today)["ring_bits"], _mask_params(today)["word_bytes"]) == (29, 3.625)
    assert (_mask_params(old)["ring_bits"], _mask_params(old)["word_bytes"]) == (32, 4)
    assert "8 to 64 bits" in _mask_params(today)["ring_rule"]
    assert "32, 64 bits" in _mask_params(old)["ring_rule"]
    assert _audit(today) == (0, [])
    checks = {}
    assert _audit(old, checks) == (0, [])
    # Review 39: a run without the newer key was "not compared" against its disclosures, so
    # one with a disclosure removed (and re-hashed) audited clean.
    assert "releases, each listed" in checks[DISCLOSURES]


def test_a_run_from_before_3_12_with_a_disclosure_removed_fails_the_audit(runs, tmp_path):
    d = copy_run(runs[1], tmp_path)
    privacy = read_json(d / "privacy.json")
    privacy["disclosures"] = privacy["disclosures"][1:]
    write_json(d / "privacy.json", privacy)
    resign(d)
    code, failed = _audit(d)
    assert code == 1 and DISCLOSURES in failed


@pytest.mark.parametrize("rule", [ABSENT, 1])
def test_relabelling_a_runs_ring_rule_fails_the_audit(runs, tmp_path, rule):
    # Today's 29-bit run relabelled as rule 1: the ring the rule implies is 32 bits, not the
    # 29 the report states.
    code, failed = _audit(relabel(runs[0], tmp_path, "ring_auto_rule", rule))
    assert code == 1 and MASK_CHECK in failed


@pytest.mark.parametrize("value", [3, "2", None, True])
def test_an_unknown_rule_fails_the_audit_in_checks_not_a_traceback(runs, tmp_path, value):
    code, failed = _audit(relabel(runs[0], tmp_path, "ring_auto_rule", value))
    assert code == 1 and failed


def test_every_release_setting_an_old_run_lacks_is_named_for_the_disclosure_check():
    # Review 39: each new not-a-flag setting (a rule a recorded run keeps) must be named in the
    # audit's _NO_RELEASE_FIELDS, or every run recorded before it has its disclosures "not
    # compared". auto_rule alone is left out: runs without it (before 3.3) lack other fields too.
    import dataclasses

    from securefed.config import NotAFlag, RunConfig, cli_metadata
    from securefed.dp.audit import _NO_RELEASE_FIELDS

    unflagged = {
        f.name for f in dataclasses.fields(RunConfig) if isinstance(cli_metadata(f.name), NotAFlag)
    }
    assert unflagged - _NO_RELEASE_FIELDS == {"auto_rule"}
