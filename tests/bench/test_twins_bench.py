"""``securefed bench twins``: arms (fl, ftl, ftl-last), the public pretrain, resuming."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from securefed.bench.twins import UNET_ENCODER, TwinGrid, _cell_key, run_twin_bench
from securefed.cli import cli
from securefed.errors import ConfigError

_OPTIONS = {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16, "n_groups": 2}


def test_an_unknown_arm_is_refused():
    with pytest.raises(ConfigError, match="twins arms"):
        TwinGrid(arms=("fl", "twin-magic"))


def test_each_ftl_arm_freezes_what_it_says_and_fl_keeps_its_old_cell_key():
    grid = TwinGrid()
    assert grid.freeze("ftl") == UNET_ENCODER
    assert grid.freeze("ftl-last") == "backbone-except-last"
    assert grid.freeze("fl") is None
    # Suites written before arms existed resume: their keys are the fl arm's.
    assert _cell_key("fl", None, 0) == "epsinf-seed0"
    assert _cell_key("ftl", 8.0, 1) == "ftl-eps8-seed1"


def test_ftl_with_another_model_is_refused_by_the_cli(tmp_path):
    res = CliRunner().invoke(
        cli,
        ["bench", "twins", "--model", "vit-unet", "--arms", "ftl", "--out", str(tmp_path / "o")],
    )
    assert res.exit_code != 0
    assert "freezes the unet's encoder" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_ftl_starts_from_the_public_pretrain_keeps_its_encoder_and_resumes(tmp_path):
    grid = TwinGrid(
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
            "personalize": 1,
            "personalize_lr": 0.05,
            "device": "cpu",
        },
        epsilons=(None,),
        arms=("fl", "ftl"),
        public={"data_options": _OPTIONS, "seed": 9, "epochs": 1, "batch_size": 4, "lr": 0.05},
    )
    out = tmp_path / "bench"

    rows = json.loads(run_twin_bench(out_dir=out, grid=grid, progress=False).read_text())

    assert sorted({r["arm"] for r in rows}) == ["fl", "ftl"]
    assert all(r["global_test_voxel_f1"] is not None for r in rows)
    ftl_run = out / "runs" / "ftl-epsinf-seed0"
    config = json.loads((ftl_run / "config.json").read_text())["run"]
    assert config["strategy"] == "ftl" and config["freeze"] == UNET_ENCODER
    # The encoder the sites never trained is the public model's, bit for bit; the decoder moved.
    public = load_file(out / "pretrained" / "model.safetensors")
    served = load_file(ftl_run / "model.safetensors")
    encoder = [k for k in public if k.split(".")[0] in UNET_ENCODER.split(",")]
    assert encoder and all((public[k] == served[k]).all() for k in encoder)
    assert any(not (public[k] == served[k]).all() for k in public if k.startswith("upcat_"))
    zero_shot = json.loads((out / "pretrained.json").read_text())
    assert set(zero_shot["by_seed"]) == {"0"} and 0 <= zero_shot["by_seed"]["0"]["mean_dice"] <= 1
    summary = (out / "summary.md").read_text()
    assert "## ftl, ε = ∞" in summary and "before any federated training" in summary
    again = json.loads(run_twin_bench(out_dir=out, grid=grid, progress=False).read_text())
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows]
