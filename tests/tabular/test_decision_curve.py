import json

import numpy as np
import pytest

from tabular.decision_curve import (
    DEFAULT_THRESHOLDS,
    decision_curve,
    net_benefit,
    plot_decision_curve,
)
from tabular.errors import DataError


def _data(n=1000, positives=200, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(positives, int), np.zeros(n - positives, int)]
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, n), 0, 1)
    return y, p


def test_net_benefit_hand_worked():
    # pt = 0.25 flags 0.9 (malignant), 0.3 (malignant), 0.5 (benign): 2/5 - 1/5 * (0.25 / 0.75).
    y = [1, 1, 0, 0, 0]
    p = [0.9, 0.3, 0.5, 0.2, 0.1]
    assert net_benefit(y, p, [0.25]) == pytest.approx([0.4 - 0.2 / 3])
    # At pt = 0.95 nothing is flagged: no benefit, no harm.
    assert net_benefit(y, p, [0.95]) == pytest.approx([0.0])


def test_perfect_model_equals_the_prevalence_line_at_threshold_zero():
    y, _ = _data()
    curve = decision_curve(y, {"perfect": y.astype(float)}, thresholds=[1e-9, 0.01, 0.3, 0.5])
    prevalence = 0.2
    assert curve["prevalence"] == pytest.approx(prevalence)
    assert curve["net_benefit"]["perfect"] == pytest.approx([prevalence] * 4)
    # Near pt = 0, treating everyone costs nothing: treat-all meets the perfect model there.
    assert curve["net_benefit"]["treat all"][0] == pytest.approx(prevalence, abs=1e-8)


def test_treat_all_crosses_zero_at_the_prevalence():
    y, p = _data()
    curve = decision_curve(y, {"model": p}, thresholds=[0.19, 0.2, 0.21])
    before, at, after = curve["net_benefit"]["treat all"]
    assert before > 0 and at == pytest.approx(0.0, abs=1e-12) and after < 0
    assert curve["net_benefit"]["treat none"] == [0.0, 0.0, 0.0]


def test_constant_scores_reduce_to_the_reference_strategies():
    y, p = _data()
    curve = decision_curve(y, {"all": np.ones_like(p), "none": np.zeros_like(p)})
    assert curve["net_benefit"]["all"] == pytest.approx(curve["net_benefit"]["treat all"])
    assert curve["net_benefit"]["none"] == pytest.approx(curve["net_benefit"]["treat none"])


def test_default_thresholds_and_json_ready():
    y, p = _data()
    curve = decision_curve(y, {"final": p, "gbdt": p**2})
    assert curve["thresholds"] == list(DEFAULT_THRESHOLDS)
    assert len(curve["thresholds"]) == 50
    assert curve["thresholds"][0] == 0.01 and curve["thresholds"][-1] == 0.5
    assert set(curve["net_benefit"]) == {"final", "gbdt", "treat all", "treat none"}
    assert json.loads(json.dumps(curve)) == curve
    # A model with skill beats both references somewhere below the prevalence.
    gain = np.array(curve["net_benefit"]["final"]) - np.maximum(
        curve["net_benefit"]["treat all"], 0
    )
    assert gain.max() > 0


def test_plot_is_a_png():
    y, p = _data()
    png = plot_decision_curve(decision_curve(y, {"final": p}))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(
        DataError,
        match=r"curve: expected the dict decision_curve returns, "
        r"missing \['net_benefit'",
    ):
        plot_decision_curve({"thresholds": [0.1], "prevalence": 0.2})


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda y, p: decision_curve(y, {"m": p}, thresholds=[0.0, 0.1]),
            r"thresholds: expected probabilities in \(0, 1\), got 0.0",
        ),
        (lambda y, p: decision_curve(y, {"m": p}, thresholds=[0.5, 1.0]), "got 1.0"),
        (lambda y, p: decision_curve(y, {"m": p}, thresholds=[]), "thresholds: got no threshold"),
        (lambda y, p: decision_curve(y, {"m": p[:-1]}), r"scores\['m'\]: expected 1000 scores"),
        (
            lambda y, p: decision_curve(y, {"m": p * 2}),
            r"probabilities\['m'\]: expected probabilities in",
        ),
        (
            lambda y, p: net_benefit(y, p - 1),
            r"y_prob: expected probabilities in \[0, 1\], got values from -",
        ),
        (lambda y, p: decision_curve(y, {"treat all": p}), "reserved for the reference strategies"),
        (lambda y, p: net_benefit(y[:-1], p), r"expected 999 scores, one per target, got shape"),
    ],
)
def test_errors_name_the_parameter(call, match):
    y, p = _data()
    with pytest.raises(DataError, match=match):
        call(y, p)
