"""The LightGBM ensemble: folds x seeds, down-sampling inside the training part, PCA per fold,
text models that reproduce the out-of-fold predictions, and nothing pickled."""

import math
import re

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from toytable import toy

from runfolder.errors import RunError
from tabular.errors import DataError
from tabular.gbdt_config import DEFAULT_NEG_RATIO, DEFAULT_PARAMS, GBDTConfig
from tabular.gbdt_ensemble import (
    fit_ensemble,
    fit_model,
    importance_table,
    predict_best,
    predict_valid,
    save_ensemble,
    train_model,
)
from tabular.gbdt_folds import build_fold, build_folds, seed_dataset
from tabular.gbdt_image import PATIENT_CONTEXT, FoldPCA, check_extra, with_extra
from tabular.gbdt_model import GBDTModel
from tabular.gbdt_sampling import negative_sample, sample_seed, sampling_summary
from tabular.metrics import roc_auc

FAST = GBDTConfig(seeds=(0, 1), num_boost_round=80, early_stopping_rounds=10, num_threads=1)


def fit(frame, spec, folds, extra=None, config=FAST):
    y = frame["target"].to_numpy()
    data = [build_fold(frame, spec, y, folds, k, extra=extra, config=config) for k in range(4)]
    return data, fit_ensemble(data, len(frame), DEFAULT_PARAMS, config)


def test_negative_sample_keeps_positives_and_bounds_ratio():
    y = np.array([1] * 10 + [0] * 990)
    keep = negative_sample(y, 5.0, seed=0)
    assert set(np.flatnonzero(y == 1)) <= set(keep)
    assert (y[keep] == 0).sum() == 50
    assert not np.array_equal(keep, negative_sample(y, 5.0, seed=1))
    assert negative_sample(y, None, seed=0) is None
    assert negative_sample(y, 0, seed=0) is None  # 0 = off
    assert negative_sample(y, 1000.0, seed=0) is None
    # No positive in the part: nothing to keep negatives for, the part stays whole.
    assert negative_sample(np.zeros(50, dtype=int), 5.0, seed=0) is None


def test_negative_sampling_is_on_by_default_and_off_with_zero():
    assert GBDTConfig().neg_ratio == DEFAULT_NEG_RATIO == 50
    assert GBDTConfig(neg_ratio=None).neg_ratio == DEFAULT_NEG_RATIO  # None = the default
    assert GBDTConfig(neg_ratio=0).neg_ratio == 0.0
    assert GBDTConfig(neg_ratio=20).neg_ratio == 20.0


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "100", True])
def test_config_refuses_bad_neg_ratio(bad):
    message = (
        r"neg_ratio: expected a number >= 0 \(negatives kept per positive; 0 keeps every negative, "
        rf"None the default 50\), got {re.escape(repr(bad))}"
    )
    with pytest.raises(DataError, match=message):
        GBDTConfig(neg_ratio=bad)


def test_config_refuses_bad_options():
    with pytest.raises(
        DataError, match=r"seeds: expected a non-empty sequence of integers, got \(\)"
    ):
        GBDTConfig(seeds=())
    with pytest.raises(DataError, match="extra_components: expected an integer >= 0, got -1"):
        GBDTConfig(extra_components=-1)
    with pytest.raises(DataError, match="extra_components: expected an integer >= 0, got 2.5"):
        GBDTConfig(extra_components=2.5)
    # 0 is metadata only (no image matrix), what `invoke train-gbdt --image-pca 0` asks for.
    assert GBDTConfig(extra_components=0).extra_components == 0


