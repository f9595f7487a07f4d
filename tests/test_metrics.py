"""Classification metrics against scikit-learn (convergence: tests/test_convergence.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from securefed.errors import ConfigError, DataError
from securefed.metrics import classification_metrics, roc_auc

# scikit-learn, the reference, warns about the very edge cases these tests compare on.
pytestmark = [
    pytest.mark.filterwarnings("ignore:A single label was found:UserWarning"),
    pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning"),
]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _case(seed: int, *, n: int, k: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    if ties:
        logits = np.round(logits, 0)  # many exact ties, as with quantised outputs
    return y, _softmax(logits)


def _assert_matches_sklearn(y, probs, k):
    result = classification_metrics(y_true=y, probs=probs, num_classes=k)
    pred = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(
        y, pred, labels=range(k), average=None, zero_division=0
    )
    macro = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)

    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert result["macro_precision"] == pytest.approx(macro[0])
    assert result["macro_recall"] == pytest.approx(macro[1])
    assert result["macro_f1"] == pytest.approx(macro[2])
    assert [c["precision"] for c in result["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in result["per_class"]] == pytest.approx(r)
    assert [c["f1"] for c in result["per_class"]] == pytest.approx(f)
    assert [c["support"] for c in result["per_class"]] == s.tolist()
    assert result["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    return result


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_binary_metrics_and_auc_match_sklearn(seed, ties):
    # Prepare
    y, probs = _case(seed, n=200, k=2, ties=ties)

    # Execute
    result = _assert_matches_sklearn(y, probs, 2)

    # Assert
    assert result["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_multiclass_metrics_and_macro_ovr_auc_match_sklearn(seed, ties):
    # Prepare
    y, probs = _case(seed, n=300, k=5, ties=ties)

    # Execute
    result = _assert_matches_sklearn(y, probs, 5)

    # Assert
    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=range(5))
    assert result["auc"] == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 60), k=st.integers(2, 6))
def test_metrics_match_sklearn_on_small_samples_with_absent_classes(seed, n, k):
    # Prepare: small n makes absent and never-predicted classes common
    y, probs = _case(seed, n=n, k=k)

    # Execute
    result = _assert_matches_sklearn(y, probs, k)

    # Assert: AUC over the present classes, each scored one-vs-rest
    present = np.unique(y)
    if present.size < 2:
        assert result["auc"] is None
    elif k == 2:
        assert result["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    else:
        per_class = [skm.roc_auc_score(y == c, probs[:, c]) for c in present]
        assert result["auc"] == pytest.approx(np.mean(per_class))


def test_result_is_plain_json():
    # Prepare
    y, probs = _case(0, n=50, k=3)

    # Execute
    result = classification_metrics(y_true=y.astype(np.int32), probs=probs, num_classes=3)

    # Assert
    assert json.loads(json.dumps(result)) == result
    assert type(result["accuracy"]) is float
    assert type(result["per_class"][0]["support"]) is int
    assert type(result["confusion_matrix"][0][0]) is int
    assert result["n_samples"] == 50


def test_never_predicted_class_has_zero_precision_not_nan():
    # Prepare: class 1 is never predicted, class 2 never occurs nor is predicted
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1, 0.0]] * 4)

    # Execute
    result = classification_metrics(y_true=y, probs=probs, num_classes=3)

    # Assert
    assert result["per_class"][1] == {
        "class": 1,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 2,
    }
    assert result["macro_precision"] == pytest.approx(0.25)  # (0.5 + 0) / 2, class 2 unseen
    assert result["balanced_accuracy"] == pytest.approx(0.5)
    assert result["auc"] == pytest.approx(0.5)  # constant scores: every pair tied


def test_single_class_truth_has_undefined_auc():
    # Execute
    result = classification_metrics(
        y_true=np.array([1, 1, 1]), probs=np.array([[0.2, 0.8]] * 3), num_classes=2
    )

    # Assert
    assert result["auc"] is None
    assert result["accuracy"] == 1.0


def test_roc_auc_rank_sum_on_a_hand_checked_example():
    # Prepare: positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs won 1 + 1 + 0.5 + 1 of 4
    positive = np.array([True, True, False, False])
    scores = np.array([0.8, 0.4, 0.4, 0.1])

    # Execute / Assert
    assert roc_auc(positive=positive, scores=scores) == pytest.approx(3.5 / 4)
    assert roc_auc(positive=np.array([True, True]), scores=np.array([0.1, 0.2])) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"probs": np.ones((3, 3))}, DataError, r"must have shape \(3, 2\)"),
        ({"y_true": np.array([0, 2, 1])}, DataError, r"must be in \[0, 2\)"),
        ({"y_true": np.array([0.0, 1.0, 1.0])}, DataError, "integer"),
        ({"probs": np.array([[np.nan, 1]] * 3)}, DataError, "NaN"),
        ({"y_true": np.array([], int), "probs": np.ones((0, 2))}, DataError, "empty"),
        ({"num_classes": 1, "probs": np.ones((3, 1))}, ConfigError, "`num_classes`"),
    ],
)
def test_bad_inputs_are_rejected(kwargs, error, expected):
    # Prepare
    call = {"y_true": np.array([0, 1, 1]), "probs": np.full((3, 2), 0.5), "num_classes": 2}
    call |= kwargs

    # Execute / Assert
    with pytest.raises(error, match=expected):
        classification_metrics(**call)
