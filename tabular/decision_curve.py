"""Decision curves (Vickers & Elkin 2006): is acting on a model's probability better than treating
every lesion, or none, for a clinician whose threshold probability is pt?

Net benefit at pt, with rows whose probability >= pt treated (excised, referred):
    NB(pt) = TP/n - FP/n * pt / (1 - pt)
pt / (1 - pt) is the exchange rate: at pt = 10% a clinician accepts 9 needless excisions to find
one melanoma. Treat-all is prevalence - (1 - prevalence) * pt / (1 - pt) (zero at pt =
prevalence), treat-none is 0, and a perfect model's curve is the prevalence at every pt.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from tabular.errors import DataError
from tabular.uncertainty import check_inputs

__all__ = ["DEFAULT_THRESHOLDS", "decision_curve", "net_benefit", "plot_decision_curve"]

log = logging.getLogger(__name__)

# Threshold probabilities 1% .. 50% in steps of 1%: beyond 50% nobody would biopsy a lesion.
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 51))


def _thresholds(thresholds) -> np.ndarray:
    try:
        pt = np.asarray(thresholds, dtype=float).ravel()
    except (TypeError, ValueError) as error:
        raise DataError(
            f"thresholds: expected probabilities in (0, 1), got {thresholds!r:.80}"
        ) from error
    if len(pt) == 0:
        raise DataError("thresholds: got no threshold probability")
    bad = ~((pt > 0.0) & (pt < 1.0))
    if bad.any():
        first = float(pt[bad][0])
        raise DataError(
            f"thresholds: expected probabilities in (0, 1), got {first!r}; "
            "net benefit is undefined at 0 and 1"
        )
    return pt


def net_benefit(y_true, y_prob, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> np.ndarray:
    """Net benefit of treating rows with y_prob >= pt, at each threshold probability pt.

    Args:
        y_true: shape (n,), 0/1.
        y_prob: shape (n,) probabilities in [0, 1] (the calibrated ones: a raw score has no
            threshold probability).
        thresholds: shape (t,) in (0, 1); default 1% .. 50%.

    Returns:
        float64 array of shape (t,).

    Raises:
        DataError: as `tabular.uncertainty.check_inputs`; probabilities outside [0, 1];
            thresholds outside (0, 1).
    """
    pt = _thresholds(thresholds)
    y, checked, _ = check_inputs(y_true, {"y_prob": y_prob})
    return _net_benefit(y, checked["y_prob"], pt, "y_prob")


def _net_benefit(y: np.ndarray, p: np.ndarray, pt: np.ndarray, name: str) -> np.ndarray:
    if p.min() < 0.0 or p.max() > 1.0:
        raise DataError(
            f"{name}: expected probabilities in [0, 1], got values from {p.min()} to "
            f"{p.max()}; use the calibrated probability"
        )
    n = len(y)
    # Rows flagged at pt are those with p >= pt: counts from one sort, for every pt at once.
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = len(pos) - np.searchsorted(pos, pt, side="left")
    fp = len(neg) - np.searchsorted(neg, pt, side="left")
    return tp / n - fp / n * pt / (1.0 - pt)


def decision_curve(
    y_true, probabilities: Mapping, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict:
    """Net benefit of each model, treat-all and treat-none, JSON-ready.

    Args:
        y_true: shape (n,), 0/1.
        probabilities: model name -> shape (n,) probabilities in [0, 1] (final model and base
            models, out of fold).
        thresholds: threshold probabilities in (0, 1); default 1% .. 50% in steps of 1%.

    Returns:
        {"thresholds": [t floats], "n": rows, "prevalence": float, "net_benefit": {model: [t],
        ..., "treat all": [t], "treat none": [t]}}.

    Raises:
        DataError: as `net_benefit`; no model; a model named "treat all" or "treat none".
    """
    pt = _thresholds(thresholds)
    y, checked, _ = check_inputs(y_true, probabilities)
    clash = {"treat all", "treat none"} & set(checked)
    if clash:
        raise DataError(
            f"probabilities: model names {sorted(clash)} are reserved for the "
            "reference strategies; rename the model"
        )
    prevalence = float(y.mean())
    curves = {
        name: _net_benefit(y, p, pt, f"probabilities[{name!r}]").tolist()
        for name, p in checked.items()
    }
    curves["treat all"] = (prevalence - (1.0 - prevalence) * pt / (1.0 - pt)).tolist()
    curves["treat none"] = [0.0] * len(pt)
    return {
        "thresholds": pt.tolist(),
        "n": int(len(y)),
        "prevalence": prevalence,
        "net_benefit": curves,
    }


def plot_decision_curve(curve: Mapping, title: str = "Decision curve") -> bytes:
    """PNG bytes of a curve from `decision_curve`: net benefit against threshold probability.

    The y axis runs from a little below 0 to a little above the prevalence (the most any model
    can reach), so that treat-all's plunge at high thresholds does not flatten the models.

    Raises:
        DataError: `curve` lacks the keys `decision_curve` returns.
    """
    missing = {"thresholds", "prevalence", "net_benefit"} - set(curve)
    if missing:
        raise DataError(
            f"curve: expected the dict decision_curve returns, missing {sorted(missing)}"
        )
    # The Agg canvas directly, not pyplot: no display, no global backend switch (servers, CI).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pt = np.asarray(curve["thresholds"], dtype=float) * 100.0
    prevalence = float(curve["prevalence"])
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, values in curve["net_benefit"].items():
        style = {
            "treat all": {"color": "0.45", "linestyle": "--"},
            "treat none": {"color": "0.2", "linestyle": ":"},
        }.get(name, {"linewidth": 1.8})
        ax.plot(pt, np.asarray(values, dtype=float), label=name, **style)
    top = prevalence * 1.15 if prevalence > 0 else 0.01
    ax.set_ylim(-0.25 * top, top)
    ax.set_xlim(pt.min(), pt.max())
    ax.set_xlabel("threshold probability (%)")
    ax.set_ylabel("net benefit")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