def test_ensemble_learns_and_saved_models_reproduce_oof(tmp_path):
    frame, spec, folds = toy()
    data, ensemble = fit(frame, spec, folds)
    assert set(ensemble.boosters) == {(k, s) for k in range(4) for s in (0, 1)}
    assert not np.isnan(ensemble.oof).any()
    assert roc_auc(frame["target"], ensemble.oof) > 0.85
    save_ensemble(tmp_path, ensemble, data, FAST, extra_dim=None)
    # Each fold's text models, at their best iteration, give back that fold's OOF predictions.
    for d in data:
        boosters = [
            lgb.Booster(model_file=str(tmp_path / f"fold{d.fold}_seed{s}.txt")) for s in (0, 1)
        ]
        p = np.mean([b.predict(d.X_valid) for b in boosters], axis=0)
        np.testing.assert_allclose(p, ensemble.oof[d.valid_rows], rtol=1e-9)
    # Only text, JSON and npy: nothing is pickled.
    assert {p.suffix for p in tmp_path.iterdir()} <= {".txt", ".json"}
    p = GBDTModel.load(tmp_path).predict(frame.drop(columns=["target"]))
    assert p.shape == (len(frame),) and ((p > 0) & (p < 1)).all()
    assert roc_auc(frame["target"], p) > 0.9


def test_neg_ratio_trains_on_fewer_negatives_but_predicts_every_row():
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0, 1), neg_ratio=1.0, num_boost_round=40, early_stopping_rounds=10, num_threads=1
    )
    data, ensemble = fit(frame, spec, folds, config=config)
    assert not np.isnan(ensemble.oof).any()
    for d in data:
        # Only the training part is sampled: each seed its own draw, every positive, one negative
        # per positive; the binned Dataset holds just the rows some seed keeps.
        keeps = [negative_sample(d.y_train, 1.0, seed=sample_seed(s, d.fold)) for s in (0, 1)]
        assert not np.array_equal(keeps[0], keeps[1])
        for keep in keeps:
            assert (d.y_train[keep] == 0).sum() == (d.y_train == 1).sum() < (d.y_train == 0).sum()
        np.testing.assert_array_equal(d.dataset_rows, np.unique(np.concatenate(keeps)))
        assert d.train_set.num_data() == len(d.dataset_rows) < len(d.train_rows)
        # The validation part is whole.
        assert d.valid_set.num_data() == len(d.valid_rows) == len(d.y_valid)
        assert len(d.train_rows) + len(d.valid_rows) == len(frame)
    summary = sampling_summary(data, config)
    assert summary["neg_ratio"] == 1.0 and summary["applied"] is True
    for f, d in zip(summary["folds"], data, strict=True):
        assert f["negatives_kept"] == f["positives"] == (d.y_train == 1).sum()
        assert (
            f["rows_per_model"] == 2 * f["positives"] and f["negatives"] == (d.y_train == 0).sum()
        )


def test_sampled_models_stop_on_the_validation_loss_at_its_own_prevalence():
    """Early stopping scores the validation part with the log-odds moved back by log(kept share
    of negatives); the saved model's own predictions are not moved."""
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0,), neg_ratio=1.0, num_boost_round=60, early_stopping_rounds=10, num_threads=1
    )
    y = frame["target"].to_numpy()
    d = build_fold(frame, spec, y, folds, 0, config=config)
    booster = train_model(d, DEFAULT_PARAMS, 0, config)
    positives = (d.y_train == 1).sum()
    offset = math.log(positives / (d.y_train == 0).sum())
    raw = booster.predict(d.X_valid, num_iteration=booster.best_iteration, raw_score=True)
    p = 1 / (1 + np.exp(-(raw + offset)))
    loss = -np.mean(d.y_valid * np.log(p) + (1 - d.y_valid) * np.log(1 - p))
    assert booster.best_score["valid"]["binary_logloss"] == pytest.approx(loss, rel=1e-6)


def test_a_fold_refuses_a_seed_or_ratio_it_was_not_built_for():
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0,), neg_ratio=1.0, num_boost_round=10, early_stopping_rounds=5, num_threads=1
    )
    d = build_fold(frame, spec, frame["target"].to_numpy(), folds, 0, config=config)
    with pytest.raises(
        DataError,
        match=r"fold 0: built for neg_ratio 1 and seeds \[0\], which does not hold "
        r"the rows of neg_ratio 1 seed 5",
    ):
        train_model(d, DEFAULT_PARAMS, 5, config)
    with pytest.raises(DataError, match="which does not hold the rows of neg_ratio 0 seed 0"):
        train_model(d, DEFAULT_PARAMS, 0, GBDTConfig(seeds=(0,), neg_ratio=0))


