"""Segmentation metrics per class and per BraTS region, averaged over subjects (plain numpy)."""

from __future__ import annotations

from typing import Any

import numpy as np

from securefed.errors import ConfigError, DataError

__all__ = ["SEG_HEADLINE_METRICS", "SEG_LABEL_CONVENTIONS", "segmentation_metrics"]

#: The scalar figures tables and CSV files show for a segmentation model, in display order.
#: ``loss`` comes from the evaluation loop; the BraTS entries are None without that convention.
SEG_HEADLINE_METRICS = ("mean_dice", "mean_iou", "dice_et", "dice_tc", "dice_wt", "loss")

#: Accepted ``label_convention`` values.
SEG_LABEL_CONVENTIONS = (None, "brats")

# The BraTS evaluation regions over the "brats" labels (0 background, 1 necrotic core,
# 2 oedema, 3 enhancing tumour): enhancing tumour, tumour core, whole tumour.
_BRATS_REGIONS = {"et": (3,), "tc": (1, 3), "wt": (1, 2, 3)}


def segmentation_metrics(
    *,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    label_convention: str | None = None,
) -> dict[str, Any]:
    """Dice, IoU, sensitivity and specificity per class (and per BraTS region), per subject.

    Every figure is computed on each subject's volume and then averaged over subjects (the
    BraTS convention: each patient counts once, whatever the tumour size). For a class (or
    region) c in one subject, with voxel counts tp, fp, fn, tn of "is c":

    - Dice ``2tp / (2tp + fp + fn)`` and IoU ``tp / (tp + fp + fn)``. When c is absent from
      both the truth and the prediction, both are 1 (nothing to find, nothing found); when it
      is absent from the truth but predicted, both are 0.
    - sensitivity ``tp / (tp + fn)``: undefined when c is absent from the truth, and such
      subjects are left out of its average.
    - specificity ``tn / (tn + fp)``: undefined when c fills the whole volume in the truth,
      likewise left out.

    An average with no defined subject is None. ``mean_dice``, ``mean_iou``,
    ``mean_sensitivity`` and ``mean_specificity`` are the unweighted means of the per-class
    averages over the foreground classes 1 ... K-1 (the background would inflate them; a
    class whose average is None is left out). ``voxel_sensitivity``, ``voxel_specificity``,
    ``voxel_f1`` (the pooled Dice) and ``voxel_iou`` score foreground (any label > 0) against
    background over every voxel of the split pooled together: the voxel-level figures of
    detection papers (sensitivity and specificity None when undefined; F1 and IoU 1 when
    neither truth nor prediction has foreground). With ``label_convention="brats"`` (labels 0
    background, 1 necrotic core, 2 oedema, 3 enhancing tumour) the regions enhancing tumour
    ET = {3}, tumour core TC = {1, 3} and whole tumour WT = {1, 2, 3} are scored the same way and
    reported as ``dice_et``, ``iou_et``, ... (None without the convention, so the keys of
    :data:`SEG_HEADLINE_METRICS` except ``loss`` are always present).

    Per-site metrics are this function applied to each site's subjects.

    Args:
        y_true: (N, *spatial) integer label maps, values in [0, num_classes).
        y_pred: Predicted label maps (e.g. ``argmax`` of the logits), same shape.
        num_classes: K, at least 2 (class 0 is the background).
        label_convention: None or ``"brats"`` (needs K = 4).

    Returns:
        A dict of plain Python ints, floats, lists and None, ready for ``json.dump``: keys
        ``n_samples``, ``mean_dice``, ``mean_iou``, ``mean_sensitivity``,
        ``mean_specificity``, ``voxel_sensitivity``, ``voxel_specificity``, ``voxel_f1``,
        ``voxel_iou``, ``dice_et``, ``iou_et``, ``dice_tc``,
        ``iou_tc``, ``dice_wt``, ``iou_wt``, ``per_class`` (K dicts with ``class``, ``dice``,
        ``iou``, ``sensitivity``, ``specificity``, ``support``: the number of subjects whose
        truth contains the class) and ``regions`` (``{"et": {...}, "tc": ..., "wt": ...}``
        with the same per-region fields, or None without the BraTS convention).

    Raises:
        ConfigError: ``num_classes`` or ``label_convention`` is invalid.
        DataError: Shapes differ or are not (N, *spatial), labels are not integers or are out
            of range, or N = 0.

    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"`num_classes` must be an int of at least 2 (got {num_classes!r}).")
    if label_convention not in SEG_LABEL_CONVENTIONS:
        raise ConfigError(f"`label_convention` must be None or 'brats' (got {label_convention!r}).")
    if label_convention == "brats" and num_classes != 4:
        raise ConfigError(f"`label_convention` 'brats' needs num_classes=4 (got {num_classes}).")
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    for name, array in (("y_true", truth), ("y_pred", pred)):
        if array.ndim < 2 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"`{name}` must be an integer array of shape (N, *spatial) "
                f"(got dtype {array.dtype}, shape {array.shape})."
            )
    if truth.shape != pred.shape:
        raise DataError(
            f"`y_true` and `y_pred` must have the same shape (got {truth.shape} and {pred.shape})."
        )
    if truth.shape[0] == 0 or truth.size == 0:
        raise DataError(f"`y_true` is empty (shape {truth.shape}): no metrics for zero voxels.")
    for name, array in (("y_true", truth), ("y_pred", pred)):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(f"`{name}` labels must be in [0, {num_classes}) (got [{lo}, {hi}]).")

    n = truth.shape[0]
    k = num_classes
    # counts[s, t, p]: voxels of subject s with true class t predicted as p. One subject at a
    # time keeps memory at one volume, whatever N.
    counts = np.empty((n, k, k), dtype=np.int64)
    for s in range(n):
        codes = truth[s].reshape(-1).astype(np.int64) * k + pred[s].reshape(-1)
        counts[s] = np.bincount(codes, minlength=k * k).reshape(k, k)
    voxels = counts[0].sum()
    tp = np.einsum("scc->sc", counts)
    true_total = counts.sum(axis=2)  # tp + fn
    pred_total = counts.sum(axis=1)  # tp + fp
    per_class = _scores(tp=tp, true_total=true_total, pred_total=pred_total, voxels=voxels)

    result: dict[str, Any] = {
        "n_samples": int(n),
        "mean_dice": float(np.mean([c["dice"] for c in per_class[1:]])),
        "mean_iou": float(np.mean([c["iou"] for c in per_class[1:]])),
        "mean_sensitivity": _mean_defined([c["sensitivity"] for c in per_class[1:]]),
        "mean_specificity": _mean_defined([c["specificity"] for c in per_class[1:]]),
        **_voxel_scores(counts),
    }
    regions = None
    if label_convention == "brats":
        regions = {}
        for region, members in _BRATS_REGIONS.items():
            inside = np.isin(np.arange(k), members)
            r_tp = counts[:, inside][:, :, inside].sum(axis=(1, 2))[:, None]
            r_true = counts[:, inside].sum(axis=(1, 2))[:, None]
            r_pred = counts[:, :, inside].sum(axis=(1, 2))[:, None]
            (scores,) = _scores(tp=r_tp, true_total=r_true, pred_total=r_pred, voxels=voxels)
            del scores["class"]
            regions[region] = scores
    for region in _BRATS_REGIONS:
        result[f"dice_{region}"] = None if regions is None else regions[region]["dice"]
        result[f"iou_{region}"] = None if regions is None else regions[region]["iou"]
    result["per_class"] = per_class
    result["regions"] = regions
    return result


def _scores(
    *, tp: np.ndarray, true_total: np.ndarray, pred_total: np.ndarray, voxels: int
) -> list[dict[str, Any]]:
    """Per-column (class) subject-averaged scores from (subjects, classes) voxel counts."""
    tp = tp.astype(np.float64)
    union = true_total + pred_total - tp  # tp + fp + fn
    empty = union == 0  # absent from truth and prediction: a perfect (vacuous) match
    dice = np.where(empty, 1.0, 2 * tp / np.maximum(true_total + pred_total, 1))
    iou = np.where(empty, 1.0, tp / np.maximum(union, 1))
    negatives = voxels - true_total  # tn + fp
    false_pos = pred_total - tp
    sens_defined = true_total > 0
    spec_defined = negatives > 0
    sensitivity = tp / np.maximum(true_total, 1)
    specificity = (negatives - false_pos) / np.maximum(negatives, 1)
    out = []
    for c in range(tp.shape[1]):
        out.append(
            {
                "class": c,
                "dice": float(dice[:, c].mean()),
                "iou": float(iou[:, c].mean()),
                "sensitivity": _mean_where(sensitivity[:, c], sens_defined[:, c]),
                "specificity": _mean_where(specificity[:, c], spec_defined[:, c]),
                "support": int(sens_defined[:, c].sum()),
            }
        )
    return out


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _voxel_scores(counts: np.ndarray) -> dict[str, float | None]:
    """Foreground (any label > 0) vs background, pooled over every voxel of every subject.

    The voxel-level figures detection papers report (sensitivity, specificity, F1, IoU of
    "is tumour"): one big confusion table, so large volumes weigh more than small ones, unlike
    the per-subject averages. F1 here is the pooled Dice of the foreground.
    """
    tp = int(counts[:, 1:, 1:].sum())
    fn = int(counts[:, 1:, 0].sum())
    fp = int(counts[:, 0, 1:].sum())
    tn = int(counts[:, 0, 0].sum())
    return {
        "voxel_sensitivity": tp / (tp + fn) if tp + fn else None,
        "voxel_specificity": tn / (tn + fp) if tn + fp else None,
        "voxel_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "voxel_iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
    }


def _mean_where(values: np.ndarray, defined: np.ndarray) -> float | None:
    return float(values[defined].mean()) if defined.any() else None
