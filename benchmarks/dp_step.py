"""DP-SGD step / plain SGD step, per model and per-sample-clipping mode, and a step's memory.

Why: the cost of per-sample clipping decides how much slower private training is than
plain training (issue 17: DP step / plain step <= 1.3x for the cnn at batch 256 on CPU).
Modes timed (one step = forward, backward, clipping, noise, SGD update):

- ``plain``: ``loss.backward()`` and ``SGD.step()``, the reference;
- ``hooks``: Opacus ``GradSampleModule`` (hooks) + ``DPOptimizer``, what the trainer ran
  before issue 17 and still runs for models the one-pass clipper does not support;
- ``functorch``: the same with ``force_functorch=True`` (vmap per-sample gradients);
- ``ew``: Opacus' ``GradSampleModuleExpandedWeights`` (torch's expanded weights);
- ``ghost``: Opacus fast gradient / ghost clipping (two backward passes);
- ``bk``: :class:`securefed.dp.clipping.BookKeepingClipper` + noise + ``SGD.step()``,
  what :class:`securefed.dp.trainer.SiteTrainer` runs for supported models.

Any mode with the suffix ``-torchpool`` (``plain-torchpool``, ``bk-torchpool``) runs the same
model with PyTorch's ``nn.MaxPool{2,3}d(2)`` in place of the project's
:class:`securefed.models.pooling.MaxPool2x` (the cnn's pooling), to measure what that saves.
``bk-nobuffer`` runs ``bk`` without the layers' kept buffers for large per-sample gradients
(``securefed.dp.clipping._REUSE_BYTES`` out of reach, as before they existed), to measure what
they save in the same run.

Timing alternates the modes inside one process and keeps the fastest of ``--repeats`` rounds
of ``--steps`` steps, so a busy machine affects every mode alike; quote ratios, not seconds.
Each process sets glibc's allocator as securefed's commands do
(:func:`securefed.allocator.tune_malloc`); ``--malloc system`` keeps glibc's defaults, to
measure what that setting saves (run the two in turn: it is process-wide).
Peak memory is the resident-set growth of a fresh subprocess that runs 3 steps of one mode
(Linux ``VmHWM``, reset after the model is built, minus ``VmRSS`` before the first step), so
modes do not share a peak.

    python benchmarks/dp_step.py --models cnn --batches 256,64 --out bench-out/dp-step
    python benchmarks/dp_step.py --models cnn,resnet-small,resnet18,unet --threads 1
    python benchmarks/dp_step.py --models cnn-3d --batches 8 --threads 1
    python benchmarks/dp_step.py --batches 64 --modes plain,plain-torchpool,bk,bk-torchpool
    python benchmarks/dp_step.py --models cnn --batches 256 --modes plain,bk --malloc system
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefed.allocator import tune_malloc  # noqa: E402
from securefed.dp import clipping  # noqa: E402
from securefed.dp.clipping import BookKeepingClipper, supports  # noqa: E402
from securefed.models import ModelSpec, build_model  # noqa: E402
from securefed.models.pooling import MaxPool2x  # noqa: E402

MODES = ("plain", "hooks", "functorch", "ew", "ghost", "bk")

# name -> (ModelSpec, loss); the sizes are the ones the project trains them at on CPUs.
SETUPS = {
    "cnn": (ModelSpec(in_channels=1, num_classes=4, image_shape=(28, 28)), "ce"),
    "resnet-small": (ModelSpec(in_channels=1, num_classes=4, image_shape=(64, 64)), "ce"),
    "resnet18": (ModelSpec(in_channels=1, num_classes=4, image_shape=(64, 64)), "ce"),
    "unet": (
        ModelSpec(
            in_channels=1,
            num_classes=2,
            spatial_dims=3,
            task="segmentation",
            image_shape=(32, 32, 32),
        ),
        "seg",
    ),
    # The cnn on volumes (AdrenalMNIST3D's 28^3), where its pooling is MaxPool3d.
    "cnn-3d": (
        ModelSpec(in_channels=1, num_classes=2, spatial_dims=3, image_shape=(28, 28, 28)),
        "ce",
    ),
}
# A setup whose name is not the model's.
MODEL_OF = {"cnn-3d": "cnn"}


def _data(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, Callable]:
    spec, kind = SETUPS[name]
    x = torch.rand(batch, spec.in_channels, *spec.image_shape)
    if kind == "ce":
        return x, torch.randint(0, spec.num_classes, (batch,)), torch.nn.CrossEntropyLoss()
    y = torch.randint(0, spec.num_classes, (batch, *spec.image_shape))
    return x, y, torch.nn.CrossEntropyLoss()


def _noise_and_step(params, sums, opt, n: float) -> None:
    flat = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    off = 0
    for p, s in zip(params, sums):
        k = p.numel()
        p.grad = (s + flat[off : off + k].view_as(s).to(s.dtype)).div_(n)
        off += k
    opt.step()


def _with_torch_pooling(model: torch.nn.Module) -> None:
    """Swap every :class:`MaxPool2x` of ``model`` for PyTorch's own pooling, in place."""
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, MaxPool2x):
                torch_pool = torch.nn.MaxPool2d if child.spatial_dims == 2 else torch.nn.MaxPool3d
                setattr(parent, child_name, torch_pool(2))