def test_sampling_off_trains_on_every_row():
    frame, spec, folds = toy(n=200)
    config = GBDTConfig(
        seeds=(0,), neg_ratio=0, num_boost_round=10, early_stopping_rounds=5, num_threads=1
    )
    data, _ = fit(frame, spec, folds, config=config)
    assert all(d.dataset_rows is None and d.train_set.num_data() == len(d.train_rows) for d in data)
    summary = sampling_summary(data, config)
    assert summary["applied"] is False and summary["neg_ratio"] == 0
    assert all(f["negatives_kept"] == f["negatives"] for f in summary["folds"])


def test_pca_fitted_on_training_part_only(tmp_path):
    frame, spec, folds = toy()
    rng = np.random.default_rng(1)
    extra = rng.normal(size=(len(frame), 12)).astype(np.float32)
    extra[:, 0] += 2 * frame["target"].to_numpy()
    config = GBDTConfig(
        seeds=(0,), extra_components=4, num_boost_round=40, early_stopping_rounds=10, num_threads=1
    )
    data, ensemble = fit(frame, spec, folds, extra=extra, config=config)
    d0 = data[0]
    np.testing.assert_allclose(d0.pca.mean, extra[d0.train_rows].mean(axis=0), rtol=1e-5, atol=1e-6)
    # The spec names a patient: the image's patient context follows its PCA components.
    assert d0.feature_names[-7:] == [
        "img_pca_0",
        "img_pca_1",
        "img_pca_2",
        "img_pca_3",
        *PATIENT_CONTEXT,
    ]
    # Changing the validation rows' embeddings leaves that fold's PCA unchanged.
    changed = extra.copy()
    changed[d0.valid_rows] += 100.0
    again = build_fold(
        frame, spec, frame["target"].to_numpy(), folds, 0, extra=changed, config=config
    )
    np.testing.assert_allclose(again.pca.components, d0.pca.components, atol=1e-5)
    save_ensemble(tmp_path, ensemble, data, config, extra_dim=12)
    for k in range(4):
        assert np.load(tmp_path / f"pca_fold{k}_components.npy", allow_pickle=False).shape == (
            4,
            12,
        )
    p = GBDTModel.load(tmp_path).predict(frame, extra=extra)
    assert p.shape == (len(frame),)
    with pytest.raises(DataError, match="extra: the models in .* use image features"):
        GBDTModel.load(tmp_path).predict(frame)
    with pytest.raises(DataError, match="extra: expected 12 columns"):
        GBDTModel.load(tmp_path).predict(frame, extra=extra[:, :5])


def test_pca_transform_chunks_match_full():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    pca = FoldPCA.fit(x, 3, max_rows=100)
    np.testing.assert_allclose(
        pca.transform(x, chunk=7), (x - pca.mean) @ pca.components.T, rtol=1e-4, atol=1e-5
    )


def test_predict_refuses_missing_stage_and_unexpected_extra(tmp_path):
    frame, spec, folds = toy(n=200)
    with pytest.raises(
        RunError,
        match=r"stage 'gbdt' is missing \(.*features.json not found\); make it "
        r"with `invoke train-gbdt --spec S --run R`",
    ):
        GBDTModel.load(tmp_path / "gbdt").predict(frame)
    config = GBDTConfig(seeds=(0,), num_boost_round=20, early_stopping_rounds=5, num_threads=1)
    data, ensemble = fit(frame, spec, folds, config=config)
    save_ensemble(tmp_path / "gbdt", ensemble, data, config, extra_dim=None)
    model = GBDTModel.load(tmp_path / "gbdt")
    assert model.predict(frame).shape == (200,)
    with pytest.raises(DataError, match="trained without image features"):
        model.predict(frame, extra=np.zeros((200, 3)))
    with pytest.raises(DataError, match=r"the frame lacks feature column\(s\) 1: x"):
        model.predict(frame.drop(columns=["x"]))


