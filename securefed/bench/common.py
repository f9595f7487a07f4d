"""What every benchmark suite shares: machine description, atomic writes, resumable rows."""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from securefed.config import RunConfig

import numpy as np

from securefed.errors import ConfigError, DataError

__all__ = [
    "Cell",
    "environment",
    "load_rows",
    "claim_folder",
    "convergence_note",
    "curve_convergence",
    "non_iid_sites",
    "open_suite",
    "mean_std",
    "pretrained_weights",
    "run_cells",
    "write_atomic",
    "write_rows",
]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _openssl_version() -> str | None:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return str(backend.openssl_version_text())
    except (ImportError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """Package versions and machine description stored with every result row."""
    return {
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "torch_version": _version("torch"),
        "opacus_version": _version("opacus"),
        "cryptography_version": _version("cryptography"),
        "openssl_version": _openssl_version(),
        "tenseal_version": _version("tenseal"),
        "securefed_version": _version("securefed"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_rows(path: Path, *, required: tuple[str, ...], suite: str) -> list[dict[str, Any]]:
    """Rows of an earlier (possibly interrupted) run of a suite, or [] when there is none.

    Raises:
        DataError: The file exists but is not a list of this suite's rows.

    """
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path} is not readable JSON ({exc}); move it away or use another --out."
        ) from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} must be a JSON list of rows; move it away or use another --out.")
    missing = [c for r in rows for c in required if c not in r]
    if missing:
        raise DataError(f"{path} has rows without `{missing[0]}`; not a {suite} result file.")
    return rows


