"""``securefed train --privacy-unit patient`` end to end: ids from an .npz, report, audit."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from securefed.cli import cli
from tests.conftest import write_small_npz


@pytest.fixture(scope="module")
def patient_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("patients")
    path = write_small_npz(d / "tiny.npz", n_train=240, n_val=60, n_test=80)
    arrays = dict(np.load(path, allow_pickle=False))
    # Patients of 1 to 5 records, with string ids (as a hospital export would have them).
    rng = np.random.default_rng(0)
    sizes = []
    while sum(sizes) < 240:
        sizes.append(int(rng.integers(1, 6)))
    sizes[-1] -= sum(sizes) - 240
    ids = np.repeat([f"P{i:04d}" for i in range(len(sizes))], sizes)
    arrays["train_patient_ids"] = rng.permutation(ids)
    np.savez(path, **arrays)
    return path, arrays["train_patient_ids"]


def _train(args):
    return CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)


def test_a_patient_level_run_reports_and_audits_a_per_patient_epsilon(patient_npz, tmp_path):
    path, ids = patient_npz
    out = tmp_path / "run"
    res = _train(
        [
            "--data", str(path), "--group-by", "patient_ids", "--privacy-unit", "patient",
            "--clients", "2", "--rounds", "2", "--batch-size", "16", "--dp-epsilon", "4",
            "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    privacy = json.loads((out / "privacy.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert privacy["privacy_unit"] == "patient" and config["run"]["privacy_unit"] == "patient"
    assert privacy["guarantee"].startswith("patient-level")
    assert privacy["sampling"] == "poisson over patients"
    summary = (out / "summary.md").read_text().splitlines()
    assert "Privacy unit: one patient" in "\n".join(summary[:4])
    # Each site's q is 1/ceil(P/B) for some patient count P: a site of P patients takes
    # max(ceil(P/16), min_steps) steps, and P patients of 1-5 records are fewer than records.
    total_patients = len(np.unique(ids))
    steps = [round(1 / c["sample_rate"]) for c in privacy["clients"]]
    assert sum(steps) <= math.ceil(total_patients / 16) + 2 * 4
    audit = CliRunner().invoke(cli, ["audit", str(out)])
    assert audit.exit_code == 0, audit.output
    assert "ε per patient" in audit.output


def test_patient_level_without_ids_is_one_clear_error(patient_npz, tmp_path):
    path, _ = patient_npz
    proc = subprocess.run(
        [sys.executable, "-m", "securefed.cli", "train", "--data", str(path), "--privacy-unit",
         "patient", "--clients", "2", "--rounds", "1", "--device", "cpu", "--out", "run",
         "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--group-by" in lines[0], proc.stderr
    assert not list(tmp_path.glob("run*/privacy.json"))


def test_the_site_warns_when_ids_look_wrong():
    """Local lines for the operator: ids that make every record a patient (a --group-by that
    finds nothing), and patients in both the training and the held-out split."""
    from types import SimpleNamespace

    from securefed.data import ArraySplit
    from securefed.fl.site_runtime import SiteRuntime

    def split(ids):
        n = len(ids)
        return ArraySplit(
            images=np.zeros((n, 1, 2, 2), np.float32),
            labels=np.zeros(n, np.int64),
            patients=np.asarray(ids, np.int64),
        )

    alone = SimpleNamespace(size=4, train=split([0, 1, 2, 3]), heldout=None, patients=np.arange(4))
    assert "patient of its own" in SiteRuntime._patient_warnings(alone, "site 0")[0]
    train = split([0, 0, 1, 1])
    shared = SimpleNamespace(size=2, train=train, heldout=split([1, 5]), patients=train.patients)
    (line,) = SiteRuntime._patient_warnings(shared, "site 0")
    assert "1 patient(s) have records in both" in line
    fine = SimpleNamespace(size=2, train=train, heldout=split([7, 5]), patients=train.patients)
    assert SiteRuntime._patient_warnings(fine, "site 0") == []