def test_check_extra():
    with pytest.raises(
        DataError, match=r"extra: expected a 2-D array \(n_rows, d\), got shape \(3,\)"
    ):
        check_extra(np.zeros(3), 3)
    with pytest.raises(DataError, match="extra: expected 4 rows .* got 3"):
        check_extra(np.zeros((3, 2)), 4)
    bad = np.zeros((3, 2))
    bad[1, 1] = np.nan
    with pytest.raises(DataError, match="extra: rows with NaN or infinite values, ids 1: b"):
        check_extra(bad, 3, ["a", "b", "c"])


def test_image_features_without_the_embeddings_are_refused():
    """A fold whose PCA was fitted needs the embeddings it projects; metadata alone passes."""
    pca = FoldPCA.fit(np.random.default_rng(0).normal(size=(20, 6)), n_components=3)
    features = pd.DataFrame({"age": np.arange(4.0)})
    with pytest.raises(
        DataError,
        match=r"extra: the features include 3 image PCA components; pass the "
        r"image embeddings",
    ):
        with_extra(features, None, pca)
    assert with_extra(features, None, None) is features
    joined = with_extra(features, np.ones((4, 6)), pca)
    assert list(joined.columns) == ["age", *pca.names] and joined.shape == (4, 4)


def test_importance_table():
    frame, spec, folds = toy(n=200)
    config = GBDTConfig(seeds=(0,), num_boost_round=20, early_stopping_rounds=5, num_threads=1)
    _, ensemble = fit(frame, spec, folds, config=config)
    table = importance_table(ensemble)
    assert list(table.columns) == ["feature", "gain", "gain_std", "gain_share", "splits"]
    assert table["feature"].iloc[0] == "x"
    assert table["gain_share"].sum() == pytest.approx(1.0)


def test_reasons_name_the_metadata_that_raises_the_score(tmp_path):
    """`x` carries the signal: the rows with the largest x are explained by it, with its value and
    a positive contribution; image PCA features never appear among the reasons."""
    frame, spec, folds = toy()
    extra = np.random.default_rng(1).normal(size=(len(frame), 6)).astype(np.float32)
    config = GBDTConfig(
        seeds=(0,), num_boost_round=60, early_stopping_rounds=20, num_threads=1, extra_components=2
    )
    data, ensemble = fit(frame, spec, folds, extra=extra, config=config)
    save_ensemble(tmp_path, ensemble, data, config, extra_dim=6)
    model = GBDTModel.load(tmp_path)
    reasons = model.reasons(frame, extra)
    assert len(reasons) == len(frame)
    top = frame["x"].nlargest(10).index
    for i in top:
        first = reasons[i].split("; ")[0]
        name, rest = first.split(" = ")
        assert name == "x" and rest == f"{frame.loc[i, 'x']:.3g} ({rest.split('(')[1]}"
        assert float(rest.split("(")[1].rstrip(")")) > 0
    assert not any("img_pca_" in text for text in reasons)


def test_reasons_read_one_hot_columns_as_conditions():
    from tabular.gbdt_model import _reason_text

    contributions = pd.Series({"age": 0.8, "site__back": 0.3, "site__face": 0.1, "size": -0.5})
    values = pd.Series({"age": 71.0, "site__back": 1.0, "site__face": 0.0, "size": 3.25})
    assert (
        _reason_text(contributions, values, top=3)
        == "age = 71 (+0.80); site = back (+0.30); site != face (+0.10)"
    )
    assert _reason_text(contributions, values, top=1) == "age = 71 (+0.80)"
    assert _reason_text(-contributions.abs(), values, top=3) == ""  # nothing raised the score


def test_reasons_come_only_from_present_values_above_the_floor():
    from tabular.gbdt_model import REASON_FLOOR, _reason_text

    contributions = pd.Series(
        {
            "age": 0.8,
            "sex__male": 0.3,
            "sex__missing": 0.2,
            "site__face": 0.6,
            "site__missing": -0.1,
            "size": 0.4,
            "tilt": REASON_FLOOR / 2,
        }
    )
    values = pd.Series(
        {
            "age": np.nan,
            "sex__male": 0.0,
            "sex__missing": 1.0,
            "site__face": 0.0,
            "site__missing": 0.0,
            "size": 3.0,
            "tilt": 2.0,
        }
    )
    # age and sex are absent (no "age = missing", no "sex != male"); tilt's share is below the floor
    assert _reason_text(contributions, values, top=3) == "site != face (+0.60); size = 3 (+0.40)"


