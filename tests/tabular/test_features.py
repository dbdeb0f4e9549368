import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from toytable import make_spec

from tabular.errors import DataError
from tabular.features import MAX_CATEGORIES, FeatureEncoder
from tabular.features_engineered import engineered_feature_names
from tabular.spec import ISIC2024_NOT_FEATURES, ISIC2024_TRAIN_ONLY, DatasetSpec, load_spec
from tabular.validate import read_metadata

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def toy_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(6)],
            "patient": ["a", "a", "a", "b", "b", "c"],
            "site": ["arm", "leg", np.nan, "arm", "back", "leg"],
            "age": [50.0, 50.0, 50.0, np.nan, 30.0, 70.0],
            "size": [1.0, 2.0, 6.0, 3.0, 5.0, 4.0],
            "target": [0, 1, 0, 0, 1, 0],
        }
    )


@pytest.fixture(scope="module")
def isic_mini():
    if not (DATA / "isic2024-mini").exists():
        pytest.skip("../shared/data is absent")
    spec = load_spec(DATA / "isic2024-mini")
    return spec, read_metadata(spec)


def test_no_label_or_train_only_column_reaches_the_features(isic_mini):
    spec, frame = isic_mini
    encoder = FeatureEncoder()
    features = encoder.fit_transform(frame, spec)
    # The encoder reads feature columns only, plus the patient column as a grouping key.
    assert set(encoder.source_columns) & spec.never_features == {spec.patient}
    banned = set(ISIC2024_TRAIN_ONLY) | set(ISIC2024_NOT_FEATURES) | spec.never_features
    assert banned <= spec.never_features
    for name in features.columns:
        for column in banned - {"patient_id"}:
            assert column.lower() not in name.lower(), (name, column)
        assert "iddx" not in name and not name.startswith("mel_") and "dnn" not in name
        assert "patient_id" not in name
    # Permuting the target, or scrambling every train-only / never-feature column, changes nothing.
    rng = np.random.default_rng(0)
    scrambled = frame.copy()
    scrambled[spec.target] = rng.permutation(scrambled[spec.target].to_numpy())
    for column in ISIC2024_TRAIN_ONLY + ISIC2024_NOT_FEATURES:
        if column != spec.target:
            scrambled[column] = rng.permutation(scrambled[column].to_numpy())
    scrambled[spec.id] = [f"X{i}" for i in range(len(scrambled))]
    refit = FeatureEncoder().fit_transform(scrambled, spec)
    assert list(refit.columns) == list(features.columns)
    np.testing.assert_array_equal(refit.to_numpy(), features.to_numpy())
    np.testing.assert_array_equal(encoder.transform(scrambled).to_numpy(), features.to_numpy())
    # And a frame without those columns at all (as at scoring time) gives the same features.
    bare = frame.drop(columns=[c for c in ISIC2024_TRAIN_ONLY if c in frame.columns])
    np.testing.assert_array_equal(encoder.transform(bare).to_numpy(), features.to_numpy())


def test_isic2024_engineered_and_patient_features(isic_mini):
    spec, frame = isic_mini
    features = FeatureEncoder().fit_transform(frame, spec)
    assert features.dtypes.unique().tolist() == [np.dtype("float32")]
    for name in (
        "lesion_size_ratio",
        "lesion_shape_index",
        "hue_contrast",
        "3d_position_distance",
        "border_length_ratio",
        "lesions_per_patient",
        "lesion_size_ratio_patient_norm",
        "combined_anatomical_site__head_neck_Head_Neck",
    ):
        assert name in features.columns
    assert set(engineered_feature_names()) <= set(features.columns)
    expected = frame["tbp_lv_minorAxisMM"] / frame["clin_size_long_diam_mm"]
    np.testing.assert_allclose(features["lesion_size_ratio"], expected, rtol=1e-6)
    expected = np.abs(frame["tbp_lv_H"] - frame["tbp_lv_Hext"])
    np.testing.assert_allclose(features["hue_contrast"], expected, rtol=1e-6)
    counts = frame.groupby("patient_id")["isic_id"].transform("count")
    np.testing.assert_array_equal(features["lesions_per_patient"], counts)


