"""Seconds of the cnn's evaluation forward pass over N images, per evaluation batch size.

Why: ``securefed.fl.evaluation.evaluate`` evaluates every round; its batch size decides how
much of the first block's activations stay in the caches on a CPU. The sizes alternate in one
process and the best and median of ``--repeats`` are kept, so a busy machine affects all alike.

    python benchmarks/eval_batch.py --images 800 --batches 512,128,64 --repeats 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from securefed.models import ModelSpec, build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print best and median milliseconds per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--batches", default="512,128,64")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = ModelSpec(in_channels=1, num_classes=4, image_shape=(28, 28))
    model = build_model(name="cnn", spec=spec).module.eval()
    x = torch.rand(args.images, 1, 28, 28)
    sizes = [int(b) for b in args.batches.split(",")]

    def run(bs: int) -> None:
        with torch.no_grad():
            for i in range(0, len(x), bs):
                torch.softmax(model(x[i : i + bs]), dim=1)

    run(sizes[0])  # warm-up
    seconds: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(args.repeats):
        for bs in sizes:
            start = time.perf_counter()
            run(bs)
            seconds[bs].append(time.perf_counter() - start)
    for bs, ts in seconds.items():
        print(
            f"batch {bs:4d}: best {min(ts) * 1e3:7.1f} ms, "
            f"median {statistics.median(ts) * 1e3:7.1f} ms ({args.images} images)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
