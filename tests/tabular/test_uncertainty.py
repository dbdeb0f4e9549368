import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from tabular import metrics
from tabular.errors import DataError
from tabular.metrics import MetricWarning
from tabular.uncertainty import (
    FIGURES,
    bootstrap_figures,
    clopper_pearson,
    delong_interval,
    delong_roc_variance,
    operating_point,
    resample_figures,
)


def _data(
    n: int, seed: int = 0, prevalence: float = 0.2, signal: float = 1.2, decimals: int | None = None
):
    """Targets and a probability-like score with some skill; `decimals` rounds to plant ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = 1.0 / (1.0 + np.exp(-(signal * y + rng.normal(size=n) - 1.5)))
    return y, (np.round(p, decimals) if decimals is not None else p)


def _width(result, model="m", figure="roc_auc"):
    interval = result["models"][model][figure]
    return interval["high"] - interval["low"]


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_point_figures_match_tabular_metrics(decimals):
    # With ties (rounded scores) too: the one-sort weighted figures are the metrics' own.
    y, p = _data(600, seed=3, decimals=decimals)
    groups = np.arange(len(y)) // 3
    point = resample_figures(y, {"m": p}, groups, 0.3)["point"]["m"]
    at = metrics.metrics_at_threshold(y, p, 0.3)
    expected = [
        metrics.roc_auc(y, p),
        metrics.pauc80(y, p),
        metrics.pr_auc(y, p),
        metrics.brier(y, p),
        at["recall"],
        at["specificity"],
    ]
    assert point == pytest.approx(expected, abs=1e-12)


def test_interval_contains_estimate_for_every_figure():
    y, p = _data(1500, seed=1)
    result = bootstrap_figures(y, {"m": p}, np.arange(1500) // 2, 0.3)
    for figure in FIGURES:
        interval = result["models"]["m"][figure]
        assert interval["low"] < interval["estimate"] < interval["high"], figure
    assert result["n_resamples"] == 1000 and result["confidence"] == 0.95
    assert result["n_groups"] == 750


def test_more_data_gives_a_narrower_interval():
    y, p = _data(500, seed=2)
    small = bootstrap_figures(y, {"m": p}, None, 0.3)
    y, p = _data(8000, seed=2)
    large = bootstrap_figures(y, {"m": p}, None, 0.3)
    for figure in FIGURES:
        assert _width(large, figure=figure) < 0.5 * _width(small, figure=figure), figure


def test_seeded_resamples_are_reproducible():
    y, p = _data(800, seed=4)
    groups = np.arange(800) % 300
    first = bootstrap_figures(y, {"m": p}, groups, 0.3, seed=7)
    again = bootstrap_figures(y, {"m": p}, groups, 0.3, seed=7)
    other = bootstrap_figures(y, {"m": p}, groups, 0.3, seed=8)
    assert first == again
    assert first["models"]["m"]["roc_auc"] != other["models"]["m"]["roc_auc"]


def test_groups_are_resampled_whole():
    # Copying each row four times within its group adds no evidence: the group bootstrap keeps
    # the interval as wide as before, a row bootstrap would shrink it by about half.
    y, p = _data(1200, seed=5)
    once = bootstrap_figures(y, {"m": p}, np.arange(1200), 0.3)
    y4, p4, g4 = np.repeat(y, 4), np.repeat(p, 4), np.repeat(np.arange(1200), 4)
    grouped = bootstrap_figures(y4, {"m": p4}, g4, 0.3)
    rows = bootstrap_figures(y4, {"m": p4}, None, 0.3)
    assert grouped["models"]["m"]["roc_auc"]["estimate"] == pytest.approx(
        once["models"]["m"]["roc_auc"]["estimate"]
    )
    assert _width(grouped) == pytest.approx(_width(once), rel=0.15)
    assert _width(rows) < 0.65 * _width(once)


def test_paired_difference_from_the_final_model():
    y, p = _data(3000, seed=6, signal=2.0)
    rng = np.random.default_rng(0)
    worse = 0.5 * p + 0.5 * rng.random(len(p))  # half the signal drowned in noise
    result = bootstrap_figures(y, {"worse": worse, "same": p.copy(), "final": p}, None, 0.3)
    assert result["final"] == "final" and set(result["differences"]) == {"worse", "same"}
    same = result["differences"]["same"]["roc_auc"]
    assert same == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    drop = result["differences"]["worse"]["roc_auc"]
    assert drop["high"] < 0 and drop["low"] < drop["estimate"] < drop["high"]
    # Paired: the difference's interval is narrower than either model's own would suggest.
    assert drop["high"] - drop["low"] < _width(result, "worse") + _width(result, "final")


def test_resamples_with_one_class_are_counted_left_out_and_warned():
    # 2 positive groups among 40: some resamples draw neither.
    y = np.zeros(40, int)
    y[[3, 17]] = 1
    p = np.linspace(0.05, 0.95, 40)
    with pytest.warns(MetricWarning, match=r"\d+ of 1000 resamples drew one class only"):
        result = bootstrap_figures(y, {"m": p}, None, 0.5)
    assert 50 < result["one_class"] < 300  # about 1000 * (38/40)^40 = 128
    assert result["models"]["m"]["roc_auc"]["low"] is not None


def test_brier_is_none_for_a_score_that_is_not_a_probability():
    y, p = _data(300, seed=8)
    result = bootstrap_figures(y, {"m": p * 10}, None, 0.5)
    assert result["models"]["m"]["brier"] == {"estimate": None, "low": None, "high": None}
    assert result["models"]["m"]["roc_auc"]["estimate"] is not None


def test_thresholds_per_model():
    y, p = _data(500, seed=9)
    result = bootstrap_figures(y, {"a": p, "b": p}, None, {"a": 0.2, "b": 0.6})
    assert (
        result["models"]["a"]["sensitivity"]["estimate"]
        > result["models"]["b"]["sensitivity"]["estimate"]
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda y, p: bootstrap_figures(y, {"m": p[:-1]}, None, 0.5),
            r"scores\['m'\]: expected 200",
        ),
        (lambda y, p: bootstrap_figures(y, {"m": p}, np.arange(199), 0.5), "groups: expected 200"),
        (lambda y, p: bootstrap_figures(y, {"m": p}, None, 1.5), r"threshold: .*\(0, 1\), got 1.5"),
        (lambda y, p: bootstrap_figures(y, {"m": p}, None, 0.0), r"threshold: .*got 0.0"),
        (
            lambda y, p: bootstrap_figures(y, {"m": p}, None, {"x": 0.5}),
            r"no operating threshold.*'m'",
        ),
        (
            lambda y, p: bootstrap_figures(y, {"m": p}, None, 0.5, n_resamples=999),
            "n_resamples: expected at least 1000 .*got 999",
        ),
        (lambda y, p: bootstrap_figures(y, {"m": p}, None, 0.5, final="x"), "final: .*got 'x'"),
        (lambda y, p: bootstrap_figures(y, {}, None, 0.5), "scores: expected a mapping"),
        (lambda y, p: bootstrap_figures(y * 2, {"m": p}, None, 0.5), "y_true: expected 0/1"),
        (lambda y, p: bootstrap_figures(y[:0], {"m": p[:0]}, None, 0.5), "y_true: got an empty"),
        (
            lambda y, p: bootstrap_figures(y.reshape(20, 10), {"m": p}, None, 0.5),
            r"y_true: expected a 1-D array, got shape \(20, 10\)",
        ),
        (
            lambda y, p: bootstrap_figures(y, {"m": np.where(p > 0.5, np.nan, p)}, None, 0.5),
            r"scores\['m'\]: expected finite scores, got nan",
        ),
        (
            lambda y, p: bootstrap_figures(y, {"m": p}, [None] + ["a"] * 199, 0.5),
            "groups: 1 rows have no group id",
        ),
        (lambda y, p: bootstrap_figures(y, {"m": p}, None, 0.5, confidence=95), "confidence:"),
        (lambda y, p: operating_point(y, p, 1.0), r"threshold: .*got 1.0"),
    ],
)
def test_errors_name_the_parameter(call, match):
    y, p = _data(200, seed=10)
    with pytest.raises(DataError, match=match):
        call(y, p)


def test_clopper_pearson_known_values():
    # Exact values: 0/10 -> upper 1 - 0.025**(1/10); 10/10 -> lower 0.025**(1/10).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025**0.1))
    assert clopper_pearson(10, 10) == pytest.approx((0.025**0.1, 1.0))
    low, high = clopper_pearson(5, 10)
    assert low == pytest.approx(0.18709, abs=1e-5) and high == pytest.approx(0.81291, abs=1e-5)
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))
    with pytest.raises(DataError, match="successes, trials: .*got 11 of 10"):
        clopper_pearson(11, 10)


def test_operating_point_counts_and_bounds():
    y = np.array([1] * 20 + [0] * 30)
    p = np.array([0.9] * 19 + [0.1] + [0.8] * 3 + [0.2] * 27)
    point = operating_point(y, p, 0.5)
    assert (point["tp"], point["fn"], point["tn"], point["fp"]) == (19, 1, 27, 3)
    assert point["sensitivity"] == pytest.approx(0.95)
    assert point["sensitivity_low"] == pytest.approx(clopper_pearson(19, 20)[0])
    assert point["sensitivity_low"] < 0.95 < point["sensitivity_high"]
    assert point["specificity"] == pytest.approx(0.9)


def test_delong_variance_matches_the_pairwise_definition():
    # DeLong's structural components written out pair by pair (O(m n)), with ties.
    y, p = _data(120, seed=11, decimals=1)
    x, z = p[y == 1], p[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(z)
    auc, variance = delong_roc_variance(y, p)
    assert auc == pytest.approx(psi.mean()) and auc == pytest.approx(metrics.roc_auc(y, p))
    assert variance == pytest.approx(expected)
    with pytest.raises(DataError, match="two positives and two negatives, got 1"):
        delong_roc_variance([1, 0, 0], [0.5, 0.2, 0.1])


def test_bootstrap_interval_agrees_with_delong_on_ham10000(shared_data):
    # HAM10000 metadata, the first image of each lesion (6,000 lesions, 929 malignant), so that
    # each group is one row and DeLong's independence holds; out-of-fold probabilities of a
    # logistic regression on age, sex and site (5 stratified folds).
    frame = pd.read_csv(shared_data / "ham10000" / "metadata.csv")
    lesions = frame.drop_duplicates("lesion_id").reset_index(drop=True)
    features = pd.get_dummies(lesions[["sex", "localization"]].fillna("unknown")).astype(float)
    features["age"] = lesions["age"].fillna(lesions["age"].median()) / 100.0
    y = lesions["target"].to_numpy()
    p = cross_val_predict(
        LogisticRegression(max_iter=1000),
        features,
        y,
        method="predict_proba",
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
    )[:, 1]
    boot = bootstrap_figures(y, {"lr": p}, lesions["lesion_id"], 0.5, n_resamples=2000, seed=0)
    auc, low, high = delong_interval(y, p)
    interval = boot["models"]["lr"]["roc_auc"]
    assert interval["estimate"] == pytest.approx(auc)
    assert abs(interval["low"] - low) < 0.005
    assert abs(interval["high"] - high) < 0.005
