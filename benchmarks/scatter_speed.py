"""Milliseconds per image of scatter-linear's feature computation: ours against kymatio's loop.

Why: on a CPU `scatter-linear` computes each image's ScatterNet features once per run, and for
small images kymatio's loop (one filter at a time, 242 FFT calls per batch at J = 2) is largely
overhead. securefed scatters images small enough (up to 83 px grey, 47 px RGB in float32) with
every orientation at once, in small chunks (``securefed.models.scatter._scatter``). This times,
on random images and alternating the two in one process, ``ScatterLinear._compute`` against
the code it replaced (kymatio's ``ScatteringTorch2D`` in chunks of 32, then the same pooling).
The fastest of ``--repeats`` each; the ratio is the figure to trust on a busy machine.

    python benchmarks/scatter_speed.py --out bench-out/scatter-speed
    python benchmarks/scatter_speed.py --threads 1 --out bench-out/scatter-speed-1
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
from securefed.models.scatter import CHUNK, ScatterLinear  # noqa: E402

# (side, channels, images): MedMNIST's 28 px in grey and RGB, 64 px, and 96 px (where the
# batched path hands over to kymatio's loop).
CASES = ((28, 1, 768), (28, 3, 384), (64, 1, 192), (64, 3, 96), (96, 1, 96))


def _kymatio(model: ScatterLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            model.pool(model.scattering(x[i : i + CHUNK].contiguous()).flatten(1, 2))
            for i in range(0, len(x), CHUNK)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for side, channels, n in CASES:
        model = ScatterLinear(in_channels=channels, num_classes=2, image_shape=(side, side))
        x = torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            worst = (_kymatio(model, x[:4]) - model._compute(x[:4])).abs().max().item()
            best = {"kymatio": float("inf"), "securefed": float("inf")}
            for _ in range(args.repeats):
                for name, fn in (("kymatio", _kymatio), ("securefed", ScatterLinear._compute)):
                    start = time.perf_counter()
                    fn(model, x)
                    best[name] = min(best[name], time.perf_counter() - start)
        row = {
            "side": side,
            "channels": channels,
            "images": n,
            "kymatio_ms_per_image": 1e3 * best["kymatio"] / n,
            "securefed_ms_per_image": 1e3 * best["securefed"] / n,
            "speedup": best["kymatio"] / best["securefed"],
            "max_abs_difference": worst,
        }
        rows.append(row)
        print(
            f"{side} px x {channels}: kymatio {row['kymatio_ms_per_image']:.2f} ms, securefed "
            f"{row['securefed_ms_per_image']:.2f} ms an image: {row['speedup']:.2f}x "
            f"(features differ by at most {worst:.1e})",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"threads": torch.get_num_threads(), "rows": rows, "environment": environment()}
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
