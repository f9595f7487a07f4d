"""What replace-one adjacency costs: sigma and epsilon against Opacus' add/remove figure.

Prints, for schedules like securefed's defaults, the noise multiplier calibrated for epsilon = 8
at delta = 1e-5 under add/remove (dp_accounting PLD, the figure Opacus-style tools state) and
under replace-one (securefed's ``calibrate_noise``), and their ratio; then the epsilon of one
fixed sigma under both relations. These are the figures the README quotes.

    python benchmarks/adjacency_sigma.py --out bench-out/adjacency
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dp_accounting import calibrate_dp_mechanism, dp_event, pld

from securefed.dp.accounting import calibrate_noise, compute_epsilon

TARGET, DELTA = 8.0, 1e-5
#: (q, steps): small q over many steps ... full-batch steps; (1/4, 80) is the quick start.
SCHEDULES = [(0.01, 2000), (1 / 19, 200), (1 / 9, 180), (1 / 4, 80), (1.0, 20)]


def _event(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )


def _add_remove_accountant() -> pld.PLDAccountant:
    return pld.PLDAccountant(value_discretization_interval=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/adjacency")
    out = Path(parser.parse_args().out)
    rows = []
    for q, steps in SCHEDULES:
        add_remove = calibrate_dp_mechanism(
            _add_remove_accountant, lambda s, q=q, n=steps: _event(s, q, n), TARGET, DELTA, tol=1e-3
        )
        replace_one = calibrate_noise(
            target_epsilon=TARGET, delta=DELTA, sample_rate=q, steps=steps
        )
        rows.append(
            {
                "q": q,
                "steps": steps,
                "sigma_add_remove": add_remove,
                "sigma_replace_one": replace_one,
                "ratio": replace_one / add_remove,
            }
        )
    acc = _add_remove_accountant()
    acc.compose(_event(1.0, 1 / 9, 180))
    fixed = {
        "sigma": 1.0,
        "q": 1 / 9,
        "steps": 180,
        "epsilon_add_remove": acc.get_epsilon(DELTA),
        "epsilon_replace_one": compute_epsilon(history=[(1.0, 1 / 9, 180)], delta=DELTA),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"sigma": rows, "fixed_sigma": fixed}, indent=2))
    lines = [
        f"sigma for epsilon = {TARGET:g}, delta = {DELTA:g}",
        "",
        "| q | steps | add/remove sigma | replace-one sigma | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['q']:.4g} | {r['steps']} | {r['sigma_add_remove']:.3f} | "
        f"{r['sigma_replace_one']:.3f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        f"sigma = 1, q = 1/9, 180 steps: epsilon {fixed['epsilon_add_remove']:.2f} add/remove, "
        f"{fixed['epsilon_replace_one']:.2f} replace-one",
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
