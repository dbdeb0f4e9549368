"""The final score as a probability: Platt and isotonic calibration, chosen out of fold, and the
prior-shift correction to another prevalence."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fuse.calibration import (
    Calibrator,
    choose_calibrator,
    fit_calibrator,
    out_of_fold,
    shift_prevalence,
)
from fuse.errors import RunError
from fuse.stack import StackConfig, load_final, stack
from tabular.metrics import calibration, expected_calibration_error, threshold_for_sensitivity


def population(n: int, prevalence: float, seed: int):
    """Labels drawn from known probabilities, and a rank score of them (ordered, not calibrated)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    logit = rng.normal(0, 1, n) + 2.0 * y  # what a lesion looks like, given its class
    true_p = 1 / (1 + np.exp(-(2.0 * logit - 2.0 + np.log(prevalence / (1 - prevalence)))))
    rank = np.argsort(np.argsort(logit)) / (n - 1)
    return y, logit, rank, true_p


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_a_rank_score_becomes_a_probability(method):
    y, _, rank, _ = population(20_000, 0.1, seed=0)
    folds = np.arange(len(y)) % 5
    assert expected_calibration_error(y, rank) > 0.3  # a rank is no probability
    calibrated = out_of_fold(y, rank, folds, method)
    assert expected_calibration_error(y, calibrated) < 0.02
    # Monotone: the order of the lesions is kept (ties allowed for isotonic steps).
    order = np.argsort(rank)
    assert np.all(np.diff(fit_calibrator(y, rank, method)(rank[order])) >= -1e-12)


def test_the_method_with_the_lower_out_of_fold_brier_is_chosen_and_saved_as_json():
    y, _, rank, _ = population(5_000, 0.2, seed=1)
    folds = np.arange(len(y)) % 5
    calibrator, p_oof, figures = choose_calibrator(y, rank, folds)
    assert figures["chosen"] == calibrator.method
    other = "isotonic" if calibrator.method == "platt" else "platt"
    assert figures[calibrator.method]["brier"] <= figures[other]["brier"]
    assert calibration(y, p_oof) == figures[calibrator.method]
    again = Calibrator.from_json(json.loads(json.dumps(calibrator.to_json())))
    np.testing.assert_allclose(again(rank), calibrator(rank))
    assert calibrator.prevalence == pytest.approx(y.mean())


def test_prior_shift_gives_probabilities_at_the_new_prevalence():
    """Calibrated at 30% malignant, moved to 5%: on a population of known 5% prevalence (same
    lesions given their class) the moved probabilities are calibrated, the unmoved ones are not."""
    y, logit, _, _ = population(40_000, 0.3, seed=2)
    calibrator = fit_calibrator(y, 1 / (1 + np.exp(-logit)), "platt")
    y_clinic, logit_clinic, _, _ = population(200_000, 0.05, seed=3)
    p = calibrator(1 / (1 + np.exp(-logit_clinic)))
    moved = shift_prevalence(p, calibrator.prevalence, 0.05)
    assert expected_calibration_error(y_clinic, p) > 0.1
    assert expected_calibration_error(y_clinic, moved) < 0.01
    assert moved.mean() == pytest.approx(0.05, abs=0.005)
    assert np.array_equal(np.argsort(moved, kind="stable"), np.argsort(p, kind="stable"))


def test_bad_prevalence_and_method_are_refused():
    with pytest.raises(RunError, match=r"--prevalence: expected a share strictly between 0 and 1, got 1.5"):
        shift_prevalence(np.array([0.5]), 0.1, 1.5)
    with pytest.raises(RunError, match=r"calibration method: expected one of \['platt', 'isotonic'\], got 'beta'"):
        fit_calibrator(np.array([0, 1]), np.array([0.2, 0.8]), "beta")
    with pytest.raises(RunError, match=r"calibration: unknown method 'beta'; rerun `invoke stack"):
        Calibrator.from_json({"method": "beta", "params": {}, "prevalence": 0.1})


def test_stack_calibrates_the_final_model_and_keeps_the_flagged_lesions(tabular_run):
    record = stack(tabular_run.dir, config=StackConfig(num_boost_round=100))
    calibration_record = record["calibration"]
    assert calibration_record["method"] in ("platt", "isotonic")
    assert calibration_record["out_of_fold"]["chosen"] == calibration_record["method"]
    calibrated = pd.read_csv(tabular_run.dir / "stack" / "final_oof.csv")
    assert calibrated["p"].between(0, 1).all()
    raw = pd.read_csv(tabular_run.dir / record["final"] / "oof.csv")
    y = raw["target"].to_numpy()
    assert record["score_threshold"] == pytest.approx(threshold_for_sensitivity(y, raw["p"].to_numpy(), 0.95))
    # The same lesions are flagged on either scale (the calibrator is monotone).
    final = load_final(tabular_run.dir)
    on_scores = raw["p"].to_numpy() >= record["score_threshold"]
    on_probabilities = final.probability(raw["p"].to_numpy()) >= record["threshold"]
    assert on_probabilities[y == 1].mean() >= 0.95
    if final.calibrator.method == "platt":  # strictly increasing: exactly the same set
        assert np.array_equal(on_scores, on_probabilities)
    else:  # isotonic steps may add the lesions tied with the threshold's step
        assert np.all(on_probabilities[on_scores])
