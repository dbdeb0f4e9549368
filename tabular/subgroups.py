"""How the final model does in each subgroup: per category of a metadata column, per age band and
per skin type, with intervals, so that a subgroup the model serves worse stands out.

A subgroup is highlighted when even the upper end of its sensitivity's 95% interval
(Clopper-Pearson) is below the target sensitivity: the shortfall is not chance. With fewer than
`MIN_POSITIVES` positives the sensitivity cannot be judged either way: the row says "too few to
tell", is never highlighted, and has no ROC AUC. The Clopper-Pearson intervals take rows as
independent (exact for one row per lesion); ROC AUC's interval is the group bootstrap.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tabular.errors import DataError
from tabular.metrics import MetricWarning
from tabular.uncertainty import (
    DEFAULT_RESAMPLES,
    bootstrap_figures,
    check_inputs,
    clopper_pearson,
)

__all__ = ["AGE_BANDS", "MIN_POSITIVES", "TOO_FEW", "age_band_labels", "subgroup_table"]

log = logging.getLogger(__name__)

# (lowest age included, first age excluded, label); None = unbounded.
AGE_BANDS = (
    (None, 30, "<30"),
    (30, 45, "30-44"),
    (45, 60, "45-59"),
    (60, 75, "60-74"),
    (75, None, "75+"),
)
# Below this many positives (or negatives, for ROC AUC) a subgroup's figures are noise.
MIN_POSITIVES = 10
TOO_FEW = "too few to tell"
_MISSING = "missing"


def _column(columns: Mapping, name: str, n: int) -> np.ndarray:
    try:
        values = columns[name]
    except (KeyError, IndexError, TypeError) as error:
        known = list(columns.keys()) if hasattr(columns, "keys") else []
        raise DataError(f"columns: no column {name!r}; columns given: {known}") from error
    values = np.asarray(values, dtype=object)
    if values.shape != (n,):
        raise DataError(
            f"columns[{name!r}]: expected {n} values, one per row, got shape {values.shape}"
        )
    return values


def _label(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return _MISSING
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # Fitzpatrick type 2.0 read from a CSV is "2"
    text = str(value).strip()
    return text if text else _MISSING


def _labels(values: np.ndarray) -> np.ndarray:
    """`_label` of every value, computed once per distinct value (a 401,059-row column holds a few
    dozen distinct values; calling `_label` per row cost seconds)."""
    codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
    table = np.array([_label(v) for v in uniques] + [_MISSING], dtype=object)
    return table[codes]  # code -1 (missing) indexes the trailing _MISSING


def age_band_labels(ages, name: str = "age", bands=AGE_BANDS) -> np.ndarray:
    """Each row's age band label ("<30" ... "75+", "missing" for no age).

    Args:
        ages: shape (n,) numbers (NaN/None = missing).
        name: the column's name, for messages (the spec's `age` or `age_approx`).
        bands: (low included or None, high excluded or None, label) tuples; default `AGE_BANDS`.

    Raises:
        DataError: a value that is not a number (naming the column and the first few).
    """
    values = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object)), errors="coerce")
    given = pd.Series(_labels(np.asarray(ages, dtype=object)) != _MISSING)
    text = values.isna() & given
    if text.any():
        shown = pd.Series(np.asarray(ages, dtype=object))[text].astype(str).unique()[:3].tolist()
        raise DataError(
            f"columns[{name!r}]: the age column must hold numbers, got {shown}; "
            "name the numeric age column (e.g. 'age' or 'age_approx')"
        )
    labels = np.full(len(values), _MISSING, dtype=object)
    v = values.to_numpy(dtype=float)
    for low, high, label in bands:
        inside = ~np.isnan(v)
        if low is not None:
            inside &= v >= low
        if high is not None:
            inside &= v < high
        labels[inside] = label
    return labels


def _json(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row(
    column: str,
    kind: str,
    label: str,
    y,
    p,
    g,
    threshold: float,
    target: float,
    n_resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    flagged = p >= threshold
    tp, tn = int((flagged & (y == 1)).sum()), int((~flagged & (y == 0)).sum())
    sens_low, sens_high = clopper_pearson(tp, positives, confidence)
    spec_low, spec_high = clopper_pearson(tn, negatives, confidence)
    roc = None
    one_class = 0
    if positives >= MIN_POSITIVES and negatives >= MIN_POSITIVES:
        with warnings.catch_warnings():
            # A rare resample of a small subgroup with one class: counted in the row instead.
            warnings.simplefilter("ignore", MetricWarning)
            boot = bootstrap_figures(
                y,
                {"final": p},
                g,
                threshold,
                n_resamples=n_resamples,
                seed=seed,
                confidence=confidence,
            )
        roc = boot["models"]["final"]["roc_auc"]
        one_class = boot["one_class"]
    too_few = positives < MIN_POSITIVES
    highlight = bool(not too_few and sens_high < target)
    status = TOO_FEW if too_few else ("below target" if highlight else "ok")
    return {
        "column": column,
        "kind": kind,
        "subgroup": label,
        "rows": int(len(y)),
        "positives": positives,
        "roc_auc": roc,
        "one_class_resamples": one_class,
        "sensitivity": _json(tp / positives) if positives else None,
        "sensitivity_low": _json(sens_low),
        "sensitivity_high": _json(sens_high),
        "specificity": _json(tn / negatives) if negatives else None,
        "specificity_low": _json(spec_low),
        "specificity_high": _json(spec_high),
        "mean_predicted": _json(p.mean()),
        "observed_rate": _json(y.mean()),
        "status": status,
        "highlight": highlight,
    }


def subgroup_table(
    y_true,
    y_score,
    groups,
    threshold: float,
    columns: Mapping,
    *,
    categorical: Sequence[str] = (),
    age: str | None = None,
    skin_type: str | None = None,
    target_sensitivity: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[dict]:
    """One row per subgroup of each categorical column, age band and skin type.

    Args:
        y_true: shape (n,), 0/1.
        y_score: shape (n,), the final model's probability (out of fold).
        groups: shape (n,), the spec's group (lesion or patient) of each row; None = rows. ROC
            AUC's interval is a bootstrap over these within the subgroup.
        threshold: the run's operating threshold in (0, 1); score >= threshold is flagged.
        columns: column name -> shape (n,) values (a DataFrame will do), holding every column
            named below.
        categorical: columns tabulated per category (missing values form a "missing" row).
        age: the numeric age column (`age`, `age_approx`, ...), tabulated in `AGE_BANDS`.
        skin_type: the skin type column (e.g. `fitzpatrick`), tabulated per type.
        target_sensitivity: the run's target; default 0.95.
        n_resamples, seed, confidence: of the bootstrap and the intervals (defaults 1,000, 0,
            0.95).

    Returns:
        JSON-ready rows in column order (categories sorted, age bands in order, "missing"
        last): column, kind ("categorical", "age band", "skin type"), subgroup, rows,
        positives, roc_auc ({estimate, low, high}, or None with fewer than `MIN_POSITIVES`
        positives or negatives), one_class_resamples, sensitivity (+ _low, _high), specificity
        (+ _low, _high), mean_predicted, observed_rate, status ("ok", "below target",
        `TOO_FEW`), highlight (upper bound of sensitivity below the target).

    Raises:
        DataError: as `tabular.uncertainty.check_inputs`; a column named but not given or of
            another length; an age column holding text; threshold or target outside (0, 1).
    """
    y, checked, g = check_inputs(y_true, {"final": y_score}, groups)
    p = checked["final"]
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as error:
        raise DataError(
            f"threshold: expected a probability in (0, 1), got {threshold!r}"
        ) from error
    if not 0.0 < threshold < 1.0:
        raise DataError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
    if not 0.0 < float(target_sensitivity) < 1.0:
        raise DataError(
            f"target_sensitivity: expected a value in (0, 1), e.g. 0.95, got {target_sensitivity!r}"
        )
    if isinstance(categorical, str):
        categorical = [categorical]
    plan: list[tuple[str, str, np.ndarray, list[str]]] = []
    for name in categorical:
        labels = _labels(_column(columns, name, len(y)))
        plan.append((name, "categorical", labels, sorted(set(labels) - {_MISSING})))
    if age is not None:
        labels = age_band_labels(_column(columns, age, len(y)), age)
        plan.append((age, "age band", labels, [band[2] for band in AGE_BANDS]))
    if skin_type is not None:
        labels = _labels(_column(columns, skin_type, len(y)))
        plan.append((skin_type, "skin type", labels, sorted(set(labels) - {_MISSING})))
    rows = []
    for name, kind, labels, order in plan:
        for label in [*order, _MISSING]:
            inside = labels == label
            if not inside.any():
                continue
            rows.append(
                _row(
                    name,
                    kind,
                    label,
                    y[inside],
                    p[inside],
                    g[inside],
                    threshold,
                    float(target_sensitivity),
                    n_resamples,
                    seed,
                    confidence,
                )
            )
    flagged = [f"{r['column']} = {r['subgroup']}" for r in rows if r["highlight"]]
    if flagged:
        log.info(
            "subgroups below the target sensitivity %s: %s", target_sensitivity, "; ".join(flagged)
        )
    return rows
