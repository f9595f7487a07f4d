"""Decision calibration under DP: class offsets from noised per-class score statistics.

Why: under DP noise and label skew, a federated classifier often ranks well (AUC 0.9) but puts
every image on one side of its decision threshold (issue 15: PneumoniaMNIST, seed 1, accuracy
0.375 with AUC 0.925). The ranking is learned, the threshold is not: the output bias swings
with the sites' class mixes and the noise. The fix is the threshold, fitted after the last
round from statistics the sites release with their own Gaussian noise, accounted like a DP-SGD
step.

What a site computes on its **training** records with the final global model:

* ``z`` = the record's logits, centred (minus their mean over classes, so only differences
  count) and clipped to L2 norm R (``--calibration-clip``; by model when unset,
  :func:`clip_of`);
* ``n[y]``: records of class y, and ``M[y]``: the sum of ``z`` over them (a K x K matrix).

It releases ``v = (R * n, M)`` plus Gaussian noise of standard deviation ``sigma_cal * R``
per coordinate. Replacing one record moves one count from one class to another and one
clipped ``z`` out of one row of ``M`` and into another (or the same) row, so
``||v - v'||_2 <= 2R``: exactly a DP-SGD step with q = 1 and clipping bound R under
replace-one adjacency. The site records it as one event ``(sigma_cal, q=1, steps=1, C=R)``
of phase ``calibrate``; every accountant and the audit compose it with the site's other
events, and the site's DP-SGD noise was calibrated with it included
(:func:`planned_entries`).

The server sums the sites' noisy vectors and sets, for each class c, the offset

    b_c = -(mean z_c over class-c records + mean z_c over the other records) / 2,

the midpoint between the two class-conditional means of the class's score: for two classes,
the threshold on the logit difference halfway between the classes' mean differences (linear
discriminant analysis with equal priors and variances). It aims at balanced accuracy, not at
the training set's class mix, since a hospital's test population rarely has its training
set's prior. The offsets are added to the bias of the model's last linear layer, a
post-processing of DP outputs (free of further privacy cost).

A calibration is skipped (offsets 0, with the reason in metrics.json) when the noisy counts
are too small to trust or when the class means are not separated by more than their noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "CLIP",
    "CLIP_BY_MODEL",
    "MAX_CLIP",
    "MIN_CLIP",
    "MIN_NOISE_MULTIPLIER",
    "NOISE_MULTIPLIER",
    "PHASE",
    "Calibration",
    "allowed_clips",
    "calibrates",
    "check_statistics",
    "clip_of",
    "implausible",
    "offsets_from_sum",
    "planned_entries",
    "planned_releases",
    "site_statistics",
    "statistics_size",
]

#: The ledger phase of a calibration release.
PHASE = "calibrate"
#: R: clipping bound on a record's centred logit vector (the "C" of its DP event), for every
#: model but those in :data:`CLIP_BY_MODEL`, and for every run before schema 3.11. The small
#: CNN's logit differences rarely pass 4 (|d| <= R * sqrt(2) is kept whole).
CLIP = 4.0
#: R by model when ``--calibration-clip`` is unset (schema 3.11). ``scatter-linear``'s centred
#: logits have median norm 19.5 on the quick start's synthetic images (9.8-33.7 between the
#: 10th and 90th percentiles): at 4 nearly every record was clipped, both class means sat at
#: the bound and their midpoint said nothing (docs/calibration.md). The noise is sigma * R,
#: so R costs no privacy; a larger R only makes a small model's estimate noisier.
CLIP_BY_MODEL = {"scatter-linear": 16.0}
#: Largest R accepted (securefed.config checks the same bounds).
MAX_CLIP = 1e3
#: Smallest R accepted: near the smallest floats the clipped scores and the noise round to a
#: coarse grid and the release's sensitivity exceeds 2R (review 38: 1.7 x 2R at R = 5e-324,
#: epsilon 1.7 for a release accounted at 0.93).
MIN_CLIP = 1e-3
#: Default noise multiplier sigma_cal: at epsilon 8 it raises the DP-SGD noise by about 1 %
#: (the release alone is epsilon 0.93 at delta 1e-5, replace-one).
NOISE_MULTIPLIER = 8.0
#: Smallest noise multiplier accepted: below it the release alone costs more than any useful
#: budget, and dp_accounting's PLD grid for it grows without bound (an untrusted report must
#: not make the audit exhaust memory).
MIN_NOISE_MULTIPLIER = 1.0
#: Data sets whose task is segmentation even when ``--task auto`` (no calibration budget).
_SEGMENTATION_DATASETS = frozenset({"synthetic-seg"})


def calibrates(run: Mapping[str, Any]) -> bool:
    """Whether a run (its ``config.to_dict()``) ends with a decision calibration.

    Only DP classification runs with one global model do: segmentation has no single
    decision threshold, clustered FL has several models, and without DP the issue does not
    arise the same way. Runs recorded before calibration existed (no ``calibrate`` key) did
    not calibrate.
    """
    if run.get("dp_epsilon") is None or not run.get("calibrate", False):
        return False
    if run.get("task") == "segmentation" or run.get("dataset") in _SEGMENTATION_DATASETS:
        return False
    return run.get("strategy") != "cfl"


def planned_entries(run: Mapping[str, Any]) -> tuple[tuple[float, float, int], ...]:
    """The calibration's accountant entries ``((sigma_cal, 1.0, 1),)`` if the run calibrates.

    Every site budgets for it from the start (DP-SGD's sigma is calibrated with it), whether
    or not it is asked in the end: the claim must not depend on what the server does.

    Raises:
        ValueError: ``calibration_noise`` below :data:`MIN_NOISE_MULTIPLIER` (or not a
            number): a run that cannot have been configured, so no accountant is asked.

    """
    if not calibrates(run):
        return ()
    return ((release_noise(run, "calibration_noise", NOISE_MULTIPLIER), 1.0, 1),)


def release_noise(run: Mapping[str, Any], key: str, default: float) -> float:
    """A release's noise multiplier ``run[key]`` (``default`` when absent), checked.

    The one rule for every release (this calibration, q-FFL's loss, logit adjustment's class
    prior): at least :data:`MIN_NOISE_MULTIPLIER`, finite, a number.

    Raises:
        ValueError: Not a number, or below :data:`MIN_NOISE_MULTIPLIER`: a run that cannot
            have been configured, so no accountant is asked.

    """
    sigma = run.get(key, default)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"{key} {sigma!r} is not a number")
    if not (math.isfinite(sigma) and sigma >= MIN_NOISE_MULTIPLIER):
        raise ValueError(f"{key} {sigma!r} is below {MIN_NOISE_MULTIPLIER}")
    return float(sigma)


def clip_of(run: Mapping[str, Any], *, model: str | None = None) -> float:
    """The R a run releases with: ``calibration_clip``, or by ``model`` when it is unset.

    A run recorded before the setting (schema < 3.11) has no key and released with
    :data:`CLIP`; one with ``calibration_clip`` None takes :data:`CLIP_BY_MODEL` for the model
    it built (``model``, the registered name ``auto`` resolved to), :data:`CLIP` otherwise.

    Raises:
        ValueError: Not a number in [:data:`MIN_CLIP`, :data:`MAX_CLIP`], or unset without
            ``model``.

    """
    clip = run.get("calibration_clip", CLIP)
    if clip is None:
        if model is None:
            raise ValueError("calibration_clip is unset and no model names it")
        return CLIP_BY_MODEL.get(model, CLIP)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise ValueError(f"calibration_clip {clip!r} is not a number")
    if not (math.isfinite(clip) and MIN_CLIP <= clip <= MAX_CLIP):
        raise ValueError(f"calibration_clip {clip!r} is outside [{MIN_CLIP:g}, {MAX_CLIP:g}]")
    return float(clip)


def allowed_clips(run: Mapping[str, Any]) -> frozenset[float]:
    """The R a release of ``run`` may carry: the run's, or its model's when R is unset.

    With ``--model auto`` the signed run dict does not say which model was built, so either
    model rule's R is the plan (R changes the estimate's noise, not epsilon).

    Raises:
        ValueError: As :func:`clip_of`.

    """
    if "calibration_clip" in run and run["calibration_clip"] is None:
        model = run.get("model")
        if isinstance(model, str) and model != "auto":
            return frozenset({clip_of(run, model=model)})
        return frozenset({CLIP, *CLIP_BY_MODEL.values()})
    return frozenset({clip_of(run)})


def planned_releases(run: Mapping[str, Any]) -> frozenset[tuple[float, float, int, float]]:
    """The ``(sigma, q, steps, C)`` a ledger event of phase :data:`PHASE` may have in ``run``.

    Empty when the run does not calibrate. The one rule the site (resuming its history), the
    server's claim book and the audit check a release against.

    Raises:
        ValueError: As :func:`planned_entries`.

    """
    entries = planned_entries(run)
    if not entries:
        return frozenset()
    return frozenset((s, q, n, c) for s, q, n in entries for c in allowed_clips(run))


def statistics_size(num_classes: int) -> int:
    """Length of a site's statistics vector: K counts and a K x K matrix of score sums."""
    return num_classes + num_classes * num_classes


