"""Training cost: DP-SGD step vs plain step, samples per second, peak memory, accounting.

Everything is measured through the code a run executes, so a faster DP step, a leaner
accountant or a quicker start-up shows up here without touching this suite:

- **Steps.** :meth:`securefed.dp.trainer.SiteTrainer.train_round` on synthetic tensors, once
  with a DP plan (Poisson sampling, per-sample clipping, secret noise, ledger) and once with
  ``plan=None``, the same model (same initial weights), the same expected batch B and the same
  number of steps per round. Rounds alternate DP / plain (plain first in even repeats, DP first
  in odd ones) so that load drift on a shared machine hits both alike; the best and the median
  of the repeats are reported. A round includes what the engine does around its steps
  (wrapping the model, building the loader, copying the weights out), divided over its steps.
  Poisson batches vary in size, so the DP / plain ratio compares seconds per *sample*, which
  at equal expected batch is the ratio of step times.
- **Memory.** Each workload runs in its own interpreter. Peak resident memory of each mode's
  rounds is the kernel's high-water mark (``VmHWM``), reset before every round
  (``/proc/self/clear_refs``); where that is not available, the process' ``ru_maxrss`` so far.
  On CUDA, ``torch.cuda.max_memory_allocated`` per round as well.
- **Accounting.** After every DP round the trainer's ledger holds one more event, and
  :meth:`~securefed.dp.trainer.SiteTrainer.epsilon` (what a site computes after each round;
  the server's :mod:`securefed.fl.claims` does the same from the same ledger) is timed.
  The plan itself comes from :func:`securefed.fl.planning.plan_site_privacy` (sigma calibrated
  once for ε = 8 over 10 rounds, or over every round measured when more), whose seconds are
  reported too.
- **Quick start.** ``securefed train --dp-epsilon 8 --secure-agg`` as a child process of the
  real CLI, in an empty folder: wall time, peak RSS (``os.wait4``'s resource usage of that
  child alone), accuracy and ε from its ``metrics.json`` and ``privacy.json``; and the
  accounting of its site plan (calibration + one ε per round) in a fresh interpreter.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from securefed.bench.common import environment, load_rows, open_suite, write_atomic, write_rows
from securefed.dp.memory import release_freed_heap
from securefed.errors import ConfigError, SecureFedError

__all__ = [
    "QUICK_TRAINING",
    "REQUIRED_COLUMNS",
    "STEP_COLUMNS",
    "TrainingGrid",
    "Workload",
    "default_workloads",
    "run_training_bench",
]

#: Columns every row has.
REQUIRED_COLUMNS = ("kind", "key", "device")
#: Columns of a ``kind == "step"`` row (docs/benchmarks.md describes each).
STEP_COLUMNS = (
    "model",
    "task",
    "input_shape",
    "batch_size",
    "steps_per_round",
    "repeats",
    "threads",
    "num_parameters",
    "dp_step_seconds_best",
    "dp_step_seconds_median",
    "plain_step_seconds_best",
    "plain_step_seconds_median",
    "ratio_best",
    "ratio_median",
    "dp_samples_per_second",
    "plain_samples_per_second",
    "dp_peak_rss_mib",
    "plain_peak_rss_mib",
    "setup_rss_mib",
    "process_peak_rss_mib",
    "calibration_seconds",
    "accounting_seconds_per_round",
    "accounting_share",
    "epsilon_after",
)

#: The quick start as the README gives it (the suite adds ``--device``, ``--out``, ``--quiet``).
QUICKSTART = ("train", "--dp-epsilon", "8", "--secure-agg")


@dataclass(frozen=True)
class Workload:
    """One model at one input size and batch.

    Attributes:
        model: Registered model name.
        image_size: Side of the square image or cubic volume.
        batch_size: Expected batch B of both modes.
        spatial_dims: 2 (images) or 3 (volumes).
        task: ``classification`` (cross-entropy) or ``segmentation`` (the task's Dice-CE).

    """

    model: str
    image_size: int
    batch_size: int
    spatial_dims: int = 2
    task: str = "classification"

    @property
    def key(self) -> str:
        """``cnn-28px-b256``, ``unet-32^3-b2``: the workload's part of a row key."""
        side = f"{self.image_size}px" if self.spatial_dims == 2 else f"{self.image_size}^3"
        return f"{self.model}-{side}-b{self.batch_size}"


#: The models measured, at sizes a CPU manages: the cnn at MedMNIST's 28 px (the quick start's
#: model) at the default DP batch 256 and the old 64; the 2D ResNets at 64 px with smaller
#: batches; the 3D UNet on a 32^3 volume, batch 2 (its per-sample gradients are large).
_WORKLOADS: dict[str, tuple[Workload, ...]] = {
    "cnn": (Workload("cnn", 28, 256), Workload("cnn", 28, 64)),
    "resnet-small": (Workload("resnet-small", 64, 64),),
    "resnet18": (Workload("resnet18", 64, 16),),
    "unet": (Workload("unet", 32, 2, spatial_dims=3, task="segmentation"),),
}


def default_workloads(models: tuple[str, ...], batch: int | None = None) -> tuple[Workload, ...]:
    """The workloads of ``models`` (every batch of each), or each at ``batch`` when given.

    Raises:
        ConfigError: An unknown model name.

    """
    unknown = [m for m in models if m not in _WORKLOADS]
    if unknown:
        raise ConfigError(
            f"--models: unknown {unknown[0]!r}; this suite measures {', '.join(_WORKLOADS)}"
        )
    out: list[Workload] = []
    for m in models:
        for w in _WORKLOADS[m]:
            if batch is not None:
                w = Workload(w.model, w.image_size, batch, w.spatial_dims, w.task)
            if w not in out:
                out.append(w)
    return tuple(out)


@dataclass(frozen=True)
class TrainingGrid:
    """What the suite measures.

    Attributes:
        workloads: Models, sizes and batches.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        repeats: Measured rounds per mode (after one warm-up round each).
        steps: Steps per round (the site holds ``steps x B`` records).
        threads: Torch CPU threads in the workload processes (``None``: torch's default).
        quickstart: Run the quick start too.
        quickstart_rounds: ``--rounds`` for the quick start (``None``: the CLI's default, 10).

    """

    workloads: tuple[Workload, ...] = field(
        default_factory=lambda: default_workloads(tuple(_WORKLOADS))
    )
    device: str = "auto"
    repeats: int = 5
    steps: int = 4
    threads: int | None = 1
    quickstart: bool = True
    quickstart_rounds: int | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.steps < 1:
            raise ConfigError("--repeats and --steps must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.quickstart_rounds is not None and self.quickstart_rounds < 1:
            raise ConfigError("the quick start needs at least 1 round")

    def fixed(self) -> dict[str, Any]:
        """The settings a folder's rows depend on (a folder of other settings is refused)."""
        return {
            "repeats": self.repeats,
            "steps": self.steps,
            "threads": self.threads,
            "quickstart_rounds": self.quickstart_rounds,
        }


#: ``--quick``: the same workloads and quick start, fewer and shorter rounds.
QUICK_TRAINING = TrainingGrid(repeats=2, steps=2)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``.

    Raises:
        ConfigError: ``cuda`` asked for and not available.

    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device")
    return device


# ---------------------------------------------------------------- in the workload process


def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class _PeakMemory:
    """Peak resident memory between :meth:`reset` and :meth:`peak_mib`."""

    def __init__(self) -> None:
        self.resettable = self._reset_hwm()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
        except OSError:
            return False
        return _proc_status_kib("VmHWM") is not None

    def reset(self) -> None:
        # Hand freed heap back to the kernel first: memory the allocator keeps from an earlier
        # round (e.g. a DP round's per-sample gradients) would otherwise count in this one.
        import gc

        gc.collect()
        release_freed_heap()
        if self.resettable:
            self._reset_hwm()

    def peak_mib(self) -> float:
        if self.resettable:
            return (_proc_status_kib("VmHWM") or 0) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_now_mib() -> float | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024


class _Counted:
    """A data set that counts the records read from it (Poisson batches vary in size)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        self.count += 1
        return self.inner[i]


def _site_plan(*, num_samples: int, batch_size: int, epochs: int, rounds: int) -> Any:
    """The engine's DP plan for a site of ``num_samples`` at ε = 8 (sigma calibrated)."""
    from securefed.config import RunConfig
    from securefed.fl.planning import plan_site_privacy

    config = RunConfig().replace(
        dp_epsilon=8.0,
        batch_size=batch_size,
        local_epochs=epochs,
        rounds=rounds,
        min_steps=1,
        calibrate=False,
    )
    return plan_site_privacy(config, num_samples=num_samples)


def measure_workload(
    workload: Workload, *, device: str, repeats: int, steps: int, threads: int | None
) -> dict[str, Any]:
    """Time DP and plain rounds of one workload in this process; the step row's figures."""
    import copy

    import torch

    from securefed.dp.ledger import PrivacyLedger
    from securefed.dp.noise import SecretNoise
    from securefed.dp.trainer import SiteTrainer
    from securefed.fl.tasks import build_task
    from securefed.models import ModelSpec, build_model

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    shape = (workload.image_size,) * workload.spatial_dims
    built = build_model(
        name=workload.model,
        spec=ModelSpec(
            in_channels=1,
            num_classes=2,
            spatial_dims=workload.spatial_dims,
            task=workload.task,
            image_shape=shape,
        ),
    )
    task = build_task(name=workload.task, num_classes=2)
    n = workload.batch_size * steps
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, 1, *shape), generator=gen)
    y_shape = (n, *shape) if workload.task == "segmentation" else (n,)
    y = torch.randint(0, 2, y_shape, generator=gen)
    data = _Counted(torch.utils.data.TensorDataset(x, y))

    start = time.perf_counter()
    # Planned for at least every round this process runs (warm-up + repeats), so no round
    # goes past the plan whatever --repeats is.
    plan = _site_plan(
        num_samples=n, batch_size=workload.batch_size, epochs=1, rounds=max(10, repeats + 1)
    )
    calibration_seconds = time.perf_counter() - start

    from securefed.config import RunConfig

    # Records through the model at once, as a run with --max-physical-batch-size unset gets it
    # on this device (64 on a CPU, whole batches on a GPU), so the rows time what users run.
    physical = RunConfig().physical_batch(dev.type)
    common = {
        "max_physical_batch_size": physical,
        "client_id": 0,
        "dataset": data,
        "batch_size": workload.batch_size,
        "lr": 0.01,  # small: the weights stay sane over the rounds; speed does not depend on it
        "momentum": 0.5,
        "device": dev,
        "loss_fn": task.loss_fn,
        "min_steps": 1,
    }
    trainers = {
        "dp": SiteTrainer(plan=plan, ledger=PrivacyLedger(), **common),
        "plain": SiteTrainer(plan=None, ledger=PrivacyLedger(), **common),
    }
    noise = SecretNoise()
    memory = _PeakMemory()
    memory.reset()
    setup_rss = _rss_now_mib()
    rounds = {"dp": 0, "plain": 0}

    def one_round(mode: str) -> dict[str, Any]:
        trainer = trainers[mode]
        model = copy.deepcopy(built.module)  # the same initial weights every round
        rounds[mode] += 1
        data.count = 0
        memory.reset()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = trainer.train_round(
            model=model,
            round_index=rounds[mode],
            epochs=1,
            generator=torch.Generator().manual_seed(rounds[mode]),
            noise=noise if mode == "dp" else None,
        )
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out: dict[str, Any] = {
            "seconds": seconds,
            "samples": data.count,
            "steps": result.steps,
            "peak_mib": memory.peak_mib(),
        }
        if cuda:
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if mode == "dp":
            t1 = time.perf_counter()
            out["epsilon"] = trainer.epsilon()
            out["accounting_seconds"] = time.perf_counter() - t1
        return out

    # Warm-up (first-call allocations, lazy imports); its memory peaks count, its time not.
    warm = {mode: one_round(mode) for mode in ("plain", "dp")}
    runs: dict[str, list[dict[str, Any]]] = {"dp": [], "plain": []}
    for i in range(repeats):
        for mode in ("plain", "dp") if i % 2 == 0 else ("dp", "plain"):
            runs[mode].append(one_round(mode))

    def per_sample(r: dict[str, Any]) -> float:
        return r["seconds"] / max(r["samples"], 1)

    paired = [per_sample(d) / per_sample(p) for d, p in zip(runs["dp"], runs["plain"])]
    acct = [r["accounting_seconds"] for r in runs["dp"]]
    dp_round = statistics.median(r["seconds"] for r in runs["dp"])
    row: dict[str, Any] = {
        "model": workload.model,
        "task": workload.task,
        "input_shape": [1, *shape],
        "batch_size": workload.batch_size,
        "max_physical_batch_size": physical,
        "steps_per_round": steps,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "num_parameters": built.num_parameters,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
    }
    for mode in ("dp", "plain"):
        step = [r["seconds"] / max(r["steps"], 1) for r in runs[mode]]
        row[f"{mode}_step_seconds_best"] = min(step)
        row[f"{mode}_step_seconds_median"] = statistics.median(step)
        row[f"{mode}_samples_per_second"] = max(r["samples"] / r["seconds"] for r in runs[mode])
        row[f"{mode}_peak_rss_mib"] = max(r["peak_mib"] for r in (warm[mode], *runs[mode]))
        if cuda:
            row[f"{mode}_cuda_peak_mib"] = max(
                r["cuda_peak_mib"] for r in (warm[mode], *runs[mode])
            )
    row.update(
        ratio_best=min(per_sample(r) for r in runs["dp"])
        / min(per_sample(r) for r in runs["plain"]),
        ratio_median=statistics.median(paired),
        setup_rss_mib=setup_rss,
        # Resetting the high-water mark also resets what wait4 would report for this process:
        # its peak is the largest of the rounds' peaks and what it held before them.
        process_peak_rss_mib=max(
            [setup_rss or 0.0]
            + [r["peak_mib"] for mode in ("dp", "plain") for r in (warm[mode], *runs[mode])]
        ),
        peak_rss_resettable=memory.resettable,
        calibration_seconds=calibration_seconds,
        accounting_seconds_per_round=statistics.median(acct),
        accounting_share=statistics.median(acct) / (dp_round + statistics.median(acct)),
        epsilon_after=runs["dp"][-1]["epsilon"],
        dp_rounds_after=rounds["dp"],
    )
    if cuda:
        row["cuda_device"] = torch.cuda.get_device_name(dev)
    return row