def test_image_pca_cut_to_what_the_folds_allow_is_said_once(caplog):
    """`--image-pca 100000` on 160 rows of 4 folds: each fold's PCA keeps 120 (its training
    rows)."""
    frame, spec, folds = toy(n=160)
    extra = np.random.default_rng(0).normal(size=(160, 200)).astype(np.float32)
    config = GBDTConfig(seeds=(0,), extra_components=100_000, neg_ratio=0, num_threads=1)
    y = frame["target"].to_numpy()
    with caplog.at_level("WARNING", logger="tabular.gbdt_folds"):
        data = [build_fold(frame, spec, y, folds, k, extra=extra, config=config) for k in range(4)]
    assert [len(d.pca.components) for d in data] == [120] * 4
    said = [r.getMessage() for r in caplog.records if "--image-pca" in r.getMessage()]
    assert len(said) == 1
    assert re.search(r"--image-pca \(extra_components\) 100000: 120 components used", said[0])
    assert "Pass --image-pca 120 or fewer" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="tabular.gbdt_folds"):
        build_fold(
            frame,
            spec,
            y,
            folds,
            0,
            extra=extra,
            config=GBDTConfig(extra_components=8, num_threads=1),
        )
    assert not [r for r in caplog.records if "--image-pca" in r.getMessage()]


def test_categories_not_seen_at_fit_are_said_once_per_column_for_every_fold(tmp_path, caplog):
    """4 fold models each meeting the same unknown site: one warning, naming rows and encoders."""
    frame, spec, folds = toy(n=200)
    config = GBDTConfig(seeds=(0,), num_boost_round=20, early_stopping_rounds=5, num_threads=1)
    data, ensemble = fit(frame, spec, folds, config=config)
    save_ensemble(tmp_path, ensemble, data, config, extra_dim=None)
    new = frame.drop(columns=["target"]).head(5).copy()
    new["site"] = ["neck", "neck", "scalp", "arm", "leg"]
    model = GBDTModel.load(tmp_path)
    with caplog.at_level("WARNING", logger="tabular.features"):
        model.predict(new)
    said = [r.getMessage() for r in caplog.records if "not seen at fit" in r.getMessage()]
    assert said == [
        "categorical column 'site': 3 row(s) hold categories not seen at fit (by 4 of 4 encoder "
        "calls, e.g. one per fold model), encoded as all-zero: 2: neck, scalp"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="tabular.features"):
        model.predict(frame.drop(columns=["target"]))
    assert "not seen at fit" not in caplog.text


# ------------------------------------------------------------ features and Datasets built once


def reference_oof(frame, spec, folds, config, extra=None):
    """Out-of-fold predictions as the stage made them before features were shared: every fold
    encoded on its own (`build_fold`), every model on a training Dataset made for it, predictions
    from the validation DataFrame."""
    y = frame["target"].to_numpy()
    oof = np.full(len(frame), np.nan)
    for k in sorted(set(folds.tolist())):
        d = build_fold(frame, spec, y, folds, k, extra=extra, config=config)
        predictions = []
        for seed in config.seeds:
            d.seed_sets.clear()
            predictions.append(
                predict_best(train_model(d, DEFAULT_PARAMS, seed, config), d.X_valid)
            )
        oof[d.valid_rows] = np.mean(predictions, axis=0)
    return oof


def rare_site(frame, folds, fold=2):
    """Give 'hand' to a few rows of one fold only: that fold's training part never sees it."""
    frame = frame.copy()
    rows = np.flatnonzero(folds == fold)[:3]
    frame.loc[rows, "site"] = "hand"
    return frame


