"""Logit adjustment's class prior under DP: once a run, a site's noised class counts.

Why: under label skew a site that holds (nearly) one class can only learn "everything is my
class", and DP-SGD's clipped, large steps push that prior into the features as well as the
bias. On PneumoniaMNIST (5 sites, ``dirichlet:0.5``) the global model's test ranking is then
inverted after round 1 and swings between rounds (docs/benchmarks.md). Logit adjustment
(Menon et al., "Long-tail learning via logit adjustment", ICLR 2021; in federated learning
Zhang et al., "Federated Learning with Label Distribution Skew via Logits Calibration", ICML
2022) trains ``f(x) + log pi_k`` against the labels, where ``pi_k`` is the site's class
prior: the shared ``f`` then learns the evidence for each class under equal priors, and a
site of one class contributes little gradient instead of a large push.

``pi_k`` is a function of the site's labels, so DP-SGD's accounting does not cover training
with it. A site therefore uses only a **released** prior, a Gaussian mechanism of its own:

* ``c``: its class counts over its training records (under ``--privacy-unit patient`` each
  patient adds its records' label histogram divided by its record count: mass 1);
* replacing one record (or patient) moves ``c`` by at most sqrt(2) in L2 (one unit of mass
  leaves one class and enters another): a DP-SGD step with q = 1 and clipping bound
  C = sqrt(2)/2 (:data:`CLIP`) under replace-one adjacency, whose sensitivity is 2C;
* Gaussian noise of standard deviation ``sigma_prior * C`` per class from the site's own
  CSPRNG, recorded as one ledger event ``(sigma_prior, q = 1, steps = 1, C)`` of phase
  :data:`PHASE` in the round of its first training;
* post-processing: ``log pi = log(max(c_noised, 1) / sum)``.

The prior never leaves the site: it is added to the logits during local training only, is not
a parameter and is not in the update. The site keeps it for the whole run in its persistent
store (:mod:`securefed.persistent`), so a resumed site never releases it twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from securefed.dp.calibration import MIN_NOISE_MULTIPLIER, release_noise

__all__ = [
    "CLIP",
    "FLOOR",
    "MIN_NOISE_MULTIPLIER",
    "NOISE_MULTIPLIER",
    "PHASE",
    "adjusts_logits",
    "releases_prior",
    "class_mass",
    "log_prior",
    "planned_entries",
    "planned_releases",
]

#: The ledger phase of the prior's release.
PHASE = "class-prior"
#: C: half the counts' replace-one L2 sensitivity, sqrt(2).
CLIP = math.sqrt(2.0) / 2.0
#: Smallest noised count kept: a class the noise drives to zero or below still gets a finite
#: log prior (log of 1 record's share), so no logit is pushed to minus infinity.
FLOOR = 1.0
#: Default noise multiplier: the release alone is epsilon 0.9 at delta 1e-5 (as the decision
#: calibration's at its default); at epsilon 8 it raises DP-SGD's noise by about 1 %.
NOISE_MULTIPLIER = 8.0


def adjusts_logits(run: Mapping[str, Any]) -> bool:
    """Whether a run (its ``config.to_dict()``) trains with logit adjustment."""
    return bool(run.get("logit_adjust", False))


def releases_prior(run: Mapping[str, Any]) -> bool:
    """Whether a run's sites release a noised prior: logit adjustment under DP.

    Without DP a site uses its exact counts (no claim to keep).
    """
    return adjusts_logits(run) and run.get("dp_epsilon") is not None


def planned_entries(run: Mapping[str, Any]) -> tuple[tuple[float, float, int], ...]:
    """The release's accountant entries ``((sigma_prior, 1.0, 1),)``, or ``()``.

    Raises:
        ValueError: ``prior_noise`` below :data:`MIN_NOISE_MULTIPLIER` or not a number (a run
            that cannot have been configured: no accountant is asked).

    """
    if not releases_prior(run):
        return ()
    return ((release_noise(run, "prior_noise", NOISE_MULTIPLIER), 1.0, 1),)


def planned_releases(run: Mapping[str, Any]) -> frozenset[tuple[float, float, int, float]]:
    """The ``(sigma, q, steps, C)`` a ledger event of phase :data:`PHASE` may have in ``run``.

    Empty when the run releases no prior. The one rule the site, the server's claim book and
    the audit check a release against.

    Raises:
        ValueError: As :func:`planned_entries`.

    """
    return frozenset((s, q, steps, CLIP) for s, q, steps in planned_entries(run))


def class_mass(
    labels: np.ndarray, *, num_classes: int, units: np.ndarray | None = None
) -> np.ndarray:
    """``c``: the class counts of ``labels`` (the caller adds the noise).

    Args:
        labels: (N,) class labels in ``[0, num_classes)``.
        num_classes: K.
        units: (N,) patient id of each record, or None (each record its own unit). A patient
            adds its records' label histogram over its record count, a mass of 1.

    Raises:
        ValueError: ``units`` does not have one entry per record, or a label is out of range.

    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if units is None:
        return np.bincount(labels, minlength=num_classes).astype(np.float64)
    units = np.asarray(units)
    if units.shape != labels.shape:
        raise ValueError(f"need one unit per record, got {units.shape} for {labels.shape}")
    _, index, sizes = np.unique(units, return_inverse=True, return_counts=True)
    return np.bincount(labels, weights=1.0 / sizes[index], minlength=num_classes)


def log_prior(noised: np.ndarray) -> np.ndarray:
    """``log pi``: noised counts floored at :data:`FLOOR`, normalised, logged (float32)."""
    counts = np.asarray(noised, dtype=np.float64).reshape(-1)
    counts = np.where(np.isfinite(counts), np.maximum(counts, FLOOR), FLOOR)
    return np.log(counts / counts.sum()).astype(np.float32)