def measure_quickstart_accounting(*, rounds: int | None) -> dict[str, Any]:
    """Accounting of the quick start's site plan in this (fresh) process.

    The quick start's sites are equal (2400 synthetic records over 3 sites): each plans with
    :func:`~securefed.fl.planning.plan_site_privacy` (calibration) and states its ε after every
    round from its ledger. In one process the other sites and the server meet the same figures
    in the accountant's cache; a deployed site computes them alone, as here.
    """
    from securefed.config import RunConfig
    from securefed.data.synthetic import DEFAULT_SIZES
    from securefed.dp.ledger import PrivacyEvent, PrivacyLedger
    from securefed.dp.trainer import SiteTrainer
    from securefed.fl.planning import plan_site_privacy

    config = RunConfig().replace(dp_epsilon=8.0, secure_agg="mask")
    if rounds is not None:
        config = config.replace(rounds=rounds)
    n = DEFAULT_SIZES[2][0] // config.clients
    start = time.perf_counter()
    plan = plan_site_privacy(config, num_samples=n)
    calibration = time.perf_counter() - start
    ledger = PrivacyLedger()
    trainer = SiteTrainer(
        client_id=0,
        dataset=range(n),  # only its size is read: no training here
        plan=plan,
        ledger=ledger,
        batch_size=config.effective_batch_size,
        lr=config.effective_lr,
        momentum=config.effective_momentum,
        device=None,  # type: ignore[arg-type]
        min_steps=config.min_steps,
    )
    per_round, eps = [], 0.0
    for r in range(1, config.rounds + 1):
        ledger.record(
            PrivacyEvent(
                round=r,
                client_id=0,
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=config.local_epochs * trainer.steps_per_epoch,
                max_grad_norm=plan.max_grad_norm,
                phase="federated",
            )
        )
        t0 = time.perf_counter()
        eps = trainer.epsilon()
        per_round.append(time.perf_counter() - t0)
    return {
        "site_samples": n,
        "rounds": config.rounds,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "calibration_seconds": calibration,
        "accounting_seconds_per_round": statistics.median(per_round),
        "accounting_seconds_total": calibration + sum(per_round),
        "epsilon_after": eps,
    }