@pytest.mark.parametrize("neg_ratio", [1.0, 0])
def test_folds_built_once_give_identical_out_of_fold_predictions(neg_ratio, caplog):
    frame, spec, folds = toy()
    frame = rare_site(frame, folds)
    config = GBDTConfig(
        seeds=(0, 1, 2),
        neg_ratio=neg_ratio,
        num_boost_round=60,
        early_stopping_rounds=10,
        num_threads=1,
    )
    y = frame["target"].to_numpy()
    with caplog.at_level("WARNING", logger="tabular.gbdt_folds"):
        shared = build_folds(frame, spec, y, folds, config=config)
    # The rows of the category the training part lacks are named, as the encoder names them.
    assert re.search(
        r"categorical column 'site': 3 row\(s\) of fold 2 hold category 'hand'", caplog.text
    )
    for d in shared:
        own = build_fold(frame, spec, y, folds, d.fold, config=config)
        assert d.feature_names == own.feature_names
        assert d.encoder.to_json() == own.encoder.to_json()
        pd.testing.assert_frame_equal(d.X_valid.reset_index(drop=True), own.X_valid)
        assert d.train_set.num_data() == own.train_set.num_data()
    assert "site__hand" not in shared[2].feature_names and "site__hand" in shared[0].feature_names
    oof = fit_ensemble(shared, len(frame), DEFAULT_PARAMS, config).oof
    # The same models; their predictions read from LightGBM's early-stopping scores (`fit_model`)
    # add the same leaf values in another order: equal but for the last bits.
    assert np.abs(oof - reference_oof(frame, spec, folds, config)).max() <= 1e-12


def test_folds_built_once_with_image_pca_and_without_patients():
    frame, spec, folds = toy(n=240)
    extra = np.random.default_rng(3).normal(size=(len(frame), 6)).astype(np.float32)
    extra[:, 0] += frame["target"].to_numpy()
    config = GBDTConfig(
        seeds=(0, 1),
        neg_ratio=1.0,
        extra_components=3,
        num_boost_round=40,
        early_stopping_rounds=10,
        num_threads=1,
    )
    for s in (spec, replace_spec(spec, patient=None)):
        shared = build_folds(
            frame, s, frame["target"].to_numpy(), folds, extra=extra, config=config
        )
        oof = fit_ensemble(shared, len(frame), DEFAULT_PARAMS, config).oof
        assert np.abs(oof - reference_oof(frame, s, folds, config, extra=extra)).max() <= 1e-12


def test_patients_across_folds_are_encoded_per_fold(caplog):
    """Per-patient features come from each part's own rows: where a patient straddles the parts,
    slices of one encoding of every row would differ, so each fold is encoded on its own."""
    frame, spec, _ = toy(n=200)
    folds = np.arange(len(frame)) % 4  # each patient's 4 rows in 4 folds
    config = GBDTConfig(
        seeds=(0,), neg_ratio=0, num_boost_round=20, early_stopping_rounds=5, num_threads=1
    )
    y = frame["target"].to_numpy()
    with caplog.at_level("INFO", logger="tabular.gbdt_folds"):
        shared = build_folds(frame, spec, y, folds, config=config)
    assert "patients in several folds (50); features are built per fold" in caplog.text
    for d in shared:
        own = build_fold(frame, spec, y, folds, d.fold, config=config)
        pd.testing.assert_frame_equal(d.X_valid, own.X_valid)
        assert d.encoder.to_json() == own.encoder.to_json()


def test_a_training_part_without_a_value_is_refused_as_before():
    frame, spec, folds = toy(n=200)
    frame["x"] = np.where(folds == 1, frame["x"], np.nan)  # x only in fold 1's rows
    with pytest.raises(
        DataError, match=r"numeric column 'x' has no value in the 148 rows given \(e.g. "
    ):
        # fold 0's training part (148 rows), refused by its own fit with its own message:
        build_folds(frame, spec, frame["target"].to_numpy(), folds, config=FAST)


