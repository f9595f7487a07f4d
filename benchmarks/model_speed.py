"""Seconds per training step of the registered 2D classifiers at a given image size.

Why: `--model auto` picks `resnet-small` above 64 px because the `cnn` keeps full resolution
through its first block (docs/defaults.md). This measures that choice: plain SGD steps and
DP-SGD steps (Opacus per-sample gradients, clipping, noise) on random images, one torch
thread, the fastest of ``--repeats``. Ratios between models measured in one run are the
figures to trust on a busy machine.

    python benchmarks/model_speed.py --size 96 --batch 64 --out bench-out/model-speed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefed.bench.common import environment  # noqa: E402
from securefed.models import ModelSpec, build_model  # noqa: E402


def _step_seconds(name: str, *, size: int, batch: int, dp: bool, steps: int, repeats: int) -> float:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    built = build_model(
        name=name, spec=ModelSpec(in_channels=1, num_classes=4, image_shape=(size, size))
    )
    model = built.module
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch, 1, size, size)
    y = torch.randint(0, 4, (batch,))
    if dp:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
        model, opt, _ = PrivacyEngine(secure_mode=False).make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    """Time every model at the size; write ``OUT/results.json`` and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="cnn,resnet-small")
    parser.add_argument("--out", type=Path, default=Path("bench-out/model-speed"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for dp in (False, True):
            sec = _step_seconds(
                name,
                size=args.size,
                batch=args.batch,
                dp=dp,
                steps=args.steps,
                repeats=args.repeats,
            )
            rows.append(
                {
                    "model": name,
                    "dp": dp,
                    "size": args.size,
                    "batch": args.batch,
                    "seconds_per_step": sec,
                }
            )
            kind = "DP-SGD" if dp else "SGD"
            print(f"{name:14s} {kind:6s} {args.size}px batch {args.batch}: {sec:.3f} s/step")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"rows": rows, "environment": environment()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
