"""The evaluation report of a run: one table of every model's out-of-fold figures, and plots.

Every figure comes from out-of-fold predictions (`<stage>/oof.csv`), so each row was scored by a
model that never saw it. Each model's operating threshold is chosen on its own out-of-fold
predictions for the target sensitivity (default 95%): the scales of the models differ (the blend
gives a rank score, not a probability), so one shared threshold would mean nothing.

Writes `<run>/report/`: `report.md` (the table, the final model, the plots), `index.html` (the
same, as one self-contained page with the plots embedded, for a browser, offline), `metrics.json`
(the same figures for machines) and the PNG plots. The page is the template
`fuse/templates/report.html` (and its parts under `report/`); `report.md` is written here.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write_text
from fuse import html
from fuse.errors import RunError
from fuse.report_applicability import applicability_section, applicability_values
from tabular.folds import read_folds
from tabular.layout import RunLayout
from tabular.metrics import MetricWarning, calibration, summarize

__all__ = ["COLUMNS", "DESCRIPTIONS", "MODELS", "PLOT_TITLES", "PLOTS", "write_report"]

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
}
PLOT_TITLES = {
    "roc": "ROC curves (shaded: the pAUC80 region, TPR >= 80%)",
    "pr": "Precision-recall curves",
    "confusion": "Confusion matrix of the final model at its operating threshold",
    "calibration": "Calibration (reliability) curves",
    "histogram": "Scores of the final model by class",
    "importance": "LightGBM feature importance (gbdt)",
}


def write_report(run_dir: Path | str, sensitivity: float = 0.95) -> Path:
    """Write `<run>/report/report.md`, `index.html`, `metrics.json` and the PNG plots.

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
    run_dir = RunLayout(Path(run_dir)).require().dir
    record = json.loads((run_dir / "run.json").read_text())
    folds = read_folds(run_dir / "folds.csv")
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
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    if "calibrated" in predictions:
        shown = "calibrated"
    else:
        shown = final["final"] if final and final["final"] in predictions else _best(figures)
    plots = _plots(out, y, predictions, figures, shown, run_dir / "gbdt" / "importance.csv")

    document = {
        "run": str(run_dir),
        "dataset": record.get("spec", {}).get("name"),
        "rows": int(len(y)),
        "positives": int(y.sum()),
        "groups": int(folds["group"].nunique()),
        "group_column": record.get("spec", {}).get("group"),
        "patients": _patients(record, folds),
        "patient_column": record.get("spec", {}).get("patient"),
        "n_folds": int(folds["fold"].nunique()),
        "sensitivity": sensitivity,
        "final": final["final"] if final else None,
        # the threshold scoring applies: on the calibrated probability where there is one
        "final_threshold": (final["threshold"] if "calibrated" in figures else figures[shown]["threshold"])
        if final and final["final"] in figures else None,
        "final_method": final.get("calibration", {}).get("method") if final else None,
        "models": figures,
        "plots": {key: name for key, name in plots.items()},
        # the training lesions' out-of-fold novelty and the threshold (None: no applicability stage)
        "applicability": applicability_section(run_dir, out),
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=2))
    path = out / "report.md"
    path.write_text(_markdown(document, final))
    atomic_write_text(out / "index.html", _html(document, final, out))
    log.info("report: %s (and index.html)", path)
    return path


def _read_predictions(run_dir: Path, folds: pd.DataFrame) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Out-of-fold predictions of every stage present, aligned with `folds.csv`, and the target."""
    layout = RunLayout(run_dir)
    if hasattr(layout, "read_oof"):
        read_oof = layout.read_oof
    else:  # the reader's earlier home
        from fuse.stack import read_oof as read_stage

        def read_oof(stage, ids, folds, target):
            return read_stage(run_dir, stage, ids, folds, target)

    ids = folds["id"].to_numpy()
    fold = folds["fold"].to_numpy()
    predictions = {}
    y = None
    for name in MODELS:
        path = run_dir / name / "oof.csv"
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
    path = run_dir / "stack" / CALIBRATED_OOF
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
    path = run_dir / "stack" / "final.json"
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
    lines += ["", "## Plots", ""]
    for key, name in document["plots"].items():
        lines += [f"### {PLOT_TITLES[key]}", "", f"![{key}]({name})", ""]
    return "\n".join(lines)


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


def _html(document: dict, final: dict | None, out: Path) -> str:
    """`index.html`: the figures of `report.md` as one self-contained page (plots embedded), from
    the template `fuse/templates/report.html`."""
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
