"""Classification metrics and convergence detection, in plain numpy with JSON-ready results."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from securefed.errors import ConfigError, DataError

__all__ = [
    "CONVERGENCE_RULE",
    "CONV_ACC_TOL",
    "CONV_LOSS_TOL",
    "CONV_PATIENCE",
    "CONV_WINDOW",
    "HEADLINE_METRICS",
    "classification_metrics",
    "convergence_criteria",
    "detect_convergence",
    "flat_windows",
    "roc_auc",
    "site_fairness",
]

#: The scalar figures tables and CSV files show for a model, in display order.
HEADLINE_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "auc",
    "loss",
)


def classification_metrics(
    *, y_true: np.ndarray, probs: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/per-class precision, recall, F1, confusion, AUC.

    Predictions are ``argmax(probs, axis=1)`` (the lowest class wins a tie). Conventions follow
    scikit-learn with ``zero_division=0``, so results match it:

    - per class: precision ``tp/(tp+fp)``, recall ``tp/(tp+fn)``, F1 ``2tp/(2tp+fp+fn)``; a
      zero denominator gives 0.0.
    - macro averages run over the classes that occur in ``y_true`` or in the predictions
      (scikit-learn's default label set); a class that is neither present nor predicted has
      no defined precision or recall and does not drag the average down. ``per_class`` still
      lists all ``num_classes`` classes.
    - balanced accuracy is the mean recall over the classes present in ``y_true``.
    - AUC: binary, the ROC AUC of ``probs[:, 1]``; multi-class, the unweighted mean of the
      one-vs-rest AUCs of the classes present in ``y_true``. None when fewer than two classes
      are present (undefined).

    Args:
        y_true: (N,) integer labels in [0, num_classes).
        probs: (N, num_classes) class scores (probabilities or logits; only their order is
            used).
        num_classes: K.

    Returns:
        A dict of plain Python ints, floats, lists and None, ready for ``json.dump``: keys
        ``n_samples``, ``accuracy``, ``balanced_accuracy``, ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``auc``, ``per_class`` (list of dicts with ``class``,
        ``precision``, ``recall``, ``f1``, ``support``) and ``confusion_matrix`` (rows are
        true classes, columns predicted).

    Raises:
        DataError: Shapes disagree, labels are out of range, scores are not finite, or N = 0.

    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"`num_classes` must be an int of at least 2 (got {num_classes!r}).")
    y = np.asarray(y_true)
    scores = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"`y_true` must be a 1-D integer array (got {y.dtype}, shape {y.shape}).")
    if y.size == 0:
        raise DataError("`y_true` is empty: no metrics for zero samples.")
    if scores.shape != (y.size, num_classes):
        raise DataError(f"`probs` must have shape ({y.size}, {num_classes}) (got {scores.shape}).")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(
            f"`y_true` labels must be in [0, {num_classes}) "
            f"(got range [{int(y.min())}, {int(y.max())}])."
        )
    if not np.all(np.isfinite(scores)):
        raise DataError("`probs` contains NaN or infinite values.")

    y = y.astype(np.int64)
    pred = scores.argmax(axis=1)
    confusion = np.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)
    seen = (support > 0) | (predicted > 0)
    present = support > 0

    return {
        "n_samples": int(y.size),
        "accuracy": float(tp.sum() / y.size),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_precision": float(precision[seen].mean()),
        "macro_recall": float(recall[seen].mean()),
        "macro_f1": float(f1[seen].mean()),
        "auc": _auc(y, scores, num_classes=num_classes, present=present),
        "per_class": [
            {
                "class": c,
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in range(num_classes)
        ],
        "confusion_matrix": confusion.astype(int).tolist(),
    }


def roc_auc(*, positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula, tied scores sharing their mean rank.

    ``AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``, where ``R_pos`` is the sum of
    the positives' ranks among all scores; this equals the trapezoidal area under the ROC
    curve, ties included.

    Args:
        positive: (N,) booleans, True for the positive class.
        scores: (N,) scores, higher meaning more positive.

    Returns:
        The AUC, or None when there are no positives or no negatives.

    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Tied values occupy ranks start+1 .. start+count; each gets their mean.
    starts = np.cumsum(counts) - counts
    mean_rank = starts + (counts + 1) / 2.0
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _auc(
    y: np.ndarray, scores: np.ndarray, *, num_classes: int, present: np.ndarray
) -> float | None:
    if present.sum() < 2:
        return None
    if num_classes == 2:
        return roc_auc(positive=y == 1, scores=scores[:, 1])
    per_class = [
        roc_auc(positive=y == c, scores=scores[:, c]) for c in range(num_classes) if present[c]
    ]
    return float(np.mean(per_class))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


#: Name of the convergence rule, recorded in ``metrics.json``'s ``convergence_criteria``.
CONVERGENCE_RULE = "trend-window"
#: Default trailing window (rounds) over which a curve's trend and scatter are judged.
CONV_WINDOW = 5
#: Default tolerances and patience (runs and benchmark suites share them): sized so that a
#: curve flattened under DP noise of about +-0.02 per round is found and one still climbing
#: a few hundredths per round is not.
CONV_ACC_TOL = 0.025
CONV_LOSS_TOL = 0.05
CONV_PATIENCE = 2
#: How many standard errors of the fitted trend are put down to noise.
CONV_NOISE_SIGMAS = 2.0


def flat_windows(values: Sequence[float], *, tol: float, window: int) -> np.ndarray:
    """Which trailing windows of a curve are flat, by a least-squares line through each.

    For the window of rounds ``e - window + 1 .. e`` the line ``y = a + b t`` is fitted by
    least squares; ``s`` is the residual standard deviation (``window - 2`` degrees of
    freedom) and ``se = s / sqrt(sum (t - mean t)^2)`` the standard error of the slope. The
    window is flat when both hold:

    - scatter: ``s <= tol``. Round-to-round noise is allowed, but only up to the tolerance;
      a curve that swings (e.g. a loss alternating 2.0, 0.7, 2.0, ...) has a near-zero slope
      and a large ``s``, and is not flat.
    - trend: ``|b| (window - 1) <= tol + 2 se (window - 1)``: the change the line predicts
      across the window is at most the tolerance, to within two standard errors. Under noise
      the fitted change across the window of a flat curve is itself noisy (standard
      deviation about 1.3 s for windows of 4 to 6 rounds), so a bare
      ``|b| (window - 1) <= tol`` would often refuse a flattened noisy curve; the margin is
      bounded (``s <= tol``), so a climb of several tolerances per window still fails.

    A window holding a NaN or infinite value is never flat.

    Args:
        values: The curve, one value per round.
        tol: Tolerance in the curve's units, finite and >= 0.
        window: Rounds per window, >= 3 (a line through two points has no residual).

    Returns:
        Booleans, one per window: entry ``i`` is the window ending at round ``i + window``
        (rounds numbered from 1). Empty when there are fewer than ``window`` rounds.

    """
    y = np.asarray(values, dtype=np.float64)
    n = y.size - window + 1
    if n <= 0:
        return np.zeros(0, dtype=bool)
    t = np.arange(window, dtype=np.float64) - (window - 1) / 2.0  # centred: a and b decouple
    stt = float(t @ t)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        w = y[i : i + window]
        if not np.all(np.isfinite(w)):
            continue
        slope = float(t @ (w - w.mean())) / stt
        resid = w - w.mean() - slope * t
        s = math.sqrt(float(resid @ resid) / (window - 2))
        se = s / math.sqrt(stt)
        span = window - 1
        out[i] = s <= tol and abs(slope) * span <= tol + CONV_NOISE_SIGMAS * se * span
    return out


def convergence_criteria(
    *, metric: str, acc_tol: float, loss_tol: float, patience: int, window: int
) -> dict[str, Any]:
    """The rule and every parameter of it, as ``metrics.json`` records them."""
    return {
        "rule": CONVERGENCE_RULE,
        "metric": metric,
        "window": window,
        "patience": patience,
        "acc_tol": acc_tol,
        "loss_tol": loss_tol,
        "noise_sigmas": CONV_NOISE_SIGMAS,
    }


def detect_convergence(
    *,
    accuracies: Sequence[float],
    losses: Sequence[float],
    seconds: Sequence[float],
    acc_tol: float,
    loss_tol: float,
    patience: int,
    window: int = CONV_WINDOW,
) -> dict[str, Any] | None:
    """First round of the plateau: where both curves have flattened, robustly to noise.

    Rounds are numbered from 1; ``accuracies[r-1]`` (the primary metric: accuracy, or Dice
    for segmentation), ``losses[r-1]`` and ``seconds[r-1]`` belong to round r, and
    ``seconds[r-1]`` is the wall-clock duration of round r alone. A window of ``window``
    consecutive rounds is *flat* when it is flat for the primary metric (tolerance
    ``acc_tol``) and for the loss (tolerance ``loss_tol``) by :func:`flat_windows`: a
    least-squares line through the window moves by at most the tolerance across it (to within
    two standard errors of its slope), and the points scatter around the line by at most the
    tolerance. The run has converged once ``patience`` consecutive windows are
    flat; the convergence round is the first round of the first of them, where the plateau
    begins. Comparing consecutive rounds (the rule before schema 2.3) fails under DP noise:
    every round jitters by more than a tight tolerance even after the curve has flattened;
    a line fitted over several rounds averages the jitter out, and the scatter bound still
    refuses a curve that swings.

    Example (``window=4``, ``patience=2``, ``acc_tol=0.02``, losses flat): accuracies
    0.50, 0.70, 0.80, 0.83, 0.81, 0.84, 0.82, 0.83. Rounds 1-4 rise by 0.33 across the
    window (slope 0.109/round): not flat. Rounds 2-5: slope 0.036, scatter s = 0.043 > 0.02:
    not flat. Rounds 3-6 (0.80, 0.83, 0.81, 0.84): slope 0.010, so 0.030 across the window,
    at most 0.02 + 2 se x 3 = 0.02 + 2 x (0.0158 / sqrt(5)) x 3 = 0.062, and s = 0.0158 <=
    0.02: flat. Rounds 4-7: slope 0.000, s = 0.0158: flat. Two flat windows in
    a row: convergence at round 3. The consecutive-round rule with a tolerance of 0.02 and
    patience 2 would never fire: only one change (0.82 to 0.83) is below 0.02.

    Args:
        accuracies: Per-round primary metric.
        losses: Per-round loss.
        seconds: Per-round wall-clock seconds (non-negative).
        acc_tol: Primary-metric tolerance, finite and >= 0, in its units.
        loss_tol: Loss tolerance, finite and >= 0, in its units.
        patience: Number of consecutive flat windows required, >= 1.
        window: Rounds per window, >= 3.

    Returns:
        ``{"round": r, "seconds": sum(seconds[:r])}`` (the wall time to reach the plateau), or
        None when no such round exists yet (including fewer than ``window + patience - 1``
        rounds).

    Raises:
        ConfigError: A tolerance, ``patience`` or ``window`` is out of range.
        DataError: The sequences differ in length or a duration is negative or not finite.

    """
    for name, tol in (("acc_tol", acc_tol), ("loss_tol", loss_tol)):
        if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
            raise ConfigError(f"`{name}` must be a finite number >= 0 (got {tol!r}).")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"`patience` must be a positive int (got {patience!r}).")
    if isinstance(window, bool) or not isinstance(window, int) or window < 3:
        raise ConfigError(f"`window` must be an int of at least 3 (got {window!r}).")
    acc = np.asarray(accuracies, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    secs = np.asarray(seconds, dtype=np.float64)
    if not acc.ndim == loss.ndim == secs.ndim == 1 or not acc.size == loss.size == secs.size:
        raise DataError(
            "`accuracies`, `losses` and `seconds` must be sequences of equal length "
            f"(got {acc.size}, {loss.size}, {secs.size})."
        )
    if not np.all(np.isfinite(secs)) or np.any(secs < 0):
        raise DataError("`seconds` must hold finite, non-negative durations.")

    flat = flat_windows(acc, tol=acc_tol, window=window) & flat_windows(
        loss, tol=loss_tol, window=window
    )
    run = 0
    for i, ok in enumerate(flat):
        run = run + 1 if ok else 0
        if run == patience:
            first_round = i + 2 - patience  # first round of the first flat window (from 1)
            return {"round": first_round, "seconds": float(secs[:first_round].sum())}
    return None


def site_fairness(
    clients: Sequence[Mapping[str, Any]],
    *,
    metric: str,
    num_heldout: Mapping[int, int] | None = None,
    twin: bool = False,
) -> dict[str, Any]:
    """How evenly one round's model serves the sites: worst, best, spread, std, mean.

    Computed over the sites that reported a finite held-out ``metric`` that round; every
    site is unweighted (a small site counts as much as a large one: fairness is about sites,
    not records). The others are listed by why they are left out:

    - ``no_heldout``: the site has no held-out records (its ``num_samples`` is 0, or it
      reported nothing and ``num_heldout`` gives 0), so it has no figure to report;
    - ``no_metrics``: it has held-out records but reported no figure that round (it failed
      or dropped out; for twins, no twin was fine-tuned that round);
    - ``not_finite``: its figure is NaN or infinite (a diverged model), which has no rank.

    Ties pick the smallest ``client_id`` for both the worst and the best site.

    Args:
        clients: A round's ``clients`` rows of ``metrics.json`` (``client_id``, the site's
            held-out figures, optionally ``num_samples`` and ``twin``).
        metric: The figure to compare (the task's primary metric: ``accuracy`` or
            ``mean_dice``).
        num_heldout: Held-out size per site, for sites whose row carries no ``num_samples``.
        twin: Compare the sites' twins (``row["twin"][metric]``) instead of the served model.

    Returns:
        ``{"metric", "sites" (ids included), "mean", "std" (population, over sites),
        "spread" (max - min), "worst_site" and "best_site" ({"client_id", "value"}),
        "excluded" ({"no_heldout", "no_metrics", "not_finite"}: lists of ids)}``; the figures
        are None when no site is included.

    """
    included: list[tuple[float, int]] = []
    excluded: dict[str, list[int]] = {"no_heldout": [], "no_metrics": [], "not_finite": []}
    for row in clients:
        sid = int(row["client_id"])
        source = (row.get("twin") or {}) if twin else row
        value = source.get(metric)
        size = source.get("num_samples", row.get("num_samples"))
        if size is None and num_heldout is not None:
            size = num_heldout.get(sid)
        if size == 0:
            excluded["no_heldout"].append(sid)
        elif value is None:
            excluded["no_metrics"].append(sid)
        elif not (isinstance(value, numbers.Real) and math.isfinite(value)):
            excluded["not_finite"].append(sid)
        else:
            included.append((float(value), sid))
    out: dict[str, Any] = {"metric": metric, "sites": sorted(sid for _, sid in included)}
    if included:
        values = np.array([v for v, _ in included])
        worst = min(included)
        best = min(included, key=lambda vs: (-vs[0], vs[1]))
        out |= {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "spread": best[0] - worst[0],
            "worst_site": {"client_id": worst[1], "value": worst[0]},
            "best_site": {"client_id": best[1], "value": best[0]},
        }
    else:
        out |= dict.fromkeys(("mean", "std", "spread", "worst_site", "best_site"))
    return out | {"excluded": excluded}