def test_engineered_guards_division_by_zero_and_follows_exclusions(isic_mini):
    spec, frame = isic_mini
    frame = frame.copy()
    frame.loc[frame.index[0], "clin_size_long_diam_mm"] = 0.0
    features = FeatureEncoder().fit_transform(frame, spec)
    assert np.isnan(features["lesion_size_ratio"].iloc[0])
    assert np.isfinite(features["lesion_size_ratio"].iloc[1:]).all()
    assert not np.isinf(features.to_numpy()).any()
    # Excluding an input drops every engineered feature built from it.
    excluded = DatasetSpec(**{**spec.__dict__, "exclude": ("tbp_lv_x",)})
    names = FeatureEncoder().fit(frame, excluded).feature_names
    assert "tbp_lv_x" not in names
    assert "3d_position_distance" not in names and "volume_approximation_3d" not in names
    assert "hue_contrast" in names


def test_engineered_only_for_builtin_spec():
    frame = toy_frame().assign(tbp_lv_H=1.0, tbp_lv_Hext=2.0)
    spec = make_spec(numeric=("age", "size", "tbp_lv_H", "tbp_lv_Hext"))
    assert "hue_contrast" not in FeatureEncoder().fit(frame, spec).feature_names


def test_one_hot_missing_and_unknown_categories(caplog):
    spec = make_spec(patient=None)
    encoder = FeatureEncoder().fit(toy_frame(), spec)
    assert encoder.feature_names == [
        "age",
        "size",
        "site__arm",
        "site__back",
        "site__leg",
        "site__missing",
    ]
    new = pd.DataFrame(
        {
            "id": ["n1", "n2", "n3"],
            "site": ["neck", np.nan, "leg"],
            "age": [1.0, 2.0, 3.0],
            "size": [1.0, 1.0, 1.0],
            "patient": ["p", "p", "q"],
        }
    )
    with caplog.at_level(logging.WARNING, logger="tabular.features"):
        out = encoder.transform(new)
    assert "site" in caplog.text and "neck" in caplog.text and "1 row(s)" in caplog.text
    onehot = out[["site__arm", "site__back", "site__leg", "site__missing"]].to_numpy()
    np.testing.assert_array_equal(onehot, [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])


def test_numeric_nan_kept_and_columns_stable_across_row_order():
    spec = make_spec()
    frame = toy_frame()
    a = FeatureEncoder().fit_transform(frame, spec)
    assert np.isnan(a["age"].iloc[3])
    shuffled = frame.sample(frac=1.0, random_state=0)
    b = FeatureEncoder().fit_transform(shuffled, spec)
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a.loc[shuffled.index], b)


def test_per_patient_features_from_the_rows_given():
    spec = make_spec()
    frame = toy_frame()
    encoder = FeatureEncoder().fit(frame, spec)
    out = encoder.transform(frame)
    np.testing.assert_array_equal(out["lesions_per_patient"], [3, 3, 3, 2, 2, 1])
    sizes = np.array([1.0, 2.0, 6.0])
    expected = (sizes - sizes.mean()) / (sizes.std(ddof=1) + 1e-5)
    np.testing.assert_allclose(out["size_patient_norm"].iloc[:3], expected, rtol=1e-5)
    assert np.isnan(out["size_patient_norm"].iloc[5])  # one lesion: no spread to compare with
    # Scoring two of patient a's rows alone: figures come from those rows only.
    part = encoder.transform(frame.iloc[:2])
    np.testing.assert_array_equal(part["lesions_per_patient"], [2, 2])
    np.testing.assert_allclose(
        part["size_patient_norm"],
        [-0.5 / (np.sqrt(0.5) + 1e-5), 0.5 / (np.sqrt(0.5) + 1e-5)],
        rtol=1e-5,
    )
    # A row without a patient is its own patient.
    lone = frame.assign(patient=[np.nan, np.nan, "a", "b", "b", "c"])
    np.testing.assert_array_equal(
        encoder.transform(lone)["lesions_per_patient"], [1, 1, 1, 2, 2, 1]
    )


