"""Evaluation metrics for binary lesion classification (1 = malignant).

`pauc80` is the ISIC 2024 Kaggle metric: the area under the ROC curve above 80% true-positive
rate, range 0..0.2 (random about 0.02, perfect 0.2). It is *not* sklearn's
`roc_auc_score(max_fpr=...)`, which returns a McClish-standardised value.

Every function takes `y_true` (0/1) and `y_score` (higher = more likely malignant), one value per
row. A metric undefined on its input (one class only) gives NaN and a `MetricWarning`, not an
error, so that one unlucky fold does not stop a run; inputs that cannot be right (lengths that
differ, targets that are not 0/1, scores that are not finite) raise `DataError`.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview

# scikit-learn's metrics are imported inside the functions that use them: scoring a few lesions
# imports this module for its names only and should not pay for them.

log = logging.getLogger(__name__)

MIN_TPR = 0.80
# Equal-count bins of the expected calibration error and the reliability curve (DESIGN.md).
CALIBRATION_BINS = 10

__all__ = [
    "CALIBRATION_BINS",
    "MIN_TPR",
    "MetricWarning",
    "brier",
    "calibration",
    "calibration_bins",
    "check_targets",
    "expected_calibration_error",
    "metrics_at_threshold",
    "pauc80",
    "pr_auc",
    "roc_auc",
    "summarize",
    "threshold_for_sensitivity",
]


class MetricWarning(UserWarning):
    """A metric is undefined on its input (for instance a fold with one class) and is NaN."""


def check_targets(y_true) -> np.ndarray:
    """Validate 0/1 targets; shape (n,), n >= 1. Returns them as int8.

    Raises:
        DataError: not 1-D, empty, or a value other than 0 and 1 (naming some of them).
    """
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(f"y_true: expected a 1-D array, got shape {y.shape}")
    if len(y) == 0:
        raise DataError("y_true: got an empty array")
    try:
        yf = y.astype(float)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"y_true: expected 0/1 targets, got values such as {y[:3].tolist()!r}"
        ) from error
    bad = ~np.isin(yf, (0.0, 1.0))
    if bad.any():
        values = sorted({str(v) for v in y[bad].tolist()})
        raise DataError(f"y_true: expected 0/1 targets, got other values ({preview(values)})")
    return yf.astype(np.int8)


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to 1-D arrays (int8 targets, float64 scores)."""
    y = check_targets(y_true)
    p = np.asarray(y_score)
    if p.ndim != 1:
        raise DataError(f"y_score: expected a 1-D array, got shape {p.shape}")
    if len(y) != len(p):
        raise DataError(
            f"y_true and y_score: lengths differ, got {len(y)} targets and {len(p)} scores"
        )
    try:
        p = p.astype(float)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"y_score: expected numbers, got values such as {p[:3].tolist()!r}"
        ) from error
    nonfinite = ~np.isfinite(p)
    if nonfinite.any():
        rows = np.flatnonzero(nonfinite)
        raise DataError(
            f"y_score: expected finite scores, got {float(p[rows[0]])} at rows "
            f"{preview(rows.tolist())}"
        )
    return y, p


def _one_class(y: np.ndarray, metric: str) -> bool:
    if y.min() == y.max():
        message = f"{metric}: only one class present in y_true (all {int(y[0])}); returning NaN"
        warnings.warn(message, MetricWarning, stacklevel=3)
        log.warning(message)
        return True
    return False


