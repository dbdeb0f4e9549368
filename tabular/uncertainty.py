"""95% confidence intervals of a run's figures: a bootstrap over the spec's groups, Clopper-Pearson
for the operating point, and DeLong's variance of ROC AUC as a reference.

The bootstrap resamples groups (lesions or patients) with replacement, so that the rows of one
group come and go together: resampling rows would treat several images of one lesion as
independent evidence and give intervals that are too narrow. A resample is a count per group; a
row's weight is its group's count, and every figure is computed as a weighted figure.

Why it is fast: for each model the rows are mapped once (one `searchsorted` on the distinct scores
of the positives) to a few columns: per distinct positive score, the negatives scored below it
since the previous one, the negatives tied with it and the positives at it; plus the flagged
positives, unflagged negatives and squared errors. Each column is a linear function of the group
counts, so one sparse product (columns x groups) @ (groups x resamples) gives them for every
resample at once, O(rows) per resample; ROC AUC, pAUC80 and PR AUC then need only cumulative sums
over the distinct positive scores (a few hundred at ISIC 2024's ~400 positives), not over rows.
All models share the same resamples, so the difference of a model from the final model has a
paired interval.

Figures (`FIGURES`), each as `tabular.metrics` defines it: roc_auc, pauc80 (the ISIC 2024
metric, exactly `tabular.metrics.pauc80`), pr_auc (average precision), brier, and sensitivity and
specificity with rows at or above the operating threshold flagged.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import beta, norm, rankdata

from tabular.errors import DataError
from tabular.metrics import MIN_TPR, MetricWarning, check_targets

__all__ = [
    "DEFAULT_RESAMPLES",
    "FIGURES",
    "MIN_RESAMPLES",
    "bootstrap_figures",
    "check_inputs",
    "clopper_pearson",
    "delong_interval",
    "delong_roc_variance",
    "operating_point",
    "resample_figures",
]

log = logging.getLogger(__name__)

FIGURES = ("roc_auc", "pauc80", "pr_auc", "brier", "sensitivity", "specificity")
# The figures undefined on a resample with one class (the ranking figures).
_RANKING = ("roc_auc", "pauc80", "pr_auc")
MIN_RESAMPLES = 1000
DEFAULT_RESAMPLES = 1000
# Elements of one dense block (groups x resamples, or columns x resamples): about 32 MB of float64
# each, so that 401,059 rows with every row its own group still fit in memory.
_BLOCK_ELEMENTS = 4_000_000


def check_inputs(y_true, scores: Mapping, groups=None) -> tuple[np.ndarray, dict, np.ndarray]:
    """Validate targets, the models' scores and the group of each row.

    Args:
        y_true: shape (n,), 0/1.
        scores: model name -> shape (n,) finite scores (higher = more likely malignant).
        groups: shape (n,) group ids (any hashable values, none missing); None = each row is
            its own group.

    Returns:
        (y int8 (n,), {name: float64 (n,)}, group index int64 (n,) in 0..n_groups-1).

    Raises:
        DataError: no model, lengths that differ, targets not 0/1, scores not finite, missing
            group ids, no row.
    """
    y = check_targets(y_true)
    if not isinstance(scores, Mapping) or not scores:
        raise DataError(f"scores: expected a mapping of model name -> scores, got {scores!r:.80}")
    checked = {}
    for name, values in scores.items():
        p = np.asarray(values)
        if p.shape != y.shape:
            raise DataError(
                f"scores[{name!r}]: expected {len(y)} scores, one per target, got shape {p.shape}"
            )
        try:
            p = p.astype(float)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"scores[{name!r}]: expected numbers, got {p[:3].tolist()!r}"
            ) from error
        if not np.isfinite(p).all():
            row = int(np.flatnonzero(~np.isfinite(p))[0])
            raise DataError(f"scores[{name!r}]: expected finite scores, got {p[row]} at row {row}")
        checked[str(name)] = p
    if groups is None:
        index = np.arange(len(y), dtype=np.int64)
    else:
        g = np.asarray(groups, dtype=object)
        if g.shape != y.shape:
            raise DataError(
                f"groups: expected {len(y)} group ids, one per target, got shape {g.shape}"
            )
        missing = np.flatnonzero(pd.isna(g))
        if len(missing):
            raise DataError(
                f"groups: {len(missing)} rows have no group id (first at row {missing[0]}); "
                "every row needs its lesion or patient"
            )
        _, index = np.unique(g.astype(str), return_inverse=True)
        index = index.astype(np.int64).ravel()
    return y, checked, index


def _check_threshold(threshold, name: str = "threshold") -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name}: expected a probability in (0, 1), got {threshold!r}") from error
    if not 0.0 < value < 1.0:
        raise DataError(
            f"{name}: expected a probability in (0, 1), got {value!r}; the operating threshold "
            "is chosen on calibrated out-of-fold probabilities (metrics.json 'threshold')"
        )
    return value


def _check_resamples(n_resamples, confidence) -> tuple[int, float]:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise DataError(f"n_resamples: expected an integer >= {MIN_RESAMPLES}, got {n_resamples!r}")
    if n_resamples < MIN_RESAMPLES:
        # Fewer resamples make the 2.5% and 97.5% percentiles themselves noisy (25 resamples
        # beyond each end at 1,000): refused rather than reported with false precision.
        raise DataError(
            f"n_resamples: expected at least {MIN_RESAMPLES} resamples for a 95% interval, "
            f"got {n_resamples}"
        )
    if not 0.0 < float(confidence) < 1.0:
        raise DataError(f"confidence: expected a value in (0, 1), e.g. 0.95, got {confidence!r}")
    return int(n_resamples), float(confidence)


class _Columns:
    """One model's rows mapped to the columns its figures need (see the module's docstring).

    Row layout of `matrix` (shape (3K + 4, n_groups), K = distinct scores among the positives):
    [0, K) negatives below positive score k and above score k-1; [K, 2K) negatives tied with score
    k; [2K, 3K) positives at score k; 3K negatives above every positive; 3K+1 flagged positives;
    3K+2 unflagged negatives; 3K+3 squared error of the score (0 where it is not a probability).
    """

    def __init__(
        self, y: np.ndarray, p: np.ndarray, group: np.ndarray, n_groups: int, threshold: float
    ):
        pos_scores = np.unique(p[y == 1])
        k = len(pos_scores)
        at = np.searchsorted(pos_scores, p, side="left")
        tied = (at < k) & (pos_scores[np.minimum(at, k - 1)] == p) if k else np.zeros(len(p), bool)
        column = np.where(y == 1, 2 * k + at, np.where(tied, k + at, np.where(at == k, 3 * k, at)))
        flagged = p >= threshold
        self.probability = bool(p.min() >= 0.0 and p.max() <= 1.0)
        rows = [
            column,
            np.full(int(((y == 1) & flagged).sum()), 3 * k + 1),
            np.full(int(((y == 0) & ~flagged).sum()), 3 * k + 2),
            np.full(len(y), 3 * k + 3),
        ]
        cols = [group, group[(y == 1) & flagged], group[(y == 0) & ~flagged], group]
        sq = (y - p) ** 2 if self.probability else np.zeros(len(y))
        data = np.concatenate([np.ones(len(y) + len(rows[1]) + len(rows[2])), sq])
        self.k = k
        self.matrix = sparse.csr_matrix(
            (data, (np.concatenate(rows), np.concatenate(cols))), shape=(3 * k + 4, n_groups)
        )
        self.matrix.sum_duplicates()

    def figures(self, counts: np.ndarray) -> np.ndarray:
        """Figures for each resample: counts (n_groups, b) -> (b, len(FIGURES)), NaN where
        undefined."""
        k = self.k
        r = np.asarray(self.matrix @ counts)
        nrun, ntie, pos = r[:k], r[k : 2 * k], r[2 * k : 3 * k]
        ntop, flag_pos, unflag_neg, sq = r[3 * k], r[3 * k + 1], r[3 * k + 2], r[3 * k + 3]
        out = np.full((r.shape[1], len(FIGURES)), np.nan)
        n_pos = pos.sum(axis=0)
        n_neg = nrun.sum(axis=0) + ntie.sum(axis=0) + ntop
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:, 3] = sq / (n_pos + n_neg) if self.probability else np.nan
            out[:, 4] = np.where(n_pos > 0, flag_pos / n_pos, np.nan)
            out[:, 5] = np.where(n_neg > 0, unflag_neg / n_neg, np.nan)
            ranked = (n_pos > 0) & (n_neg > 0)
            if k == 0 or not ranked.any():
                return out
            # Weighted negatives strictly below positive score k, and positives strictly below it.
            n_below = np.cumsum(nrun, axis=0)
            n_below += np.cumsum(ntie, axis=0)
            n_below -= ntie
            p_below = np.cumsum(pos, axis=0)
            p_below -= pos
            auc = np.einsum("kb,kb->b", pos, n_below + 0.5 * ntie) / (n_pos * n_neg)
            # Average precision: precision at each positive score (rows at or above it) weighted
            # by the positives there; where none was drawn the weight is 0 and so is the term.
            flagged = (n_pos - p_below) + (n_neg - n_below)
            precision = np.divide(
                n_pos - p_below, flagged, out=np.zeros_like(flagged), where=flagged > 0
            )
            ap = np.einsum("kb,kb->b", pos, precision) / n_pos
            # Only positive scores that start below x' = max_fpr in some resample add area; the
            # cumulative shares only grow, so they form a prefix.
            cut = int((p_below < abs(1.0 - MIN_TPR) * n_pos).any(axis=1).sum())
            pauc = self._pauc(
                p_below[:cut] / n_pos,
                (p_below[:cut] + pos[:cut]) / n_pos,
                n_below[:cut] / n_neg,
                (n_below[:cut] + ntie[:cut]) / n_neg,
            )
            out[:, 0] = np.where(ranked, auc, np.nan)
            out[:, 1] = np.where(ranked, pauc, np.nan)
            out[:, 2] = np.where(ranked, ap, np.nan)
        return out

    @staticmethod
    def _pauc(x0, x1, y0, y1, min_tpr: float = MIN_TPR) -> np.ndarray:
        """Area under the flipped ROC curve up to x' = 1 - min_tpr, as `tabular.metrics.pauc80`.

        pauc80 flips the classes (benign "positive", score -p): walking the scores upwards, x' is
        the share of malignant rows at or below the cut and y' the share of benign ones. Between
        two distinct positive scores only negatives pass, so x' stays put (no area); each positive
        score k is one segment (x0, y0) -> (x1, y1), diagonal where negatives tie with it. Each is
        clipped at x' = max_fpr with linear interpolation, as sklearn's curve is interpolated.
        """
        max_fpr = abs(1.0 - min_tpr)
        xa, xb = np.minimum(x0, max_fpr), np.minimum(x1, max_fpr)
        width = x1 - x0
        slope = np.where(width > 0, (y1 - y0) / np.where(width > 0, width, 1.0), 0.0)
        ya, yb = y0 + slope * (xa - x0), y0 + slope * (xb - x0)
        return np.nansum((xb - xa) * (ya + yb) / 2.0, axis=0)


def _draws(n_groups: int, n_resamples: int, seed: int, block: int):
    """Group counts of each resample, in blocks of shape (n_groups, b): groups drawn with
    replacement, as many as there are. The blocks depend only on the data's size and the seed."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        picks = rng.integers(0, n_groups, size=(b, n_groups))
        offsets = (np.arange(b) * n_groups)[:, None]
        counts = np.bincount((picks + offsets).ravel(), minlength=b * n_groups)
        yield counts.reshape(b, n_groups).T.astype(np.float64)
        done += b


