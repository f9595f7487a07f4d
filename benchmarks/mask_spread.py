"""How far apart two masked in-process runs with the same seed end up (run-to-run spread).

Pairwise masking encodes each site's weighted update n_i u_i to a fixed-point grid of step
q = 2^-f with stochastic rounding whose coins are fresh secrets at every site, so no two masked
runs are bit-identical even with one seed. The step is the ring's quantum, not a float32 ulp:
with the defaults (``--secagg-ring-bits auto``, a 30-bit ring for 3 sites, ``--secagg-clip``
1e5) q = 2^-10 = 9.8e-4, and one round's FedAvg update can differ by up to k q / sum(n_i) per
weight (k sites; FixedPointCodec.error_bound): 1.2e-5 on the 240-image set, 1.2e-6 on the
2400-image one: 330 to 3300 float32 ulps of a weight near 0.05 (ulp 3.7e-9). (Before schema
3.12 the default was a 32-bit ring, q = 2^-12, four times smaller.) Later rounds'
training carries those differences on. This is the yardstick for comparing a deployed (Flower)
run with an in-process one.

Usage (from the repository root):

    python benchmarks/mask_spread.py            # prints one line per data set size

Both sizes use the synthetic shapes, 3 sites, 2 rounds, DP epsilon 8 (RDP), ``--secure-agg
mask``: 240 training images with lr 0.5 and batch 32 (the integration tests' set: 2-3 DP steps
per site and round), and the default 2400 images (the deploy benchmark's: 25 steps).
"""

from __future__ import annotations

from securefed.config import RunConfig
from securefed.fl.simulation import Federation


def spread(config: RunConfig) -> float:
    """Largest absolute difference between the final weights of two identical masked runs."""
    finals = []
    for _ in range(2):
        fed = Federation(config)
        for r in range(1, config.rounds + 1):
            fed.run_round(r)
        finals.append({k: v.clone() for k, v in fed.global_model.state_dict().items()})
    return max(float((finals[0][k] - finals[1][k]).abs().max()) for k in finals[0])


def main() -> None:
    """Measure the spread on the small and the default synthetic set."""
    base = RunConfig(
        dataset="synthetic",
        model="cnn",  # the documented figures' model; `auto` under DP is now scatter-linear
        clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=32,
        dp_epsilon=8.0,
        device="cpu",
        accountant="pld",
        secure_agg="mask",
        seed=0,
        # Same DP noise in both runs: only the masking's fresh rounding coins differ.
        reproducible_noise=True,
    )
    small = base.replace(lr=0.5, data_options={"n_train": 240, "n_val": 60, "n_test": 80})
    for name, config in (("240 training images", small), ("2400 training images", base)):
        print(f"{name}: max |w_run1 - w_run2| = {spread(config):.3g}")


if __name__ == "__main__":
    main()
