"""The evaluation report of a run: one table of every model's out-of-fold figures, and plots.

Every figure comes from out-of-fold predictions (`<stage>/oof.csv`), so each row was scored by a
model that never saw it. Each model's operating threshold is chosen on its own out-of-fold
predictions for the target sensitivity (default 95%): the scales of the models differ (the blend
gives a rank score, not a probability), so one shared threshold would mean nothing.

Writes `<run>/report/`: `report.md` (the table, the final model, the plots), `index.html` (the
same, as one self-contained page with the plots embedded, for a browser, offline), `metrics.json`
(the same figures for machines), `model-card.md` (see `fuse.pages.model_card`) and the PNG plots.
This module writes them; the figures are computed in `fuse.pages.report_figures`, turned into
text in `fuse.pages.report_text`, `report.md` in `fuse.pages.report_markdown`, the plots in
`fuse.pages.report_plots`, and the page is rendered here from the template
`fuse/pages/templates/report.html` (and its parts under `report/`).

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
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write_text
from fuse.errors import RunError
from fuse.pages import html, model_card
from fuse.pages.report_applicability import applicability_section, applicability_values
from fuse.pages.report_figures import (
    MODELS,
    N_RESAMPLES,
    SEED,
    age_column,
    intervals,
    model_figures,
    net_benefit,
    patients,
    read_calibrated,
    read_final,
    read_predictions,
    shown_model,
    shown_operating_point,
    skin_type_column,
    subgroups,
)
from fuse.pages.report_markdown import markdown
from fuse.pages.report_plots import PLOT_TITLES, PLOTS, write_decision_plot, write_plots
from fuse.pages.report_text import (
    COLUMNS,
    DESCRIPTIONS,
    INTERVAL_FIGURES,
    SUBGROUP_HEADINGS,
    ci_text,
    decision_values,
    interval_values,
    on_probability,
    operating_sentence,
    subgroup_values,
)
from runfolder.layout import METRICS, REPORT, RunLayout
from tabular.folds import read_folds

__all__ = [
    "COLUMNS",
    "DESCRIPTIONS",
    "INTERVAL_FIGURES",
    "MODELS",
    "N_RESAMPLES",
    "PLOT_TITLES",
    "PLOTS",
    "SEED",
    "SUBGROUP_HEADINGS",
    "age_column",
    "ci_text",
    "decision_values",
    "interval_values",
    "operating_sentence",
    "read_operating_point",
    "skin_type_column",
    "subgroup_values",
    "write_report",
]

log = logging.getLogger(__name__)


def write_report(run_dir: Path | str, sensitivity: float = 0.95) -> Path:
    """Write `<run>/report/report.md`, `index.html`, `metrics.json`, `model-card.md` and the PNG
    plots.

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
    predictions, y = read_predictions(run_dir, folds)
    final = read_final(run_dir)
    calibrated = read_calibrated(run_dir, folds, final)
    if calibrated is not None:
        predictions["calibrated"] = calibrated
    figures = model_figures(y, predictions, final, sensitivity)
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    shown = shown_model(predictions, figures, final)
    plots = write_plots(
        out, y, predictions, figures, shown, layout.stage("gbdt") / "importance.csv"
    )
    document = _document(
        run_dir, record, folds, y, predictions, figures, final, shown, plots, sensitivity
    )
    card = model_card.build(run_dir, record, document, final)
    document["model_card"] = model_card.FILE
    layout.write_json(REPORT, METRICS, document)
    atomic_write_text(out / model_card.FILE, model_card.markdown(card))
    path = atomic_write_text(out / "report.md", markdown(document, final))
    atomic_write_text(out / "index.html", _html(document, final, out, card))
    log.info("report: %s (and index.html)", path)
    return path


def _document(
    run_dir: Path,
    record: dict,
    folds: pd.DataFrame,
    y: np.ndarray,
    predictions: dict[str, np.ndarray],
    figures: dict,
    final: dict | None,
    shown: str,
    plots: dict[str, str],
    sensitivity: float,
) -> dict:
    """The report's `metrics.json` (less "model_card"): the data set's figures, every model's,
    and the shown model's intervals, operating point, subgroups and decision curve (whose plot
    it writes into `report/`)."""
    out = RunLayout(run_dir).report
    groups = folds["group"].to_numpy()
    spec = record.get("spec", {})
    # the threshold scoring applies: on the calibrated probability where there is one
    final_threshold = (
        (final["threshold"] if "calibrated" in figures else figures[shown]["threshold"])
        if final and final["final"] in figures
        else None
    )
    threshold = final_threshold if final_threshold is not None else figures[shown]["threshold"]
    curve = net_benefit(y, predictions, shown)
    if curve is not None:
        plots["decision"] = write_decision_plot(out, curve)
    return {
        "run": str(run_dir),
        "dataset": spec.get("name"),
        "rows": int(len(y)),
        "positives": int(y.sum()),
        "groups": int(folds["group"].nunique()),
        "group_column": spec.get("group"),
        "patients": patients(record, folds),
        "patient_column": spec.get("patient"),
        "n_folds": int(folds["fold"].nunique()),
        "sensitivity": sensitivity,
        "final": final["final"] if final else None,
        "final_threshold": final_threshold,
        "final_method": final.get("calibration", {}).get("method") if final else None,
        "models": figures,
        # the model whose operating point, subgroups and decision curve the report shows
        "shown": shown,
        "intervals": intervals(y, predictions, figures, groups, shown),
        "operating_point": shown_operating_point(
            y, predictions[shown], threshold, shown, sensitivity
        ),
        "subgroups": subgroups(spec, folds, y, predictions[shown], groups, threshold, sensitivity),
        "decision_curve": curve,
        "plots": {key: name for key, name in plots.items()},
        # the training lesions' out-of-fold novelty and the threshold (None: no applicability stage)
        "applicability": applicability_section(run_dir, out),
    }


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


# ------------------------------------------------------------------------------------- html


def _html(document: dict, final: dict | None, out: Path, card: dict) -> str:
    """`index.html`: the figures of `report.md` as one self-contained page (plots embedded), from
    the template `fuse/pages/templates/report.html`."""
    sensitivity = document["sensitivity"]
    rows, positives = document["rows"], document["positives"]
    final_name = final["final"] if final else None
    models = []
    for name, figures in document["models"].items():
        models.append(
            {
                "name": name,
                "final": final_name is not None and name == final_name,
                "calibrated": {"final": document["final"], "method": document["final_method"]}
                if name == "calibrated"
                else None,
                "cells": [
                    {"sort": _sort_key(figures[key]), "text": html.number(figures[key], fmt)}
                    for key, _, fmt in COLUMNS
                ],
                "description": html.code_segments(DESCRIPTIONS.get(name, "")),
            }
        )
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
        plots=[
            {
                "key": key,
                "title": PLOT_TITLES[key],
                "src": html.png_data_uri((out / name).read_bytes()),
            }
            for key, name in document["plots"].items()
        ],
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
        "on_probability": html.code_segments(on_probability(document)),
        "recall": html.number(figures.get("recall"), ".4f"),
        "specificity": html.number(figures.get("specificity"), ".4f"),
        "pauc80": html.number(figures.get("pauc80"), ".4f"),
        "stale": stale,
    }


def _sort_key(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(float(value))
