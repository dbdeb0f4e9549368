import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tabular.errors import DataError
from tabular.metrics import (
    MetricWarning,
    metrics_at_threshold,
    pauc80,
    pr_auc,
    roc_auc,
    summarize,
    threshold_for_sensitivity,
)


def test_pauc80_hand_worked_step():
    # y = [1, 1, 0, 0, 0], p = [0.9, 0.3, 0.5, 0.2, 0.1].
    # Kaggle flips classes: benign is "positive" (3 of them), score -p. Walking p upwards:
    # 0.1 b -> (fpr 0, tpr 1/3); 0.2 b -> (0, 2/3); 0.3 m -> (1/2, 2/3); 0.5 b -> (1/2, 1);
    # 0.9 m -> (1, 1). At fpr 0.2 the curve is flat at tpr 2/3: area = 0.2 * 2/3.
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.3, 0.5, 0.2, 0.1]
    assert pauc80(y, p) == pytest.approx(0.2 * 2 / 3)


def test_pauc80_hand_worked_tie_interpolated():
    # y = [1, 1, 0, 0], p = [0.9, 0.5, 0.5, 0.1]. 2 benign, 2 malignant.
    # 0.1 b -> (0, 1/2); the tie at 0.5 (one b, one m) moves diagonally to (1/2, 1);
    # 0.9 m -> (1, 1).
    # At fpr 0.2 on the diagonal: tpr = 1/2 + (0.2 / 0.5) * 1/2 = 0.7.
    # Trapezoid from 0 to 0.2: (0.5 + 0.7) / 2 * 0.2 = 0.12.
    assert pauc80([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.12)


def test_pauc80_perfect_wrong_and_all_tied():
    y = np.array([0] * 50 + [1] * 10)
    good = np.r_[np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 10)]
    assert pauc80(y, good) == pytest.approx(0.2)
    assert pauc80(y, -good) == pytest.approx(0.0)
    # All scores tied: the ROC is the diagonal, whose area up to 0.2 is 0.2^2 / 2.
    assert pauc80(y, np.zeros(60)) == pytest.approx(0.02)


def test_pauc80_random_scores_average_002():
    rng = np.random.default_rng(0)
    values = []
    for _ in range(200):
        y = (rng.random(400) < 0.2).astype(int)
        y[0], y[1] = 0, 1
        values.append(pauc80(y, rng.random(400)))
    assert np.mean(values) == pytest.approx(0.02, abs=0.003)
    assert 0.0 <= min(values) and max(values) <= 0.2


def test_pauc80_is_not_mcclish_standardised():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(int)
    p = y * 0.5 + rng.random(300)
    ours = pauc80(y, p)
    mcclish = roc_auc_score(y, p, max_fpr=0.2)
    assert 0 < ours < 0.2
    assert ours != pytest.approx(mcclish)


def test_pauc80_invariant_to_monotone_transform():
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.3).astype(int)
    p = rng.random(200) + 0.3 * y
    assert pauc80(y, p) == pytest.approx(pauc80(y, np.log(p + 1) * 7))


def test_roc_and_pr_auc():
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, p) == pytest.approx(0.75)
    assert 0 < pr_auc(y, p) <= 1
    assert pr_auc([0, 1], [0.1, 0.9]) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", [pauc80, roc_auc, pr_auc])
def test_one_class_gives_nan_and_warning(metric):
    with pytest.warns(MetricWarning, match="only one class"):
        assert math.isnan(metric([0, 0, 0], [0.1, 0.2, 0.3]))


@pytest.mark.parametrize("metric", [pauc80, roc_auc, pr_auc, threshold_for_sensitivity])
def test_bad_inputs_raise(metric):
    with pytest.raises(DataError, match="lengths differ, got 3 targets and 2 scores"):
        metric([0, 1, 0], [0.1, 0.2])
    with pytest.raises(DataError, match=r"y_true: expected 0/1 targets.*2"):
        metric([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="y_score: expected finite scores, got nan"):
        metric([0, 1, 0], [0.1, float("nan"), 0.3])
    with pytest.raises(DataError, match="y_true: expected a 1-D array"):
        metric([[0, 1]], [[0.1, 0.2]])


def test_min_tpr_out_of_range():
    with pytest.raises(DataError, match="min_tpr: expected a value in \\[0, 1\\), got 1.5"):
        pauc80([0, 1], [0.1, 0.2], min_tpr=1.5)


def test_threshold_for_sensitivity():
    y = np.array([1] * 20 + [0] * 5)
    p = np.r_[np.arange(20, 0, -1) / 20, np.full(5, 0.5)]
    # 0.95 * 20 = 19 positives must be at or above: the 19th highest positive score is 2/20.
    t = threshold_for_sensitivity(y, p, 0.95)
    assert t == pytest.approx(0.1)
    assert metrics_at_threshold(y, p, t)["recall"] >= 0.95
    # Any larger threshold would miss the target.
    assert metrics_at_threshold(y, p, t + 1e-9)["recall"] < 0.95
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(0.05)
    with pytest.raises(DataError, match="sensitivity: expected a value in \\(0, 1\\], got 0"):
        threshold_for_sensitivity(y, p, 0)
    with pytest.warns(MetricWarning, match="no positive"):
        assert math.isnan(threshold_for_sensitivity([0, 0], [0.1, 0.2]))


def test_metrics_at_threshold_confusion():
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.3, 0.5, 0.2, 0.1]
    m = metrics_at_threshold(y, p, 0.4)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.5)
    assert math.isnan(metrics_at_threshold(y, p, 2.0)["precision"])
    with pytest.raises(DataError, match="threshold: expected a finite number, got nan"):
        metrics_at_threshold(y, p, float("nan"))


def test_summarize_json_ready():
    rng = np.random.default_rng(3)
    y = (rng.random(100) < 0.3).astype(int)
    p = rng.random(100) + 0.5 * y
    s = summarize(y, p)
    for key in (
        "pauc80",
        "roc_auc",
        "pr_auc",
        "threshold",
        "target_sensitivity",
        "accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "tp",
        "fp",
        "tn",
        "fn",
    ):
        assert key in s
    assert s["target_sensitivity"] == 0.95
    assert s["recall"] >= 0.95
    json.dumps(s, allow_nan=False)
    fixed = summarize(y, p, threshold=0.5)
    assert fixed["threshold"] == 0.5 and fixed["target_sensitivity"] is None
    with pytest.warns(MetricWarning):
        one = summarize([0, 0, 0], [0.1, 0.2, 0.3])
    assert one["pauc80"] is None
    json.dumps(one, allow_nan=False)
