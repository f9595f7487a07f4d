"""`securefed bench privacy-audit`, CI-sized: rows, the claim's side of the bound, resume."""

from __future__ import annotations

import json

import pytest

from securefed.bench.privacy_audit import REQUIRED_COLUMNS, AuditGrid, run_privacy_audit
from securefed.errors import ConfigError

_TINY = AuditGrid(
    datasets=("synthetic",),
    epsilons=(4.0, None),
    seeds=(0,),
    site_size=200,
    canaries=200,
    epochs=2,
    batch_size=50,
)


def test_rows_hold_eps_emp_per_epsilon_below_the_claim_and_resume(tmp_path):
    path = run_privacy_audit(out_dir=tmp_path, grid=_TINY, progress=False)
    rows = json.loads(path.read_text())
    assert [r["epsilon"] for r in rows] == [4.0, None]
    for r in rows:
        assert all(c in r for c in REQUIRED_COLUMNS)
        assert r["steps"] == 2 * 4 and r["canaries"] == 200
    noisy, bare = rows
    assert noisy["eps_emp"] <= noisy["epsilon_spent"] <= 4.0
    assert bare["epsilon_spent"] is None and bare["noise_multiplier"] == 0.0
    assert bare["eps_emp"] > 2.0 and bare["correct"] >= 0.95 * bare["guesses"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| synthetic | 4 |" in summary and "∞ (no noise)" in summary
    # Finished cells are read back, not trained again.
    again = json.loads(run_privacy_audit(out_dir=tmp_path, grid=_TINY, progress=False).read_text())
    assert [r["eps_emp"] for r in again] == [r["eps_emp"] for r in rows]
    # Another grid may not reuse the folder.
    with pytest.raises(ConfigError, match="another `base`"):
        run_privacy_audit(
            out_dir=tmp_path, grid=AuditGrid(**{**_TINY.__dict__, "canaries": 100}), progress=False
        )