def pauc80(y_true, y_score, min_tpr: float = MIN_TPR) -> float:
    """Partial ROC AUC above `min_tpr` true-positive rate, as the ISIC 2024 Kaggle metric.

    The Kaggle code flips the problem so that benign is the "positive" class (`v_gt = |y - 1|`,
    `v_pred = -score`); the malignant sensitivity >= 80% region then becomes false-positive rate
    <= 0.2. The ROC curve is interpolated linearly at that rate and the trapezoid area up to it
    returned, unstandardised.

    Args:
        y_true: shape (n,), 0/1.
        y_score: shape (n,), higher means more likely malignant.
        min_tpr: in [0, 1); default 0.80.

    Returns:
        A float in [0, 1 - min_tpr] (0..0.2 at the default; random ~0.02); NaN with a
        MetricWarning when only one class is present.

    Raises:
        DataError: lengths differ, targets not 0/1, scores not finite, `min_tpr` out of range.
    """
    from sklearn.metrics import auc, roc_curve

    if not 0.0 <= min_tpr < 1.0:
        raise DataError(f"min_tpr: expected a value in [0, 1), got {min_tpr!r}")
    y, p = _check(y_true, y_score)
    if _one_class(y, "pauc80"):
        return math.nan
    v_gt = np.abs(y - 1)
    v_pred = -p
    max_fpr = abs(1.0 - min_tpr)
    fpr, tpr, _ = roc_curve(v_gt, v_pred)
    if max_fpr == 1.0:
        return float(auc(fpr, tpr))
    stop = int(np.searchsorted(fpr, max_fpr, "right"))
    x_interp = [fpr[stop - 1], fpr[stop]]
    y_interp = [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return float(auc(fpr, tpr))


def roc_auc(y_true, y_score) -> float:
    """ROC AUC; NaN with a MetricWarning for one class. Raises DataError as `pauc80`."""
    from sklearn.metrics import roc_auc_score

    y, p = _check(y_true, y_score)
    if _one_class(y, "roc_auc"):
        return math.nan
    return float(roc_auc_score(y, p))


def pr_auc(y_true, y_score) -> float:
    """Area under the precision-recall curve as average precision (positives = malignant).

    NaN with a MetricWarning for one class. Raises DataError as `pauc80`.
    """
    from sklearn.metrics import average_precision_score

    y, p = _check(y_true, y_score)
    if _one_class(y, "pr_auc"):
        return math.nan
    return float(average_precision_score(y, p))


def threshold_for_sensitivity(y_true, y_score, sensitivity: float = 0.95) -> float:
    """The largest threshold `t` whose recall (share of positives with score >= t) >= `sensitivity`.

    Meant for out-of-fold predictions: the operating point that keeps the target sensitivity
    while flagging as few benign lesions as possible.

    Returns:
        A score value from `y_score`; NaN with a MetricWarning when there is no positive.

    Raises:
        DataError: `sensitivity` not in (0, 1], or bad arrays as in `pauc80`.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise DataError(f"sensitivity: expected a value in (0, 1], got {sensitivity!r}")
    y, p = _check(y_true, y_score)
    positives = np.sort(p[y == 1])[::-1]
    if len(positives) == 0:
        message = "threshold_for_sensitivity: no positive in y_true; returning NaN"
        warnings.warn(message, MetricWarning, stacklevel=2)
        log.warning(message)
        return math.nan
    # The k highest-scored positives must be flagged; the small tolerance keeps 0.95 * 20 = 19
    # from rounding up to 20 through floating-point error.
    k = max(1, math.ceil(sensitivity * len(positives) - 1e-9))
    return float(positives[k - 1])


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def metrics_at_threshold(y_true, y_score, threshold: float) -> dict:
    """Confusion-matrix figures when rows with `y_score >= threshold` are flagged malignant.

    Returns:
        dict with accuracy, precision, recall (sensitivity), specificity, f1 (floats; NaN where
        the denominator is zero) and tp, fp, tn, fn (ints).

    Raises:
        DataError: `threshold` is not a finite number, or bad arrays as in `pauc80`.
    """
    from sklearn.metrics import confusion_matrix

    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as error:
        raise DataError(f"threshold: expected a number, got {threshold!r}") from error
    if not math.isfinite(threshold):
        raise DataError(f"threshold: expected a finite number, got {threshold!r}")
    y, p = _check(y_true, y_score)
    (tn, fp), (fn, tp) = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).tolist()
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def calibration_bins(y_true, y_score, n_bins: int = CALIBRATION_BINS) -> pd.DataFrame:
    """The reliability curve: rows sorted by score, cut into `n_bins` equal-count bins.

    Returns:
        One row per non-empty bin: rows, mean_score, share_malignant (columns of those names).
    """
    y, p = _check(y_true, y_score)
    order = np.argsort(p, kind="stable")
    bins = [b for b in np.array_split(order, min(n_bins, len(order))) if len(b)]
    return pd.DataFrame(
        {
            "rows": [len(b) for b in bins],
            "mean_score": [float(p[b].mean()) for b in bins],
            "share_malignant": [float(y[b].mean()) for b in bins],
        }
    )


def expected_calibration_error(y_true, y_score, n_bins: int = CALIBRATION_BINS) -> float:
    """Mean |share malignant - mean score| over `n_bins` equal-count bins of the score, weighted by
    bin size (0 = calibrated). Only meaningful for a score that claims to be a probability.
    """
    bins = calibration_bins(y_true, y_score, n_bins)
    gap = (bins["share_malignant"] - bins["mean_score"]).abs()
    return float((gap * bins["rows"]).sum() / bins["rows"].sum())


def brier(y_true, y_score) -> float:
    """Mean squared difference between the 0/1 label and the score (`brier_score_loss`)."""
    from sklearn.metrics import brier_score_loss

    y, p = _check(y_true, y_score)
    if p.min() < 0 or p.max() > 1:
        return math.nan  # a score outside [0, 1] is not a probability
    return float(brier_score_loss(y, p))


def calibration(y_true, y_score) -> dict:
    """{brier, ece} of a score that claims to be a probability (JSON-ready)."""
    return {
        "brier": _json_ready(brier(y_true, y_score)),
        "ece": _json_ready(expected_calibration_error(y_true, y_score)),
    }


def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(y_true, y_score, threshold: float | None = None, sensitivity: float = 0.95) -> dict:
    """All figures at once, JSON-ready (NaN becomes None).

    Args:
        y_true, y_score: shape (n,) each.
        threshold: the operating threshold; None picks it on these predictions with
            `threshold_for_sensitivity(y_true, y_score, sensitivity)` (do that on out-of-fold
            predictions only).
        sensitivity: target sensitivity used when `threshold` is None; default 0.95.

    Returns:
        dict: n, positives, pauc80, roc_auc, pr_auc, threshold, target_sensitivity (None when
        a threshold was given), and the keys of `metrics_at_threshold`.

    Raises:
        DataError: as `pauc80`, `threshold_for_sensitivity` and `metrics_at_threshold`.
    """
    y, p = _check(y_true, y_score)
    target = None
    if threshold is None:
        target = sensitivity
        threshold = threshold_for_sensitivity(y, p, sensitivity)
    with warnings.catch_warnings():
        # One warning per undefined metric is enough; _one_class already logged it.
        warnings.simplefilter("ignore", MetricWarning)
        # ints (counts), floats (figures) and None (counts that do not exist at no threshold)
        figures: dict[str, int | float | None] = {
            "n": int(len(y)),
            "positives": int(y.sum()),
            "pauc80": pauc80(y, p),
            "roc_auc": roc_auc(y, p),
            "pr_auc": pr_auc(y, p),
        }
    if y.min() == y.max():
        warnings.warn(
            f"summarize: only one class present in y_true (all {int(y[0])}); AUCs are NaN",
            MetricWarning,
            stacklevel=2,
        )
    figures["threshold"] = float(threshold)
    figures["target_sensitivity"] = target
    if math.isfinite(threshold):
        figures.update(metrics_at_threshold(y, p, threshold))
    else:
        figures.update(
            dict.fromkeys(("accuracy", "precision", "recall", "specificity", "f1"), math.nan)
        )
        figures.update(dict.fromkeys(("tp", "fp", "tn", "fn"), None))
    return {key: _json_ready(value) for key, value in figures.items()}
