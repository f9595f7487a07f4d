"""Bad input to `securefed train` is refused before anything slow, in one line naming the flag.

Each case runs the real CLI in a subprocess (so a traceback would show) from a temporary
working folder, and checks: exit code 2, exactly one line on stderr, no traceback, and no run
folder left behind. Cases caught by the early validation also check that torch was never
imported, the proof that no data set was loaded and no model built.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_small_npz

# Runs the CLI and then reports on stdout whether the training stack was ever imported.
_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules))\n"
    "sys.argv = ['securefed', *sys.argv[1:]]\n"
    "from securefed.cli import main\n"
    "main()\n"
)


def _train(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, "train", *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )


def _assert_refused(proc, tmp_path, *fragments, early=True):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    # nothing written: neither the default runs/ folder nor an --out folder
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "out").exists()
    if early:
        assert "torch imported: False" in proc.stdout, proc.stdout


@pytest.fixture
def npz(tmp_path):
    return write_small_npz(tmp_path / "tiny.npz", n_train=40, n_val=12, n_test=12)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--seed", -5], ["`--seed` (seed) must be 0 or more (got -5)"]),
        (["--batch-size", 0], ["`--batch-size` (batch_size) must be at least 1 (got 0)"]),
        (["--dp-delta", 2], ["`--dp-delta` (dp_delta) must be in (0, 1)"]),
        (["--num-classes", 1], ["`--num-classes`"]),
        (["--partition", "bogus"], ["`--partition` (partition) must be one of", "'bogus'"]),
        (["--partition", "dirichlet:x"], ["dirichlet"]),
        (["--data", "missing.npz"], ["`--data`", "missing.npz", "no such file"]),
        (["--data", "notes.txt"], ["`--data`", "expected a folder of images or a .npz file"]),
        (["--dataset", "nosuchmnist", "--data-dir", "."], ["`--dataset`", "nosuchmnist.npz"]),
        (["--pretrained", "nope.safetensors"], ["`--pretrained`", "nope.safetensors"]),
        (
            ["--secure-agg", "mask", "--dropout-clients", 1],
            ["`--dropout-clients`", "`--secagg-threshold` t = 3", "--secagg-threshold 2"],
        ),
        (
            ["--secure-agg", "mask", "--clients", 4, "--secagg-threshold", 2],
            ["--secure-agg mask with 4 site(s)", "`--secagg-threshold`", "majority"],
        ),
        (["--secure-agg", "mask", "--clients", 1], ["`--clients`", "at least 2"]),
        (["--secure-agg", "he", "--he-scale-bits", 170], ["--secure-agg he"]),
        (["--clients", 100000], ["`--clients` (clients) is 100000", "2400 training samples"]),
    ],
)
def test_bad_flags_are_refused_before_loading_anything(tmp_path, args, fragments):
    (tmp_path / "notes.txt").write_text("not data")
    _assert_refused(_train(tmp_path, *args), tmp_path, *fragments)


def test_more_sites_than_npz_samples_is_known_from_the_file_headers(tmp_path, npz):
    proc = _train(tmp_path, "--data", npz, "--clients", 100000, "--out", tmp_path / "out")
    _assert_refused(proc, tmp_path, "`--clients`", "100000 sites but only 40 training samples")


def test_an_unknown_model_is_refused_before_the_data_are_loaded(tmp_path, npz):
    proc = _train(tmp_path, "--data", npz, "--model", "resnet9000", "--out", tmp_path / "out")
    # the model registry imports torch; no data set was loaded and no folder made
    _assert_refused(proc, tmp_path, "`--model` (model) must be one of", "resnet9000", early=False)


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"rounds": "two"}, '`--rounds` (rounds) must be an integer (got "two").'),
        ({"clients": None}, "`--clients` (clients) must be an integer (got null)."),
        ({"partition": 5}, "`--partition` (partition) must be a string (got 5)."),
        ({"seed": 1.5}, "`--seed` (seed) must be an integer (got 1.5)."),
    ],
)
def test_config_files_with_wrong_types_are_refused_in_one_line(tmp_path, content, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    proc = _train(tmp_path, "--config", path)
    _assert_refused(proc, tmp_path, expected)


@pytest.mark.parametrize(
    "split, label, fragment",
    [("train", 7, "`train_labels`"), ("test", 5, "`test_labels` must be in [0, 4)")],
)
def test_a_stray_label_is_refused_in_one_line(tmp_path, npz, split, label, fragment):
    with np.load(npz) as archive:
        arrays = dict(archive)
    arrays[f"{split}_labels"][0] = label
    bad = tmp_path / "stray.npz"
    np.savez(bad, **arrays)
    proc = _train(tmp_path, "--data", bad, "--rounds", 1)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(bad) in err and fragment in err and f"label {label}" in err


def test_a_run_where_no_round_was_applied_exits_1(tmp_path, npz, monkeypatch, capsys):
    """The old silent failure: every round aborted, exit 0. Now: files kept, exit 1, one line.

    RunConfig refuses the settings that can never work; its check is switched off here to
    recreate such a run (every site drops before uploading) through the real runtime.
    """
    import securefed.cli as cli
    from securefed.config import RunConfig

    monkeypatch.setattr(RunConfig, "_check_dropouts", lambda self: None)
    out = tmp_path / "run"
    argv = ["train", "--data", str(npz), "--clients", "2", "--rounds", "1", "--local-epochs"]
    argv += ["1", "--batch-size", "16", "--device", "cpu", "--dropout-clients", "2"]
    argv += ["--dropout-phase", "before", "--out", str(out), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["securefed", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    captured = capsys.readouterr()
    assert info.value.code == 1
    # Past the start-up warnings (each site's small batches), one line.
    lines = [ln for ln in captured.err.strip().splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1, captured.err
    assert "no round was applied" in lines[0] and "round 1" in lines[0]
    assert "privacy budget was spent" in lines[0]
    # the files are still written, so the user can see what happened
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["applied"] for r in metrics["rounds"]] == [False]
