"""The Python API: securefed.train / audit / RunConfig, and a user's own model and data set."""

import json
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import securefed
from securefed.data.dataset import load_dataset
from securefed.errors import ConfigError, DataError
from securefed.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_model_and_data.py"

USER_MODULE = """
import math

import numpy as np
from torch import nn

import securefed


def build(spec):
    inputs = spec.in_channels * math.prod(spec.image_shape)
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # not per-sample private: Opacus' fixer must replace it
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * inputs, spec.num_classes),
    )


def not_a_module(spec):
    return 42


NOT_CALLABLE = 3


def load(seed=0, n_train=120):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 2, n)
        images = rng.uniform(0.0, 0.5, (n, 1, 8, 8)) + 0.5 * labels[:, None, None, None]
        return securefed.ArraySplit(images=images.astype(np.float32), labels=labels)

    return securefed.DatasetBundle(
        name="user-data", train=split(n_train), val=split(30), test=split(30),
        num_classes=2, class_names=("dark", "bright"), source="user module",
    )


def load_arrays(seed=0):
    return {"train": None}
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_mod_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_the_readme_example_runs_and_its_audit_passes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    run = tmp_path / "runs" / "api-example"
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["dp"] and privacy["model"]["name"] == "tiny-mlp"
    assert privacy["model"]["opacus_validator"] == "passed"
    assert privacy["dataset"]["name"] == "bright-or-dark"
    assert 0 < privacy["epsilon"] <= 8.0
    assert "audit exit code: 0" in capsys.readouterr().out


def test_the_readme_shows_the_tested_example():
    readme = (REPO / "README.md").read_text()
    body = EXAMPLE.read_text().split('"""\n', 1)[1].strip()  # without the module docstring
    assert body in readme


def test_import_securefed_does_not_import_torch():
    code = "import sys, securefed; print('torch' in sys.modules, securefed.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"
    assert securefed.RunConfig is securefed.config.RunConfig


def test_audit_reports_no_dp_claim_with_exit_code_3(tmp_path):
    config = securefed.RunConfig(
        dataset="synthetic",
        data_options={"n_train": 60, "n_val": 20, "n_test": 20, "image_size": 12},
        clients=2,
        rounds=1,
        local_epochs=1,
        batch_size=16,
        dp_epsilon=None,
    )
    run = securefed.train(config, out_dir=tmp_path / "run", progress=False)
    assert securefed.audit(run).exit_code == 3


def test_a_module_function_model_is_built_and_fixed_by_opacus(user_module):
    spec = ModelSpec(in_channels=1, num_classes=2, image_shape=(8, 8))
    built = build_model(name=f"{user_module}:build", spec=spec)
    # The user's BatchNorm went through ModuleValidator.fix like a built-in model's would.
    assert any("BatchNorm2d -> GroupNorm" in c for c in built.changes), built.changes
    assert f"{user_module}:build" in securefed.models.available_models()


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("{mod}:missing", "has no 'missing'"),
        ("{mod}:NOT_CALLABLE", "not a function"),
        ("{mod}:not_a_module", "not a torch.nn.Module"),
        ("{mod}:", "expected module:function"),
    ],
)
def test_a_bad_module_function_model_is_one_config_error_naming_the_flag(
    user_module, ref, fragment
):
    spec = ModelSpec(in_channels=1, num_classes=2, image_shape=(8, 8))
    with pytest.raises(ConfigError) as exc:
        build_model(name=ref.format(mod=user_module), spec=spec)
    message = str(exc.value)
    assert message.startswith("--model ") and fragment in message and "\n" not in message


def test_a_module_function_data_set_is_loaded_with_seed_and_options(user_module):
    bundle = load_dataset(name=f"{user_module}:load", seed=3, n_train=40)
    assert bundle.name == "user-data" and len(bundle.train) == 40
    again = load_dataset(name=f"{user_module}:load", seed=3, n_train=40)
    assert again.fingerprint == bundle.fingerprint


def test_bad_module_function_data_sets_are_refused_naming_the_flag(user_module):
    with pytest.raises(ConfigError, match=r"^--dataset .*cannot import module"):
        load_dataset(name="no_such_module_xyz:load")
    with pytest.raises(ConfigError, match=r"^--dataset .*must accept seed= and the --data-option"):
        load_dataset(name=f"{user_module}:load", bogus=1)
    with pytest.raises(DataError, match=r"^--dataset .*returned a dict, not a securefed"):
        load_dataset(name=f"{user_module}:load_arrays")


def test_register_dataset_refuses_a_builtin_name():
    with pytest.raises(ConfigError, match="built-in"):
        securefed.register_dataset("synthetic")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "securefed.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_cli_trains_a_module_function_model_on_a_module_function_data_set(user_module, tmp_path):
    # `python -m` puts the working directory on sys.path, so a module next to the user works.
    out = tmp_path / "run"
    common = ("--rounds", "1", "--clients", "2", "--batch-size", "16", "--quiet")
    proc = _cli(
        "train",
        "--model",
        f"{user_module}:build",
        "--dataset",
        f"{user_module}:load",
        "--max-physical-batch-size",
        "5",
        *common,
        "--out",
        out,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["model"]["name"] == f"{user_module}:build"
    assert any("GroupNorm" in c for c in privacy["model_changes"])
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["max_physical_batch_size"] == 5
    # Logical steps only: one local epoch of ceil(n/B) steps per site, not one per chunk.
    for client in privacy["clients"]:
        assert client["steps"] == client["planned_steps"]

    proc = _cli(
        "train", "--model", "no_such_module_xyz:f", *common, "--out", tmp_path / "x", cwd=tmp_path
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and "\n" not in err and "--model" in err, err


def test_user_module_text_is_valid_python():
    compile(textwrap.dedent(USER_MODULE), "user_module", "exec")
