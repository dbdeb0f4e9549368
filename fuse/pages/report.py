"""The evaluation report of a run: one table of every model's out-of-fold figures, and plots.

Every figure comes from out-of-fold predictions (`<stage>/oof.csv`), so each row was scored by a
model that never saw it. Each model's operating threshold is chosen on its own out-of-fold
predictions for the target sensitivity (default 95%): the scales of the models differ (the blend
gives a rank score, not a probability), so one shared threshold would mean nothing.

Writes `<run>/report/`: `report.md` (the table, the final model, the plots), `index.html` (the
same, as one self-contained page with the plots embedded, for a browser, offline), `metrics.json`
(the same figures for machines), `model-card.md` (see `fuse.pages.model_card`) and the PNG plots. The
page is the template `fuse/pages/templates/report.html` (and its parts under `report/`); `report.md` is
written here.

Beside the point figures the report gives what the data can and cannot tell:
- 95% confidence intervals of every model's ROC AUC, pAUC80, PR AUC, Brier, sensitivity and
  specificity (a bootstrap over the spec's groups from `folds.csv`, `N_RESAMPLES` resamples,
  seeded), and the paired interval of each model's difference from the final model
  (`tabular.uncertainty`);
- the final model's operating point with the exact (Clopper-Pearson) interval of its
  sensitivity, which the triage page also states (`read_operating_point`);
- a subgroup table per categorical column, age band and skin type (`tabular.subgroups`);
- the decision curve: net benefit against threshold probability (`tabular.decision_curve`).
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

from common.files import atomic_write, atomic_write_text
from fuse.errors import RunError
from fuse.pages import html, model_card
from fuse.pages.report_applicability import applicability_section, applicability_values
from runfolder.layout import METRICS, REPORT, RunLayout
from tabular.decision_curve import decision_curve, plot_decision_curve
from tabular.errors import DataError
from tabular.folds import read_folds
from tabular.metrics import MetricWarning, calibration, summarize
from tabular.subgroups import MIN_POSITIVES, TOO_FEW, subgroup_table
from tabular.uncertainty import bootstrap_figures, operating_point

__all__ = ["COLUMNS", "DESCRIPTIONS", "INTERVAL_FIGURES", "MODELS", "N_RESAMPLES", "PLOT_TITLES",
           "PLOTS", "SEED", "SUBGROUP_HEADINGS", "age_column", "ci_text", "decision_values",
           "interval_values", "operating_sentence", "read_operating_point", "skin_type_column",
           "subgroup_values", "write_report"]

log = logging.getLogger(__name__)

MODELS = ("gbdt", "fusion", "blend", "stack")
DESCRIPTIONS = {
    "gbdt": "LightGBM ensemble on metadata (and image PCA) features",
    "fusion": "fusion MLP on image embeddings + metadata",
    "blend": "rank average of gbdt and fusion",
    "stack": "LightGBM on metadata + the fusion MLP's and gbdt's predictions",
    "calibrated": "the final model's score through its calibrator (fitted on the out-of-fold "
                  "scores): the `probability` that scoring writes",
}
# The final model's calibrated out-of-fold probabilities (written by `invoke stack` beside its
# oof.csv), shown as the model "calibrated"; absent for runs stacked before calibration.
CALIBRATED_OOF = "final_oof.csv"
# (key in metrics.json, column heading, format)
# Models whose output is a rank, not a probability (no Brier score or ECE for them).
RANK_SCORES = ("blend",)
COLUMNS = (
    ("pauc80", "pAUC80", ".4f"),
    ("roc_auc", "ROC AUC", ".4f"),
    ("pr_auc", "PR AUC", ".4f"),
    ("brier", "Brier", ".4f"),
    ("ece", "ECE", ".4f"),
    ("threshold", "threshold", ".6g"),
    ("accuracy", "accuracy", ".4f"),
    ("precision", "precision", ".4f"),
    ("recall", "recall", ".4f"),
    ("specificity", "specificity", ".4f"),
    ("f1", "F1", ".4f"),
    ("tp", "TP", "d"),
    ("fp", "FP", "d"),
    ("tn", "TN", "d"),
    ("fn", "FN", "d"),
)
PLOTS = {
    "roc": "roc.png",
    "pr": "precision_recall.png",
    "confusion": "confusion_matrix.png",
    "calibration": "calibration.png",
    "histogram": "score_histogram.png",
    "importance": "feature_importance.png",
    "decision": "decision_curve.png",
}
PLOT_TITLES = {
    "roc": "ROC curves (shaded: the pAUC80 region, TPR >= 80%)",
    "pr": "Precision-recall curves",
    "confusion": "Confusion matrix of the final model at its operating threshold",
    "calibration": "Calibration (reliability) curves",
    "histogram": "Scores of the final model by class",
    "importance": "LightGBM feature importance (gbdt)",
    "decision": "Decision curve: net benefit of acting on each model's probability, treat all "
                "and treat none, at threshold probabilities 1-50%",
}
# The group bootstrap of the report's intervals: resamples and seed (fixed, so that a report
# rewritten from the same run shows the same intervals).
N_RESAMPLES = 1000
SEED = 0
# (key in tabular.uncertainty.FIGURES, heading, format) of the interval tables.
INTERVAL_FIGURES = (
    ("roc_auc", "ROC AUC", ".4f"),
    ("pauc80", "pAUC80", ".4f"),
    ("pr_auc", "PR AUC", ".4f"),
    ("brier", "Brier", ".4f"),
    ("sensitivity", "sensitivity", ".3f"),
    ("specificity", "specificity", ".3f"),
)
# Names of the numeric age column, in order of preference (lower case; first match wins):
# exactly "age", then one starting "age_" (ISIC's `age_approx`).
_AGE = re.compile(r"^age(_.*)?$")
# A skin type column: Fitzpatrick type by any of its usual names.
_SKIN_TYPE = re.compile(r"fitzpatrick|skin_?type|phototype")


def write_report(run_dir: Path | str, sensitivity: float = 0.95) -> Path:
    """Write `<run>/report/report.md`, `index.html`, `metrics.json`, `model-card.md` and the PNG plots.

    `metrics.json` holds, beside every model's point figures ("models"): "intervals"
    (`tabular.uncertainty.bootstrap_figures` over the groups of `folds.csv`, each model at its own
    threshold, differences from the shown model; None when no model has a threshold in (0, 1)),
    "operating_point" (the shown model at the run's threshold, Clopper-Pearson bounds), "subgroups"
    ({"rows": `tabular.subgroups.subgroup_table` rows, "age_column", "skin_type_column", ...}, with
    "unavailable" saying why when there are none), "decision_curve" (`decision_curve`'s dict plus
    "models": curve label -> model; None when the shown score is not a probability) and "shown"
    (the calibrated final model, else the final model, else the base model with the best pAUC80).
    (The bootstrap's cost is measured by `benchmarks/uncertainty.py`.) A part that cannot be
    computed (metadata no longer readable, say) is logged and left out, never the whole report.

    Args:
        run_dir: the run folder.
        sensitivity: target sensitivity of each model's operating threshold, in (0, 1].

    Returns:
        The path of `report.md`.

    Raises:
        RunError: no run at `run_dir`; no stage has out-of-fold predictions yet; an `oof.csv`
            does not match the run's `folds.csv`; `sensitivity` out of range.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise RunError(f"sensitivity: expected a value in (0, 1], got {sensitivity!r}")
    layout = RunLayout(Path(run_dir)).require()
    run_dir = layout.dir
    record = layout.read_record()
    folds = read_folds(layout.folds)
    predictions, y = _read_predictions(run_dir, folds)
    final = _final(run_dir)
    calibrated = _read_calibrated(run_dir, folds, final)
    if calibrated is not None:
        predictions["calibrated"] = calibrated

    figures = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for name, p in predictions.items():
            # The calibrated final model is shown at the threshold scoring applies (final.json).
            threshold = final["threshold"] if name == "calibrated" and final else None
            figures[name] = summarize(y, p, threshold=threshold, sensitivity=sensitivity)
            # Brier and ECE only mean something for a score that claims to be a probability:
            # the blend is a rank.
            figures[name].update(calibration(y, p) if name not in RANK_SCORES else {"brier": None, "ece": None})
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    if "calibrated" in predictions:
        shown = "calibrated"
    else:
        shown = final["final"] if final and final["final"] in predictions else _best(figures)
    plots = _plots(out, y, predictions, figures, shown, layout.stage("gbdt") / "importance.csv")
    groups = folds["group"].to_numpy()
    spec = record.get("spec", {})
    # the threshold scoring applies: on the calibrated probability where there is one
    final_threshold = ((final["threshold"] if "calibrated" in figures else figures[shown]["threshold"])
                       if final and final["final"] in figures else None)
    threshold = final_threshold if final_threshold is not None else figures[shown]["threshold"]
    curve = _decision_curve(y, predictions, shown)
    if curve is not None:
        atomic_write(out / PLOTS["decision"],
                     lambda f: f.write(plot_decision_curve(curve, "Decision curve (net benefit)")))
        plots["decision"] = PLOTS["decision"]

    document = {
        "run": str(run_dir),
        "dataset": spec.get("name"),
        "rows": int(len(y)),
        "positives": int(y.sum()),
        "groups": int(folds["group"].nunique()),
        "group_column": spec.get("group"),
        "patients": _patients(record, folds),
        "patient_column": spec.get("patient"),
        "n_folds": int(folds["fold"].nunique()),
        "sensitivity": sensitivity,
        "final": final["final"] if final else None,
        "final_threshold": final_threshold,
        "final_method": final.get("calibration", {}).get("method") if final else None,
        "models": figures,
        # the model whose operating point, subgroups and decision curve the report shows
        "shown": shown,
        "intervals": _intervals(y, predictions, figures, groups, shown),
        "operating_point": _operating_point(y, predictions[shown], threshold, shown, sensitivity),
        "subgroups": _subgroups(spec, folds, y, predictions[shown], groups, threshold, sensitivity),
        "decision_curve": curve,
        "plots": {key: name for key, name in plots.items()},
        # the training lesions' out-of-fold novelty and the threshold (None: no applicability stage)
        "applicability": applicability_section(run_dir, out),
    }
    card = model_card.build(run_dir, record, document, final)
    document["model_card"] = model_card.FILE
    layout.write_json(REPORT, METRICS, document)
    atomic_write_text(out / model_card.FILE, model_card.markdown(card))
    path = atomic_write_text(out / "report.md", _markdown(document, final))
    atomic_write_text(out / "index.html", _html(document, final, out, card))
    log.info("report: %s (and index.html)", path)
    return path


def read_operating_point(run_dir: Path | str) -> dict | None:
    """The final model's operating point as the run's report states it (`report/metrics.json`),
    for pages that repeat it (the triage page's header).

    Returns:
        None when the run has no report yet, or one written before operating points were
        reported; else `tabular.uncertainty.operating_point`'s dict (threshold, tp, fn, tn, fp,
        sensitivity with sensitivity_low/high, specificity with its bounds) plus "model" (the
        model it belongs to) and "target_sensitivity".
    """
    path = RunLayout(Path(run_dir)).report / METRICS
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    point = document.get("operating_point") if isinstance(document, dict) else None
    return point if isinstance(point, dict) and point.get("sensitivity") is not None else None


def age_column(spec: dict) -> str | None:
    """The spec's numeric age column: a numeric column named exactly `age` (any case), else the
    first numeric column whose name starts with `age_` (ISIC's `age_approx`); None when none."""
    numeric = [str(c) for c in spec.get("numeric", ())]
    exact = [c for c in numeric if c.lower() == "age"]
    return (exact or [c for c in numeric if _AGE.match(c.lower())] or [None])[0]


def skin_type_column(spec: dict) -> str | None:
    """The spec's skin type column (a categorical or numeric column named like `fitzpatrick`,
    `skin_type` or `phototype`); None when the spec has none."""
    columns = [str(c) for c in (*spec.get("categorical", ()), *spec.get("numeric", ()))]
    return next((c for c in columns if _SKIN_TYPE.search(c.lower())), None)


def _intervals(y: np.ndarray, predictions: dict, figures: dict, groups: np.ndarray,
               shown: str) -> dict | None:
    """Bootstrap intervals of every model's figures and of its difference from `shown`, each
    model at its own operating threshold; None (logged) when no model has a usable threshold."""
    thresholds = {name: figures[name]["threshold"] for name in predictions}
    usable = {name: p for name, p in predictions.items()
              if thresholds[name] is not None and 0.0 < thresholds[name] < 1.0}
    left_out = sorted(set(predictions) - set(usable))
    if left_out:
        log.warning("report: no interval for %s (operating threshold not in (0, 1): %s)", left_out,
                    {name: thresholds[name] for name in left_out})
    if shown not in usable:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # one-class resamples: counted in the result
        result = bootstrap_figures(y, usable, groups, {n: thresholds[n] for n in usable},
                                   final=shown, n_resamples=N_RESAMPLES, seed=SEED)
    for name in RANK_SCORES:  # a rank has no Brier score (the point table says n/a too)
        for table in ("models", "differences"):
            if name in result[table]:
                result[table][name]["brier"] = {"estimate": None, "low": None, "high": None}
    result["left_out"] = left_out
    return result


def _operating_point(y: np.ndarray, p: np.ndarray, threshold, shown: str,
                     sensitivity: float) -> dict | None:
    """The shown model's sensitivity and specificity at `threshold`, with exact intervals."""
    if threshold is None or not 0.0 < threshold < 1.0:
        return None
    point = operating_point(y, p, threshold)
    return {"model": shown, "target_sensitivity": sensitivity, **point}


def _subgroups(spec: dict, folds: pd.DataFrame, y: np.ndarray, p: np.ndarray, groups: np.ndarray,
               threshold, sensitivity: float) -> dict:
    """The subgroup table of the shown model, or {"unavailable": why} (logged)."""
    age, skin = age_column(spec), skin_type_column(spec)
    categorical = [str(c) for c in spec.get("categorical", ()) if c != skin]
    base = {"age_column": age, "skin_type_column": skin, "categorical": categorical,
            "threshold": threshold, "target_sensitivity": sensitivity,
            "min_positives": MIN_POSITIVES, "too_few": TOO_FEW}
    wanted = [*categorical, *([age] if age else []), *([skin] if skin else [])]
    if not wanted:
        return {**base, "rows": [], "unavailable": "the spec names no categorical, age or skin type column"}
    if threshold is None or not 0.0 < threshold < 1.0:
        return {**base, "rows": [], "unavailable": f"no operating threshold in (0, 1) (got {threshold!r})"}
    try:
        table = pd.read_csv(spec["metadata"], usecols=[spec["id"], *wanted], dtype={spec["id"]: str})
        table = table.drop_duplicates(spec["id"]).set_index(spec["id"]).reindex(folds["id"].astype(str))
        target = min(float(sensitivity), 1.0 - 1e-9)  # a 100% target: any shortfall is highlighted
        rows = subgroup_table(y, p, groups, threshold, table.reset_index(drop=True),
                              categorical=categorical, age=age, skin_type=skin,
                              target_sensitivity=target, n_resamples=N_RESAMPLES, seed=SEED)
    except (OSError, ValueError, KeyError) as error:
        # DataError is a ValueError: a changed metadata file must not cost the whole report
        log.warning("report: subgroups left out (%s)", error)
        return {**base, "rows": [], "unavailable": f"metadata {spec.get('metadata')} could not be "
                                                   f"tabulated: {error}"}
    return {**base, "rows": rows}


def _decision_curve(y: np.ndarray, predictions: dict, shown: str) -> dict | None:
    """Net benefit of the shown model and each base model that outputs a probability (the rank
    blend does not), treat-all and treat-none at 1-50%; None when the shown model is a rank."""
    candidates = {"final": shown, **{name: name for name in predictions if name not in (shown, "calibrated")}}
    probabilities, models = {}, {}
    for label, name in candidates.items():
        p = predictions[name]
        if name in RANK_SCORES or p.min() < 0.0 or p.max() > 1.0:
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


def _read_predictions(run_dir: Path, folds: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
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
            f"run {run_dir}: no model has out-of-fold predictions yet (no gbdt/, fusion/, blend/ or "
            "stack/ oof.csv); train one with `invoke train-gbdt --spec S --run R` or "
            "`invoke train-fusion --spec S --run R`"
        )
    return predictions, y


def _patients(record: dict, folds: pd.DataFrame) -> int | None:
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


def _read_calibrated(run_dir: Path, folds: pd.DataFrame, final: dict | None) -> np.ndarray | None:
    """The final model's calibrated out-of-fold probabilities aligned with `folds.csv`, or None
    (no calibration yet, or a file that does not match the run: logged)."""
    path = RunLayout(run_dir).stage("stack") / CALIBRATED_OOF
    if not final or "calibration" not in final or not path.is_file():
        return None
    oof = pd.read_csv(path, dtype={"id": str})
    if not {"id", "p"} <= set(oof.columns) or oof["id"].duplicated().any():
        log.warning("%s: not an out-of-fold file of this run; calibrated figures left out", path)
        return None
    p = pd.to_numeric(oof.set_index("id")["p"].reindex(folds["id"]), errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(p).all():
        log.warning("%s: ids differ from the run's folds.csv; calibrated figures left out", path)
        return None
    return p


def _final(run_dir: Path) -> dict | None:
    path = RunLayout(run_dir).final
    return json.loads(path.read_text()) if path.is_file() else None


def _best(figures: dict) -> str:
    def key(name):
        value = figures[name]["pauc80"]
        return -math.inf if value is None else value

    return max(figures, key=key)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def _markdown(document: dict, final: dict | None) -> str:
    sensitivity = document["sensitivity"]
    lines = [
        f"# Evaluation report: {document['dataset']}",
        "",
        f"Run `{document['run']}`: {_data_figures(document)}. Every figure is out of fold: each "
        "row was scored by a model that never saw it.",
        "",
    ]
    if final:
        lines.append(
            f"**Final model: {final['final']}** (the higher out-of-fold pAUC80 of stack and blend; "
            f"`stack/final.json`), operating threshold {_cell(document['final_threshold'], '.6g')} "
            f"for {sensitivity:.0%} target sensitivity{_on_probability(document)}."
        )
        if abs(final["sensitivity"] - sensitivity) > 1e-12:
            lines.append(
                f"Note: `stack/final.json` holds the threshold for {final['sensitivity']:.0%} "
                "sensitivity, which scoring uses; this report's thresholds are for "
                f"{sensitivity:.0%}. Rerun `invoke stack --run R --sensitivity {sensitivity}` to align them."
            )
    else:
        lines.append("No final model yet: run `invoke stack --run R` to stack and blend the base models.")
    lines += [
        "",
        f"Thresholds: each model's own, chosen on its out-of-fold predictions as the highest "
        f"score that keeps recall at or above {sensitivity:.0%}. pAUC80 is the ISIC 2024 metric "
        "(ROC area above 80% TPR, 0..0.2, random about 0.02).",
        "",
        "| model | " + " | ".join(heading for _, heading, _ in COLUMNS) + " |",
        "|---|" + "|".join("---:" for _ in COLUMNS) + "|",
    ]
    for name, figures in document["models"].items():
        label = f"**{name}** (final)" if final and name == final["final"] else name
        if name == "calibrated":
            label = f"**calibrated** ({document['final']}, {document['final_method']})"
        cells = [_cell(figures[key], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Models:"]
    lines += [f"- {name}: {DESCRIPTIONS[name]}" for name in document["models"]]
    operating = operating_sentence(document)
    if operating:
        lines += ["", "## Operating point", "", operating]
    lines += ["", *_markdown_intervals(document)]
    lines += ["", *_markdown_subgroups(document)]
    lines += ["", *_markdown_decision(document)]
    lines += ["", "## Plots", ""]
    for key, name in document["plots"].items():
        lines += [f"### {PLOT_TITLES[key]}", "", f"![{key}]({name})", ""]
    lines += ["## Model card", "", f"The model card of this run: [{model_card.FILE}]({model_card.FILE}).", ""]
    return "\n".join(lines)


def _md_table(headings: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    return ["| " + " | ".join(headings) + " |",
            "|" + "|".join("---" if i < numeric_from else "---:" for i in range(len(headings))) + "|",
            *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]]


def _markdown_intervals(document: dict) -> list[str]:
    values = interval_values(document)
    if values is None:
        return ["## Figures with 95% CI", "", "No intervals: no model has an operating threshold in (0, 1)."]
    lines = ["## Figures with 95% CI", "", values["note"], ""]
    lines += _md_table(["model", *values["headings"]], [[r["name"], *r["cells"]] for r in values["models"]])
    lines += ["", f"### Difference from the final model ({values['final']}), paired 95% CI", "",
              values["difference_note"]]
    if values["differences"]:
        lines += ["", *_md_table(["model", *values["headings"]],
                                 [[r["name"], *r["cells"]] for r in values["differences"]])]
    return lines


def _markdown_subgroups(document: dict) -> list[str]:
    values = subgroup_values(document)
    lines = ["## Subgroup figures", "", values["note"]]
    if values["unavailable"]:
        return [*lines, "", f"Subgroup table not made: {values['unavailable']}."]
    for table in values["tables"]:
        rows = [[("**" + r["subgroup"] + "** (below target)") if r["highlight"] else r["subgroup"],
                 *r["cells"], r["status"]] for r in table["rows"]]
        lines += ["", f"### Subgroup: {table['title']}", ""]
        lines += _md_table(["subgroup", *values["headings"], "status"], rows)
    return lines


def _markdown_decision(document: dict) -> list[str]:
    values = decision_values(document)
    lines = ["## Decision curve (net benefit)", ""]
    if values is None:
        return [*lines, "No decision curve: the final model's score is not a probability."]
    lines += [values["note"], ""]
    lines += _md_table(["threshold probability", *values["headings"]],
                       [[r["threshold"], *r["cells"]] for r in values["rows"]])
    return lines


def ci_text(cell: dict | None, fmt: str, signed: bool = False) -> str:
    """"0.9120 (0.8990 to 0.9250)" from {"estimate", "low", "high"}; "n/a" where undefined."""
    if not cell or cell.get("estimate") is None:
        return "n/a"
    f = ("+" if signed else "") + fmt
    if cell.get("low") is None or cell.get("high") is None:
        return format(cell["estimate"], f)
    return f"{format(cell['estimate'], f)} ({format(cell['low'], f)} to {format(cell['high'], f)})"


def _split(text: str) -> dict:
    """"0.91 (0.89 to 0.93)" as {"estimate": "0.91", "interval": "0.89 to 0.93"}."""
    estimate, _, interval = text.partition(" (")
    return {"estimate": estimate, "interval": interval.rstrip(")")}


def interval_values(document: dict) -> dict | None:
    """The interval tables as plain text cells (for report.md, index.html and the model card)."""
    intervals = document.get("intervals")
    if not intervals:
        return None
    headings = [f"{heading} (95% CI)" for _, heading, _ in INTERVAL_FIGURES]

    def rows(table: dict, signed: bool) -> list[dict]:
        return [{"name": name, "final": name == intervals["final"],
                 "cells": [ci_text(figs.get(key), fmt, signed) for key, _, fmt in INTERVAL_FIGURES],
                 # the page shows the interval under its estimate, to keep the table narrow
                 "split": [_split(ci_text(figs.get(key), fmt, signed)) for key, _, fmt in INTERVAL_FIGURES]}
                for name, figs in table.items()]

    groups = f"{intervals['n_groups']:,} groups ({document['group_column']})"
    note = (f"Estimate and 95% CI (percentile bootstrap over the {groups}: {intervals['n_resamples']:,} "
            f"resamples, seed {intervals['seed']}; a group's rows are drawn together). Sensitivity and "
            "specificity at each model's own operating threshold.")
    if intervals.get("one_class"):
        note += (f" {intervals['one_class']} resamples drew one class only and are left out of the "
                 "ROC AUC, pAUC80 and PR AUC intervals.")
    if intervals.get("left_out"):
        note += f" No interval for {', '.join(intervals['left_out'])} (no operating threshold in (0, 1))."
    difference_note = (f"Each model minus {intervals['final']} on the same resamples: an interval that "
                       "excludes 0 is a difference the data can tell apart from chance."
                       if intervals["differences"] else
                       f"No other model to compare with {intervals['final']}.")
    return {"headings": headings, "note": note, "final": intervals["final"],
            "difference_note": difference_note,
            "models": rows(intervals["models"], False), "differences": rows(intervals["differences"], True)}


def operating_sentence(document: dict) -> str | None:
    """"At threshold 0.0247 (calibrated) sensitivity is 0.950 (lower 95% bound 0.931, ...)"."""
    point = document.get("operating_point")
    if not point or point.get("sensitivity") is None:
        return None
    text = (f"At the operating threshold {point['threshold']:.6g} ({point['model']}), chosen for "
            f"{point['target_sensitivity']:.0%} target sensitivity, the out-of-fold sensitivity is "
            f"{point['sensitivity']:.3f} ({point['tp']:,} of {point['tp'] + point['fn']:,} malignant "
            f"lesions flagged; lower 95% bound {point['sensitivity_low']:.3f}, 95% CI "
            f"{point['sensitivity_low']:.3f} to {point['sensitivity_high']:.3f}, Clopper-Pearson)")
    if point.get("specificity") is not None:
        text += (f" and the specificity {point['specificity']:.3f} (95% CI {point['specificity_low']:.3f} "
                 f"to {point['specificity_high']:.3f})")
    return text + "."


SUBGROUP_HEADINGS = ["rows", "positives", "ROC AUC (95% CI)", "sensitivity (95% CI)",
                     "specificity (95% CI)", "mean predicted", "observed rate"]


def subgroup_values(document: dict) -> dict:
    """The subgroup tables as plain text cells, one table per column (for report.md, index.html)."""
    sub = document.get("subgroups") or {}
    target = sub.get("target_sensitivity", document["sensitivity"])
    note = (f"Subgroup figures of the final model ({document.get('shown')}) at the run's operating threshold. "
            f"Highlighted (below target): the upper end of the subgroup's sensitivity 95% CI "
            f"(Clopper-Pearson) is below the target {target:.0%}, so the shortfall is not chance. "
            f"Fewer than {sub.get('min_positives', MIN_POSITIVES)} positives: \"{TOO_FEW}\". "
            f"Age bands from the column {sub.get('age_column') or '(none in the spec)'}"
            f"{'' if not sub.get('age_column') else ' (the numeric column named age, else age_*)'}; "
            f"skin type from {sub.get('skin_type_column') or '(none in the spec)'}.")
    tables: dict[tuple, dict] = {}
    for row in sub.get("rows", []):
        key = (row["column"], row["kind"])
        title = row["column"] if row["kind"] == "categorical" else f"{row['column']} ({row['kind']})"
        table = tables.setdefault(key, {"title": title, "column": row["column"], "kind": row["kind"], "rows": []})
        interval = {"estimate": row["sensitivity"], "low": row["sensitivity_low"], "high": row["sensitivity_high"]}
        specificity = {"estimate": row["specificity"], "low": row["specificity_low"], "high": row["specificity_high"]}
        table["rows"].append({
            "subgroup": row["subgroup"], "highlight": bool(row["highlight"]), "status": row["status"],
            "too_few": row["status"] == TOO_FEW,
            "cells": [f"{row['rows']:,}", f"{row['positives']:,}",
                      ci_text(row["roc_auc"], ".3f") if row["roc_auc"] else "n/a",
                      ci_text(interval, ".3f"), ci_text(specificity, ".3f"),
                      html.number(row["mean_predicted"], ".3f"), html.number(row["observed_rate"], ".3f")],
        })
    highlighted = [f"{r['column']} = {r['subgroup']}" for r in sub.get("rows", []) if r["highlight"]]
    return {"note": note, "headings": SUBGROUP_HEADINGS, "tables": list(tables.values()),
            "unavailable": sub.get("unavailable"), "highlighted": highlighted,
            "too_few": sum(r["status"] == TOO_FEW for r in sub.get("rows", [])),
            "count": len(sub.get("rows", []))}


# Threshold probabilities the decision table lists (the plot shows every one, 1-50%).
DECISION_ROWS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def decision_values(document: dict) -> dict | None:
    """Net benefit at a few threshold probabilities, as plain text cells."""
    curve = document.get("decision_curve")
    if not curve:
        return None
    names = list(curve["net_benefit"])
    models = curve.get("models", {})
    headings = [f"{name} ({models[name]})" if name == "final" and name in models else name for name in names]
    rows = []
    for pt in DECISION_ROWS:
        matches = [i for i, t in enumerate(curve["thresholds"]) if abs(t - pt) < 1e-9]
        if matches:
            i = matches[0]
            rows.append({"threshold": f"{pt:.0%}",
                         "cells": [format(curve["net_benefit"][name][i], ".4f") for name in names]})
    note = ("Net benefit (Vickers & Elkin 2006) of treating (referring, excising) the lesions whose "
            "out-of-fold probability is at or above the threshold probability pt: true positives / n "
            "minus false positives / n x pt / (1 - pt). A model is worth using at pt where its net "
            f"benefit is above both treat all and treat none (0). Prevalence {curve['prevalence']:.4f}, "
            f"{curve['n']:,} rows; every threshold 1-50% is in metrics.json and the plot. Models whose "
            "score is not a probability (the rank blend) have no curve.")
    return {"headings": headings, "rows": rows, "note": note}


def _on_probability(document: dict) -> str:
    if "calibrated" not in document["models"]:
        return ""
    return (f", on the calibrated probability (row `calibrated`: {document['final']} through "
            f"{document['final_method']} calibration, the `probability` scoring writes)")


def _data_figures(document: dict) -> str:
    """"300 rows, 90 positive (malignant), 150 groups (lesion_id), 5 grouped folds"."""
    parts = [f"{document['rows']} rows", f"{document['positives']} positive (malignant)",
             f"{document['groups']} groups ({document['group_column']})"]
    if document.get("patients") is not None:
        parts.append(f"{document['patients']} patients ({document['patient_column']})")
    parts.append(f"{document['n_folds']} grouped folds")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------- html


def _html(document: dict, final: dict | None, out: Path, card: dict) -> str:
    """`index.html`: the figures of `report.md` as one self-contained page (plots embedded), from
    the template `fuse/pages/templates/report.html`."""
    sensitivity = document["sensitivity"]
    rows, positives = document["rows"], document["positives"]
    models = []
    for name, figures in document["models"].items():
        models.append({
            "name": name,
            "final": bool(final) and name == final["final"],
            "calibrated": {"final": document["final"], "method": document["final_method"]}
            if name == "calibrated" else None,
            "cells": [{"sort": _sort_key(figures[key]), "text": html.number(figures[key], fmt)}
                      for key, _, fmt in COLUMNS],
            "description": html.code_segments(DESCRIPTIONS.get(name, "")),
        })
    return html.render(
        "report.html",
        dataset=document["dataset"],
        run=document["run"],
        data={
            "rows": f"{rows:,}",
            "positives": f"{positives:,} ({positives / rows:.2%})" if rows else "0",
            "groups": f"{document['groups']:,}",
            "group_column": document["group_column"],
            "patients": None if document.get("patients") is None else f"{document['patients']:,}",
            "patient_column": document.get("patient_column"),
            "folds": document["n_folds"],
        },
        sensitivity=f"{sensitivity:.0%}",
        final=_final_values(document, final) if final else None,
        columns=[heading for _, heading, _ in COLUMNS],
        models=models,
        plots=[{"key": key, "title": PLOT_TITLES[key], "src": html.png_data_uri((out / name).read_bytes())}
               for key, name in document["plots"].items()],
        operating=operating_sentence(document),
        intervals=interval_values(document),
        subgroups=subgroup_values(document),
        decision=decision_values(document),
        card=model_card.page_values(card),
        card_file=model_card.FILE,
        applicability=applicability_values(document.get("applicability"), out),
    )


def _final_values(document: dict, final: dict) -> dict:
    """The final model's values for `report/final.html`."""
    name = final["final"]
    figures = document["models"].get("calibrated", document["models"].get(name, {}))
    sensitivity = document["sensitivity"]
    stale = None
    if abs(final["sensitivity"] - sensitivity) > 1e-12:
        stale = {"held": f"{final['sensitivity']:.0%}", "value": str(sensitivity)}
    return {
        "name": name,
        "description": html.code_segments(DESCRIPTIONS.get(name, "")),
        "threshold": html.number(document["final_threshold"], ".6g"),
        "on_probability": html.code_segments(_on_probability(document)),
        "recall": html.number(figures.get("recall"), ".4f"),
        "specificity": html.number(figures.get("specificity"), ".4f"),
        "pauc80": html.number(figures.get("pauc80"), ".4f"),
        "stale": stale,
    }


def _sort_key(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value))


# ------------------------------------------------------------------------------------ plots


def _plots(out: Path, y: np.ndarray, predictions: dict, figures: dict, shown: str,
           importance_csv: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    written = {}
    one_class = y.min() == y.max()
    # calibration keeps the final model's order: its ROC and PR curves would repeat the final's
    ranked = {name: p for name, p in predictions.items() if name != "calibrated"}

    def save(fig, key):
        fig.tight_layout()
        fig.savefig(out / PLOTS[key], dpi=110)
        plt.close(fig)
        written[key] = PLOTS[key]

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.axhspan(0.8, 1.0, color="tab:green", alpha=0.12, label="pAUC80 region (TPR >= 0.8)")
    if not one_class:
        for name, p in ranked.items():
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} (AUC {_cell(figures[name]['roc_auc'], '.3f')}, "
                                    f"pAUC80 {_cell(figures[name]['pauc80'], '.3f')})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (sensitivity)", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    save(fig, "roc")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    if not one_class:
        for name, p in ranked.items():
            precision, recall, _ = precision_recall_curve(y, p)
            ax.plot(recall, precision, label=f"{name} (AP {_cell(figures[name]['pr_auc'], '.3f')})")
    ax.axhline(y.mean(), color="grey", lw=0.8, ls="--", label=f"prevalence {y.mean():.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper right", fontsize=7)
    save(fig, "pr")

    f = figures[shown]
    counts = np.array([[f["tn"] or 0, f["fp"] or 0], [f["fn"] or 0, f["tp"] or 0]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(counts, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black", fontsize=12)
    ax.set_xticks([0, 1], ["benign", "malignant"])
    ax.set_yticks([0, 1], ["benign", "malignant"])
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{shown} at threshold {_cell(f['threshold'], '.4g')}")
    save(fig, "confusion")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    if not one_class:
        for name, p in predictions.items():
            bins = max(2, min(10, int(y.sum()) // 2))
            true, mean = calibration_curve(y, np.clip(p, 0, 1), n_bins=bins, strategy="quantile")
            suffix = {"blend": " (rank score)", "calibrated": " (probability)"}.get(name, "")
            ax.plot(mean, true, marker="o", ms=3, label=name + suffix)
    ax.set(xlabel="mean predicted score", ylabel="observed share malignant", title="Calibration", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    save(fig, "calibration")

    p = predictions[shown]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    edges = np.linspace(float(p.min()), float(p.max()) + 1e-12, 41)
    ax.hist(p[y == 0], bins=edges, alpha=0.6, density=True, label=f"benign ({int((y == 0).sum())})")
    ax.hist(p[y == 1], bins=edges, alpha=0.6, density=True, label=f"malignant ({int(y.sum())})")
    if f["threshold"] is not None:
        ax.axvline(f["threshold"], color="black", ls="--", lw=1, label="operating threshold")
    ax.set(xlabel=f"{shown} score", ylabel="density", title=f"Scores by class ({shown})")
    ax.legend(fontsize=7)
    save(fig, "histogram")

    if importance_csv.is_file():
        top = _importance(importance_csv)
        if top is not None:
            fig, ax = plt.subplots(figsize=(6, max(2.5, 0.22 * len(top) + 1)))
            ax.barh(top.index[::-1], top.to_numpy()[::-1], color="tab:blue")
            ax.set(xlabel=top.name, title="LightGBM feature importance (gbdt)")
            ax.tick_params(axis="y", labelsize=7)
            save(fig, "importance")
    return written


def _importance(path: Path, top: int = 25) -> pd.Series | None:
    """The `top` features of `gbdt/importance.csv` by gain (or its first numeric column)."""
    table = pd.read_csv(path)
    text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    if not text or not numeric:
        log.warning("%s: no feature-name and value columns; importance plot skipped", path)
        return None
    value = next((c for c in numeric if "gain" in c.lower()), numeric[0])
    series = table.groupby(text[0])[value].mean().sort_values(ascending=False).head(top)
    series.name = value
    return series
