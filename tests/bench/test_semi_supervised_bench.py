"""``securefed bench semi-supervised`` on a CI-sized grid: cells, files, table, resuming."""

from __future__ import annotations

import json
import math

import pytest

from securefed.bench.semi_supervised import REQUIRED_COLUMNS, SemiGrid, run_semi_supervised
from securefed.errors import ConfigError

_OPTIONS = {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16, "n_groups": 2}


def test_the_default_grid_runs_teacher_student_only_below_full_labels():
    cells = SemiGrid().cells()
    # (0.1, 0.25) x 2 arms + the F = 1 reference, x 2 ε x 3 seeds
    assert len(cells) == 5 * 2 * 3
    assert not [c for c in cells if c[0] == "teacher-student" and c[1] >= 1]


def test_a_fraction_outside_zero_one_is_refused():
    with pytest.raises(ConfigError, match="labelled fractions"):
        SemiGrid(fractions=(0.0, 1.0))


@pytest.mark.integration
def test_a_tiny_grid_writes_rows_table_and_resumes(tmp_path):
    grid = SemiGrid(
        fractions=(0.5, 1.0),
        epsilons=(None,),
        seeds=(0,),
        base={
            "dataset": "synthetic-seg",
            "data_options": _OPTIONS,
            "model": "unet",
            "clients": 2,
            "partition": "by-group",
            "rounds": 1,
            "local_epochs": 1,
            "batch_size": 2,
            "lr": 0.1,
            "device": "cpu",
        },
        teacher={"data_options": _OPTIONS, "seed": 9, "epochs": 1, "batch_size": 4, "lr": 0.05},
        pseudo_threshold=0.5,
    )
    out = tmp_path / "bench"

    rows = json.loads(run_semi_supervised(out_dir=out, grid=grid, progress=False).read_text())

    assert sorted((r["arm"], r["labelled_fraction"]) for r in rows) == [
        ("supervised", 0.5),
        ("supervised", 1.0),
        ("teacher-student", 0.5),
    ]
    for r in rows:
        assert all(c in r for c in REQUIRED_COLUMNS)
        assert math.isfinite(r["mean_dice"]) and 0 <= r["voxel_f1"] <= 1
    summary = (out / "summary.md").read_text()
    assert "gap to F = 1" in summary and "(reference)" in summary
    assert (out / "results.csv").stat().st_size > 0
    # Resuming trains nothing: the same rows come back.
    again = json.loads(run_semi_supervised(out_dir=out, grid=grid, progress=False).read_text())
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows]


def test_the_cli_sizes_the_sites_and_the_teacher_alike(tmp_path, grid_of):
    from click.testing import CliRunner

    import securefed.bench.semi_supervised as semi
    from securefed.cli import cli

    seen = grid_of(semi, "run_semi_supervised")
    args = ["bench", "semi-supervised", "--out", str(tmp_path / "o"), "--image-size", "32"]
    res = CliRunner().invoke(cli, [*args, "--teacher-volumes", "108"])
    assert res.exit_code == 0, res.output
    grid = seen["grid"]
    assert grid.base["data_options"]["image_size"] == 32
    assert grid.teacher["data_options"] == {
        **SemiGrid().teacher["data_options"],
        "image_size": 32,
        "n_train": 108,
    }
    # The sites' own volumes are unchanged but for their size.
    assert grid.base["data_options"]["n_train"] == SemiGrid().base["data_options"]["n_train"]
    res = CliRunner().invoke(cli, [*args[:-1], "8"])
    assert res.exit_code != 0 and "--image-size" in res.output


def test_the_cli_passes_the_teacher_mode_and_refuses_an_unknown_one(tmp_path, grid_of):
    from click.testing import CliRunner

    import securefed.bench.semi_supervised as semi
    from securefed.cli import cli

    seen = grid_of(semi, "run_semi_supervised")

    def args(out: str) -> list[str]:
        return ["bench", "semi-supervised", "--out", str(tmp_path / out)]

    assert CliRunner().invoke(cli, args("a")).exit_code == 0
    assert seen["grid"].teacher_mode == "fixed"
    assert CliRunner().invoke(cli, [*args("b"), "--teacher", "global"]).exit_code == 0
    assert seen["grid"].teacher_mode == "global"
    res = CliRunner().invoke(cli, [*args("c"), "--teacher", "ema"])
    assert res.exit_code != 0 and "--teacher" in res.output
    with pytest.raises(ConfigError, match="--teacher"):
        SemiGrid(teacher_mode="ema")


def test_a_folder_from_before_the_teacher_mode_is_refused_to_a_fixed_teacher_grid(tmp_path):
    # Its teacher-student cells ran with the round's global model as the teacher: resuming it
    # with --teacher fixed would table both recipes as one arm.
    from dataclasses import asdict

    from securefed.bench.common import claim_folder

    old = asdict(SemiGrid())
    del old["teacher_mode"]
    (tmp_path / "suite.json").write_text(json.dumps({"suite": "semi-supervised", "grid": old}))

    with pytest.raises(ConfigError, match="teacher_mode"):
        claim_folder(tmp_path, suite="semi-supervised", grid=asdict(SemiGrid()))
    claim_folder(tmp_path, suite="semi-supervised", grid=asdict(SemiGrid(teacher_mode="global")))