def test_each_seed_dataset_is_made_once_and_serves_any_booster_parameters():
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0, 1), neg_ratio=1.0, num_boost_round=40, early_stopping_rounds=10, num_threads=1
    )
    y = frame["target"].to_numpy()
    d = build_folds(frame, spec, y, folds, config=config)[0]
    first = seed_dataset(d, 1, config)
    assert seed_dataset(d, 1, config) is first and first[0] is not seed_dataset(d, 0, config)[0]
    # A trial's other booster parameters on the kept Dataset: the same model as on a fresh one.
    other = {**DEFAULT_PARAMS, "num_leaves": 31, "min_child_samples": 5, "learning_rate": 0.1}
    train_model(d, DEFAULT_PARAMS, 1, config)
    kept = train_model(d, other, 1, config)
    assert seed_dataset(d, 1, config) is first
    fresh = build_fold(frame, spec, y, folds, 0, config=config)
    again = train_model(fresh, other, 1, config)
    assert kept.best_iteration == again.best_iteration
    np.testing.assert_array_equal(predict_best(kept, d.X_valid), predict_best(again, fresh.X_valid))


def replace_spec(spec, **changes):
    from dataclasses import replace

    return replace(spec, **changes)


@pytest.mark.parametrize(
    "neg_ratio, rounds, stopping",
    [
        (1.0, 300, 10),  # down-sampled (a validation offset), stopped early: trees after the best
        (0, 300, 10),  # every negative (no offset), stopped early
        (1.0, 2, 50),  # down-sampled, the last iteration the best: no tree to take back out
        (0, 2, 50),  # the scores as LightGBM kept them
    ],
)
def test_fit_model_predicts_the_validation_part_as_the_model_does(neg_ratio, rounds, stopping):
    """The validation predictions read from LightGBM's early-stopping scores are the model's own
    predictions at its best iteration, and the booster is the one `train_model` returns."""
    frame, spec, folds = toy()
    # Coarse values, as ISIC 2020's ages are: many rows share their leaves, and their predictions.
    frame["x"] = frame["x"].round(1)
    config = GBDTConfig(
        seeds=(0,),
        neg_ratio=neg_ratio,
        num_boost_round=rounds,
        early_stopping_rounds=stopping,
        num_threads=1,
    )
    d = build_fold(frame, spec, frame["target"].to_numpy(), folds, 0, config=config)
    params = DEFAULT_PARAMS
    booster, predictions = fit_model(d, params, 0, config)
    expected = predict_valid(booster, d)
    assert predictions.shape == (len(d.valid_rows),)
    assert np.abs(predictions - expected).max() <= 1e-12
    # The same order, ties included (pAUC80 counts a tie as half): no row swaps with another.
    np.testing.assert_array_equal(
        np.argsort(predictions, kind="stable"), np.argsort(expected, kind="stable")
    )
    own = train_model(d, params, 0, config)
    assert booster.best_iteration == own.best_iteration
    # The cases above as described: stopped before its last round, or best at the last round.
    assert (booster.best_iteration < rounds) == (rounds == 300)
    assert booster.current_iteration() == own.current_iteration()
    assert booster.model_to_string() == own.model_to_string()


def test_fit_model_predicts_with_the_trees_where_the_output_is_not_a_logistic():
    """Another objective's scores cannot have the validation offset taken out of their log-odds:
    the predictions are then the model's own, exactly."""
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0,), neg_ratio=1.0, num_boost_round=100, early_stopping_rounds=10, num_threads=1
    )
    d = build_fold(frame, spec, frame["target"].to_numpy(), folds, 0, config=config)
    params = {**DEFAULT_PARAMS, "objective": "cross_entropy", "metric": "cross_entropy"}
    booster, predictions = fit_model(d, params, 0, config)
    np.testing.assert_array_equal(predictions, predict_valid(booster, d))


def test_fit_model_predicts_with_the_trees_where_lightgbm_lacks_the_score_buffer(monkeypatch):
    """This LightGBM's booster has the buffer `fit_model` reads (the fast path is taken); without
    it the predictions are the model's own, exactly."""
    assert hasattr(lgb.Booster, "_Booster__inner_predict")
    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0,), neg_ratio=1.0, num_boost_round=100, early_stopping_rounds=10, num_threads=1
    )
    d = build_fold(frame, spec, frame["target"].to_numpy(), folds, 0, config=config)
    monkeypatch.delattr(lgb.Booster, "_Booster__inner_predict")
    booster, predictions = fit_model(d, DEFAULT_PARAMS, 0, config)
    np.testing.assert_array_equal(predictions, predict_valid(booster, d))
