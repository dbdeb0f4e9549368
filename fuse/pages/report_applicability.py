"""The report's applicability section: how unusual the training lesions themselves are, out of fold.

Reads the run's detector through its own loader (`fuse.applicability.stage.load_detector`) and
gives the report plain values: the threshold, the share of training lesions it marks out of fold
(overall and per part), the parts and the fit time, plus a histogram of the training lesions'
out-of-fold novelty with the threshold line (`applicability.png`). The page shows them through
the include `report/applicability.html`; a run without the stage gets no section.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fuse.applicability.stage import load_detector
from fuse.pages import html
from runfolder.errors import RunError
from runfolder.layout import RunLayout

__all__ = ["PLOT", "applicability_section", "applicability_values"]

log = logging.getLogger(__name__)

PLOT = "applicability.png"


def applicability_section(run_dir: Path, out: Path) -> dict | None:
    """Plain values for `metrics.json` (None when the run has no applicability stage); writes
    the histogram `out/applicability.png`."""
    try:
        detector = load_detector(RunLayout(Path(run_dir)))
    except RunError as error:  # a broken stage costs its section, not the report
        log.warning("report: the applicability stage is left out: %s", error)
        return None
    if detector is None:
        return None
    summary = detector.summary()
    novelty = detector.training_novelty
    _histogram(novelty, summary["threshold"], out / PLOT)
    return {
        "parts": summary.get("parts", []),
        "rows": summary.get("rows"),
        "threshold": summary["threshold"],
        "target_share": summary.get("marked_share"),
        "marked_share_out_of_fold": summary.get("marked_share_out_of_fold"),
        "marked_by_part_out_of_fold": summary.get("marked_by_part_out_of_fold", {}),
        "fit_seconds": summary.get("fit_seconds"),
        "plot": PLOT,
    }


def applicability_values(section: dict | None, out: Path) -> dict | None:
    """What `report/applicability.html` shows (texts and the plot as a data URI)."""
    if section is None:
        return None
    return {
        "parts": ", ".join(section["parts"]),
        "rows": f"{section['rows']:,}" if section.get("rows") is not None else "",
        "threshold": html.number(section["threshold"], ".4f"),
        "target": f"{section['target_share']:.1%}"
        if section.get("target_share") is not None
        else "",
        "marked": f"{section['marked_share_out_of_fold']:.2%}",
        "by_part": [
            {"part": part, "share": f"{share:.2%}"}
            for part, share in section["marked_by_part_out_of_fold"].items()
        ],
        "fit_seconds": html.number(section.get("fit_seconds"), ".1f"),
        "src": html.png_data_uri((out / section["plot"]).read_bytes()),
    }


def _histogram(novelty: np.ndarray, threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(
        novelty,
        bins=np.linspace(0, 1, 41).tolist(),
        color="tab:blue",
        alpha=0.75,
        label=f"training lesions, out of fold ({len(novelty):,})",
    )
    marked = float(np.mean(novelty >= threshold)) if len(novelty) else 0.0
    ax.axvline(
        threshold,
        color="tab:red",
        ls="--",
        lw=1.2,
        label=f"threshold {threshold:.4f} (marks {marked:.2%})",
    )
    ax.set(
        xlabel="novelty (share of training lesions less unusual)",
        ylabel="training lesions",
        title="Applicability: novelty of the training lesions",
    )
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