def make_step(name: str, mode: str, batch: int) -> Callable[[], None] | None:
    """One closure per (model, mode): a full optimizer step; ``None`` if unsupported."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    spec, _ = SETUPS[name]
    model = build_model(name=MODEL_OF.get(name, name), spec=spec).module
    mode, _, variant = mode.partition("-")
    if variant == "torchpool":
        _with_torch_pooling(model)
    elif variant and (variant, mode) != ("nobuffer", "bk"):
        raise ValueError(f"unknown mode suffix {variant!r}")
    x, y, crit = _data(name, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)
    if mode == "plain":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            crit(model(x), y).backward()
            opt.step()

        return step
    if mode in ("hooks", "functorch", "ew"):
        if mode == "ew":
            from opacus.grad_sample import GradSampleModuleExpandedWeights

            gsm = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
        else:
            gsm = GradSampleModule(
                model, loss_reduction="mean", force_functorch=mode == "functorch"
            )
        dpo = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)

        def step() -> None:
            dpo.zero_grad(set_to_none=True)
            crit(gsm(x), y).backward()
            dpo.step()

        return step
    if mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(
            model, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean"
        )
        dpo = DPOptimizerFastGradientClipping(
            opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )
        loss_fn = DPLossFastGradientClipping(gsm, dpo, torch.nn.CrossEntropyLoss(), "mean")

        def step() -> None:
            dpo.zero_grad(set_to_none=True)
            loss_fn(gsm(x), y).backward()
            dpo.step()

        return step
    if mode == "bk":
        if not supports(model):
            return None
        clipper = BookKeepingClipper(model, params)
        reuse = clipping._REUSE_BYTES if variant != "nobuffer" else 1 << 62

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            saved, clipping._REUSE_BYTES = clipping._REUSE_BYTES, reuse
            try:
                with clipper.pass_(scale=batch):
                    F.cross_entropy(model(x), y).backward()
            finally:
                clipping._REUSE_BYTES = saved
            _noise_and_step(params, clipper.clip_and_sum(1.0, batch), opt, float(batch))

        return step
    raise ValueError(mode)


def time_modes(
    name: str, modes: list[str], batch: int, *, steps: int, repeats: int
) -> dict[str, float]:
    """Best seconds per step of each mode, the modes alternating within each repeat."""
    steps_fns = {}
    for mode in modes:
        try:
            fn = make_step(name, mode, batch)
        except Exception as exc:  # a mode that cannot wrap this model is reported, not fatal
            print(f"  {name} {mode}: not available ({type(exc).__name__}: {exc})"[:200])
            fn = None
        if fn is not None:
            try:
                fn()  # warm-up (allocations, kernel selection)
            except Exception as exc:
                print(f"  {name} {mode}: failed ({type(exc).__name__}: {exc})"[:200])
                continue
            steps_fns[mode] = fn
    best = {m: float("inf") for m in steps_fns}
    for _ in range(repeats):
        for mode, fn in steps_fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            best[mode] = min(best[mode], (time.perf_counter() - start) / steps)
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_child(name: str, mode: str, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    fn = make_step(name, mode, batch)
    if fn is None:
        print(json.dumps(None))
        return
    before = _status_kib("VmRSS")
    # Reset the high-water mark (Linux): the peak below is the steps', not the imports'.
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        fn()
    print(json.dumps((_status_kib("VmHWM") - before) / 1024))


def peak_mib(name: str, mode: str, batch: int, threads: int, malloc: str) -> float | None:
    """Resident-memory growth (MiB) of a fresh process over 3 steps of one mode."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--peak-child",
            f"{name},{mode},{batch},{threads}",
            "--malloc",
            malloc,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Time the modes per model and batch; write ``OUT/results.json`` and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batches", default="256,64")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    parser.add_argument("--out", type=Path, default=Path("bench-out/dp-step"))
    parser.add_argument(
        "--malloc",
        choices=("tuned", "system"),
        default="tuned",
        help="glibc settings: securefed's (default) or glibc's own",
    )
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    malloc_state = tune_malloc() if args.malloc == "tuned" else "glibc defaults"
    if args.peak_child:
        name, mode, batch, threads = args.peak_child.split(",")
        _peak_child(name, mode, int(batch), int(threads))
        return 0
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            best = time_modes(name, modes, batch, steps=args.steps, repeats=args.repeats)
            plain = best.get("plain")
            for mode, sec in best.items():
                row = {
                    "model": name,
                    "batch": batch,
                    "mode": mode,
                    "threads": args.threads,
                    "malloc": malloc_state,
                    "seconds_per_step": sec,
                    "ratio_to_plain": sec / plain if plain else None,
                    "peak_mib": None
                    if args.no_memory
                    else peak_mib(name, mode, batch, args.threads, args.malloc),
                }
                rows.append(row)
                ratio = f"{row['ratio_to_plain']:.2f}x" if plain else "-"
                mem = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"
                print(
                    f"{name:13s} B={batch:<4d} {mode:10s} {sec * 1e3:9.1f} ms  {ratio:>6s}  {mem}"
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
