"""Cost of gradient canaries inside DP-SGD: the same site's rounds with and without them.

One process, the two arms alternating, best of ``--repeats`` per arm (the ratio is what this
measures; absolute seconds depend on the machine's load). The canaries' cost is a K-sized
Bernoulli draw, an index_add and a gather per step; the audit run's real cost is that it is a
run of its own (README, "Empirical privacy audit").

    python benchmarks/canary_overhead.py --canaries 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from securefed.bench.privacy_audit import _load, _model
from securefed.dp.accounting import calibrate_noise, sample_rate, site_delta, steps_per_epoch
from securefed.dp.empirical import AuditedSiteTrainer, GradientCanaries
from securefed.dp.ledger import PrivacyLedger
from securefed.dp.noise import SecretNoise
from securefed.dp.trainer import DPPlan, SiteTrainer


def _round(data, model, plan, batch, canaries: int) -> float:
    common = dict(
        client_id=0,
        dataset=data,
        plan=plan,
        ledger=PrivacyLedger(),
        batch_size=batch,
        lr=0.5,
        momentum=0.0,
        device=torch.device("cpu"),
    )
    if canaries:
        trainer = AuditedSiteTrainer(canaries=GradientCanaries(count=canaries), **common)
    else:
        trainer = SiteTrainer(**common)
    start = time.perf_counter()
    trainer.train_round(
        model=copy.deepcopy(model),
        round_index=1,
        epochs=1,
        generator=torch.Generator().manual_seed(0),
        noise=SecretNoise(),
    )
    return time.perf_counter() - start


def main() -> None:
    """Print seconds per round with and without canaries, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--site-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    data, channels, classes = _load("synthetic", "", args.site_size, 0)
    model = _model(channels, classes, 0)
    n, b = args.site_size, args.batch_size
    q = sample_rate(num_samples=n, batch_size=b)
    steps = 10 * steps_per_epoch(num_samples=n, batch_size=b)
    delta = site_delta(num_samples=n)
    sigma = calibrate_noise(target_epsilon=8.0, delta=delta, sample_rate=q, steps=steps)
    plan = DPPlan(sigma, q, 1.0, steps, delta, "pld")
    best = {0: float("inf"), args.canaries: float("inf")}
    for _ in range(args.repeats):
        for k in best:
            best[k] = min(best[k], _round(data, model, plan, b, k))
    print(f"without canaries: {best[0]:.3f} s/round (best of {args.repeats})")
    print(f"with {args.canaries} canaries: {best[args.canaries]:.3f} s/round")
    print(f"ratio: {best[args.canaries] / best[0]:.3f}")


if __name__ == "__main__":
    main()
