"""The report's figures as text: table columns and model descriptions, cells with their 95%
intervals, the operating-point sentence, and the interval, subgroup and decision tables as plain
text cells, shared by `report.md`, `index.html` and the model card."""

from __future__ import annotations

import logging
import math

from fuse.pages import html
from tabular.subgroups import MIN_POSITIVES, TOO_FEW

__all__ = [
    "COLUMNS",
    "DESCRIPTIONS",
    "INTERVAL_FIGURES",
    "SUBGROUP_HEADINGS",
    "cell",
    "ci_text",
    "data_figures",
    "decision_values",
    "interval_values",
    "on_probability",
    "operating_sentence",
    "subgroup_values",
]

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "gbdt": "LightGBM ensemble on metadata (and image PCA) features",
    "fusion": "fusion MLP on image embeddings + metadata",
    "blend": "rank average of gbdt and fusion",
    "stack": "LightGBM on metadata + the fusion MLP's and gbdt's predictions",
    "calibrated": "the final model's score through its calibrator (fitted on the out-of-fold "
    "scores): the `probability` that scoring writes",
}
# (key in metrics.json, column heading, format)
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
# (key in tabular.uncertainty.FIGURES, heading, format) of the interval tables.
INTERVAL_FIGURES = (
    ("roc_auc", "ROC AUC", ".4f"),
    ("pauc80", "pAUC80", ".4f"),
    ("pr_auc", "PR AUC", ".4f"),
    ("brier", "Brier", ".4f"),
    ("sensitivity", "sensitivity", ".3f"),
    ("specificity", "specificity", ".3f"),
)


