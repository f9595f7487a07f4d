"""`securefed train --audit-canaries K` and `securefed audit --empirical RUN_DIR`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from securefed.cli import cli
from securefed.config import RunConfig
from securefed.deploy.coordinator import check_deployable
from securefed.dp.audit import audit_run as audit_run_dir
from securefed.dp.empirical import RECORD_FILE, check_audit_run
from securefed.errors import AuditError, ConfigError
from securefed.run import train


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    from tests.conftest import tiny_config, write_small_npz

    tmp = tmp_path_factory.mktemp("audit")
    cfg = tiny_config(write_small_npz(tmp / "tiny.npz"), rounds=1, audit_canaries=200)
    return train(cfg, out_dir=tmp / "run", progress=False)


def test_audit_run_reports_eps_emp_below_the_claim_and_declares_itself(audit_run):
    privacy = json.loads((audit_run / "privacy.json").read_text())
    block = privacy["empirical"]
    assert privacy["schema_version"] == "3.12"
    assert block["K"] == 200 and block["site"] == 0 and block["audit_run"] is True
    assert block["confidence"] == 0.95 and "Steinke" in block["method"]
    assert 0 <= block["eps_emp"] <= block["epsilon"] == privacy["clients"][0]["epsilon"]
    assert block["steps"] == privacy["clients"][0]["steps"]  # every DP step carried them
    summary = (audit_run / "summary.md").read_text().splitlines()
    assert summary[2].startswith("**Privacy unit: one training record")
    assert "AUDIT RUN: do not deploy" in "\n".join(summary[:6])
    assert any("eps_emp" in line and "lower bound" not in line for line in summary)
    from safetensors import safe_open

    with safe_open(str(audit_run / "model.safetensors"), framework="pt") as f:
        assert "do not deploy" in f.metadata()["audit_run"]
    result = check_audit_run(audit_run)
    assert result["holds"] and result["eps_emp"] == pytest.approx(block["eps_emp"])


def test_audit_empirical_cli_passes_and_refuses_a_tampered_record(audit_run, tmp_path):
    ok = CliRunner().invoke(cli, ["audit", "--empirical", str(audit_run)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("[PASS] site 0: eps_emp")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(audit_run, copy)
    record = json.loads((copy / RECORD_FILE).read_text())
    record["signs"] = [-s for s in record["signs"]]  # claim the opposite coins
    (copy / RECORD_FILE).write_text(json.dumps(record))
    bad = CliRunner().invoke(cli, ["audit", "--empirical", str(copy)])
    assert bad.exit_code == 2
    assert bad.output.strip().count("\n") == 0 and "record_sha256 (edited)" in bad.output
    # The signature audit reads the empirical block too: one more check, failing here.
    assert audit_run_dir(audit_run).ok
    checks = {c.name: c for c in audit_run_dir(copy).checks}
    assert not checks["empirical audit record"].ok


def test_a_run_without_canaries_has_no_empirical_block(small_config, tmp_path):
    out = train(small_config.replace(rounds=1), out_dir=tmp_path / "run", progress=False)
    privacy = json.loads((out / "privacy.json").read_text())
    assert "empirical" not in privacy and not (out / RECORD_FILE).exists()
    summary = (out / "summary.md").read_text().splitlines()
    assert summary[2].startswith("**Privacy unit: one training record")
    with pytest.raises(AuditError, match="no empirical audit"):
        check_audit_run(out)


def test_audit_canaries_need_dp_and_stay_in_process():
    with pytest.raises(ConfigError, match="needs --dp-epsilon"):
        RunConfig(dp_epsilon=None, audit_canaries=10)
    for bad in (-1, 1):
        with pytest.raises(ConfigError, match="at least 2"):
            RunConfig(audit_canaries=bad)
    with pytest.raises(ConfigError, match="--audit-canaries"):
        check_deployable(RunConfig(audit_canaries=10))


def test_a_run_whose_noise_is_silently_off_fails_its_empirical_audit(
    small_npz, tmp_path, monkeypatch
):
    """The planted bug through the whole run: the ledger claims eps = 1, no noise is added."""
    from securefed.fl import site_runtime
    from tests.conftest import tiny_config
    from tests.dp.test_empirical import _SilencedNoise

    monkeypatch.setattr(site_runtime, "mechanism_noise", lambda config, *labels: _SilencedNoise())
    cfg = tiny_config(small_npz, rounds=1, dp_epsilon=1.0, audit_canaries=200, calibrate=False)
    out = train(cfg, out_dir=tmp_path / "run", progress=False)
    block = json.loads((out / "privacy.json").read_text())["empirical"]
    assert block["epsilon"] <= 1.0 < block["eps_emp"]
    assert "EXCEEDS the analytical ε" in (out / "summary.md").read_text()
    refuted = CliRunner().invoke(cli, ["audit", "--empirical", str(out)])
    assert refuted.exit_code == 1 and refuted.output.startswith("[FAIL] site 0: eps_emp")
    assert not audit_run_dir(out).ok  # the signature audit fails it as well


def test_a_forged_empirical_record_rehashed_fails_the_sites_signature(audit_run, tmp_path):
    """The attack: rewrite the canaries' scores so eps_emp comes out lower, then update
    record_sha256 and the report hash. The audited site's signature over (eps_emp, record
    digest) no longer verifies; against its pinned key even a re-signed block fails."""
    import shutil

    from securefed.dp.empirical import empirical_epsilon
    from securefed.dp.report import file_sha256
    from securefed.dp.signing import SiteSigner, empirical_message
    from tests.dp.audit_fixtures import rehash

    copy = tmp_path / "forged"
    shutil.copytree(audit_run, copy)
    record = json.loads((copy / RECORD_FILE).read_text())
    record["scores"] = [0.0] * len(record["scores"])  # no canary guessed: eps_emp 0
    (copy / RECORD_FILE).write_text(json.dumps(record))
    privacy = json.loads((copy / "privacy.json").read_text())
    block = privacy["empirical"]
    forged = empirical_epsilon(
        record["scores"], record["signs"], delta=block["delta"], confidence=block["confidence"]
    )
    block.update(forged.to_dict(), record_sha256=file_sha256(copy / RECORD_FILE))
    (copy / "privacy.json").write_text(json.dumps(privacy))
    rehash(copy)
    with pytest.raises(AuditError, match="signature does not verify"):
        check_audit_run(copy)
    bad = CliRunner().invoke(cli, ["audit", "--empirical", str(copy)])
    assert bad.exit_code == 2 and "signature" in bad.output
    # Re-signed by the forger: the report's own key is then the forger's, the pinned one not.
    block["signature"] = SiteSigner.generate().sign_message(empirical_message(block))
    (copy / "privacy.json").write_text(json.dumps(privacy))
    rehash(copy)
    pinned = {"0": privacy["site_keys"]["0"]}
    with pytest.raises(AuditError, match="pinned key"):
        check_audit_run(copy, site_keys=pinned)


def test_the_empirical_audit_compares_with_the_epsilon_the_site_signed(audit_run, tmp_path):
    # Review 32a: the empirical check read clients[site].epsilon, which only the unkeyed hash
    # covered: raised to 50 and rehashed, a refuted claim (eps_emp above the true epsilon)
    # passed. The epsilon it compares with is now the one the site's signature covers.
    import shutil

    from tests.dp.audit_fixtures import rehash

    copy = tmp_path / "copy"
    shutil.copytree(audit_run, copy)
    privacy = json.loads((copy / "privacy.json").read_text())
    privacy["clients"][0]["epsilon"] = 50.0
    (copy / "privacy.json").write_text(json.dumps(privacy))
    rehash(copy)
    with pytest.raises(AuditError, match="signed claim .* does not verify"):
        check_audit_run(copy)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"record": "/etc/hostname"}, "must be a file in the run"),
        ({"record": "../empirical_audit.json"}, "must be a file in the run"),
        ({"K": 100_000}, "not the run's --audit-canaries"),
        ({"confidence": 1.5}, ""),
    ],
)
def test_a_hostile_empirical_block_is_a_one_line_error(audit_run, tmp_path, edit, match):
    # Review 32d: the record was read from any path, whole; a canary count past the run's
    # made the check slow; a confidence above 1 escaped as a traceback.
    import shutil

    from securefed.dp.signing import SiteSigner, empirical_message
    from tests.dp.audit_fixtures import rehash

    copy = tmp_path / "copy"
    shutil.copytree(audit_run, copy)
    privacy = json.loads((copy / "privacy.json").read_text())
    privacy["empirical"].update(edit)
    signer = SiteSigner.generate()  # the report supplies its own key (nothing pinned)
    privacy["site_keys"]["0"] = signer.public_key_hex
    privacy["empirical"]["signature"] = signer.sign_message(empirical_message(privacy["empirical"]))
    (copy / "privacy.json").write_text(json.dumps(privacy))
    rehash(copy)
    res = CliRunner().invoke(cli, ["audit", "--empirical", str(copy)])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit)
    assert res.output.strip().count("\n") == 0 and match in res.output
