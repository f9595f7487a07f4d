"""Cost of secret DP noise: one DP-SGD step with SecretNoise vs Opacus' torch.Generator noise.

A ~1e6-parameter CNN (GroupNorm, 28x28 inputs), batch 64, CPU. Every variant runs the same
step (per-sample gradients, flat clipping, noise, SGD) on the same batch; only the noise
differs:

- ``torch``: Opacus' default, ``torch.normal`` from a ``torch.Generator`` (one draw per
  coordinate, float32): what the trainer did before, and the reference of the ratio;
- ``secret-d``: :class:`securefed.dp.noise.SecretNoise` (ChaCha20 keystream, Box-Muller in
  float64), ``d`` normals summed per coordinate; ``d = 4`` is what the trainer uses.

Variants are interleaved within each repeat, so drift in machine load hits them alike;
medians are reported. Noise-only rows time drawing one step's noise for every parameter.

Usage (from the repository root):

    python benchmarks/noise_bench.py --out bench-out/noise [--repeats 30] [--threads 1]

Writes results.json and table.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from securefed.dp.noise import SECURE_DRAWS, SecretNoise
from securefed.dp.trainer import NoiseDPOptimizer

BATCH = 64
SIGMA, CLIP = 1.0, 1.0
TARGET = 1.10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 320),
        nn.ReLU(),
        nn.Linear(320, 10),
    )


def _optimizer(name: str, params) -> DPOptimizer:
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.5)
    if name == "torch":
        return DPOptimizer(
            sgd,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=BATCH,
            generator=torch.Generator().manual_seed(0),
        )
    draws = int(name.split("-")[1])
    return NoiseDPOptimizer(
        sgd,
        noise=SecretNoise(),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=BATCH,
        draws=draws,
    )


def _noise_only(name: str, params: list[torch.Tensor], noise: SecretNoise, gen) -> float:
    start = time.perf_counter()
    if name == "torch":
        for p in params:
            torch.normal(0.0, SIGMA * CLIP, size=p.shape, generator=gen)
    else:
        total = sum(p.numel() for p in params)
        flat = noise.gaussian(total, draws=int(name.split("-")[1])).mul_(SIGMA * CLIP)
        offset = 0
        for p in params:
            flat[offset : offset + p.numel()].view(p.shape).to(p.dtype)
            offset += p.numel()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/noise"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    # Opacus' hooks fire on inputs that need no grad; torch warns, nothing is wrong.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    variants = ["torch", "secret-1", "secret-2", f"secret-{SECURE_DRAWS}"]

    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    setups = {}
    for name in variants:
        model = GradSampleModule(_model())
        setups[name] = (model, _optimizer(name, list(model.parameters())))
    n_params = sum(p.numel() for p in setups["torch"][0].parameters())
    criterion = nn.CrossEntropyLoss()

    def step(name: str) -> float:
        model, opt = setups[name]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    params = list(setups["torch"][0].parameters())
    noise, gen = SecretNoise(), torch.Generator().manual_seed(2)
    steps = {n: [] for n in variants}
    noise_only = {n: [] for n in variants}
    for r in range(args.warmup + args.repeats):
        for name in variants if r % 2 == 0 else reversed(variants):
            s = step(name)
            t = _noise_only(name, params, noise, gen)
            if r >= args.warmup:
                steps[name].append(s)
                noise_only[name].append(t)

    ref = statistics.median(steps["torch"])
    rows = []
    for name in variants:
        med = statistics.median(steps[name])
        rows.append(
            {
                "variant": name,
                "draws": 1 if name == "torch" else int(name.split("-")[1]),
                "step_ms_median": 1e3 * med,
                "step_ms_min": 1e3 * min(steps[name]),
                "noise_ms_median": 1e3 * statistics.median(noise_only[name]),
                "ratio_to_torch": med / ref,
            }
        )
    result = {
        "params": n_params,
        "batch": BATCH,
        "repeats": args.repeats,
        "threads": args.threads,
        "target_ratio": TARGET,
        "trainer_draws": SECURE_DRAWS,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(["benchmarks/noise_bench.py", *sys.argv[1:]]),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"DP-SGD step, {n_params:,} parameters, batch {BATCH}, CPU ({args.threads} thread(s)), "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| noise | normals/coord | step ms | noise-only ms | step / torch |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['draws']} | {row['step_ms_median']:.1f} | "
            f"{row['noise_ms_median']:.1f} | {row['ratio_to_torch']:.3f} |"
        )
    lines += [
        "",
        "torch: Opacus' default, torch.normal from a torch.Generator (float32, not secret). "
        f"secret-d: SecretNoise, d Box-Muller normals summed per coordinate; the trainer "
        f"uses d = {SECURE_DRAWS}. Target: step / torch <= {TARGET}.",
        "",
        f"Command: `{result['command']}`",
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