def cell(value, fmt: str) -> str:
    """`value` formatted by `fmt`; "n/a" for None or a value that is not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def ci_text(cell: dict | None, fmt: str, signed: bool = False) -> str:
    """ "0.9120 (0.8990 to 0.9250)" from {"estimate", "low", "high"}; "n/a" where undefined."""
    if not cell or cell.get("estimate") is None:
        return "n/a"
    f = ("+" if signed else "") + fmt
    if cell.get("low") is None or cell.get("high") is None:
        return format(cell["estimate"], f)
    return f"{format(cell['estimate'], f)} ({format(cell['low'], f)} to {format(cell['high'], f)})"


def _split(text: str) -> dict:
    """ "0.91 (0.89 to 0.93)" as {"estimate": "0.91", "interval": "0.89 to 0.93"}."""
    estimate, _, interval = text.partition(" (")
    return {"estimate": estimate, "interval": interval.rstrip(")")}


def interval_values(document: dict) -> dict | None:
    """The interval tables as plain text cells (for report.md, index.html and the model card)."""
    intervals = document.get("intervals")
    if not intervals:
        return None
    headings = [f"{heading} (95% CI)" for _, heading, _ in INTERVAL_FIGURES]

    def rows(table: dict, signed: bool) -> list[dict]:
        return [
            {
                "name": name,
                "final": name == intervals["final"],
                "cells": [ci_text(figs.get(key), fmt, signed) for key, _, fmt in INTERVAL_FIGURES],
                # the page shows the interval under its estimate, to keep the table narrow
                "split": [
                    _split(ci_text(figs.get(key), fmt, signed)) for key, _, fmt in INTERVAL_FIGURES
                ],
            }
            for name, figs in table.items()
        ]

    groups = f"{intervals['n_groups']:,} groups ({document['group_column']})"
    note = (
        f"Estimate and 95% CI (percentile bootstrap over the {groups}: "
        f"{intervals['n_resamples']:,} resamples, seed {intervals['seed']}; a group's rows are "
        "drawn together). Sensitivity and specificity at each model's own operating threshold."
    )
    if intervals.get("one_class"):
        note += (
            f" {intervals['one_class']} resamples drew one class only and are left out of the "
            "ROC AUC, pAUC80 and PR AUC intervals."
        )
    if intervals.get("left_out"):
        note += (
            f" No interval for {', '.join(intervals['left_out'])} (no operating threshold in "
            "(0, 1))."
        )
    difference_note = (
        f"Each model minus {intervals['final']} on the same resamples: an interval that "
        "excludes 0 is a difference the data can tell apart from chance."
        if intervals["differences"]
        else f"No other model to compare with {intervals['final']}."
    )
    return {
        "headings": headings,
        "note": note,
        "final": intervals["final"],
        "difference_note": difference_note,
        "models": rows(intervals["models"], False),
        "differences": rows(intervals["differences"], True),
    }


def operating_sentence(document: dict) -> str | None:
    """ "At threshold 0.0247 (calibrated) sensitivity is 0.950 (lower 95% bound 0.931, ...)"."""
    point = document.get("operating_point")
    if not point or point.get("sensitivity") is None:
        return None
    text = (
        f"At the operating threshold {point['threshold']:.6g} ({point['model']}), chosen for "
        f"{point['target_sensitivity']:.0%} target sensitivity, the out-of-fold sensitivity is "
        f"{point['sensitivity']:.3f} ({point['tp']:,} of {point['tp'] + point['fn']:,} malignant "
        f"lesions flagged; lower 95% bound {point['sensitivity_low']:.3f}, 95% CI "
        f"{point['sensitivity_low']:.3f} to {point['sensitivity_high']:.3f}, Clopper-Pearson)"
    )
    if point.get("specificity") is not None:
        text += (
            f" and the specificity {point['specificity']:.3f} (95% CI "
            f"{point['specificity_low']:.3f} "
            f"to {point['specificity_high']:.3f})"
        )
    return text + "."


SUBGROUP_HEADINGS = [
    "rows",
    "positives",
    "ROC AUC (95% CI)",
    "sensitivity (95% CI)",
    "specificity (95% CI)",
    "mean predicted",
    "observed rate",
]


def subgroup_values(document: dict) -> dict:
    """The subgroup tables as plain text cells, one table per column (for report.md, index.html)."""
    sub = document.get("subgroups") or {}
    target = sub.get("target_sensitivity", document["sensitivity"])
    note = (
        f"Subgroup figures of the final model ({document.get('shown')}) at the run's operating "
        "threshold. Highlighted (below target): the upper end of the subgroup's sensitivity 95% CI "
        f"(Clopper-Pearson) is below the target {target:.0%}, so the shortfall is not chance. "
        f'Fewer than {sub.get("min_positives", MIN_POSITIVES)} positives: "{TOO_FEW}". '
        f"Age bands from the column {sub.get('age_column') or '(none in the spec)'}"
        f"{'' if not sub.get('age_column') else ' (the numeric column named age, else age_*)'}; "
        f"skin type from {sub.get('skin_type_column') or '(none in the spec)'}."
    )
    tables: dict[tuple, dict] = {}
    for row in sub.get("rows", []):
        key = (row["column"], row["kind"])
        title = (
            row["column"] if row["kind"] == "categorical" else f"{row['column']} ({row['kind']})"
        )
        table = tables.setdefault(
            key, {"title": title, "column": row["column"], "kind": row["kind"], "rows": []}
        )
        interval = {
            "estimate": row["sensitivity"],
            "low": row["sensitivity_low"],
            "high": row["sensitivity_high"],
        }
        specificity = {
            "estimate": row["specificity"],
            "low": row["specificity_low"],
            "high": row["specificity_high"],
        }
        table["rows"].append(
            {
                "subgroup": row["subgroup"],
                "highlight": bool(row["highlight"]),
                "status": row["status"],
                "too_few": row["status"] == TOO_FEW,
                "cells": [
                    f"{row['rows']:,}",
                    f"{row['positives']:,}",
                    ci_text(row["roc_auc"], ".3f") if row["roc_auc"] else "n/a",
                    ci_text(interval, ".3f"),
                    ci_text(specificity, ".3f"),
                    html.number(row["mean_predicted"], ".3f"),
                    html.number(row["observed_rate"], ".3f"),
                ],
            }
        )
    highlighted = [
        f"{r['column']} = {r['subgroup']}" for r in sub.get("rows", []) if r["highlight"]
    ]
    return {
        "note": note,
        "headings": SUBGROUP_HEADINGS,
        "tables": list(tables.values()),
        "unavailable": sub.get("unavailable"),
        "highlighted": highlighted,
        "too_few": sum(r["status"] == TOO_FEW for r in sub.get("rows", [])),
        "count": len(sub.get("rows", [])),
    }


# Threshold probabilities the decision table lists (the plot shows every one, 1-50%).
_DECISION_ROWS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def decision_values(document: dict) -> dict | None:
    """Net benefit at a few threshold probabilities, as plain text cells."""
    curve = document.get("decision_curve")
    if not curve:
        return None
    names = list(curve["net_benefit"])
    models = curve.get("models", {})
    headings = [
        f"{name} ({models[name]})" if name == "final" and name in models else name for name in names
    ]
    rows = []
    for pt in _DECISION_ROWS:
        matches = [i for i, t in enumerate(curve["thresholds"]) if abs(t - pt) < 1e-9]
        if matches:
            i = matches[0]
            rows.append(
                {
                    "threshold": f"{pt:.0%}",
                    "cells": [format(curve["net_benefit"][name][i], ".4f") for name in names],
                }
            )
    note = (
        "Net benefit (Vickers & Elkin 2006) of treating (referring, excising) the lesions whose "
        "out-of-fold probability is at or above the threshold probability pt: true positives / n "
        "minus false positives / n x pt / (1 - pt). A model is worth using at pt where its net "
        "benefit is above both treat all and treat none (0). Prevalence "
        f"{curve['prevalence']:.4f}, "
        f"{curve['n']:,} rows; every threshold 1-50% is in metrics.json and the plot. Models whose "
        "score is not a probability (the rank blend) have no curve."
    )
    return {"headings": headings, "rows": rows, "note": note}


def on_probability(document: dict) -> str:
    """ ", on the calibrated probability (...)" where the run has a calibrated final model."""
    if "calibrated" not in document["models"]:
        return ""
    return (
        f", on the calibrated probability (row `calibrated`: {document['final']} through "
        f"{document['final_method']} calibration, the `probability` scoring writes)"
    )


def data_figures(document: dict) -> str:
    """ "300 rows, 90 positive (malignant), 150 groups (lesion_id), 5 grouped folds"."""
    parts = [
        f"{document['rows']} rows",
        f"{document['positives']} positive (malignant)",
        f"{document['groups']} groups ({document['group_column']})",
    ]
    if document.get("patients") is not None:
        parts.append(f"{document['patients']} patients ({document['patient_column']})")
    parts.append(f"{document['n_folds']} grouped folds")
    return ", ".join(parts)