def write_rows(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``results.json`` (a list of rows) and ``results.csv`` (union of columns)."""
    write_atomic(out_dir / "results.json", json.dumps(rows, indent=1) + "\n")
    columns: list[str] = []
    for r in rows:
        columns.extend(c for c in r if c not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                k: "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v)
                for k, v in r.items()
            }
        )
    write_atomic(out_dir / "results.csv", buffer.getvalue())


@dataclass(frozen=True)
class Cell:
    """One training run of a suite.

    Attributes:
        key: Unique name; the run is written to ``OUT/runs/<key>``.
        config: What to train.
        to_rows: Reads the finished run folder into result rows.
        isolated: Train in a child process and record its peak memory in
            ``resources.json`` (the scaling suite's memory column).

    """

    key: str
    config: RunConfig
    to_rows: Callable[[Path], list[dict[str, Any]]]
    isolated: bool = False


def run_cells(
    *, out: Path, cells: Sequence[Cell], rows: list[dict[str, Any]], done: set[str], progress: bool
) -> list[dict[str, Any]]:
    """Run the cells not in ``done``, appending their rows and saving after each one.

    A run folder that already holds a finished run (its ``privacy.json``, written last) is
    read back instead of trained again, so an interrupted suite loses at most one cell.
    """
    from tqdm.auto import tqdm

    from securefed.run import train

    env = environment()
    todo = [c for c in cells if c.key not in done]
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, file=sys.stderr)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        run = out / "runs" / cell.key
        if not (run / "privacy.json").exists():
            if run.exists():
                _discard_partial(run)
            if cell.isolated:
                _train_in_child(cell.config, run)
            else:
                train(cell.config, out_dir=run, progress=False)
        for row in cell.to_rows(run):
            row.update(environment=env, date=datetime.date.today().isoformat())
            rows.append(row)
        write_rows(out, rows)
    return rows


def _discard_partial(run: Path) -> None:
    """A run folder without privacy.json is an interrupted run: start it again from scratch."""
    import shutil

    shutil.rmtree(run)


_CHILD = """
import json, resource, sys
from securefed.allocator import tune_malloc
tune_malloc()  # as `securefed train` does: the cell measures what a run costs
from securefed.config import RunConfig
from securefed.run import train
cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
run = train(cfg, out_dir=sys.argv[2], progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
(run / "resources.json").write_text(json.dumps({"peak_rss_mib": peak}))
"""


def _train_in_child(config: RunConfig, run: Path) -> None:
    """Train in a fresh interpreter, so its peak memory is this run's alone."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(config.to_dict()), str(run)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        from securefed.errors import SecureFedError

        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SecureFedError(f"benchmark cell {run.name} failed: {last}")


def mean_std(values: Sequence[float | None], digits: int = 3) -> str:
    """``"m ± s"`` over the finite values (one value: itself; none: ``n/a``)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def mean_std_min(values: Sequence[float | None], digits: int = 3) -> str:
    """``"m ± s (min x)"``: :func:`mean_std` and the worst value, the figure a user meets."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    return f"{mean_std(xs, digits)} (min {min(xs):.{digits}f})" if xs else "n/a"


def is_one_class(confusion: Sequence[Sequence[int]]) -> bool:
    """Whether a confusion matrix (rows true, columns predicted) has at most one predicted class."""
    return sum(1 for column in zip(*confusion) if sum(column)) <= 1


def pretrained_weights(
    out: Path,
    *,
    dataset: str,
    data_dir: str | None,
    base: dict[str, Any],
    epochs: int | None,
    progress: bool,
) -> Path:
    """FTL's starting point for a suite: pretrained once on the declared-public share.

    Kept in ``OUT/pretrained`` and reused when the suite resumes.
    """
    from securefed.fl.pretrain import pretrain

    path = out / "pretrained" / "model.safetensors"
    if path.exists():
        return path
    return pretrain(
        out=path.parent,
        dataset=dataset,
        data_dir=data_dir,
        data_options=base.get("data_options"),
        model=base.get("model", "auto"),
        public_fraction=float(base["public_fraction"]),
        public_seed=int(base.get("public_seed", 0)),
        epochs=epochs,
        device=base.get("device", "auto"),
        progress=progress,
    )


#: Grid fields that change what a cell computes; seeds, ε values, arms or site counts may be
#: added to a folder (new cells), but these must match the results already there.
_FIXED_FIELDS = (
    "base",
    "dataset",
    "data_dir",
    "pretrain_epochs",
    "secagg_plus_from",
    "teacher",
    "public",
    "ftl_freeze",
    "pseudo_threshold",
    "unlabelled_weight",
    "teacher_mode",
)
#: What a fixed field was, in effect, before the suite had it: results written then used it.
_FIXED_BEFORE = {"teacher_mode": "global"}


def claim_folder(out: Path, *, suite: str, grid: dict[str, Any]) -> None:
    """Record the suite and grid in ``suite.json``, refusing a folder of another suite or grid.

    Cells are resumed by name, so a folder holding results of other settings would silently
    lend its cells to this run.

    Raises:
        ConfigError: ``out`` holds another suite, or the same suite with other settings.

    """
    path = out / "suite.json"
    grid = json.loads(json.dumps(grid))  # tuples -> lists, as stored
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not readable JSON ({exc})") from exc
        if old.get("suite") != suite:
            raise ConfigError(
                f"{out} holds results of the {old.get('suite')!r} suite; use another --out"
            )
        # A setting the folder's grid lacks came with a later version of the suite: results
        # written before it did not depend on it (e.g. twins' `public` before the ftl arms).
        before = {**_FIXED_BEFORE, **old.get("grid", {})}
        changed = [k for k in _FIXED_FIELDS if k in grid and k in before and before[k] != grid[k]]
        if changed:
            raise ConfigError(
                f"{out} holds {suite} results with another `{changed[0]}` "
                f"(e.g. a --quick run, or an earlier recipe); use another --out"
            )
    write_atomic(path, json.dumps({"suite": suite, "grid": grid}, indent=1) + "\n")


def non_iid_sites() -> dict[str, Any]:
    """The real-data setting the suites share: 5 label-skewed sites, 10 rounds, 10 % public."""
    return {
        "clients": 5,
        "partition": "dirichlet:0.5",
        "rounds": 10,
        "public_fraction": 0.1,
        "device": "auto",
    }


def curve_convergence(
    rounds: list[dict[str, Any]],
    *,
    acc_tol: float,
    loss_tol: float,
    patience: int,
    window: int,
) -> dict[str, Any]:
    """Convergence of a run's global test curves, recomputed (``{}`` when never).

    The same rule as a run's ``metrics.json`` (:func:`securefed.metrics.detect_convergence`),
    with the suite's parameters, so every cell of a suite is judged alike.
    """
    from securefed.metrics import detect_convergence

    return (
        detect_convergence(
            accuracies=[r["global"]["accuracy"] for r in rounds],
            losses=[r["global"]["loss"] for r in rounds],
            seconds=[r["seconds"] for r in rounds],
            acc_tol=acc_tol,
            loss_tol=loss_tol,
            patience=patience,
            window=window,
        )
        or {}
    )


def convergence_note(*, acc_tol: float, loss_tol: float, patience: int, window: int) -> str:
    """One sentence for a suite's summary: the convergence rule and its parameters."""
    return (
        f"Convergence round: first round of the first {patience} consecutive flat windows of "
        f"{window} rounds; a window is flat when a least-squares line through its test "
        f"accuracy moves by at most {acc_tol} across it (to within two standard errors) and "
        f"the points scatter around the line by at most {acc_tol}, and likewise for the test "
        f"loss with {loss_tol} (n/a: never)."
    )


def open_suite(
    out_dir: Path, *, suite: str, grid: dict[str, Any], required: tuple[str, ...]
) -> tuple[Path, list[dict[str, Any]]]:
    """Create or reopen a suite's output folder: claim it, and load the rows already there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, suite=suite, grid=grid)
    return out, load_rows(out / "results.json", required=required, suite=suite)


def check_pretrain(out: Path, *, base: dict[str, Any], settings: dict[str, Any]) -> Path | None:
    """The pretrain already in ``out`` if it was made with these settings, else ``None``.

    Suites call it before claiming their folder, so a refused pretrain leaves the folder as
    it was.

    Raises:
        ConfigError: ``out`` holds a pretrain of other settings or another model.
        DataError: ``out`` holds weights without a readable ``pretrain.json``.

    """
    path = Path(out) / "model.safetensors"
    if not path.exists():
        return None
    # A folder copied in, or left by other settings, must not stand in for this pretrain.
    try:
        info = json.loads((Path(out) / "pretrain.json").read_text())
        done = {
            "data_options": info["source"]["data_options"],
            **{k: info["training"][k] for k in ("seed", "epochs", "batch_size", "lr")},
        }
        made_by = info["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{out}: a pretrain without a readable pretrain.json ({exc!r}); use another --out"
        ) from exc
    wanted = {k: settings[k] for k in done}
    if done != wanted or made_by != base["model"]:
        raise ConfigError(
            f"{out} holds a pretrain of other settings ({json.dumps(done)}, model "
            f"{made_by}); use another --out"
        )
    return path


def pretrain_once(
    out: Path, *, base: dict[str, Any], settings: dict[str, Any], progress: bool
) -> Path:
    """A suite's public pretrain (no DP: public data), trained once and reused on resume.

    Args:
        out: The folder that holds (or will hold) ``model.safetensors`` and ``pretrain.json``.
        base: The suite's RunConfig settings: its ``dataset``, ``model`` and ``device``.
        settings: ``data_options``, ``seed``, ``epochs``, ``batch_size`` and ``lr``.
        progress: Show a progress bar.

    Returns:
        The weight file's path.

    Raises:
        ConfigError: See :func:`check_pretrain`.
        DataError: See :func:`check_pretrain`.

    """
    from securefed.fl.pretrain import pretrain

    done = check_pretrain(out, base=base, settings=settings)
    if done is not None:
        return done
    return pretrain(
        out=out,
        dataset=base["dataset"],
        data_options=settings["data_options"],
        model=base["model"],
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        seed=settings["seed"],
        device=base.get("device", "auto"),
        progress=progress,
    )
