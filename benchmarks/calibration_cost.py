"""What the decision calibration's release costs in privacy (docs/calibration.md).

For each calibration noise multiplier: the release's own replace-one epsilon at delta 1e-5, and
how much larger a site's DP-SGD sigma must be to keep the whole run (steps + release) within
the target, for a few (sampling rate, steps) plans at epsilon 8. Pure accounting (dp_accounting's
PLD, the functions a site plans with); no training.

Usage (from the repository root):

    python benchmarks/calibration_cost.py
"""

from __future__ import annotations

from securefed.dp.accounting import calibrate_noise, pld_epsilon

PLANS = ((1 / 12, 240), (1 / 4, 80), (1.0, 20))  # (q, steps): 10 rounds x 2 epochs x 1/q
TARGET, DELTA = 8.0, 1e-5


def main() -> int:
    """Print one line per (noise multiplier, plan)."""
    print("sigma_cal | release epsilon | q | steps | DP-SGD sigma without -> with | increase")
    for sigma_cal in (4.0, 6.0, 8.0, 12.0):
        alone = pld_epsilon(history=[(sigma_cal, 1.0, 1)], delta=DELTA)
        for q, steps in PLANS:
            kwargs = {"target_epsilon": TARGET, "delta": DELTA, "sample_rate": q, "steps": steps}
            plain = calibrate_noise(**kwargs)
            with_release = calibrate_noise(**kwargs, extra=((sigma_cal, 1.0, 1),))
            print(
                f"{sigma_cal:g} | {alone:.2f} | {q:.4g} | {steps} | {plain:.4f} -> "
                f"{with_release:.4f} | {100 * (with_release / plain - 1):.1f} %"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
