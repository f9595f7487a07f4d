"""The quick start's compute floor: what its local training alone costs on this machine's cores.

Why: issue 17 asks for the README's quick start (``securefed train --dp-epsilon 8
--secure-agg``) in at most 20 s on 2 cores. This script counts the work that run must do --
every record of every site through the small ``cnn`` (the quick start's model until
``--model auto`` rule 3 picked ``scatter-linear`` under DP; ``--model cnn`` since), once per
local epoch and round (the
expected count under Poisson sampling) -- and times it at its best: the plain and the DP step
(one-pass clipping, noise, SGD) at one torch thread, best of ``--repeats``, on the physical
chunk a run uses on a CPU (64) and on whole batches of 256, divided by the cores as if they
were used perfectly in parallel. A run cannot train faster than that floor; the rest of its
wall time is start-up, evaluation, aggregation and accounting. Floating-point operations are
torch's count (convolutions and matrix products only; element-wise work is extra). The steps
are ``benchmarks/dp_step.py``'s (``plain`` and ``bk``), timed by its ``time_modes``, on the
quick start's image shape (checked).

    python benchmarks/quickstart_floor.py
    python benchmarks/quickstart_floor.py --cores 2 --repeats 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_step import SETUPS, make_step, time_modes  # noqa: E402

from securefed.allocator import tune_malloc  # noqa: E402
from securefed.config import RunConfig  # noqa: E402
from securefed.data.synthetic import make_synthetic  # noqa: E402
from securefed.models import ModelSpec, build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print the quick start's records, FLOPs and its plain / DP training floors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    tune_malloc()
    torch.set_num_threads(1)
    config = RunConfig()
    data = make_synthetic()
    n_train = len(data.train.labels)
    records = n_train * config.local_epochs * config.rounds
    spec = ModelSpec(
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
    )
    built = build_model(name="cnn", spec=spec, private=True)
    setup, _ = SETUPS.get(built.name, (None, None))
    if setup is None or (setup.in_channels, setup.num_classes, setup.image_shape) != (
        spec.in_channels,
        spec.num_classes,
        spec.image_shape,
    ):
        print(f"error: dp_step.py has no setup of the quick start's {built.name} {spec}")
        return 2
    print(
        f"quick start: {n_train} training records x {config.local_epochs} local epochs x "
        f"{config.rounds} rounds = {records} record passes, model {built.name} "
        f"({built.num_parameters} weights), {args.cores} cores"
    )
    for batch in (64, 256):
        plain = make_step(built.name, "plain", batch)
        assert plain is not None
        with FlopCounterMode(display=False) as counter:
            plain()
        flops = counter.get_total_flops() / batch
        best = time_modes(built.name, ["plain", "bk"], batch, steps=1, repeats=args.repeats)
        for mode, name in (("plain", "plain"), ("bk", "dp")):
            ms = best[mode] * 1e3 / batch
            floor = records * ms / 1e3 / args.cores
            print(
                f"batch {batch:3d} {name:5s}: {ms:.3f} ms a record at one thread "
                f"({flops / ms / 1e6:.1f} GFLOP/s of {flops / 1e6:.1f} MFLOP a record) -> "
                f"training floor {floor:.1f} s on {args.cores} cores"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
