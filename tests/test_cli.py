"""The CLI: bad input gives one clear line and a non-zero exit; good input writes a run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import write_small_npz


def securefed(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "securefed.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert err.count("\n") == 0, err
    for f in fragments:
        assert f in err, err


def test_help_lists_every_training_option():
    proc = securefed("train", "--help")
    assert proc.returncode == 0
    for flag in (
        "--dp-epsilon",
        "--dp-delta",
        "--max-grad-norm",
        "--accountant",
        "--batch-size",
        "--local-epochs",
        "--rounds",
        "--lr",
        "--clients",
        "--partition",
        "--seed",
        "--reproducible-noise",
        "--device",
        "--secure-agg",
        "--data-dir",
        "--data",
        "--dataset",
        "--quiet",
        "--out",
    ):
        assert flag in proc.stdout, flag


@pytest.mark.slow
@pytest.mark.integration
def test_train_then_audit_round_trip(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    proc = securefed(
        "train",
        "--data",
        npz,
        "--clients",
        2,
        "--rounds",
        2,
        "--local-epochs",
        1,
        "--batch-size",
        32,
        "--dp-epsilon",
        8,
        "--accountant",
        "pld",
        "--secure-agg",  # the bare flag means pairwise masking
        "--out",
        out,
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "secure-agg mask" in proc.stdout
    assert "ε=" in proc.stdout
    audit = securefed("audit", out)
    assert audit.returncode == 0, audit.stdout
    assert "audit: all claims hold" in audit.stdout
    # tamper with the report: exit 1
    privacy = json.loads((out / "privacy.json").read_text())
    privacy["clients"][0]["epsilon"] = 0.1
    (out / "privacy.json").write_text(json.dumps(privacy))
    assert securefed("audit", out).returncode == 1
    # a second run into the same folder is refused rather than overwriting it
    again = securefed("train", "--data", npz, "--rounds", 1, "--out", out, "--quiet")
    _assert_one_line_error(again, "already holds a run")


def test_audit_unreadable_input_exits_2(tmp_path):
    proc = securefed("audit", tmp_path / "missing")
    assert proc.returncode == 2
    _assert_one_line_error(proc, "not a run directory")


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"train_images": np.zeros((10, 28, 28), np.uint8)}, "missing"),
        (
            {
                **{
                    f"{s}_images": np.zeros((10, 28, 28), np.uint8)
                    for s in ("train", "val", "test")
                },
                **{f"{s}_labels": np.zeros((9, 1), np.uint8) for s in ("train", "val", "test")},
            },
            "train",
        ),
        (
            {
                **{
                    f"{s}_images": np.zeros((10, 28, 28), np.uint8)
                    for s in ("train", "val", "test")
                },
                **{f"{s}_labels": np.full((10, 1), -1, np.int64) for s in ("train", "val", "test")},
            },
            "label",
        ),
    ],
    ids=["missing-keys", "length-mismatch", "negative-labels"],
)
def test_bad_npz_files_give_one_line_errors(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    proc = securefed("train", "--data", path, "--rounds", 1, "--out", tmp_path / "o", "--quiet")
    _assert_one_line_error(proc, "bad.npz", fragment)
    assert not (tmp_path / "o" / "privacy.json").exists()


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    out = tmp_path / "o"  # every run gets an --out: the default, runs/<timestamp>, is in cwd
    _assert_one_line_error(
        securefed("train", "--data", bad, "--quiet", "--out", out), "corrupt.npz"
    )
    _assert_one_line_error(
        securefed(
            "train", "--dataset", "nosuchmnist", "--data-dir", tmp_path, "--quiet", "--out", out
        ),
        "nosuchmnist.npz",
    )


def test_more_sites_than_samples(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz", n_train=8, n_val=4, n_test=4)
    proc = securefed("train", "--data", npz, "--clients", 20, "--quiet", "--out", tmp_path / "o")
    _assert_one_line_error(proc, "20 sites")


def test_unreachable_epsilon_says_what_to_change(tmp_path):
    npz = write_small_npz(tmp_path / "tiny.npz")
    proc = securefed(
        "train",
        "--data",
        npz,
        "--dp-epsilon",
        "0.00001",
        "--batch-size",
        240,
        "--rounds",
        200,
        "--quiet",
        "--out",
        tmp_path / "o",
    )
    _assert_one_line_error(proc, "cannot be reached", "--dp-epsilon")


def test_invalid_flags_are_rejected_by_name(tmp_path):
    out = tmp_path / "o"
    proc = securefed("train", "--clients", 0, "--quiet", "--out", out)
    _assert_one_line_error(proc, "`--clients` (clients)")
    proc = securefed("train", "--partition", "zipf:2", "--quiet", "--out", out)
    _assert_one_line_error(proc, "zipf")
    proc = securefed("train", "--dp-epsilon", "-1", "--quiet", "--out", out)
    assert proc.returncode != 0 and "must be positive" in proc.stderr
