"""`securefed bench privacy-unit`, CI-sized: the arms, their units and per-patient guarantees."""

from __future__ import annotations

import json
import math

import pytest

from securefed.bench.privacy_unit import REQUIRED_COLUMNS, UnitGrid, per_patient, run_privacy_unit
from securefed.errors import ConfigError


def test_group_privacy_of_a_record_level_claim():
    assert per_patient(unit="patient", epsilon=8.0, delta=1e-5, k=4) == (8.0, 1e-5)
    eps, delta = per_patient(unit="record", epsilon=1.0, delta=1e-5, k=3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-5)
    assert per_patient(unit="record", epsilon=8.0, delta=1e-5, k=3) == (math.inf, 1.0)


def test_every_arm_runs_and_states_what_it_protects(tmp_path):
    grid = UnitGrid(records_per_patient=3, n_train=96, seeds=(0,), base={"clients": 2, "rounds": 1})
    rows = json.loads(run_privacy_unit(out_dir=tmp_path, grid=grid, progress=False).read_text())
    by_arm = {r["arm"]: r for r in rows}
    assert set(by_arm) == {"record", "patient", "record-eps/k", "no-dp"}
    for r in rows:
        assert all(c in r for c in REQUIRED_COLUMNS)
    assert by_arm["patient"]["privacy_unit"] == "patient"
    assert by_arm["patient"]["patient_epsilon"] == by_arm["patient"]["epsilon_spent"] <= 8.0
    assert by_arm["record"]["patient_guarantee"] is False  # 3 records at eps 8: delta >= 1
    assert by_arm["record-eps/k"]["epsilon_spent"] <= 8.0 / 3
    assert by_arm["record-eps/k"]["patient_epsilon"] <= 8.0 + 1e-9
    summary = (tmp_path / "summary.md").read_text()
    assert "| patient | 8 |" in summary and "none (δ ≥ 1)" in summary


def test_a_grid_needs_patients_of_several_records():
    with pytest.raises(ConfigError, match="at least 2"):
        UnitGrid(records_per_patient=1)
    with pytest.raises(ConfigError, match="arms"):
        UnitGrid(arms=("records",))
