import numpy as np
import pandas as pd
import pytest

from tabular.errors import DataError
from tabular.subgroups import MIN_POSITIVES, TOO_FEW, age_band_labels, subgroup_table


def _planted(seed: int = 0):
    """Sites A and B: 97% of positives above 0.5; site C: 70%; site D: 5 positives only."""
    rng = np.random.default_rng(seed)
    sites, ys, ps = [], [], []
    for site, positives, negatives, caught in (
        ("A", 300, 1500, 0.97),
        ("B", 300, 1500, 0.97),
        ("C", 300, 1500, 0.70),
        ("D", 5, 200, 0.97),
    ):
        hit = rng.random(positives) < caught
        ps.append(
            np.where(hit, rng.uniform(0.55, 0.99, positives), rng.uniform(0.05, 0.45, positives))
        )
        ps.append(rng.uniform(0.01, 0.6, negatives))
        ys.append(np.r_[np.ones(positives, int), np.zeros(negatives, int)])
        sites += [site] * (positives + negatives)
    y, p = np.concatenate(ys), np.concatenate(ps)
    frame = pd.DataFrame({"site": sites, "age": rng.uniform(18, 90, len(y))})
    return y, p, frame


def _rows(table, column):
    return {row["subgroup"]: row for row in table if row["column"] == column}


def test_planted_lower_sensitivity_is_highlighted_and_five_positives_are_too_few():
    y, p, frame = _planted()
    table = subgroup_table(y, p, np.arange(len(y)) // 2, 0.5, frame, categorical=["site"])
    rows = _rows(table, "site")
    assert list(rows) == ["A", "B", "C", "D"]
    assert rows["C"]["highlight"] and rows["C"]["status"] == "below target"
    assert rows["C"]["sensitivity_high"] < 0.95
    for site in ("A", "B"):
        assert not rows[site]["highlight"] and rows[site]["status"] == "ok"
        assert rows[site]["sensitivity_high"] >= 0.95
        auc = rows[site]["roc_auc"]
        assert auc["low"] < auc["estimate"] < auc["high"]
    d = rows["D"]
    assert d["positives"] == 5 < MIN_POSITIVES
    assert d["status"] == TOO_FEW == "too few to tell"
    assert d["roc_auc"] is None and not d["highlight"]
    assert d["rows"] == 205
    assert d["observed_rate"] == pytest.approx(5 / 205)
    assert d["mean_predicted"] == pytest.approx(p[frame["site"] == "D"].mean())


def test_age_bands_skin_type_and_missing_values():
    rng = np.random.default_rng(1)
    n = 1200
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0.001, 0.999)
    ages = rng.choice([20.0, 35.0, 50.0, 65.0, 80.0, np.nan], n)
    skin = rng.choice([1.0, 2.0, 3.0, np.nan], n)
    sex = rng.choice(["female", "male", None], n)
    columns = {"age_approx": ages, "fitzpatrick": skin, "sex": sex}
    table = subgroup_table(
        y, p, None, 0.4, columns, categorical=["sex"], age="age_approx", skin_type="fitzpatrick"
    )
    assert [r["subgroup"] for r in table if r["kind"] == "categorical"] == [
        "female",
        "male",
        "missing",
    ]
    assert [r["subgroup"] for r in table if r["kind"] == "age band"] == [
        "<30",
        "30-44",
        "45-59",
        "60-74",
        "75+",
        "missing",
    ]
    assert [r["subgroup"] for r in table if r["kind"] == "skin type"] == ["1", "2", "3", "missing"]
    bands = _rows(table, "age_approx")
    assert bands["75+"]["rows"] == int((ages == 80.0).sum())
    assert bands["missing"]["rows"] == int(np.isnan(ages).sum())
    assert sum(r["rows"] for r in table if r["kind"] == "skin type") == n


def test_age_band_edges():
    labels = age_band_labels([29.9, 30, 44.5, 45, 74.9, 75, None, "60"], "age")
    assert labels.tolist() == ["<30", "30-44", "30-44", "45-59", "60-74", "75+", "missing", "60-74"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"categorical": ["site"]}, r"columns: no column 'site'; columns given: \['sex', 'age'\]"),
        ({"age": "sex"}, r"columns\['sex'\]: the age column must hold numbers, got \['f', 'm'\]"),
        (
            {"skin_type": "age", "threshold": 1.2},
            r"threshold: expected a probability in \(0, 1\), got 1.2",
        ),
        ({"target_sensitivity": 95}, "target_sensitivity: expected a value in"),
    ],
)
def test_errors_name_the_column_or_parameter(kwargs, match):
    y = np.array([0, 1] * 10)
    p = np.linspace(0.1, 0.9, 20)
    columns = {"sex": ["f", "m"] * 10, "age": np.arange(20.0)}
    threshold = kwargs.pop("threshold", 0.5)
    with pytest.raises(DataError, match=match):
        subgroup_table(y, p, None, threshold, columns, **kwargs)


def test_column_of_another_length_is_refused():
    with pytest.raises(DataError, match=r"columns\['sex'\]: expected 4 values, one per row"):
        subgroup_table(
            [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], None, 0.5, {"sex": ["f", "m"]}, categorical="sex"
        )
