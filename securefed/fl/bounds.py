"""The poisoning bound: what an honest site's update can be, and the server's check of a sum.

Each honest site clips its whole model update Δ_i (the flattened vector it aggregates, after
training: post-processing, no privacy cost) to the L2 norm C_u (``--update-clip``) and weighs
it by n_i, its sample count capped at the run's N_max (``--secagg-clip``, the largest value any
coordinate of a protected vector may take). So every honest vector ``[n_i Δ_i, n_i]`` has
``1 <= n_i <= N_max`` and ``‖n_i Δ_i‖ <= n_i C_u``, and a sum over k honest sites has

    k <= Σ n_i <= k N_max        and        ‖Σ n_i Δ_i‖ <= (Σ n_i) C_u,

up to the secure sum's rounding. Under q-FFL (``--fair-q``) the last coordinate is the site's
``c h'`` in ``[(FLOOR/B)^q, N_max]`` instead of n_i and the update part is at most C_u times it
(:mod:`securefed.fl.qffl`): the same checks with that least weight. The server checks both on
the decoded sum, whatever the
mode (plaintext, masking, CKKS), and refuses to apply a round that breaks them; without
secure aggregation it also checks each site's own vector and drops a site that breaks them.
What this does and does not stop: docs/poisoning.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "aggregate_violation",
    "clip_update",
    "coordinate_slack",
    "max_site_weight",
    "site_violation",
    "update_clip_for",
]

#: Relative tolerance for float64 rounding in norms and sums.
_REL = 1e-6


def update_clip_for(config: Any, dim: int) -> float:
    """C_u: the L2 norm a site clips its update to, for a model of ``dim`` aggregated values.

    ``--update-clip`` when set; else ``lr * sqrt(dim)``: every aggregated value moves by at
    most ``lr`` root-mean-square in a round. An honest local update is a few SGD steps of
    size ``lr`` times a gradient whose coordinates are far below 1 (measured on the test
    configurations: 1-2 % of the default without DP, 9-10 % with DP), so the default clips no
    honest update in practice, while it refuses an update that moves every weight by 1e6. It
    is loose: on those configurations it is 8x the model's own norm, so it does not keep one
    round from replacing the model (docs/poisoning.md, "Choosing --update-clip").
    """
    if config.update_clip is not None:
        return float(config.update_clip)
    return float(config.effective_lr) * math.sqrt(max(int(dim), 1))


def max_site_weight(config: Any) -> float:
    """N_max: the most samples one site's update weighs (``floor(--secagg-clip)``, at least 1).

    A run-level cap, so no site discloses its size for the check: a site with more samples
    than N_max weighs as N_max. It is the fixed-point encoder's per-coordinate range, which
    the weight coordinate n_i of a masked vector cannot exceed anyway.
    """
    return float(max(1, math.floor(config.secagg_clip)))


def clip_update(update: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """``update`` scaled down to L2 norm ``bound`` if it is longer; and whether it was."""
    norm = float(np.linalg.norm(update))
    if norm <= bound:
        return update, False
    return update * (bound / norm), True


def coordinate_slack(config: Any, n_summands: int) -> float:
    """Largest error per coordinate the secure sum of ``n_summands`` vectors may add.

    Masking: one fixed-point quantum per summand (stochastic rounding), the quantum of the
    codec the sites encoded with, sized for up to the run's sites (a round with dropouts is
    encoded for more sites than it sums). CKKS: the flooded decryption's documented precision,
    its noise sized, as the key holder sizes it, for up to the run's sites. Plaintext: none.
    """
    n = max(int(n_summands), 1)
    most = max(n, int(config.clients))
    if config.secure_agg == "none":
        return 0.0
    if config.secure_agg == "mask":
        from securefed.crypto.fixedpoint import FixedPointCodec

        codec = FixedPointCodec(
            ring_bits=config.resolved_ring_bits, clip_range=config.secagg_clip, n_summands=most
        )
        return n * codec.quantum
    from securefed.protocol.modes.ckks import ckks_params

    return ckks_params(config, n_sites=most).precision(most)


def site_violation(
    vector: np.ndarray, *, clip: float, max_weight: float, least_weight: float = 1.0
) -> str | None:
    """Why one site's plaintext vector ``[n Δ, n]`` is not one an honest site sends, or None.

    ``least_weight`` below 1 (q-FFL, :func:`securefed.fl.qffl.least_weight`): the last
    coordinate is a real number in ``[least_weight, N_max]``, not a count.
    """
    weight = float(vector[-1])
    if least_weight < 1.0:
        if not (math.isfinite(weight) and least_weight <= weight <= max_weight):
            return f"its q-FFL weight {weight:.6g} is outside [{least_weight:.3g}, {max_weight:g}]"
    elif not (math.isfinite(weight) and weight.is_integer() and 1 <= weight <= max_weight):
        return f"its weight n_i = {weight:g} is not a count in [1, {max_weight:g}]"
    norm = float(np.linalg.norm(vector[:-1]))
    if not norm <= weight * clip * (1 + _REL):
        return (
            f"its update has L2 norm {norm / weight:.4g}, above the bound C_u = {clip:.4g} "
            "(--update-clip)"
        )
    return None


def aggregate_violation(
    total: np.ndarray,
    *,
    contributors: int,
    clip: float,
    max_weight: float,
    slack: float,
    least_weight: float = 1.0,
) -> str | None:
    """Why a decoded sum ``[Σ n_i Δ_i, Σ n_i]`` of ``contributors`` sites breaks the bound.

    Args:
        total: The decoded sum.
        contributors: How many sites' vectors it adds.
        clip: C_u.
        max_weight: N_max.
        slack: The secure sum's largest error per coordinate (:func:`coordinate_slack`).
        least_weight: The smallest last coordinate one honest site sends (1: a count;
            q-FFL's :func:`securefed.fl.qffl.least_weight`).

    Returns:
        The reason, or None when honest clipped updates could have produced ``total``.

    """
    k = max(int(contributors), 1)
    weight = float(total[-1])
    low, high = k * least_weight - slack, k * max_weight * (1 + _REL) + slack
    # The server divides by the weight sum: one at or below the sum's own error (q-FFL's tiny
    # weights under a coarse ring) is noise, never a step size, whatever least_weight says.
    if not (math.isfinite(weight) and weight > slack and low <= weight <= high):
        return (
            f"the sum of the {k} sites' weights is {weight:.6g}, outside "
            f"[{k * least_weight:.6g}, {k * max_weight:g}] "
            f"(each n_i in [{least_weight:.3g}, {max_weight:g}])"
        )
    norm = float(np.linalg.norm(total[:-1]))
    limit = weight * clip * (1 + _REL) + slack * math.sqrt(max(total.size - 1, 1))
    if not norm <= limit:
        return (
            f"the sum's update has L2 norm {norm:.6g}, above the {limit:.6g} that {k} honest "
            f"updates clipped to C_u = {clip:.4g} can reach (--update-clip)"
        )
    return None
