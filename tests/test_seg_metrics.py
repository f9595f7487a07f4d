"""Segmentation metrics: hand-counted cases, empty-class conventions, BraTS regions, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.errors import ConfigError, DataError
from securefed.seg_metrics import SEG_HEADLINE_METRICS, segmentation_metrics

# Two 1x6 "volumes". Subject 0: truth 0 1 1 2 3 3, prediction 0 1 2 2 3 0.
# Subject 1: truth all background, prediction one false class-1 voxel.
TRUTH = np.array([[[0, 1, 1, 2, 3, 3]], [[0, 0, 0, 0, 0, 0]]])
PRED = np.array([[[0, 1, 2, 2, 3, 0]], [[0, 0, 0, 0, 0, 1]]])


def test_per_class_scores_match_hand_counts():
    # Execute
    result = segmentation_metrics(y_true=TRUTH, y_pred=PRED, num_classes=4)
    per_class = {c["class"]: c for c in result["per_class"]}

    # Assert, counting voxels by hand:
    # class 1, subject 0: tp 1, fp 0, fn 1 -> Dice 2/3, IoU 1/2, sens 1/2, spec 4/4
    #          subject 1: tp 0, fp 1, fn 0 -> Dice 0, IoU 0, sens undefined, spec 5/6
    assert per_class[1]["dice"] == pytest.approx((2 / 3 + 0) / 2)
    assert per_class[1]["iou"] == pytest.approx((1 / 2 + 0) / 2)
    assert per_class[1]["sensitivity"] == pytest.approx(1 / 2)
    assert per_class[1]["specificity"] == pytest.approx((1 + 5 / 6) / 2)
    assert per_class[1]["support"] == 1
    # class 2, subject 0: tp 1, fp 1, fn 0 -> Dice 2/3, IoU 1/2; subject 1: absent in both -> 1
    assert per_class[2]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert per_class[2]["iou"] == pytest.approx((1 / 2 + 1) / 2)
    assert per_class[2]["sensitivity"] == pytest.approx(1.0)
    assert per_class[2]["specificity"] == pytest.approx((4 / 5 + 1) / 2)
    # class 0, subject 0: tp 1, fp 1, fn 0 -> Dice 2/3; subject 1: tp 5, fn 1 -> Dice 10/11
    assert per_class[0]["dice"] == pytest.approx((2 / 3 + 10 / 11) / 2)
    assert per_class[0]["sensitivity"] == pytest.approx((1 + 5 / 6) / 2)
    # background fills subject 1 entirely, so its specificity there is undefined
    assert per_class[0]["specificity"] == pytest.approx(4 / 5)
    # class 3, subject 0: tp 1, fn 1 -> Dice 2/3; subject 1: absent in both -> 1
    foreground = [(2 / 3 + 0) / 2, (2 / 3 + 1) / 2, (2 / 3 + 1) / 2]
    assert result["mean_dice"] == pytest.approx(np.mean(foreground))
    assert result["n_samples"] == 2


def test_brats_regions_match_hand_counts():
    # Execute
    result = segmentation_metrics(
        y_true=TRUTH, y_pred=PRED, num_classes=4, label_convention="brats"
    )

    # Assert
    # ET = {3}: subject 0 tp 1, fn 1 -> 2/3; subject 1 absent in both -> 1
    assert result["dice_et"] == pytest.approx((2 / 3 + 1) / 2)
    # TC = {1, 3}: subject 0 truth {1,2,4,5}, prediction {1,4} -> tp 2, fn 2 -> Dice 2/3,
    # IoU 1/2; subject 1: a predicted core voxel with no true core -> 0
    assert result["dice_tc"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["iou_tc"] == pytest.approx((1 / 2 + 0) / 2)
    # WT = {1, 2, 3}: subject 0 truth {1..5}, prediction {1..4} -> tp 4, fn 1 -> Dice 8/9
    assert result["dice_wt"] == pytest.approx((8 / 9 + 0) / 2)
    assert result["regions"]["wt"]["sensitivity"] == pytest.approx(4 / 5)
    assert result["regions"]["wt"]["support"] == 1


def test_empty_truth_and_empty_prediction_is_a_perfect_score():
    # Prepare: nothing but background, predicted perfectly
    empty = np.zeros((3, 4, 4, 4), dtype=np.int64)

    # Execute
    result = segmentation_metrics(
        y_true=empty, y_pred=empty, num_classes=4, label_convention="brats"
    )

    # Assert
    assert result["mean_dice"] == result["mean_iou"] == 1.0
    assert result["dice_et"] == result["dice_tc"] == result["dice_wt"] == 1.0
    for cls in result["per_class"][1:]:
        assert cls["sensitivity"] is None, "undefined without any true voxel"
        assert cls["specificity"] == 1.0 and cls["support"] == 0
    assert result["per_class"][0]["specificity"] is None, "background fills every volume"


def test_missing_a_class_everywhere_scores_zero_for_it():
    # Prepare: class 1 present in truth, never predicted
    truth = np.zeros((2, 3, 3), dtype=np.int64)
    truth[:, 1, 1] = 1

    # Execute
    result = segmentation_metrics(y_true=truth, y_pred=np.zeros_like(truth), num_classes=2)

    # Assert
    assert result["per_class"][1]["dice"] == 0.0
    assert result["per_class"][1]["sensitivity"] == 0.0
    assert result["mean_dice"] == 0.0


def test_without_brats_the_headline_keys_exist_and_are_none():
    # Execute
    result = segmentation_metrics(y_true=TRUTH, y_pred=PRED, num_classes=4)

    # Assert
    for key in SEG_HEADLINE_METRICS:
        if key != "loss":
            assert key in result
    assert result["dice_et"] is None and result["regions"] is None
    assert json.loads(json.dumps(result)) == result


def test_each_subject_counts_once_whatever_its_size():
    # Prepare: a large tumour found perfectly, a one-voxel tumour missed
    truth = np.zeros((2, 10, 10), dtype=np.int64)
    truth[0, :8, :8] = 1
    truth[1, 0, 0] = 1
    pred = truth.copy()
    pred[1, 0, 0] = 0

    # Execute
    result = segmentation_metrics(y_true=truth, y_pred=pred, num_classes=2)

    # Assert: per-subject averaging gives 0.5, voxel pooling would give 128/129
    assert result["per_class"][1]["dice"] == pytest.approx(0.5)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    k=st.integers(2, 4),
    shape=st.sampled_from([(5,), (3, 4), (2, 3, 2)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_scores_agree_with_scikit_learn_per_subject(n, k, shape, seed):
    # Prepare
    from sklearn.metrics import f1_score, jaccard_score, recall_score

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, (n, *shape))
    pred = rng.integers(0, k, (n, *shape))

    # Execute
    result = segmentation_metrics(y_true=truth, y_pred=pred, num_classes=k)

    # Assert: Dice is the binary F1 and IoU the Jaccard index of "is class c", per subject
    for c in range(k):
        dice, iou, sens = [], [], []
        for t, p in zip(truth.reshape(n, -1) == c, pred.reshape(n, -1) == c, strict=True):
            dice.append(f1_score(t, p, zero_division=1.0))
            iou.append(jaccard_score(t, p, zero_division=1.0))
            if t.any():
                sens.append(recall_score(t, p))
        scores = result["per_class"][c]
        assert scores["dice"] == pytest.approx(np.mean(dice))
        assert scores["iou"] == pytest.approx(np.mean(iou))
        if sens:
            assert scores["sensitivity"] == pytest.approx(np.mean(sens))
        else:
            assert scores["sensitivity"] is None
        assert 0.0 <= scores["iou"] <= scores["dice"] <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"y_pred": PRED[:1]}, DataError, "must have the same shape"),
        ({"y_true": TRUTH[0, 0], "y_pred": PRED[0, 0]}, DataError, r"shape \(N, \*spatial\)"),
        ({"y_true": TRUTH.astype(float)}, DataError, "`y_true` must be an integer array"),
        ({"y_pred": PRED + 1}, DataError, r"`y_pred` labels must be in \[0, 4\)"),
        ({"y_true": TRUTH - 1}, DataError, r"`y_true` labels must be in \[0, 4\) \(got \[-1"),
        (
            {"y_true": np.zeros((0, 2), int), "y_pred": np.zeros((0, 2), int)},
            DataError,
            "empty",
        ),
        ({"num_classes": 1}, ConfigError, "`num_classes` must be an int of at least 2"),
        ({"label_convention": "kits"}, ConfigError, "`label_convention` must be None or 'brats'"),
        (
            {"num_classes": 5, "label_convention": "brats"},
            ConfigError,
            "'brats' needs num_classes=4",
        ),
    ],
)
def test_malformed_inputs_are_refused(kwargs, error, expected):
    # Prepare
    call = {"y_true": TRUTH, "y_pred": PRED, "num_classes": 4} | kwargs

    # Execute / Assert
    with pytest.raises(error, match=expected):
        segmentation_metrics(**call)


def test_voxel_level_figures_pool_tumour_vs_background_over_every_voxel():
    # Two subjects of 10 voxels; tumour = any label > 0, whatever the class.
    truth = np.array([[0, 0, 0, 0, 0, 0, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    pred = np.array([[0, 0, 0, 0, 0, 1, 2, 2, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 2, 2]])
    # tp 3 (the 1 predicted 2 counts: it is tumour), fn 1, fp 1 + 2, tn 5 + 8
    out = segmentation_metrics(y_true=truth, y_pred=pred, num_classes=4)

    assert out["voxel_sensitivity"] == pytest.approx(3 / 4)
    assert out["voxel_specificity"] == pytest.approx(13 / 16)
    assert out["voxel_f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    assert out["voxel_iou"] == pytest.approx(3 / (3 + 3 + 1))
    for key in ("mean_sensitivity", "mean_specificity"):
        assert 0 <= out[key] <= 1