def _child_main() -> None:
    """Entry point of a workload process: ``argv[1]`` the job (JSON), ``argv[2]`` the answer."""
    from securefed.allocator import tune_malloc

    tune_malloc()  # as `securefed train` does: the workload is timed as a run would be
    job = json.loads(sys.argv[1])
    if job["what"] == "workload":
        result = measure_workload(
            Workload(**job["workload"]),
            device=job["device"],
            repeats=job["repeats"],
            steps=job["steps"],
            threads=job["threads"],
        )
    else:
        result = measure_quickstart_accounting(rounds=job["rounds"])
    Path(sys.argv[2]).write_text(json.dumps(result))


# ---------------------------------------------------------------- in the suite's process


def _child_env() -> dict[str, str]:
    """The environment of a child: this checkout's ``securefed`` first on the path."""
    import securefed

    root = str(Path(securefed.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_child(
    argv: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None
) -> tuple[int, float, float]:
    """Run ``argv``; its exit status, wall seconds and peak RSS in MiB (its own, via wait4)."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env or _child_env()
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024  # KiB on Linux


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _job(out: Path, name: str, job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run one measurement job in a fresh interpreter; its answer and the process' peak RSS."""
    folder = out / "logs"
    folder.mkdir(exist_ok=True)
    answer = folder / f"{name}.json"
    code = "from securefed.bench.training import _child_main; _child_main()"
    rc, _, peak = _run_child(
        [sys.executable, "-c", code, json.dumps(job), str(answer.resolve())],
        cwd=out,
        log=folder / f"{name}.log",
    )
    if rc != 0 or not answer.exists():
        raise SecureFedError(f"{name} failed: {_last_line(folder / f'{name}.log')}")
    return json.loads(answer.read_text()), peak


def _quickstart_row(out: Path, *, device: str, rounds: int | None) -> dict[str, Any]:
    """The quick start through the real CLI, in an empty folder under ``out``."""
    import shutil

    folder = out / "quickstart"
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted attempt: start again from nothing
    folder.mkdir()
    args = [*QUICKSTART, "--device", device]
    if rounds is not None:
        args += ["--rounds", str(rounds)]
    argv = [sys.executable, "-m", "securefed.cli", *args, "--quiet", "--out", "run"]
    log = folder / "train.log"
    rc, wall, peak = _run_child(argv, cwd=folder, log=log)
    if rc != 0:
        raise SecureFedError(f"the quick start failed: {_last_line(log)}")
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    privacy = json.loads((folder / "run" / "privacy.json").read_text())
    return {
        "command": "securefed " + " ".join(args),
        "wall_seconds": wall,
        "run_seconds": metrics.get("total_seconds"),
        "peak_rss_mib": peak,
        "accuracy": metrics["final"].get("accuracy"),
        "auc": metrics["final"].get("auc"),
        "epsilon": privacy.get("epsilon"),
        "target_epsilon": privacy.get("target_epsilon"),
        "rounds": len(metrics["rounds"]),
        "run_dir": str(folder / "run"),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _summary(out: Path, rows: list[dict[str, Any]]) -> None:
    steps = [r for r in rows if r["kind"] == "step"]
    lines = ["# Training cost: DP-SGD vs plain steps, memory, accounting, quick start", ""]
    if steps:
        cuda = any(r["device"] == "cuda" for r in steps)
        lines += [
            "`SiteTrainer.train_round` with a DP plan vs `plan=None`: same model and initial "
            "weights, same expected batch, synthetic tensors. Step seconds: best / median of "
            "the repeats (DP and plain rounds alternate). DP / plain: per-sample seconds "
            "(Poisson batches vary), best over best and median of the paired repeats. Peak "
            "RSS: high-water mark of the workload's own process during that mode's rounds. "
            "Accounting: the site's ε after each DP round (`SiteTrainer.epsilon`), and its "
            "share of a DP round plus that.",
            "",
            "| model | input | batch | device | threads | DP step s | plain step s | "
            "DP / plain (best, median) | samples/s DP | samples/s plain | peak RSS DP / plain "
            "(MiB) |"
            + (" CUDA peak DP / plain (MiB) |" if cuda else "")
            + " accounting s/round (share) |",
            "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|",
        ]
        for r in steps:
            shape = "x".join(str(s) for s in r["input_shape"][1:])
            cuda_cell = (
                f" {_fmt(r.get('dp_cuda_peak_mib'), 0)} / {_fmt(r.get('plain_cuda_peak_mib'), 0)} |"
                if cuda
                else ""
            )
            lines.append(
                f"| {r['model']} | {shape} | {r['batch_size']} | {r['device']} | {r['threads']} | "
                f"{_fmt(r['dp_step_seconds_best'], 3)} / {_fmt(r['dp_step_seconds_median'], 3)} | "
                f"{_fmt(r['plain_step_seconds_best'], 3)} / "
                f"{_fmt(r['plain_step_seconds_median'], 3)} | "
                f"**{_fmt(r['ratio_best'])}x**, {_fmt(r['ratio_median'])}x | "
                f"{_fmt(r['dp_samples_per_second'], 0)} | {_fmt(r['plain_samples_per_second'], 0)}"
                f" | {_fmt(r['dp_peak_rss_mib'], 0)} / {_fmt(r['plain_peak_rss_mib'], 0)} |"
                + cuda_cell
                + f" {_fmt(r['accounting_seconds_per_round'], 4)} "
                f"({100 * r['accounting_share']:.1f} %) |"
            )
        lines.append("")
    for r in rows:
        if r["kind"] == "quickstart":
            lines.append(
                f"- Quick start `{r['command']}` ({r['rounds']} rounds, {r['device']}): "
                f"**{r['wall_seconds']:.1f} s** wall, peak RSS **{r['peak_rss_mib']:.0f} MiB**, "
                f"accuracy {_fmt(r['accuracy'], 3)}, ε {_fmt(r['epsilon'], 3)} "
                f"(target {_fmt(r['target_epsilon'], 1)})."
            )
        if r["kind"] == "accounting":
            share = r.get("quickstart_share")
            lines.append(
                f"- Accounting of a quick-start site ({r['site_samples']} records, q = "
                f"{r['sample_rate']:.4g}, σ = {r['noise_multiplier']:.3f}, fresh interpreter): "
                f"calibration {r['calibration_seconds']:.2f} s once, "
                f"{r['accounting_seconds_per_round']:.4f} s per round, "
                f"{r['accounting_seconds_total']:.2f} s over {r['rounds']} rounds"
                + (f" = {100 * share:.1f} % of the quick start's wall time." if share else ".")
            )
    env = rows[0]["environment"] if rows else {}
    lines += [
        "",
        f"Machine: {env.get('cpu_model')}, {env.get('cpu_count')} CPUs; torch "
        f"{env.get('torch_version')}, opacus {env.get('opacus_version')}. Absolute times on a "
        "shared machine are noisy; the ratios, measured alternately in one process, less so.",
        "",
    ]
    write_atomic(out / "summary.md", "\n".join(lines))


def run_training_bench(*, out_dir: Path, grid: TrainingGrid, progress: bool = True) -> Path:
    """Run (or resume) the suite; write results.json/.csv and summary.md under ``out_dir``.

    Raises:
        SecureFedError: A workload or the quick start failed (the rows of the others are
            written first; rerunning retries only what is missing).

    """
    device = resolve_device(grid.device)
    grid_record = {"base": grid.fixed(), "workloads": [asdict(w) for w in grid.workloads]}
    out, rows = open_suite(out_dir, suite="training", grid=grid_record, required=REQUIRED_COLUMNS)
    done = {r["key"] for r in rows}
    env = environment()
    failures: list[str] = []

    def add(row: dict[str, Any]) -> None:
        row.update(device=device, environment=env, date=datetime.date.today().isoformat())
        rows.append(row)
        write_rows(out, rows)
        _summary(out, rows)

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    for w in grid.workloads:
        key = f"step/{w.key}/{device}"
        if key in done:
            continue
        say(f"training bench: {key}")
        job = {
            "what": "workload",
            "workload": asdict(w),
            "device": device,
            "repeats": grid.repeats,
            "steps": grid.steps,
            "threads": grid.threads,
        }
        try:
            result, peak = _job(out, key.replace("/", "_"), job)
        except SecureFedError as exc:
            failures.append(str(exc))
            say(f"training bench: {exc}")
            continue
        if not result["peak_rss_resettable"]:
            result["process_peak_rss_mib"] = peak  # no resets: wait4's figure is the whole run's
        add({"kind": "step", "key": key, **result})

    if grid.quickstart:
        qs_key = f"quickstart/{device}"
        if qs_key not in done:
            say(f"training bench: {qs_key}")
            try:
                add({"kind": "quickstart", "key": qs_key, **_quickstart_row(
                    out, device=device, rounds=grid.quickstart_rounds
                )})  # fmt: skip
            except SecureFedError as exc:
                failures.append(str(exc))
        acct_key = f"accounting/quickstart/{device}"
        if acct_key not in done:
            say(f"training bench: {acct_key}")
            try:
                result, _ = _job(
                    out, "accounting", {"what": "accounting", "rounds": grid.quickstart_rounds}
                )
                add({"kind": "accounting", "key": acct_key, **result})
            except SecureFedError as exc:
                failures.append(str(exc))
        # The share needs both rows; either may come from an earlier, interrupted run.
        qs = next((r for r in rows if r["key"] == qs_key), None)
        acct = next((r for r in rows if r["key"] == acct_key), None)
        if qs and acct:
            acct["quickstart_share"] = acct["accounting_seconds_total"] / qs["wall_seconds"]
            write_rows(out, rows)
    if rows:
        _summary(out, rows)
    if failures:
        raise SecureFedError("; ".join(failures))
    return out / "results.json"


def render(out: Path) -> None:
    """(Re)write summary.md from ``results.json``."""
    rows = load_rows(out / "results.json", required=REQUIRED_COLUMNS, suite="training")
    if rows:
        _summary(out, rows)