def _thresholds(threshold, names) -> dict[str, float]:
    if isinstance(threshold, Mapping):
        missing = [name for name in names if name not in threshold]
        if missing:
            raise DataError(
                f"threshold: no operating threshold for models {missing}; "
                "give one per model, or a single number for all"
            )
        return {name: _check_threshold(threshold[name], f"threshold[{name!r}]") for name in names}
    value = _check_threshold(threshold)
    return dict.fromkeys(names, value)


def resample_figures(
    y_true,
    scores: Mapping,
    groups,
    threshold,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Every model's figures on each bootstrap resample of the groups, and on the data itself.

    Args:
        y_true: shape (n,), 0/1.
        scores: model name -> shape (n,) scores.
        groups: shape (n,) lesion or patient ids (the spec's `group`); None = rows.
        threshold: the operating threshold, one for all models or a mapping model -> threshold;
            each in (0, 1). Rows with score >= threshold are flagged.
        n_resamples: at least `MIN_RESAMPLES` (default 1,000).
        seed: the resamples are a function of (number of groups, n_resamples, seed).

    Returns:
        {"point": {name: float64 (len(FIGURES),)}, "resamples": {name: float64 (n_resamples,
        len(FIGURES))}, "one_class": resamples where a class is absent (their ranking figures
        are NaN), "n_groups": int}. Columns in the order of `FIGURES`; brier is NaN for a score
        outside [0, 1].

    Raises:
        DataError: as `check_inputs`, a threshold outside (0, 1), n_resamples below 1,000.
    """
    n_resamples, _ = _check_resamples(n_resamples, 0.95)
    y, checked, group = check_inputs(y_true, scores, groups)
    thresholds = _thresholds(threshold, list(checked))
    n_groups = int(group.max()) + 1
    models = {
        name: _Columns(y, p, group, n_groups, thresholds[name]) for name, p in checked.items()
    }
    widest = max([n_groups] + [3 * m.k + 4 for m in models.values()])
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // widest))
    ones = np.ones((n_groups, 1))
    point = {name: m.figures(ones)[0] for name, m in models.items()}
    parts: dict[str, list] = {name: [] for name in models}
    for counts in _draws(n_groups, n_resamples, seed, block):
        for name, m in models.items():
            parts[name].append(m.figures(counts))
    resamples = {name: np.concatenate(blocks) for name, blocks in parts.items()}
    first = next(iter(resamples.values()))
    one_class = int(np.isnan(first[:, FIGURES.index("roc_auc")]).sum())
    return {"point": point, "resamples": resamples, "one_class": one_class, "n_groups": n_groups}


def _json(value: float):
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(point: float, draws: np.ndarray, confidence: float) -> dict:
    valid = draws[~np.isnan(draws)]
    tail = 100.0 * (1.0 - confidence) / 2.0
    if len(valid) == 0 or not math.isfinite(point):
        low = high = math.nan
    else:
        low, high = np.percentile(valid, [tail, 100.0 - tail])
    return {"estimate": _json(point), "low": _json(low), "high": _json(high)}


def bootstrap_figures(
    y_true,
    scores: Mapping,
    groups,
    threshold,
    *,
    final: str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Percentile bootstrap intervals of every model's figures and of its difference from `final`.

    Args:
        y_true, scores, groups, threshold, n_resamples, seed: as `resample_figures`.
        final: the model the others are compared with; default the last one in `scores`.
        confidence: default 0.95 (the 2.5th and 97.5th percentiles).

    Returns:
        JSON-ready: {"confidence", "n_resamples", "seed", "n_groups", "one_class" (resamples
        left out of the ranking figures' percentiles), "final", "models": {name: {figure:
        {"estimate", "low", "high"}}}, "differences": {name: {figure: {...}}} (model minus
        final, paired: the same resamples; the final model itself is absent)}. None where a
        figure is undefined.

    Raises:
        DataError: as `resample_figures`; `final` not one of the models; confidence not in (0, 1).
    """
    _, confidence = _check_resamples(n_resamples, confidence)
    names = [str(name) for name in scores] if isinstance(scores, Mapping) else []
    final = names[-1] if final is None and names else final
    if names and final not in names:
        raise DataError(f"final: expected one of the models {names}, got {final!r}")
    raw = resample_figures(y_true, scores, groups, threshold, n_resamples=n_resamples, seed=seed)
    if raw["one_class"]:
        message = (
            f"bootstrap: {raw['one_class']} of {n_resamples} resamples drew one class only; "
            "their ROC AUC, pAUC80 and PR AUC are NaN and left out of the percentiles"
        )
        warnings.warn(message, MetricWarning, stacklevel=2)
        log.warning(message)
    point, draws = raw["point"], raw["resamples"]
    models = {
        name: {
            fig: _interval(point[name][j], draws[name][:, j], confidence)
            for j, fig in enumerate(FIGURES)
        }
        for name in point
    }
    differences = {
        name: {
            fig: _interval(
                point[name][j] - point[final][j], draws[name][:, j] - draws[final][:, j], confidence
            )
            for j, fig in enumerate(FIGURES)
        }
        for name in point
        if name != final
    }
    return {
        "confidence": confidence,
        "n_resamples": n_resamples,
        "seed": seed,
        "n_groups": raw["n_groups"],
        "one_class": raw["one_class"],
        "final": final,
        "models": models,
        "differences": differences,
    }


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a proportion successes / trials.

    Returns:
        (low, high) in [0, 1]; (NaN, NaN) for 0 trials. At 0.95 the low end is the exact 97.5%
        one-sided lower bound.

    Raises:
        DataError: counts negative or successes > trials; confidence not in (0, 1).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise DataError(f"confidence: expected a value in (0, 1), e.g. 0.95, got {confidence!r}")
    if trials < 0 or successes < 0 or successes > trials:
        raise DataError(
            f"successes, trials: expected 0 <= successes <= trials, got {successes} of {trials}"
        )
    if trials == 0:
        return math.nan, math.nan
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = (
        1.0
        if successes == trials
        else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return low, high


def operating_point(y_true, y_score, threshold: float, confidence: float = 0.95) -> dict:
    """Sensitivity and specificity at `threshold` (score >= threshold is flagged), each with its
    Clopper-Pearson interval.

    The exact interval treats rows as independent; where several rows share a lesion or patient
    the group bootstrap of `bootstrap_figures` is the honest one, and this one is the floor the
    page states beside the target ("95% sensitivity; lower 95% bound 0.93").

    Returns:
        JSON-ready: threshold, tp, fn, tn, fp, sensitivity, sensitivity_low, sensitivity_high,
        specificity, specificity_low, specificity_high (None where a class is absent).

    Raises:
        DataError: as `check_inputs`; threshold outside (0, 1).
    """
    threshold = _check_threshold(threshold)
    y, checked, _ = check_inputs(y_true, {"score": y_score})
    flagged = checked["score"] >= threshold
    tp, fn = int((flagged & (y == 1)).sum()), int((~flagged & (y == 1)).sum())
    tn, fp = int((~flagged & (y == 0)).sum()), int((flagged & (y == 0)).sum())
    sens_low, sens_high = clopper_pearson(tp, tp + fn, confidence)
    spec_low, spec_high = clopper_pearson(tn, tn + fp, confidence)
    return {
        "threshold": threshold,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": _json(tp / (tp + fn)) if tp + fn else None,
        "sensitivity_low": _json(sens_low),
        "sensitivity_high": _json(sens_high),
        "specificity": _json(tn / (tn + fp)) if tn + fp else None,
        "specificity_low": _json(spec_low),
        "specificity_high": _json(spec_high),
    }


def delong_roc_variance(y_true, y_score) -> tuple[float, float]:
    """ROC AUC and DeLong's variance of it, by Sun & Xu's (2014) midrank algorithm, O(n log n).

    Rows are taken as independent (one row per group), which is what the group bootstrap reduces
    to when every group has one row.

    Returns:
        (auc, variance).

    Raises:
        DataError: as `check_inputs`; fewer than two positives or two negatives.
    """
    y, checked, _ = check_inputs(y_true, {"score": y_score})
    p = checked["score"]
    x, z = p[y == 1], p[y == 0]
    m, n = len(x), len(z)
    if m < 2 or n < 2:
        raise DataError(
            f"y_true: DeLong's variance needs two positives and two negatives, got {m} and {n}"
        )
    tx, tz = rankdata(x), rankdata(z)
    t = rankdata(np.concatenate([x, z]))
    auc = (t[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v01 = (t[:m] - tx) / n  # per positive: share of negatives below it (ties count half)
    v10 = 1.0 - (t[m:] - tz) / m  # per negative: share of positives above it
    return float(auc), float(np.var(v01, ddof=1) / m + np.var(v10, ddof=1) / n)


def delong_interval(y_true, y_score, confidence: float = 0.95) -> tuple[float, float, float]:
    """(auc, low, high): the normal interval auc +- z * sqrt(DeLong variance), clipped to [0, 1].

    Raises:
        DataError: as `delong_roc_variance`; confidence not in (0, 1).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise DataError(f"confidence: expected a value in (0, 1), e.g. 0.95, got {confidence!r}")
    auc, variance = delong_roc_variance(y_true, y_score)
    half = float(norm.ppf(0.5 + confidence / 2.0)) * math.sqrt(variance)
    return auc, max(0.0, auc - half), min(1.0, auc + half)
