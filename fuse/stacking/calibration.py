"""Turning the final model's score into a probability, and moving it to another prevalence.

The final model is often the rank blend, whose output is a rank in [0, 1]: ordered like a
probability but not one (lesions scored 0.5 are far less than half malignant). `probability` in
the scoring output is that score passed through a calibrator fitted on the run's out-of-fold
scores, so that of lesions given 0.2 about one in five is malignant at the training data's
prevalence.

Every calibrator chosen for a run is strictly increasing in the score over the range it was
fitted on: two lesions the final model told apart keep distinct probabilities in the same order,
so calibrating costs no ranking and the triage page's order is the model's, not arbitrary inside a
tie. The candidates (`METHODS`):

- "platt": a logistic regression on the score's logit (Platt scaling; two numbers).
- "beta": beta calibration (Kull, Silva Filho and Flach, 2017): a logistic regression on
  ln(s) and -ln(1 - s), three numbers, both slopes kept >= 0 so the map stays increasing. It
  bends at both ends where Platt cannot, which suits a rank score whose malignant share rises
  steeply only in its top few percent.
- "isotonic-interpolated": isotonic regression's steps (pool-adjacent-violators), joined by
  straight lines in log-odds between the steps' centres (each step's mean score, at its share
  malignant) instead of held flat, so no shape is assumed and no lesions are tied. Past the
  outermost centres the end segments' slopes go on to the lowest and highest fitted score, halving
  or doubling the odds at most; a step with no malignant (or no benign) lesion is given half a
  lesion's worth, (k + 0.5) / (n + 1), kept short of the next step, since a probability of exactly
  0 or 1 has no log-odds and no room below (above) it.

Each is measured out of fold *within* the out-of-fold scores (fitted on four folds' scores,
applied to the fifth); of those that keep the score's ranking figures out of fold (within
`RANKING_TOLERANCE`), the one with the lowest Brier score is fitted on every fold's scores and kept
(`choose_calibrator`). Scores outside the fitted range are held at the range's ends (the
isotonic map) or extrapolated by the fitted formula (platt, beta); exact 0 and 1, which a rank
blend gives, are taken as `EPSILON` inside (0, 1) for the logarithms. A score with no ranking
skill at all (its fitted slope is not positive, or isotonic finds a single step) gives every lesion
the training prevalence: there is no order to keep.

"isotonic" (flat steps) is no longer a candidate; a run stacked with it still loads and scores as
before. The flagged set at the operating threshold is the same lesions on either scale (the
threshold is carried through the calibrator).

`shift_prevalence` is the standard prior-shift correction (Saerens et al., 2002): the odds are
multiplied by the ratio of the new prior odds to the training prior odds. It assumes that what a
lesion looks like given its class is the same in both populations; only the mix of classes
differs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from fuse.errors import RunError
from tabular.metrics import brier, expected_calibration_error, pauc80, roc_auc

__all__ = [
    "EPSILON",
    "KNOWN_METHODS",
    "METHODS",
    "RANKING_TOLERANCE",
    "Calibrator",
    "choose_calibrator",
    "distinct_share",
    "fit_calibrator",
    "out_of_fold",
    "shift_prevalence",
]

log = logging.getLogger(__name__)

# The candidates `choose_calibrator` measures, in the order ties on Brier are broken (fewest
# numbers first).
METHODS = ("platt", "beta", "isotonic-interpolated")
# What a saved calibrator may hold: the candidates, and the flat isotonic steps of runs stacked
# before the candidates were strictly increasing (still fitted on request, for comparison).
KNOWN_METHODS = METHODS + ("isotonic",)
# Scores are clipped this far inside (0, 1) before their logit or logarithm is taken.
EPSILON = 1e-6
# The isotonic map's end segments change the odds by at most this factor beyond the outermost
# step centres: enough to keep the ends strictly increasing, not enough to invent confidence the
# steps do not show.
END_ODDS_FACTOR = 2.0
# Out of fold, a candidate may lose at most this much ROC AUC or pAUC80 against the uncalibrated
# score and still be chosen on Brier (see `choose_calibrator`).
RANKING_TOLERANCE = 0.0005


def _clip(score: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(score, dtype=np.float64), EPSILON, 1 - EPSILON)


def _logit(p: np.ndarray) -> np.ndarray:
    p = _clip(p)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _beta_features(score: np.ndarray) -> np.ndarray:
    """Shape (n, 2): ln(s) and -ln(1 - s), both increasing in s."""
    s = _clip(score)
    return np.column_stack([np.log(s), -np.log1p(-s)])


@dataclass(frozen=True)
class Calibrator:
    """A fitted score -> probability map, saved as JSON (never pickled).

    `method` "platt": p = sigmoid(a * logit(score) + b), `params` {a, b}.
    `method` "beta": p = sigmoid(a * ln(score) - b * ln(1 - score) + c), `params` {a, b, c},
    a, b >= 0.
    `method` "isotonic-interpolated": p = sigmoid(linear interpolation of `params` {x, log_odds}
    at the score), held at the ends outside [x[0], x[-1]]; x and log_odds strictly increasing.
    `method` "isotonic" (runs stacked before the strictly increasing maps): interpolation through
    `params` {x, y} (flat steps).
    `prevalence`: the share of malignant lesions in the data it was fitted on.
    """

    method: str
    params: dict = field(default_factory=dict)
    prevalence: float = math.nan

    def __call__(self, score: np.ndarray) -> np.ndarray:
        """Probabilities, shape of `score`; a NaN score gives NaN."""
        score = np.asarray(score, dtype=np.float64)
        if self.method == "platt":
            return _sigmoid(self.params["a"] * _logit(score) + self.params["b"])
        if self.method == "beta":
            s = _clip(score)
            return _sigmoid(
                self.params["a"] * np.log(s) - self.params["b"] * np.log1p(-s) + self.params["c"]
            )
        if self.method == "isotonic-interpolated":
            return _sigmoid(np.interp(score, self.params["x"], self.params["log_odds"]))
        if self.method == "isotonic":
            return np.interp(score, self.params["x"], self.params["y"])
        raise RunError(
            f"calibration: unknown method {self.method!r}; expected one of {list(KNOWN_METHODS)}"
        )

    def to_json(self) -> dict:
        return {"method": self.method, "params": self.params, "prevalence": self.prevalence}

    @classmethod
    def from_json(cls, data: dict) -> Calibrator:
        """The calibrator `to_json` wrote (also the "isotonic" of older runs' `final.json`).

        Raises:
            RunError: an unknown method (names `invoke stack`).
        """
        if data.get("method") not in KNOWN_METHODS:
            raise RunError(
                f"calibration: unknown method {data.get('method')!r}; rerun `invoke stack --run R`"
            )
        return cls(
            method=data["method"], params=data["params"], prevalence=float(data["prevalence"])
        )


def _check(y, score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape or y.ndim != 1:
        raise RunError(
            f"calibration: labels and scores must be two arrays of one length, got shapes "
            f"{y.shape} and {score.shape}"
        )
    if not np.isfinite(score).all():
        raise RunError(
            f"calibration: {int((~np.isfinite(score)).sum())} scores are not finite; "
            "rerun the final model's stage"
        )
    if not np.isin(y, (0, 1)).all() or len(np.unique(y)) < 2:
        raise RunError(
            f"calibration: labels must be 0/1 with both classes present, got values "
            f"{sorted(np.unique(y).tolist())[:5]}"
        )
    return y.astype(np.int64), score


def _fit_platt(y: np.ndarray, score: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression

    # Nearly unregularised: two parameters, fitted on thousands of rows.
    model = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(score).reshape(-1, 1), y)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:  # a score that does not rise with malignancy: no order to keep
        a, b = 0.0, float(_logit(np.array([y.mean()]))[0])
    return {"a": a, "b": b}


def _fit_beta(y: np.ndarray, score: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression

    features = _beta_features(score)

    def fit(columns: list[int]) -> tuple[np.ndarray, float]:
        model = LogisticRegression(C=1e6, max_iter=1000).fit(features[:, columns], y)
        coef = np.zeros(2)
        coef[columns] = model.coef_[0]
        return coef, float(model.intercept_[0])

    coef, c = fit([0, 1])
    # Kull et al.'s rule: a negative slope would make the map fall somewhere in (0, 1); refit
    # without that feature, so the map is increasing (strictly, while a slope is positive).
    if coef.min() < 0:
        coef, c = fit([int(np.argmax(coef))])
    if coef.max() <= 0:
        coef, c = np.zeros(2), float(_logit(np.array([y.mean()]))[0])
    return {"a": float(coef[0]), "b": float(coef[1]), "c": c}


def _fit_isotonic_steps(y: np.ndarray, score: np.ndarray) -> dict:
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, y)
    return {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


def _isotonic_steps(
    y: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pool-adjacent-violators on the distinct scores: per step, (mean score, rows, malignant,
    lowest
    and highest score) as arrays over the steps in increasing order."""
    from sklearn.isotonic import isotonic_regression

    # Tied scores are one point (weighted by their rows): a step never splits lesions of one score.
    values, inverse, rows = np.unique(score, return_inverse=True, return_counts=True)
    malignant = np.bincount(inverse, weights=y, minlength=len(values))
    fitted = isotonic_regression(
        malignant / rows, sample_weight=rows.astype(np.float64), increasing=True
    )
    # PAV gives every point of a step the step's own mean, so a step ends where the value changes.
    starts = np.flatnonzero(np.r_[True, np.diff(fitted) != 0])
    step_rows = np.add.reduceat(rows, starts)
    step_malignant = np.add.reduceat(malignant, starts)
    centres = np.add.reduceat(values * rows, starts) / step_rows
    return centres, step_rows.astype(np.float64), step_malignant, values


def _fit_isotonic_interpolated(y: np.ndarray, score: np.ndarray) -> dict:
    centres, rows, malignant, values = _isotonic_steps(y, score)
    share = malignant / rows
    if len(share) == 1:  # no ranking skill: one step, the prevalence everywhere
        return {"x": [float(centres[0])], "log_odds": [float(_logit(share)[0])]}
    # Only the first step can hold no malignant lesion and only the last no benign one (the
    # steps' shares strictly increase); give them half a lesion's worth, short of their neighbour.
    if share[0] == 0:
        share[0] = min(0.5 / (rows[0] + 1), share[1] / 2)
    if share[-1] == 1:
        share[-1] = max(1 - 0.5 / (rows[-1] + 1), (1 + share[-2]) / 2)
    x, z = list(centres), list(np.log(share / (1 - share)))
    # Strictly increasing up to the lowest and highest fitted scores, not flat past the outer
    # centres.
    most = math.log(END_ODDS_FACTOR)
    if values[0] < centres[0]:
        slope = (z[1] - z[0]) / (x[1] - x[0])
        x.insert(0, float(values[0]))
        z.insert(0, z[0] - min(slope * (centres[0] - values[0]), most))
    if values[-1] > centres[-1]:
        slope = (z[-1] - z[-2]) / (x[-1] - x[-2])
        z.append(z[-1] + min(slope * (values[-1] - centres[-1]), most))
        x.append(float(values[-1]))
    return {"x": [float(v) for v in x], "log_odds": [float(v) for v in z]}


_FITS = {
    "platt": _fit_platt,
    "beta": _fit_beta,
    "isotonic-interpolated": _fit_isotonic_interpolated,
    "isotonic": _fit_isotonic_steps,
}


def fit_calibrator(y: np.ndarray, score: np.ndarray, method: str) -> Calibrator:
    """Fit `method` (one of `KNOWN_METHODS`) on labels `y` and scores `score`, shape (n,) each.

    Raises:
        RunError: an unknown method; labels not 0/1 or of one class; scores not finite; lengths
            differ.
    """
    if method not in _FITS:
        raise RunError(f"calibration method: expected one of {list(KNOWN_METHODS)}, got {method!r}")
    y, score = _check(y, score)
    return Calibrator(method=method, params=_FITS[method](y, score), prevalence=float(y.mean()))


def out_of_fold(y: np.ndarray, score: np.ndarray, folds: np.ndarray, method: str) -> np.ndarray:
    """Calibrated scores where fold k's rows pass through a calibrator fitted on the other folds.

    Raises:
        RunError: as `fit_calibrator`, e.g. the other folds hold one class only.
    """
    y, score, folds = np.asarray(y), np.asarray(score, dtype=np.float64), np.asarray(folds)
    out = np.full(len(y), np.nan)
    for k in np.unique(folds):
        train = folds != k
        out[~train] = fit_calibrator(y[train], score[train], method)(score[~train])
    return out


def distinct_share(calibrated: np.ndarray, score: np.ndarray) -> float:
    """Distinct calibrated values over distinct scores (1.0: no lesions tied that the score told
    apart)."""
    return len(np.unique(calibrated)) / len(np.unique(score))


def _ranking_loss(figures: dict, uncalibrated: dict) -> float:
    """How much ROC AUC or pAUC80 the calibrated out-of-fold probabilities lost (the larger;
    <= 0: none)."""
    return max(uncalibrated[name] - figures[name] for name in ("roc_auc", "pauc80"))


def choose_calibrator(
    y: np.ndarray, score: np.ndarray, folds: np.ndarray
) -> tuple[Calibrator, np.ndarray, dict]:
    """The candidate with the lowest out-of-fold Brier score among those that keep the ranking,
    fitted on every row.

    Every candidate is strictly increasing, yet out of fold each fold's rows pass through their own
    calibrator, and calibrators that differ from fold to fold reorder lesions of different folds:
    a flexible map (the isotonic one) can cost the pooled figures about 0.001 ROC AUC that way,
    for a Brier score lower by about 0.0001. So a candidate whose ROC AUC or pAUC80 out of fold
    falls more than `RANKING_TOLERANCE` below the uncalibrated score's is chosen only when every
    candidate does (then the one that loses least).

    Args:
        y, score, folds: labels, out-of-fold scores of the final model and their folds, shape (n,).

    Returns:
        (the calibrator fitted on all rows, its out-of-fold calibrated scores, figures): figures
        holds {brier, ece, roc_auc, pauc80, distinct} of every candidate out of fold, "uncalibrated"
        {roc_auc, pauc80} of the score itself, "chosen" and "tolerance".

    Raises:
        RunError: as `fit_calibrator`.
    """
    y, score, folds = np.asarray(y), np.asarray(score, dtype=np.float64), np.asarray(folds)
    candidates = {method: out_of_fold(y, score, folds, method) for method in METHODS}
    figures: dict = {"uncalibrated": {"roc_auc": roc_auc(y, score), "pauc80": pauc80(y, score)}}
    for method, p in candidates.items():
        figures[method] = {
            "brier": brier(y, p),
            "ece": expected_calibration_error(y, p),
            "roc_auc": roc_auc(y, p),
            "pauc80": pauc80(y, p),
            "distinct": distinct_share(p, score),
        }
    losses = {method: _ranking_loss(figures[method], figures["uncalibrated"]) for method in METHODS}
    keeping = [method for method in METHODS if losses[method] <= RANKING_TOLERANCE]
    if keeping:
        chosen = min(keeping, key=lambda m: figures[m]["brier"])  # ties: the earlier, simpler one
    else:
        chosen = min(METHODS, key=lambda m: losses[m])
        log.warning(
            "calibration: every candidate loses more than %g ROC AUC or pAUC80 out of fold "
            "(%s); chose %s, which loses least",
            RANKING_TOLERANCE,
            ", ".join(f"{m} {losses[m]:.4f}" for m in METHODS),
            chosen,
        )
    figures["chosen"] = chosen
    figures["tolerance"] = RANKING_TOLERANCE
    log.info(
        "calibration out of fold (Brier / ranking loss): %s; chosen %s",
        ", ".join(f"{m} {figures[m]['brier']:.5f} / {losses[m]:+.4f}" for m in METHODS),
        chosen,
    )
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
