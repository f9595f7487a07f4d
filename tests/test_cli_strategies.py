"""CLI for issue #4: pretrain on declared-public data, then FTL / CFL / twins, then audit."""

import json

import pytest

from tests.conftest import write_small_npz
from tests.test_cli import _assert_one_line_error, securefed

_FAST = ("--rounds", "1", "--local-epochs", "1", "--batch-size", "32", "--lr", "0.5")
_FAST += ("--accountant", "pld", "--device", "cpu", "--quiet")


def test_help_lists_the_strategy_options():
    proc = securefed("train", "--help")
    for flag in (
        "--strategy",
        "--prox-mu",
        "--server-opt",
        "--pretrained",
        "--freeze",
        "--public-fraction",
        "--schedule",
        "--clusters",
        "--personalize",
        "--task",
        "--fusion",
        "--augment",
    ):
        assert flag in proc.stdout, flag
    assert "--public-fraction" in securefed("pretrain", "--help").stdout


@pytest.mark.slow
@pytest.mark.integration
def test_pretrain_then_ftl_under_he_then_audit(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    pre = securefed(
        "pretrain", "--data", npz, "--public-fraction", "0.2", "--epochs", "1", "--batch-size",
        "32", "--device", "cpu", "--quiet", "--out", tmp_path / "pre",
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr
    assert "no privacy cost" in pre.stdout
    info = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert info["source"]["public_samples"] == pytest.approx(48, abs=4)
    run = tmp_path / "run"
    proc = securefed(
        "train", "--data", npz, "--strategy", "ftl", "--pretrained",
        tmp_path / "pre" / "model.safetensors", "--public-fraction", "0.2", "--secure-agg", "he",
        "--dp-epsilon", "8", *_FAST, "--out", run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["transfer"]["pretrained"]["verified_disjoint"] is True
    assert privacy["dp_applies_to"].startswith("trainable parameters only")
    assert privacy["transfer"]["trainable_parameters"] < privacy["model"]["num_parameters"]
    audit = securefed("audit", run)
    assert audit.returncode == 0, audit.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_cfl_with_twins_under_masking_reports_membership_and_makes_no_dp_claim(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    proc = securefed(
        "train", "--data", npz, "--clients", "4", "--strategy", "cfl", "--clusters", "2",
        "--personalize", "1", "--secure-agg", "mask", *_FAST, "--no-dp", "--out", run,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "twins" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["strategy"] == "cfl"
    assert set(metrics["clusters"]["final_membership"]) == {"0", "1", "2", "3"}
    assert len(metrics["personalization"]) == 4
    privacy = json.loads((run / "privacy.json").read_text())
    assert ("select", "cluster", "clear") in {
        (d["message"], d["field"], d["protection"]) for d in privacy["disclosures"]
    }
    assert privacy["events"] == []
    assert securefed("audit", run).returncode == 3  # no DP claim: not "privacy verified"


def test_cfl_under_dp_is_a_one_line_error(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    proc = securefed("train", "--data", npz, "--strategy", "cfl", *_FAST, "--out", tmp_path / "r")
    assert proc.returncode == 2
    assert "un-noised training loss" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_strategy_settings_are_one_line_errors(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    _assert_one_line_error(
        securefed("train", "--data", npz, "--strategy", "ftl", "--out", tmp_path / "a"),
        "pretrained",
    )
    _assert_one_line_error(
        securefed(
            "train",
            "--data",
            npz,
            "--schedule",
            "cyclic",
            "--secure-agg",
            "mask",
            "--out",
            tmp_path / "b",
        ),  # fmt: skip
        "cyclic",
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _assert_one_line_error(
        securefed(
            "train",
            "--data",
            npz,
            "--strategy",
            "ftl",
            "--pretrained",
            bad,
            *_FAST,
            "--out",
            tmp_path / "c",
        ),  # fmt: skip
        "bad.safetensors",
    )
    assert not (tmp_path / "c" / "privacy.json").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_report_command_renders_a_run(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    assert securefed("train", "--data", npz, *_FAST, "--out", run).returncode == 0
    proc = securefed("report", run)
    assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page
    _assert_one_line_error(securefed("report", tmp_path / "nothing"), "no such folder")


@pytest.mark.slow
def test_ftl_from_a_torchvision_resnet18_checkpoint_records_the_convention(tmp_path):
    # Prepare: a torchvision-named RGB ResNet-18 (random values, real names and shapes), as a
    # user would download it; securefed itself downloads nothing.
    import torch

    from tests.models.foreign_weights import torchvision_resnet

    weights = tmp_path / "tv_resnet18.pth"
    torch.save(torchvision_resnet(), weights)
    run = tmp_path / "run"

    # Execute: one round on 32x32 synthetic data; ftl freezes all but the head by default
    proc = securefed(
        "train", "--dataset", "synthetic", "--data-option", "n_train=48",
        "--data-option", "n_val=16", "--data-option", "n_test=16",
        "--data-option", "image_size=32", "--clients", "2", "--model", "resnet18",
        "--strategy", "ftl", "--pretrained", weights, "--dp-epsilon", "8",
        "--rounds", "1", "--local-epochs", "1", "--batch-size", "16", "--accountant", "pld",
        "--device", "cpu", "--quiet", "--out", run,
    )  # fmt: skip

    # Assert
    assert proc.returncode == 0, proc.stderr
    pretrained = json.loads((run / "privacy.json").read_text())["transfer"]["pretrained"]
    assert pretrained["convention"] == "torchvision/timm"
    assert pretrained["file_format"] == "torch"
    assert pretrained["adapted"] == ["conv1.weight"]
    assert "layer4.1.bn2.running_var" in pretrained["dropped"]
    assert pretrained["verified_disjoint"] is False  # no securefed provenance in the file
    assert (
        "torchvision/timm names mapped, 60 BatchNorm statistics dropped"
        in (run / "summary.md").read_text()
    )