def site_statistics(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    clip: float = CLIP,
    units: np.ndarray | None = None,
) -> np.ndarray:
    """The un-noised vector ``(R * n, M)`` of one site (the caller adds the noise).

    With ``units`` (patient-level DP) each record counts ``1/k`` for a patient of ``k``
    records: a patient adds the mean of its records' contributions. Each record's
    contribution ``w_i`` differs from any other's by at most 2R (the module's bound), so the
    difference of two patients' means, an average of such differences, does too: the release
    keeps sensitivity 2R for replacing one patient.

    Args:
        logits: (N, K) logits of the site's training records under the global model.
        labels: (N,) class indices in ``0..K-1``.
        num_classes: K.
        clip: R.
        units: (N,) patient id of each record, or None (each record its own unit).

    Raises:
        ValueError: Shapes or labels that do not fit ``num_classes``.

    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    k = int(num_classes)
    if logits.ndim != 2 or logits.shape[1] != k or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits (N, {k}) and labels (N,), got {logits.shape}, {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in 0..{k - 1}")
    # A non-finite logit (a model a server crafted to overflow on some records) would carry
    # NaN past the noise and name the record's class: such a record adds z = 0 (still counted),
    # which keeps the 2R bound for any model.
    logits = np.where(np.isfinite(logits).all(axis=1, keepdims=True), logits, 0.0)
    z = logits - logits.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    z *= np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    weight = np.ones(labels.shape[0])
    if units is not None:
        units = np.asarray(units)
        if units.shape != labels.shape:
            raise ValueError(f"need one unit per record, got {units.shape} for {labels.shape}")
        _, index, sizes = np.unique(units, return_inverse=True, return_counts=True)
        weight = 1.0 / sizes[index]
    counts = np.bincount(labels, weights=weight, minlength=k).astype(np.float64)
    sums = np.zeros((k, k))
    np.add.at(sums, labels, z * weight[:, None])
    return np.concatenate([clip * counts, sums.ravel()])


@dataclass(frozen=True)
class Calibration:
    """The server's result: offsets to add to the last layer's bias, or why none.

    Attributes:
        offsets: Per class (zeros when skipped).
        applied: Whether the offsets are to be used.
        reason: Why not, when not.
        counts: The noisy class counts the offsets rest on.

    """

    offsets: list[float]
    applied: bool
    reason: str | None
    counts: list[float]


def offsets_from_sum(
    total: np.ndarray,
    *,
    num_classes: int,
    sites: int,
    noise_multiplier: float,
    clip: float = CLIP,
) -> Calibration:
    """Class offsets from the sum of ``sites`` noisy statistics vectors.

    Skipped when a class (or its complement) holds fewer than ``max(10, 3 x`` the noise's
    standard deviation on a count ``)`` records, or when for some class the distance between
    its two means is under twice the noise's standard error on it: a threshold set by noise
    would be worse than none.

    Raises:
        ValueError: ``total`` has the wrong length or is not finite.

    """
    k = int(num_classes)
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (statistics_size(k),) or not np.all(np.isfinite(total)):
        raise ValueError(f"calibration statistics: need {statistics_size(k)} finite values")
    counts = total[:k] / clip
    sums = total[k:].reshape(k, k)
    zero = [0.0] * k
    if not (np.all(np.isfinite(counts)) and math.isfinite(float(counts.sum()))):
        return Calibration(zero, False, "the summed counts are not finite", counts.tolist())
    count_sd = noise_multiplier * math.sqrt(max(sites, 1))  # noise s.d. on a summed count
    sum_sd = count_sd * clip  # ... and on a summed score
    least = max(10.0, 3.0 * count_sd)
    offsets = []
    for c in range(k):
        n_in, n_out = counts[c], counts.sum() - counts[c]
        if min(n_in, n_out) < least:
            return Calibration(
                zero,
                False,
                f"class {c}: about {min(n_in, n_out):.0f} records on one side, fewer than "
                f"{least:.0f} (three times the noise on a count)",
                counts.tolist(),
            )
        mean_in = sums[c, c] / n_in
        mean_out = (sums[:, c].sum() - sums[c, c]) / n_out
        # Standard error of the difference of the two means (noise only; sampling variation
        # is the model's business).
        se = sum_sd * math.sqrt(1.0 / n_in**2 + (k - 1) / n_out**2)
        if abs(mean_in - mean_out) < 2.0 * se:
            return Calibration(
                zero,
                False,
                f"class {c}: its scores separate the classes by {abs(mean_in - mean_out):.3g}, "
                f"under twice the noise ({2 * se:.3g})",
                counts.tolist(),
            )
        offset = -(mean_in + mean_out) / 2.0
        if not math.isfinite(offset) or abs(offset) > clip:
            # Honest sites' means lie within [-R, R] (each z is), so their midpoint does too:
            # anything else is a poisoned or broken sum, and a site must not set the model.
            return Calibration(
                zero,
                False,
                f"class {c}: offset {offset:.3g} outside [-{clip:g}, {clip:g}] (a bad release)",
                counts.tolist(),
            )
        offsets.append(offset)
    return Calibration(offsets, True, None, counts.tolist())


def implausible(
    vec: np.ndarray,
    *,
    num_classes: int,
    noise_multiplier: float,
    max_records: float,
    clip: float = CLIP,
) -> str | None:
    """Why one site's release cannot come from an honest site, or None.

    An honest vector is ``(R n, M)`` plus noise of s.d. ``sigma R``: its counts are not far
    below 0 nor, in all, above ``max_records`` (the run's N_max, the most one site weighs);
    and every score sum ``|M[y][c]|`` is at most ``R n[y]``. Six standard deviations of
    slack keep an honest site in (a false refusal about once in 10^8 per coordinate). A
    site that passes can still pull the threshold, in proportion to its claimed size, within
    [-R, R]: the trust a site has for its model update too.
    """
    k = int(num_classes)
    slack = 6.0 * noise_multiplier  # in records
    counts = vec[:k] / clip
    sums = vec[k:].reshape(k, k)
    if np.any(counts < -slack) or counts.sum() > max_records + slack * math.sqrt(k):
        return "class counts outside what one site can hold"
    room = clip * (np.maximum(counts, 0.0) + slack)
    if np.any(np.abs(sums) > room[:, None]):
        return "score sums larger than its counts allow"
    return None


def check_statistics(values: Sequence[Any], *, num_classes: int, what: str) -> np.ndarray:
    """A site's reply as a finite float vector of the right length.

    Raises:
        ValueError: Naming ``what``.

    """
    try:
        vec = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: calibration statistics are not numbers") from None
    if vec.shape != (statistics_size(num_classes),) or not np.all(np.isfinite(vec)):
        raise ValueError(
            f"{what}: calibration statistics need {statistics_size(num_classes)} finite values"
        )
    return vec