def test_no_patient_features_without_patient():
    names = FeatureEncoder().fit(toy_frame(), make_spec(patient=None)).feature_names
    assert not any("patient" in n for n in names)


def test_per_patient_features_scale_vectorised():
    rng = np.random.default_rng(0)
    n = 60_000
    frame = pd.DataFrame(
        {
            "id": np.arange(n).astype(str),
            "patient": rng.integers(0, 500, n).astype(str),
            "site": rng.choice(["a", "b"], n),
            "age": rng.normal(50, 10, n),
            "size": rng.normal(5, 1, n),
        }
    )
    out = FeatureEncoder().fit_transform(frame, make_spec())
    expected = frame.groupby("patient")["size"].transform(
        lambda s: (s - s.mean()) / (s.std() + 1e-5)
    )
    np.testing.assert_allclose(out["size_patient_norm"], expected, rtol=1e-4, atol=1e-5)


def test_json_round_trip_and_mlp_matrix():
    spec = make_spec()
    frame = toy_frame()
    encoder = FeatureEncoder().fit(frame, spec)
    document = json.loads(json.dumps(encoder.to_json()))
    again = FeatureEncoder.from_json(document)
    pd.testing.assert_frame_equal(again.transform(frame), encoder.transform(frame))
    mlp = again.mlp_matrix(again.transform(frame))
    assert mlp.dtypes.unique().tolist() == [np.dtype("float32")]
    assert not mlp.isna().any().any()
    np.testing.assert_allclose(mlp["size"].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(mlp["size"].std(ddof=0), 1.0, atol=1e-5)
    assert "age__isna" in mlp.columns and mlp["age__isna"].tolist() == [0, 0, 0, 1, 0, 0]
    assert mlp.loc[3, "age"] == 0.0
    assert "site__arm" in mlp.columns
    # A raw frame is transformed first; the same columns come out.
    pd.testing.assert_frame_equal(again.mlp_matrix(frame), mlp)
    plain = again.mlp_matrix(frame, standardise=False, indicators=False)
    assert "age__isna" not in plain.columns and plain.loc[0, "size"] == 1.0


def test_numeric_text_refused():
    frame = toy_frame().astype({"age": object})
    frame.loc[2, "age"] = "fifty"
    with pytest.raises(
        DataError, match=r"numeric column 'age' holds text, e.g. 'fifty' \(ids 1: r2\)"
    ):
        FeatureEncoder().fit(frame, make_spec())
    encoder = FeatureEncoder().fit(toy_frame(), make_spec())
    with pytest.raises(DataError, match="numeric column 'age' holds text"):
        encoder.transform(frame)


def test_numeric_infinite_refused():
    frame = toy_frame()
    frame.loc[1, "size"] = np.inf
    with pytest.raises(
        DataError, match=r"numeric column 'size' holds infinite values, e.g. inf \(ids 1: r1\)"
    ):
        FeatureEncoder().fit(frame, make_spec())


def test_all_missing_columns_refused():
    frame = toy_frame().assign(site=np.nan)
    with pytest.raises(DataError, match="categorical column 'site' has no value in the 6 rows"):
        FeatureEncoder().fit(frame, make_spec())
    frame = toy_frame().assign(age=np.nan)
    with pytest.raises(DataError, match="numeric column 'age' has no value in the 6 rows"):
        FeatureEncoder().fit(frame, make_spec())


def test_too_many_categories_refused():
    n = MAX_CATEGORIES + 1
    frame = pd.DataFrame(
        {
            "id": np.arange(n).astype(str),
            "patient": "p",
            "site": np.arange(n).astype(str),
            "age": 1.0,
            "size": 1.0,
        }
    )
    with pytest.raises(DataError, match=f"categorical column 'site' has {n} distinct values"):
        FeatureEncoder().fit(frame, make_spec())


def test_missing_column_and_unfitted_and_bad_json():
    encoder = FeatureEncoder().fit(toy_frame(), make_spec())
    with pytest.raises(DataError, match=r"transform: the frame lacks feature column\(s\) 1: size"):
        encoder.transform(toy_frame().drop(columns=["size"]))
    with pytest.raises(DataError, match=r"fit: the frame lacks feature column\(s\) 1: site"):
        FeatureEncoder().fit(toy_frame().drop(columns=["site"]), make_spec())
    with pytest.raises(DataError, match="encoder: not fitted"):
        FeatureEncoder().transform(toy_frame())
    with pytest.raises(DataError, match="not a FeatureEncoder JSON document"):
        FeatureEncoder.from_json({"weights": []})
    with pytest.raises(DataError, match="fit: the frame has no rows"):
        FeatureEncoder().fit(toy_frame().iloc[:0], make_spec())
    with pytest.raises(DataError, match="no feature column"):
        FeatureEncoder().fit(toy_frame(), make_spec(categorical=(), numeric=(), patient=None))


def test_unknown_categories_over_batches_and_encoders_are_said_once_with_counts(caplog):
    """Two encoders (fold models) and two batches: one warning per column, distinct rows counted."""
    from tabular.features import unknown_categories_said_once

    spec = make_spec(patient=None)
    frame = toy_frame()
    encoders = [
        FeatureEncoder().fit(frame, spec),
        FeatureEncoder().fit(frame[frame.site != "leg"], spec),
    ]
    batches = [
        pd.DataFrame({"id": ids, "site": sites, "age": 1.0, "size": 1.0, "patient": "p"})
        for ids, sites in ((["n1", "n2"], ["neck", "leg"]), (["n3"], ["neck"]))
    ]
    with caplog.at_level(logging.WARNING, logger="tabular.features"):
        with unknown_categories_said_once():
            for batch in batches:
                for encoder in encoders:
                    with unknown_categories_said_once():  # nested blocks add to the outer one
                        encoder.transform(batch)
            assert "not seen at fit" not in caplog.text
    (said,) = [r.getMessage() for r in caplog.records if "not seen at fit" in r.getMessage()]
    assert said == (
        "categorical column 'site': 3 row(s) hold categories not seen at fit (by 4 of 4 encoder "
        "calls, e.g. one per fold model), encoded as all-zero: 2: leg, neck"
    )


@pytest.mark.parametrize("rows", [[0, 1, 2, 5], [3, 4], [0, 1, 2, 3, 4, 5]])
def test_restrict_gives_the_encoder_and_features_of_a_fit_on_those_rows(rows):
    """Patients a (rows 0-2), b (3-4), c (5) whole in each subset: slices of one encoding equal a
    fit on the subset, its categories (back only in row 4, missing only in row 2) included."""
    spec = make_spec()
    frame = toy_frame()
    encoder = FeatureEncoder()
    features = encoder.fit_transform(frame, spec)
    restricted, subset, picks = encoder.restrict(features, np.array(rows))
    own = FeatureEncoder()
    expected = own.fit_transform(frame.iloc[rows], spec)
    assert restricted.to_json() == own.to_json()
    pd.testing.assert_frame_equal(subset, expected)
    # Other rows (a validation part) take the same columns: unseen categories drop out, as in
    # transform.
    others = [i for i in range(len(frame)) if i not in rows]
    if others:
        np.testing.assert_array_equal(
            features.to_numpy()[others][:, picks],
            own.transform(frame.iloc[others], _warn_unknown=False).to_numpy(),
        )


def test_restrict_refuses_rows_fit_would_refuse():
    spec = make_spec(patient=None)
    frame = toy_frame()
    encoder = FeatureEncoder()
    features = encoder.fit_transform(frame, spec)
    with pytest.raises(DataError, match="numeric column 'age' has no value in the 1 rows given"):
        encoder.restrict(features, np.array([3]))
    with pytest.raises(
        DataError, match="categorical column 'site' has no value in the 1 rows given"
    ):
        encoder.restrict(features, np.array([2]))
    with pytest.raises(DataError, match="fit: the frame has no rows"):
        encoder.restrict(features, np.array([], dtype=int))
    with pytest.raises(
        DataError, match=r"restrict: expected the 6 columns of this encoder's transform, got 5"
    ):
        encoder.restrict(features.iloc[:, :5], np.array([0, 1]))
