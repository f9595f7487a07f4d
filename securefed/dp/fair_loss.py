"""q-FFL's loss release under DP: each round, a site's noised, clipped training loss.

Why: q-FFL (:mod:`securefed.fl.qffl`) weighs a site's update by ``F_k^q``, its training loss
under the round's global model. ``F_k`` is an un-noised function of the site's records;
scaling a DP-SGD update by it would release it (a record that moves the loss moves the
update's length), which no DP-SGD accounting covers. So a site uses only a **released**
loss, a Gaussian mechanism of its own, accounted like a DP-SGD step.

What a site computes, before it trains, on its **training** records with the global model
it was sent:

* each record's loss, clipped to ``[0, B]`` (:data:`BOUND`, B = 4 nats; a non-finite loss,
  e.g. from a model a server crafted to overflow on one record, counts as B);
* ``S`` = the sum of the clipped losses (under ``--privacy-unit patient`` a patient adds the
  mean of its records', which also lies in ``[0, B]``).

Replacing one record (or patient) moves ``S`` by at most B: the same as a sum of losses
centred to ``[-B/2, B/2]``, i.e. a DP-SGD step with q = 1 and clipping bound C = B/2
(:data:`CLIP`) under replace-one adjacency, whose sensitivity is 2C = B. The site adds
Gaussian noise of standard deviation ``sigma_loss * C`` from its own CSPRNG and records one
ledger event ``(sigma_loss, q = 1, steps = 1, C = B/2)`` of phase :data:`PHASE` for the round.
Then, post-processing: ``F = (S + noise) / n`` (n the site's size, the same in both
neighbouring data sets), kept within ``[FLOOR, B]``.

The released ``F`` never leaves the site on its own: it only scales what the site puts into
the (secure) sum. Under ``--secure-agg none`` the server can divide it out of the site's
vector, which is why it is accounted in full as the site's own release, not as a share of a
sum. Every site plans for one release in every round (:func:`planned_entries`), whether or
not it is sampled, as for its DP-SGD steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from securefed.dp.calibration import MIN_NOISE_MULTIPLIER, release_noise

__all__ = [
    "BOUND",
    "CLIP",
    "FLOOR",
    "MIN_NOISE_MULTIPLIER",
    "NOISE_MULTIPLIER",
    "PHASE",
    "clipped_loss_sum",
    "planned_entries",
    "planned_releases",
    "released_loss",
    "releases_loss",
]

#: The ledger phase of a loss release.
PHASE = "fair-loss"
#: B: per-record loss bound in nats. Cross-entropy at chance is ln K (0.69 for two classes);
#: 4 nats is a record the model calls wrong with about 98 % confidence, so clipping at B
#: keeps the losses of all but confidently wrong records whole.
BOUND = 4.0
#: C = B/2: the DP event's clipping bound (a centred loss lies in [-B/2, B/2]).
CLIP = BOUND / 2.0
#: Smallest released loss: q-FFL raises F to the power q - 1, which a loss of 0 (or a noisy
#: negative one) would make infinite.
FLOOR = 0.01
#: Default noise multiplier sigma_loss: at epsilon 8 over 10 rounds it raises the DP-SGD
#: noise by about 2 % (the 10 releases alone are epsilon 1.2 at delta 1e-5, replace-one).
NOISE_MULTIPLIER = 20.0


def releases_loss(run: Mapping[str, Any]) -> bool:
    """Whether a run (its ``config.to_dict()``) releases a noised loss each round.

    DP runs with q > 0 do. Without DP the site uses its exact loss (no claim to keep); runs
    recorded before q-FFL existed (no ``fair_q`` key) did not.
    """
    q = run.get("fair_q", 0.0)
    return run.get("dp_epsilon") is not None and isinstance(q, (int, float)) and q > 0


def planned_entries(run: Mapping[str, Any]) -> tuple[tuple[float, float, int], ...]:
    """The releases' accountant entries ``((sigma_loss, 1.0, rounds),)``, or ``()``.

    One release per round for every round: the plan does not depend on sampling.

    Raises:
        ValueError: ``fair_loss_noise`` below :data:`MIN_NOISE_MULTIPLIER` or not a number
            (a run that cannot have been configured: no accountant is asked).

    """
    if not releases_loss(run):
        return ()
    sigma = release_noise(run, "fair_loss_noise", NOISE_MULTIPLIER)
    return ((sigma, 1.0, int(run["rounds"])),)


def planned_releases(run: Mapping[str, Any]) -> frozenset[tuple[float, float, int, float]]:
    """The ``(sigma, q, steps, C)`` a ledger event of phase :data:`PHASE` may have in ``run``.

    Empty when the run releases no loss. The one rule the site (resuming its history), the
    server's claim book and the audit check a release against.

    Raises:
        ValueError: As :func:`planned_entries`.

    """
    return frozenset((s, q, 1, CLIP) for s, q, _ in planned_entries(run))


def clipped_loss_sum(losses: np.ndarray, *, units: np.ndarray | None = None) -> float:
    """``S``: the sum of per-record losses clipped to ``[0, B]`` (the caller adds the noise).

    Args:
        losses: (N,) per-record losses under the global model.
        units: (N,) patient id of each record, or None (each record its own unit). A patient
            adds the mean of its records' clipped losses, which lies in ``[0, B]`` too.

    Raises:
        ValueError: ``units`` does not have one entry per record.

    """
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    # NaN or inf (a crafted model) counts as the bound: it must not carry past the noise.
    clipped = np.where(np.isfinite(losses), np.clip(losses, 0.0, BOUND), BOUND)
    if units is None:
        return float(clipped.sum())
    units = np.asarray(units)
    if units.shape != losses.shape:
        raise ValueError(f"need one unit per record, got {units.shape} for {losses.shape}")
    _, index, sizes = np.unique(units, return_inverse=True, return_counts=True)
    return float((clipped / sizes[index]).sum())


def released_loss(noised_sum: float, *, size: int) -> float:
    """``F``: a noised loss sum as a mean over the site's ``size`` units, in ``[FLOOR, B]``.

    Post-processing of the release: ``size`` is the same in both neighbouring data sets.
    """
    mean = float(noised_sum) / max(int(size), 1)
    if not math.isfinite(mean):
        return BOUND
    return min(max(mean, FLOOR), BOUND)
