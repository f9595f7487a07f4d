"""``securefed bench twins``: arms (fl, ftl, ftl-last), the public pretrain, resuming."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from securefed.bench.twins import UNET_ENCODER, TwinGrid, _cell_key, run_twin_bench
from securefed.cli import cli
from securefed.errors import ConfigError, DataError

_OPTIONS = {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 16, "n_groups": 2}


def test_an_unknown_or_repeated_arm_is_refused():
    with pytest.raises(ConfigError, match="twins arms"):
        TwinGrid(arms=("fl", "twin-magic"))
    # A repeated arm would count every site-run twice in the tables.
    with pytest.raises(ConfigError, match="at most once"):
        TwinGrid(arms=("ftl", "ftl"))


def test_each_ftl_arm_freezes_what_it_says_and_fl_keeps_its_old_cell_key():
    grid = TwinGrid()
    assert grid.freeze("ftl") == UNET_ENCODER
    assert grid.freeze("ftl-last") == "backbone-except-last"
    assert grid.freeze("ftl-head") == "backbone"
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
        base=_tiny_base(),
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
    # The zero-shot figures are the public model's, not a fresh network's.
    zero_shot = json.loads((out / "pretrained.json").read_text())["by_seed"]
    assert set(zero_shot) == {"0"}
    assert zero_shot["0"]["loss"] == pytest.approx(_test_loss(grid, out / "pretrained"))
    assert zero_shot["0"]["loss"] != pytest.approx(_test_loss(grid, None))
    summary = (out / "summary.md").read_text()
    assert "## ftl, ε = ∞" in summary and "before any federated training" in summary
    again = json.loads(run_twin_bench(out_dir=out, grid=grid, progress=False).read_text())
    assert [r["run_dir"] for r in again] == [r["run_dir"] for r in rows]
    # A pretrain of other settings in the folder is refused, not silently reused.
    other = dataclasses.replace(grid, public={**grid.public, "epochs": 2})
    with pytest.raises(ConfigError, match="pretrain of other settings"):
        run_twin_bench(out_dir=out, grid=other, progress=False)
    copied = tmp_path / "copied"
    shutil.copytree(out / "pretrained", copied / "pretrained")
    # And the suite refuses another `public` even where the pretrain folder is gone.
    shutil.rmtree(out / "pretrained")
    with pytest.raises(ConfigError, match="another `public`"):
        run_twin_bench(out_dir=out, grid=other, progress=False)
    with pytest.raises(ConfigError, match="pretrain of other settings"):
        run_twin_bench(out_dir=copied, grid=other, progress=False)
    assert not (copied / "suite.json").exists()  # refused before the folder was claimed
    (copied / "pretrained" / "pretrain.json").write_text("{}")
    with pytest.raises(DataError, match="readable pretrain.json"):
        run_twin_bench(out_dir=copied, grid=grid, progress=False)


@pytest.mark.integration
def test_a_suite_written_before_arms_existed_resumes_without_training(tmp_path):
    grid = TwinGrid(
        base={**_tiny_base(), "rounds": 1},
        epsilons=(None,),
        arms=("fl",),
    )
    out = tmp_path / "bench"
    rows = json.loads(run_twin_bench(out_dir=out, grid=grid, progress=False).read_text())
    # As the suite wrote them before arms: no `arm` in the rows, none of the new grid fields.
    for r in rows:
        del r["arm"]
    (out / "results.json").write_text(json.dumps(rows))
    suite = json.loads((out / "suite.json").read_text())
    for key in ("arms", "public", "ftl_freeze"):
        del suite["grid"][key]
    (out / "suite.json").write_text(json.dumps(suite))
    run = out / "runs" / "epsinf-seed0"
    before = (run / "privacy.json").stat().st_mtime_ns

    again = json.loads(run_twin_bench(out_dir=out, grid=grid, progress=False).read_text())

    assert len(again) == len(rows) and (run / "privacy.json").stat().st_mtime_ns == before
    assert "## fl, ε = ∞" in (out / "summary.md").read_text()


def _tiny_base() -> dict:
    return {
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
    }


def _test_loss(grid: TwinGrid, pretrained: Path | None) -> float:
    """Seed 0's pooled test loss of a fresh unet, with the pretrained weights or without."""
    import torch

    from securefed.data.dataset import load_dataset
    from securefed.fl.tasks import build_task
    from securefed.models import ModelSpec, build_model
    from securefed.models.transfer import load_pretrained

    bundle = load_dataset(name="synthetic-seg", seed=0, **_OPTIONS)
    built = build_model(
        name="unet",
        spec=ModelSpec(
            in_channels=bundle.in_channels,
            num_classes=bundle.num_classes,
            spatial_dims=3,
            task="segmentation",
            image_shape=tuple(bundle.image_shape),
        ),
    )
    if pretrained is not None:
        load_pretrained(
            built.module, path=pretrained / "model.safetensors", head_prefixes=built.head_prefixes
        )
    task = build_task(name="segmentation", num_classes=bundle.num_classes, label_convention="brats")
    with torch.no_grad():
        res = task.evaluate(model=built.module, split=bundle.test, device=torch.device("cpu"))
    return res["loss"]


def test_another_model_keeps_the_ftl_last_arm_by_default(tmp_path, grid_of):
    import securefed.bench.twins as twins

    seen = grid_of(twins, "run_twin_bench")
    res = CliRunner().invoke(
        cli, ["bench", "twins", "--model", "vit-unet", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert seen["grid"].arms == ("fl", "ftl-last")
    assert seen["grid"].base["model"] == "vit-unet"
