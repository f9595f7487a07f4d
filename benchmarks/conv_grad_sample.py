"""Milliseconds of a convolution's per-sample weight gradients: grouped kernel vs shifted products.

Why: the one-pass clipper (``securefed.dp.clipping``) materializes each convolution's
per-sample weight gradients either with oneDNN's grouped weight gradient (the batch as groups)
or with batched products of shifted views of the input; ``_shifted_ok`` picks one by a fixed
rule. This measures both on the stride-1 layer shapes of the cnn, resnet-small, the 3D cnn and
the 3D unet, the two kernels alternating in one process, best of ``--repeats``.
``--malloc system`` keeps glibc's defaults instead of
:func:`securefed.allocator.tune_malloc` (what securefed's commands set).

    python benchmarks/conv_grad_sample.py --threads 2
    python benchmarks/conv_grad_sample.py --threads 1
    python benchmarks/conv_grad_sample.py --threads 2 --malloc system
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefed.allocator import tune_malloc  # noqa: E402
from securefed.dp.clipping import (  # noqa: E402
    _grouped_grad_sample,
    _shifted_grad_sample,
    _shifted_ok,
)

# (dims, batch, in channels, out channels, side, kernel): every stride-1 convolution of the
# cnn at 28 px and of resnet-small at 28 and 64 px, the 3D cnn's last block at 28^3 and the 3D
# unet's 4^3 block and 1x1 head (its stride-2 and stride-1-large layers always take the
# grouped kernel). Batch 64 in 2D, 8 in 3D.
SHAPES = [
    (2, 64, 1, 32, 28, 3),  # cnn
    (2, 64, 32, 64, 14, 3),  # cnn
    (2, 64, 64, 64, 7, 3),  # cnn
    (2, 64, 16, 16, 16, 3),  # resnet-small @64
    (2, 64, 32, 32, 8, 3),  # resnet-small @64
    (2, 64, 16, 16, 7, 3),  # resnet-small @28
    (2, 64, 64, 64, 4, 3),  # resnet-small @64
    (2, 64, 32, 32, 4, 3),  # resnet-small @28
    (2, 64, 96, 96, 2, 3),  # resnet-small @64
    (2, 64, 64, 64, 2, 3),  # resnet-small @28
    (3, 8, 64, 64, 7, 3),  # 3D cnn @28^3
    (3, 8, 64, 64, 4, 3),  # 3D unet
    (3, 8, 16, 2, 32, 1),  # 3D unet's 1x1 head @32^3
]


def _best_ms(fns, calls: int, repeats: int) -> list[float]:
    """Best milliseconds per call of each function, the functions alternating per repeat."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return [b * 1e3 for b in best]


def main(argv: list[str] | None = None) -> int:
    """Print one row per layer shape: both kernels' milliseconds and the rule's choice."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--malloc", choices=("tuned", "system"), default="tuned")
    args = parser.parse_args(argv)
    state = tune_malloc() if args.malloc == "tuned" else "glibc defaults"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {args.threads}, malloc: {state}")
    print("layer                          grouped ms  shifted ms  grouped/shifted  rule")
    for nd, b, cin, cout, side, k in SHAPES:
        conv = (nn.Conv2d if nd == 2 else nn.Conv3d)(cin, cout, k, padding=k // 2)
        x = torch.randn(b, cin, *([side] * nd))
        go = torch.randn(b, cout, *([side] * nd))
        grouped, shifted = _best_ms(
            [
                lambda c=conv, a=x, g=go: _grouped_grad_sample(c, a, g),
                lambda c=conv, a=x, g=go: _shifted_grad_sample(c, a, g),
            ],
            args.calls,
            args.repeats,
        )
        name = f"{nd}D B{b} {cin}->{cout} @{side}^{nd} k{k}"
        rule = "shifted" if _shifted_ok(conv, go) else "grouped"
        print(f"{name:30s} {grouped:10.2f} {shifted:11.2f} {grouped / shifted:16.2f}  {rule}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
