"""What the quick start's accounting costs: cached PLD pieces against from-scratch composition.

Replays, without training, every accountant call the README's quick start makes at one site
plan (q = 1/4, 8 steps a round, epsilon 8, delta 1e-5, the decision calibration's release):
the sigma search (today's: the secant, schema 3.10), then each round's progress epsilon,
the last with the release.
Once with :mod:`securefed.dp.accounting` as it is (one-step PLDs and their self-compositions
cached), once with a fresh dp_accounting ``PLDAccountant`` per history (what every figure
cost before); it checks that both give the same sigma and the same epsilons to the last bit.
Times are the best of ``--repeats`` alternating runs in one process (caches cleared each
time), so a busy machine slows both alike.

Usage (from the repository root):

    python benchmarks/accounting_cost.py [--repeats 3] [--rounds 10]
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache

from securefed.dp import accounting

Q, STEPS_PER_ROUND, TARGET, DELTA = 0.25, 8, 8.0, 1e-5
RELEASE = ((8.0, 1.0, 1),)


def _clear() -> None:
    for f in (accounting._pld_cached, accounting._group_pld, accounting._step_pld):
        f.cache_clear()
    accounting.calibrate_noise.cache_clear()


def _workload(rounds: int) -> tuple[float, list[float]]:
    sigma = accounting.calibrate_noise(
        target_epsilon=TARGET,
        delta=DELTA,
        sample_rate=Q,
        steps=STEPS_PER_ROUND * rounds,
        extra=RELEASE,
    )
    eps = []
    for r in range(1, rounds + 1):
        history = [(sigma, Q, STEPS_PER_ROUND)] * r + (list(RELEASE) if r == rounds else [])
        eps.append(accounting.compute_epsilon(history=history, delta=DELTA))
    return sigma, eps


def _timed(patch: bool, rounds: int) -> tuple[float, tuple[float, list[float]]]:
    _clear()
    cached = accounting._pld_cached
    if patch:  # the accounting before: one fresh PLDAccountant per distinct history
        accounting._pld_cached = lru_cache(maxsize=4096)(accounting._pld_from_scratch)
    try:
        start = time.perf_counter()
        out = _workload(rounds)
        return time.perf_counter() - start, out
    finally:
        accounting._pld_cached = cached


def main() -> int:
    """Print the best time of each way and whether their figures agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10, help="the quick start's 10")
    args = parser.parse_args()
    accounting.pld_epsilon(history=[(1.0, 0.5, 1)], delta=DELTA)  # import dp_accounting first
    best = {"cached": float("inf"), "from scratch": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for name in best:
            seconds, results[name] = _timed(patch=name == "from scratch", rounds=args.rounds)
            best[name] = min(best[name], seconds)
    same = results["cached"] == results["from scratch"]
    sigma, eps = results["cached"]
    print(f"sigma {sigma!r}; epsilon per round {[round(e, 4) for e in eps]}")
    print(f"same sigma and epsilons as from scratch: {same}")
    for name, seconds in best.items():
        print(f"{name}: {seconds:.3f} s (best of {args.repeats})")
    print(f"ratio from scratch / cached: {best['from scratch'] / best['cached']:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
