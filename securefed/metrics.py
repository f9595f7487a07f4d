"""Classification metrics and convergence detection, in plain numpy with JSON-ready results."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from securefed.errors import ConfigError, DataError

__all__ = ["HEADLINE_METRICS", "classification_metrics", "detect_convergence", "roc_auc"]

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


def detect_convergence(
    *,
    accuracies: Sequence[float],
    losses: Sequence[float],
    seconds: Sequence[float],
    acc_tol: float,
    loss_tol: float,
    patience: int,
) -> dict[str, Any] | None:
    """First round from which accuracy and loss stay flat for ``patience`` rounds.

    Rounds are numbered from 1; ``accuracies[r-1]``, ``losses[r-1]`` and ``seconds[r-1]``
    belong to round r, and ``seconds[r-1]`` is the wall-clock duration of round r alone (not
    a running total). Round r >= 2 is *stable* when both
    ``|accuracies[r-1] - accuracies[r-2]| < acc_tol`` and
    ``|losses[r-1] - losses[r-2]| < loss_tol``. The convergence round is the smallest r such
    that rounds r+1, ..., r+patience are all stable: round r is where the plateau begins,
    the first round after which nothing changed by a tolerance or more for ``patience``
    consecutive rounds. A NaN or infinite value is never stable.

    Example: accuracies 0.50, 0.70, 0.80, 0.805, 0.806, 0.807 with ``acc_tol=0.01``
    (losses flat) and ``patience=3``: rounds 4, 5, 6 are stable, so convergence is at round 3.

    Args:
        accuracies: Per-round accuracy.
        losses: Per-round loss.
        seconds: Per-round wall-clock seconds (non-negative).
        acc_tol: Accuracy tolerance, >= 0 (0: no change is small enough, never converges).
        loss_tol: Loss tolerance, >= 0 (likewise).
        patience: Number of consecutive stable rounds required, >= 1.

    Returns:
        ``{"round": r, "seconds": sum(seconds[:r])}`` (the wall time to reach the plateau), or
        None when no such round exists yet (including fewer than ``patience + 1`` rounds).

    Raises:
        ConfigError: A tolerance or ``patience`` is out of range.
        DataError: The sequences differ in length or a duration is negative or not finite.

    """
    for name, tol in (("acc_tol", acc_tol), ("loss_tol", loss_tol)):
        if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
            raise ConfigError(f"`{name}` must be a finite number >= 0 (got {tol!r}).")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ConfigError(f"`patience` must be a positive int (got {patience!r}).")
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

    with np.errstate(invalid="ignore"):
        # stable[i] refers to round i + 2: the change from round i + 1 to round i + 2.
        stable = (np.abs(np.diff(acc)) < acc_tol) & (np.abs(np.diff(loss)) < loss_tol)
    run = 0
    for i, ok in enumerate(stable):
        run = run + 1 if ok else 0
        if run == patience:
            first_round = i + 2 - patience  # round whose successor starts the stable stretch
            return {"round": first_round, "seconds": float(secs[:first_round].sum())}
    return None
