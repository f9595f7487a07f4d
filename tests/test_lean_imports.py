"""A plain classification run imports none of the heavy optional stacks it does not use.

MONAI, TorchIO, TenSEAL and Flower take seconds (and hundreds of MB) to import; a 2D
classification run with masking secure aggregation needs none of them. Checked on the real
CLI in a fresh interpreter through ``sys.modules``, not by timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_small_npz

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("monai", "torchio", "tenseal", "flwr", "kymatio")

# Runs the CLI, then prints on stdout which of HEAVY were ever imported.
_PROBE = (
    "import atexit, json, sys\n"
    f"heavy = {HEAVY!r}\n"
    "atexit.register(lambda: print(json.dumps(sorted(m for m in heavy if m in sys.modules))))\n"
    "sys.argv = ['securefed', *sys.argv[1:]]\n"
    "from securefed.cli import main\n"
    "main()\n"
)


def _run(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
        check=False,
    )


def test_importing_the_training_stack_loads_no_heavy_stack(tmp_path):
    code = (
        "import json, sys\n"
        "import securefed.run, securefed.fl.simulation, securefed.models\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    proc = _run(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_dp_classification_run_with_masking_loads_only_its_scattering(tmp_path):
    # `auto` trains scatter-linear under DP on 2D images: kymatio (about 0.4 s to import) is its
    # model; MONAI, TorchIO, TenSEAL and Flower stay out.
    npz = write_small_npz(tmp_path / "tiny.npz", n_train=120, n_val=30, n_test=40)
    proc = _run(
        _PROBE,
        "train",
        "--data",
        str(npz),
        "--clients",
        "2",
        "--rounds",
        "1",
        "--batch-size",
        "32",
        "--dp-epsilon",
        "8",
        "--secure-agg",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "privacy.json").exists()
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["kymatio"]


def test_deploy_run_checks_a_config_without_loading_torch(tmp_path):
    # `securefed deploy run` refuses what the Flower runtime cannot run before it submits; the
    # check reads the config alone, so the submitting process never loads torch and Opacus
    # (about 8 s in a fresh interpreter, before `flwr run` even starts).
    code = (
        "import json, sys\n"
        "from securefed.config import RunConfig\n"
        "from securefed.deploy.launch import check_deployable, submit\n"
        "check_deployable(RunConfig(secure_agg='mask'))\n"
        "print(json.dumps(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules)))\n"
    )
    proc = _run(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
