"""Turning the final model's score into a probability, and moving it to another prevalence.

The final model is often the rank blend, whose output is a rank in [0, 1]: ordered like a
probability but not one (lesions scored 0.5 are far less than half malignant). `probability` in
the scoring output is that score passed through a calibrator fitted on the run's out-of-fold
scores, so that of lesions given 0.2 about one in five is malignant at the training data's
prevalence.

Two calibrators, chosen per run by measurement (`choose_calibrator`): Platt scaling (a logistic
regression on the score's logit: two numbers, keeps every distinction between scores) and
isotonic regression (a monotone step function: no shape assumed, but ties scores that fall in one
step). Each is measured out of fold *within* the out-of-fold scores (fitted on four folds' scores,
applied to the fifth), and the one with the lower Brier score is fitted on every fold's scores
and kept. Both are monotone, so the flagged set at the operating threshold is the same lesions
(the threshold is chosen on the calibrated out-of-fold probabilities).

`shift_prevalence` is the standard prior-shift correction (Saerens et al., 2002): the odds are
multiplied by the ratio of the new prior odds to the training prior odds. It assumes that what a
lesion looks like given its class is the same in both populations; only the mix of classes
differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fuse.errors import RunError
from tabular.metrics import brier, calibration

METHODS = ("platt", "isotonic")
# Scores are clipped this far inside (0, 1) before their logit is taken.
EPSILON = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1 - EPSILON)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class Calibrator:
    """A fitted score -> probability map, saved as JSON (never pickled).

    `method` "platt": p = sigmoid(a * logit(score) + b), `params` {a, b}.
    `method` "isotonic": p = interpolation through `params` {x, y} (increasing steps).
    `prevalence`: the share of malignant lesions in the data it was fitted on.
    """

    method: str
    params: dict = field(default_factory=dict)
    prevalence: float = math.nan

    def __call__(self, score: np.ndarray) -> np.ndarray:
        score = np.asarray(score, dtype=np.float64)
        if self.method == "platt":
            z = self.params["a"] * _logit(score) + self.params["b"]
            return 1.0 / (1.0 + np.exp(-z))
        if self.method == "isotonic":
            return np.interp(score, self.params["x"], self.params["y"])
        raise RunError(f"calibration: unknown method {self.method!r}; expected one of {list(METHODS)}")

    def to_json(self) -> dict:
        return {"method": self.method, "params": self.params, "prevalence": self.prevalence}

    @classmethod
    def from_json(cls, data: dict) -> Calibrator:
        if data.get("method") not in METHODS:
            raise RunError(f"calibration: unknown method {data.get('method')!r}; rerun `invoke stack --run R`")
        return cls(method=data["method"], params=data["params"], prevalence=float(data["prevalence"]))


def fit_calibrator(y: np.ndarray, score: np.ndarray, method: str) -> Calibrator:
    """Fit `method` ("platt" or "isotonic") on labels `y` and scores `score`, shape (n,) each."""
    y = np.asarray(y, dtype=np.int64)
    prevalence = float(y.mean())
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Nearly unregularised: two parameters, fitted on thousands of rows.
        model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(score).reshape(-1, 1), y)
        params = {"a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}
    elif method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, y)
        params = {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}
    else:
        raise RunError(f"calibration method: expected one of {list(METHODS)}, got {method!r}")
    return Calibrator(method=method, params=params, prevalence=prevalence)


def out_of_fold(y: np.ndarray, score: np.ndarray, folds: np.ndarray, method: str) -> np.ndarray:
    """Calibrated scores where fold k's rows pass through a calibrator fitted on the other folds."""
    out = np.full(len(y), np.nan)
    for k in np.unique(folds):
        train = folds != k
        out[~train] = fit_calibrator(y[train], score[train], method)(score[~train])
    return out


def choose_calibrator(y: np.ndarray, score: np.ndarray, folds: np.ndarray) -> tuple[Calibrator, np.ndarray, dict]:
    """The method with the lower out-of-fold Brier score, fitted on every row.

    Args:
        y, score, folds: labels, out-of-fold scores of the final model and their folds, shape (n,).

    Returns:
        (the calibrator fitted on all rows, its out-of-fold calibrated scores, {method: {brier,
        ece}} of both methods out of fold, plus "chosen").
    """
    candidates = {method: out_of_fold(y, score, folds, method) for method in METHODS}
    figures = {method: calibration(y, p) for method, p in candidates.items()}
    chosen = min(METHODS, key=lambda m: brier(y, candidates[m]))
    figures["chosen"] = chosen
    return fit_calibrator(y, score, chosen), candidates[chosen], figures


def shift_prevalence(p: np.ndarray, trained_at: float, wanted: float) -> np.ndarray:
    """Probabilities at prevalence `trained_at` moved to prevalence `wanted` (prior shift).

    Raises:
        RunError: a prevalence outside (0, 1).
    """
    for name, value in (("--prevalence", wanted), ("the run's prevalence", trained_at)):
        if not 0.0 < value < 1.0:
            raise RunError(f"{name}: expected a share strictly between 0 and 1, got {value!r}")
    ratio = (wanted / (1 - wanted)) / (trained_at / (1 - trained_at))
    p = np.asarray(p, dtype=np.float64)
    odds = p / np.clip(1 - p, 1e-12, None) * ratio
    return odds / (1 + odds)
