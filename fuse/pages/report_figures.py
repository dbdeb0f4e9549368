"""The figures the report computes from a run: out-of-fold predictions read and aligned with
`folds.csv`, each model's point figures, the shown model, and the intervals, operating point,
subgroup tables and decision curve of `report/metrics.json`.

Everything here returns plain values (dicts, arrays, numbers); turning them into text is
`fuse.pages.report_text`'s job, writing them `fuse.pages.report`'s.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from fuse.errors import RunError
from runfolder.layout import RunLayout
from tabular.decision_curve import decision_curve
from tabular.errors import DataError
from tabular.metrics import MetricWarning, calibration, summarize
from tabular.subgroups import MIN_POSITIVES, TOO_FEW, subgroup_table
from tabular.uncertainty import bootstrap_figures, operating_point

__all__ = [
    "CALIBRATED_OOF",
    "MODELS",
    "N_RESAMPLES",
    "SEED",
    "age_column",
    "intervals",
    "model_figures",
    "net_benefit",
    "patients",
    "read_calibrated",
    "read_final",
    "read_predictions",
    "shown_model",
    "shown_operating_point",
    "skin_type_column",
    "subgroups",
]

log = logging.getLogger(__name__)

MODELS = ("gbdt", "fusion", "blend", "stack")
# The final model's calibrated out-of-fold probabilities (written by `invoke stack` beside its
# oof.csv), shown as the model "calibrated"; absent for runs stacked before calibration.
CALIBRATED_OOF = "final_oof.csv"
# Models whose output is a rank, not a probability (no Brier score or ECE for them).
_RANK_SCORES = ("blend",)
# The group bootstrap of the report's intervals: resamples and seed (fixed, so that a report
# rewritten from the same run shows the same intervals).
N_RESAMPLES = 1000
SEED = 0
# Names of the numeric age column, in order of preference (lower case; first match wins):
# exactly "age", then one starting "age_" (ISIC's `age_approx`).
_AGE = re.compile(r"^age(_.*)?$")
# A skin type column: Fitzpatrick type by any of its usual names.
_SKIN_TYPE = re.compile(r"fitzpatrick|skin_?type|phototype")


def age_column(spec: dict) -> str | None:
    """The spec's numeric age column: a numeric column named exactly `age` (any case), else the
    first numeric column whose name starts with `age_` (ISIC's `age_approx`); None when none."""
    numeric = [str(c) for c in spec.get("numeric", ())]
    matches = [c for c in numeric if c.lower() == "age"]
    matches = matches or [c for c in numeric if _AGE.match(c.lower())]
    return matches[0] if matches else None


def skin_type_column(spec: dict) -> str | None:
    """The spec's skin type column (a categorical or numeric column named like `fitzpatrick`,
    `skin_type` or `phototype`); None when the spec has none."""
    columns = [str(c) for c in (*spec.get("categorical", ()), *spec.get("numeric", ()))]
    return next((c for c in columns if _SKIN_TYPE.search(c.lower())), None)


def intervals(
    y: np.ndarray, predictions: dict, figures: dict, groups: np.ndarray, shown: str
) -> dict | None:
    """Bootstrap intervals of every model's figures and of its difference from `shown`, each
    model at its own operating threshold; None (logged) when no model has a usable threshold."""
    thresholds = {name: figures[name]["threshold"] for name in predictions}
    usable = {
        name: p
        for name, p in predictions.items()
        if thresholds[name] is not None and 0.0 < thresholds[name] < 1.0
    }
    left_out = sorted(set(predictions) - set(usable))
    if left_out:
        log.warning(
            "report: no interval for %s (operating threshold not in (0, 1): %s)",
            left_out,
            {name: thresholds[name] for name in left_out},
        )
    if shown not in usable:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # one-class resamples: counted in the result
        result = bootstrap_figures(
            y,
            usable,
            groups,
            {n: thresholds[n] for n in usable},
            final=shown,
            n_resamples=N_RESAMPLES,
            seed=SEED,
        )
    for name in _RANK_SCORES:  # a rank has no Brier score (the point table says n/a too)
        for table in ("models", "differences"):
            if name in result[table]:
                result[table][name]["brier"] = {"estimate": None, "low": None, "high": None}
    result["left_out"] = left_out
    return result


def shown_operating_point(
    y: np.ndarray, p: np.ndarray, threshold, shown: str, sensitivity: float
) -> dict | None:
    """The shown model's sensitivity and specificity at `threshold`, with exact intervals."""
    if threshold is None or not 0.0 < threshold < 1.0:
        return None
    point = operating_point(y, p, threshold)
    return {"model": shown, "target_sensitivity": sensitivity, **point}


def subgroups(
    spec: dict,
    folds: pd.DataFrame,
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray,
    threshold,
    sensitivity: float,
) -> dict:
    """The subgroup table of the shown model, or {"unavailable": why} (logged)."""
    age, skin = age_column(spec), skin_type_column(spec)
    categorical = [str(c) for c in spec.get("categorical", ()) if c != skin]
    base = {
        "age_column": age,
        "skin_type_column": skin,
        "categorical": categorical,
        "threshold": threshold,
        "target_sensitivity": sensitivity,
        "min_positives": MIN_POSITIVES,
        "too_few": TOO_FEW,
    }
    wanted = [*categorical, *([age] if age else []), *([skin] if skin else [])]
    if not wanted:
        return {
            **base,
            "rows": [],
            "unavailable": "the spec names no categorical, age or skin type column",
        }
    if threshold is None or not 0.0 < threshold < 1.0:
        return {
            **base,
            "rows": [],
            "unavailable": f"no operating threshold in (0, 1) (got {threshold!r})",
        }
    try:
        table = pd.read_csv(
            spec["metadata"], usecols=[spec["id"], *wanted], dtype={spec["id"]: str}
        )
        table = (
            table.drop_duplicates(spec["id"]).set_index(spec["id"]).reindex(folds["id"].astype(str))
        )
        target = min(float(sensitivity), 1.0 - 1e-9)  # a 100% target: any shortfall is highlighted
        rows = subgroup_table(
            y,
            p,
            groups,
            threshold,
            table.reset_index(drop=True),
            categorical=categorical,
            age=age,
            skin_type=skin,
            target_sensitivity=target,
            n_resamples=N_RESAMPLES,
            seed=SEED,
        )
    except (OSError, ValueError, KeyError) as error:
        # DataError is a ValueError: a changed metadata file must not cost the whole report
        log.warning("report: subgroups left out (%s)", error)
        return {
            **base,
            "rows": [],
            "unavailable": f"metadata {spec.get('metadata')} could not be tabulated: {error}",
        }
    return {**base, "rows": rows}


def net_benefit(y: np.ndarray, predictions: dict, shown: str) -> dict | None:
    """Net benefit of the shown model and each base model that outputs a probability (the rank
    blend does not), treat-all and treat-none at 1-50%; None when the shown model is a rank."""
    candidates = {
        "final": shown,
        **{name: name for name in predictions if name not in (shown, "calibrated")},
    }
    probabilities, models = {}, {}
    for label, name in candidates.items():
        p = predictions[name]
        if name in _RANK_SCORES or p.min() < 0.0 or p.max() > 1.0:
            continue
        probabilities[label] = p
        models[label] = name
    if "final" not in probabilities:
        log.warning("report: no decision curve (the final score %s is not a probability)", shown)
        return None
    try:
        curve = decision_curve(y, probabilities)
    except DataError as error:
        log.warning("report: no decision curve (%s)", error)
        return None
    return {**curve, "models": models}


def read_predictions(
    run_dir: Path, folds: pd.DataFrame
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Out-of-fold predictions of every stage present, aligned with `folds.csv`, and the target."""
    layout = RunLayout(run_dir)
    read_oof = layout.read_oof
    ids = folds["id"].to_numpy()
    fold = folds["fold"].to_numpy()
    predictions = {}
    y = None
    for name in MODELS:
        path = layout.oof(name)
        if not path.is_file():
            continue
        if y is None:
            oof = pd.read_csv(path, dtype={"id": str})
            if "target" not in oof.columns:
                raise RunError(f"{path}: not an out-of-fold file, missing column(s) ['target']")
            y = oof.set_index("id").reindex(ids)["target"].to_numpy()
            if np.isnan(y.astype(float)).any():
                y = None  # read_oof below names the ids that differ
            else:
                y = y.astype(np.int64)
        predictions[name] = read_oof(name, ids, fold, y)
    if not predictions:
        raise RunError(
            f"run {run_dir}: no model has out-of-fold predictions yet (no gbdt/, fusion/, blend/ "
            "or stack/ oof.csv); train one with `invoke train-gbdt --spec S --run R` or "
            "`invoke train-fusion --spec S --run R`"
        )
    if y is None:
        raise RunError(
            f"run {run_dir}: no out-of-fold file holds a target for every row of the run (an "
            f"empty `target` cell in {', '.join(f'{name}/oof.csv' for name in predictions)}); "
            "retrain the stage that wrote it"
        )
    return predictions, y


def patients(record: dict, folds: pd.DataFrame) -> int | None:
    """How many patients the run's rows come from; None when the spec names no patient column
    (or its metadata file can no longer be read)."""
    spec = record.get("spec", {})
    patient = spec.get("patient")
    if not patient:
        return None
    if patient == spec.get("group"):
        return int(folds["group"].nunique())
    try:
        table = pd.read_csv(spec["metadata"], usecols=[spec["id"], patient], dtype=str)
    except (OSError, ValueError, KeyError) as error:
        log.warning("report: patients not counted (%s)", error)
        return None
    rows = table[table[spec["id"]].isin(set(folds["id"]))]
    return int(rows[patient].nunique())


def read_calibrated(run_dir: Path, folds: pd.DataFrame, final: dict | None) -> np.ndarray | None:
    """The final model's calibrated out-of-fold probabilities aligned with `folds.csv`, or None
    (no calibration yet, or a file that does not match the run: logged)."""
    path = RunLayout(run_dir).stage("stack") / CALIBRATED_OOF
    if not final or "calibration" not in final or not path.is_file():
        return None
    oof = pd.read_csv(path, dtype={"id": str})
    if not {"id", "p"} <= set(oof.columns) or oof["id"].duplicated().any():
        log.warning("%s: not an out-of-fold file of this run; calibrated figures left out", path)
        return None
    p = pd.to_numeric(oof.set_index("id")["p"].reindex(folds["id"]), errors="coerce").to_numpy(
        dtype=float
    )
    if not np.isfinite(p).all():
        log.warning("%s: ids differ from the run's folds.csv; calibrated figures left out", path)
        return None
    return p


def read_final(run_dir: Path) -> dict | None:
    """The run's `stack/final.json`, None before `invoke stack`."""
    path = RunLayout(run_dir).final
    return json.loads(path.read_text()) if path.is_file() else None


def _best(figures: dict) -> str:
    """The model with the highest pAUC80 (a model without one counts as lowest)."""

    def key(name):
        value = figures[name]["pauc80"]
        return -math.inf if value is None else value

    return max(figures, key=key)


def model_figures(
    y: np.ndarray, predictions: dict[str, np.ndarray], final: dict | None, sensitivity: float
) -> dict[str, dict]:
    """Each model's point figures (`tabular.metrics.summarize` at its own threshold for
    `sensitivity`, with Brier and ECE), keyed like `predictions`."""
    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for name, p in predictions.items():
            # The calibrated final model is shown at the threshold scoring applies (final.json).
            threshold = final["threshold"] if name == "calibrated" and final else None
            figures[name] = summarize(y, p, threshold=threshold, sensitivity=sensitivity)
            # Brier and ECE only mean something for a score that claims to be a probability:
            # the blend is a rank.
            figures[name].update(
                calibration(y, p) if name not in _RANK_SCORES else {"brier": None, "ece": None}
            )
    return figures


def shown_model(predictions: dict, figures: dict, final: dict | None) -> str:
    """The model whose operating point, subgroups and decision curve the report shows: the
    calibrated final model, else the final model, else the base model with the best pAUC80."""
    if "calibrated" in predictions:
        return "calibrated"
    return final["final"] if final and final["final"] in predictions else _best(figures)
