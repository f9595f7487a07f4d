"""Shared fixtures: real data from ../shared/data, and small fast run configurations.

Also a session guard: tests write only under temporary folders, so a run that leaves new files
in the checkout fails (``runs/<timestamp>/`` from a ``train`` without ``--out`` once did).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import settings

# One OpenMP thread per test process (subprocesses inherit it; set it yourself to override).
# The tests' models are tiny, so more threads barely help, and on a loaded machine torch's
# threads wait on each other at every barrier: on 2 cores beside another busy process the
# suite ran several times slower. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# Hypothesis would keep its example database in ./.hypothesis, inside the checkout.
settings.register_profile("securefed", database=None)
settings.load_profile("securefed")

# Written by Python, pytest and Hypothesis themselves (all git-ignored), not by tests.
_TOOL_CACHES = ("__pycache__", ".pytest_cache", ".hypothesis")
# Output folders the package writes by default; git ignores them, so their contents are listed.
_IGNORED_OUTPUTS = ("runs", "bench-out")
_BEFORE = pytest.StashKey[set | None]()


def _git_status(*options: str) -> list[str] | None:
    try:
        proc = subprocess.run(
            ["git", "status", "--porcelain", *options],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.splitlines() if proc.returncode == 0 else None


def _checkout_files() -> set[str] | None:
    """Untracked paths in the checkout (ignored ones too), or None outside a git checkout."""
    if not (REPO_ROOT / ".git").exists():
        return None  # e.g. an unpacked sdist; a parent repository is not ours to watch
    untracked = _git_status("--untracked-files=all")
    # Ignored folders come as one entry each ("runs/", ".venv/"): walking them would be slow.
    ignored = _git_status("--untracked-files=normal", "--ignored")
    if untracked is None or ignored is None:
        return None
    paths = {line[3:] for line in untracked + ignored if line[:2] in ("??", "!!")}
    for folder in _IGNORED_OUTPUTS:  # ... so list the package's output folders one level down
        if (REPO_ROOT / folder).is_dir():
            paths |= {f"{folder}/{child.name}" for child in (REPO_ROOT / folder).iterdir()}
    return {p for p in paths if not any(part in _TOOL_CACHES for part in Path(p).parts)}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _checkout_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    after = _checkout_files() if before is not None else None
    if before is None or after is None:
        return  # not a git checkout (e.g. an unpacked sdist): nothing to compare
    gained = sorted(after - before)
    if gained:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "tests wrote into the checkout (write under tmp_path): " + ", ".join(gained)
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"FAILED {message}", red=True, bold=True)
        else:
            print(message)


def _registries() -> list[dict]:
    """The process-wide name registries a test may add to (models, data sets, plug-ins)."""
    from securefed import models as model_registry
    from securefed import plugins
    from securefed.data import registry as data_registry

    return [
        model_registry._REGISTRY,
        data_registry._LOADERS,
        *(r._entries for r in (plugins.STRATEGIES, plugins.SERVER_OPTIMIZERS, plugins.SECURE_AGG)),
    ]


@pytest.fixture(autouse=True)
def _registrations_end_with_the_test():
    """What a test registers is gone after it, so no test depends on which ran before it.

    A model registered by one test (``test_weights.py``) once stayed for the rest of the
    process, and the tests that list the registry exactly (``test_models.py``) failed whenever
    they ran after it: never in file order, sometimes in another order (pytest-xdist).
    """
    saved = [(registry, dict(registry)) for registry in _registries()]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository; missing data fails in CI and skips elsewhere."""
    path = SHARED_DATA_DIR
    if not (path / "pneumoniamnist.npz").is_file():
        reason = f"shared data not found at {path} (expected pneumoniamnist.npz)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def write_small_npz(
    path: Path, *, n_train: int = 240, n_val: int = 60, n_test: int = 80, seed: int = 0
):
    """A tiny MedMNIST-layout file (uint8 28x28, labels (N, 1)) built from the synthetic set."""
    import numpy as np

    from securefed.data.synthetic import make_synthetic

    b = make_synthetic(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    arrays = {}
    for split in ("train", "val", "test"):
        s = getattr(b, split)
        arrays[f"{split}_images"] = np.round(s.images[:, 0] * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = s.labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def write_image_folder(
    root: Path,
    *,
    signal: bool = True,
    per_class: tuple[int, int, int] = (24, 8, 8),
    odd_size: tuple[int, int] | None = None,
) -> Path:
    """A two-class image folder (train/val/test) of 16x16 gray PNGs.

    With ``signal`` class ``left`` is bright on the left half and ``right`` on the right,
    under noise: a CNN learns it in an epoch or two. Without, every image is the same flat
    gray, so no model can beat chance. ``odd_size`` adds one training image of that size.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val", "test"), per_class, strict=True):
        for c, cls in enumerate(("left", "right")):
            for i in range(n):
                pixels = np.full((16, 16), 100, dtype=np.uint8)
                if signal:
                    pixels = rng.integers(0, 60, (16, 16)).astype(np.uint8)
                    pixels[:, 8 * c : 8 * (c + 1)] += 150
                path = root / split / cls / f"{i:02d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    if odd_size is not None:
        Image.new("L", odd_size, color=40).save(root / "train" / "left" / "odd.png")
    return root


@pytest.fixture
def small_npz(tmp_path) -> Path:
    """Path of a tiny 4-class MedMNIST-layout .npz file."""
    return write_small_npz(tmp_path / "tiny.npz")


def tiny_config(npz, **changes):
    """A fast DP configuration over the ``.npz`` file ``npz`` (3 sites, 2 rounds), changed."""
    from securefed.config import RunConfig

    return RunConfig(
        data=str(npz),
        clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        lr=0.5,
        dp_epsilon=8.0,
        device="cpu",
        accountant="pld",
    ).replace(**changes)


@pytest.fixture
def small_config(small_npz):
    """A fast DP configuration over ``small_npz`` (3 sites, 2 rounds)."""
    return tiny_config(small_npz)


def pretrain_public(root):
    """FTL weights pretrained on another (public) data set than the sites' (seed 7)."""
    from securefed.fl.pretrain import pretrain

    return pretrain(
        out=root / "pre",
        data=str(write_small_npz(root / "public.npz", seed=7)),
        epochs=1,
        batch_size=32,
        device="cpu",
        progress=False,
    )


def dp_72px_config(**changes):
    """A small DP run on 72 px synthetic images: above 64 px, where `--model auto` picks
    scatter-linear (rule 2) or resnet-small (rule 1)."""
    from securefed.config import RunConfig

    base = dict(
        dataset="synthetic",
        data_options={"n_train": 32, "n_val": 8, "n_test": 8, "image_size": 72},
        clients=2,
        rounds=1,
        local_epochs=1,
        dp_epsilon=8.0,
        calibrate=False,
        device="cpu",
    )
    return RunConfig(**{**base, **changes})
