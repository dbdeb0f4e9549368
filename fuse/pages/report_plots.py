"""The report's PNG plots: ROC, precision-recall, confusion matrix, calibration, score
histogram, LightGBM feature importance and the decision curve, written into `report/`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from common.files import atomic_write
from fuse.pages.report_text import cell
from tabular.decision_curve import plot_decision_curve

__all__ = ["PLOTS", "PLOT_TITLES", "write_decision_plot", "write_plots"]

log = logging.getLogger(__name__)

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


def write_plots(
    out: Path, y: np.ndarray, predictions: dict, figures: dict, shown: str, importance_csv: Path
) -> dict[str, str]:
    """Write the plots into `out`; returns {key in PLOTS: file name} of those written (the
    importance plot only where `importance_csv` has feature names and values)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

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
    _draw_roc(ax, y, {} if one_class else ranked, figures)
    save(fig, "roc")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    _draw_precision_recall(ax, y, {} if one_class else ranked, figures)
    save(fig, "pr")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    _draw_confusion(ax, figures[shown], shown)
    save(fig, "confusion")
    fig, ax = plt.subplots(figsize=(5.5, 5))
    _draw_calibration(ax, y, {} if one_class else predictions)
    save(fig, "calibration")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _draw_histogram(ax, y, predictions[shown], figures[shown]["threshold"], shown)
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


def _draw_roc(ax, y: np.ndarray, ranked: dict, figures: dict) -> None:
    """ROC curves of the `ranked` models (none for one class), the pAUC80 region shaded."""
    from sklearn.metrics import roc_curve

    ax.axhspan(0.8, 1.0, color="tab:green", alpha=0.12, label="pAUC80 region (TPR >= 0.8)")
    for name, p in ranked.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(
            fpr,
            tpr,
            label=f"{name} (AUC {cell(figures[name]['roc_auc'], '.3f')}, "
            f"pAUC80 {cell(figures[name]['pauc80'], '.3f')})",
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate (sensitivity)",
        title="ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=7)


def _draw_precision_recall(ax, y: np.ndarray, ranked: dict, figures: dict) -> None:
    """Precision-recall curves of the `ranked` models, with the prevalence as the baseline."""
    from sklearn.metrics import precision_recall_curve

    for name, p in ranked.items():
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, label=f"{name} (AP {cell(figures[name]['pr_auc'], '.3f')})")
    ax.axhline(y.mean(), color="grey", lw=0.8, ls="--", label=f"prevalence {y.mean():.3f}")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="upper right", fontsize=7)


def _draw_confusion(ax, f: dict, shown: str) -> None:
    """The confusion matrix of the shown model's figures `f` at its threshold."""
    counts = np.array([[f["tn"] or 0, f["fp"] or 0], [f["fn"] or 0, f["tp"] or 0]])
    ax.imshow(counts, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                color="white" if counts[i, j] > counts.max() / 2 else "black",
                fontsize=12,
            )
    ax.set_xticks([0, 1], ["benign", "malignant"])
    ax.set_yticks([0, 1], ["benign", "malignant"])
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{shown} at threshold {cell(f['threshold'], '.4g')}",
    )


def _draw_calibration(ax, y: np.ndarray, predictions: dict) -> None:
    """Reliability curves (equal-count bins) of the `predictions`, against the diagonal."""
    from sklearn.calibration import calibration_curve

    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    for name, p in predictions.items():
        bins = max(2, min(10, int(y.sum()) // 2))
        true, mean = calibration_curve(y, np.clip(p, 0, 1), n_bins=bins, strategy="quantile")
        suffix = {"blend": " (rank score)", "calibrated": " (probability)"}.get(name, "")
        ax.plot(mean, true, marker="o", ms=3, label=name + suffix)
    ax.set(
        xlabel="mean predicted score",
        ylabel="observed share malignant",
        title="Calibration",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=7)


def _draw_histogram(ax, y: np.ndarray, p: np.ndarray, threshold: float | None, shown: str) -> None:
    """The shown model's scores `p` by class, with its operating threshold."""
    edges = np.linspace(float(p.min()), float(p.max()) + 1e-12, 41)
    ax.hist(
        p[y == 0],
        bins=edges.tolist(),
        alpha=0.6,
        density=True,
        label=f"benign ({int((y == 0).sum())})",
    )
    ax.hist(
        p[y == 1], bins=edges.tolist(), alpha=0.6, density=True, label=f"malignant ({int(y.sum())})"
    )
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1, label="operating threshold")
    ax.set(xlabel=f"{shown} score", ylabel="density", title=f"Scores by class ({shown})")
    ax.legend(fontsize=7)


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


def write_decision_plot(out: Path, curve: dict) -> str:
    """Write the decision curve's plot into `out`; returns its file name."""
    png = plot_decision_curve(curve, "Decision curve (net benefit)")

    def write(f: BinaryIO) -> None:
        f.write(png)

    atomic_write(out / PLOTS["decision"], write)
    return PLOTS["decision"]
