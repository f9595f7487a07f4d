"""Noise calibration's two searches side by side: accountant calls, seconds, the guarantee.

``securefed.dp.accounting.calibrate_noise`` finds the smallest sigma (to 0.01 in epsilon) whose
replace-one PLD epsilon is at most the target. Search 1 (runs before schema 3.10) bisects from
sigma = 1; search 2 (schema 3.10 on) runs a safeguarded secant from a Gaussian-DP guess. For
each plan this calibrates with both, alternating which goes first, with every accountant cache
cleared before each, and reports the accountant calls, the seconds and whether the returned
sigma meets ``target - 0.01 <= epsilon <= target`` (recomputed afresh). The first plan is the
README quick start's site (800 records, q = 1/4, 80 steps, the decision calibration's release).

Usage (from the repository root):

    python benchmarks/sigma_search.py            # the quick start's plan and 24 others
    python benchmarks/sigma_search.py --full     # 144 plans, small q, large epsilon (~15 min)
"""

from __future__ import annotations

import argparse
import itertools
import time

from securefed.dp import accounting

QUICK = (8.0, 1e-5, 0.25, 80, ((8.0, 1.0, 1),))


def _clear() -> None:
    for f in (accounting._pld_cached, accounting._group_pld, accounting._step_pld):
        f.cache_clear()
    accounting.calibrate_noise.cache_clear()


def _calibrate(plan: tuple, search: int) -> tuple[float, int, float]:
    target, delta, q, steps, extra = plan
    real = accounting.pld_epsilon
    calls = [0]

    def counted(**kwargs):
        calls[0] += 1
        return real(**kwargs)

    _clear()
    accounting.pld_epsilon = counted
    try:
        t0 = time.perf_counter()
        sigma = accounting.calibrate_noise(
            target_epsilon=target,
            delta=delta,
            sample_rate=q,
            steps=steps,
            extra=extra,
            search=search,
        )
        seconds = time.perf_counter() - t0
    finally:
        accounting.pld_epsilon = real
    return sigma, calls[0], seconds


def main(argv: list[str] | None = None) -> int:
    """Print one line per plan and the totals; exit 1 if a sigma misses the guarantee."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    args = p.parse_args(argv)
    if args.full:
        grid = itertools.product(
            [0.5, 1, 3, 8, 16, 50], [1.0, 0.25, 0.05, 0.01], [10, 40, 1000], [1e-5, 1e-7]
        )
    else:
        grid = itertools.product([1, 4, 8, 16], [1.0, 0.25, 0.05], [40, 1000], [1e-5])
    plans = [QUICK, *((float(e), d, q, s, ()) for e, q, s, d in grid)]
    print("| ε | δ | q | steps | release | σ bisection | calls | s | σ secant | calls | s | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {1: [0, 0.0], 2: [0, 0.0]}
    bad = 0
    for i, plan in enumerate(plans):
        out = {}
        for search in (1, 2) if i % 2 == 0 else (2, 1):
            out[search] = _calibrate(plan, search)
            totals[search][0] += out[search][1]
            totals[search][1] += out[search][2]
        target, delta, q, steps, extra = plan
        ok = True
        for search in (1, 2):
            _clear()
            eps = accounting.pld_epsilon(history=[(out[search][0], q, steps), *extra], delta=delta)
            ok = ok and target - 0.01 <= eps <= target
        bad += not ok
        s1, s2 = out[1], out[2]
        print(
            f"| {target:g} | {delta:g} | {q:g} | {steps} | {'yes' if extra else 'no'} "
            f"| {s1[0]:.6g} | {s1[1]} | {s1[2]:.2f} | {s2[0]:.6g} | {s2[1]} | {s2[2]:.2f} "
            f"| {'yes' if ok else 'NO'} |",
            flush=True,
        )
    (c1, t1), (c2, t2) = totals[1], totals[2]
    print(
        f"\n{len(plans)} plans: bisection {c1} accountant calls, {t1:.1f} s; secant {c2} calls, "
        f"{t2:.1f} s; secant / bisection {c2 / c1:.2f}x calls, {t2 / t1:.2f}x seconds; "
        f"{bad} sigma(s) outside [target - 0.01, target]"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
