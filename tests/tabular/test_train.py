"""`fit_gbdt`: the whole LightGBM stage of a run, on synthetic and real metadata."""

import json

import numpy as np
import pandas as pd
import pytest

from tabular.errors import DataError
from tabular.gbdt_config import GBDTConfig
from tabular.gbdt_image import PATIENT_CONTEXT
from tabular.gbdt_model import GBDTModel
from tabular.metrics import roc_auc
from tabular.spec import ISIC2024_NOT_FEATURES, ISIC2024_TRAIN_ONLY, load_spec
from tabular.train import fit_gbdt

FAST = GBDTConfig(seeds=(0, 1), num_boost_round=60, early_stopping_rounds=10, num_threads=1)

SPEC = """
[dataset]
name = "synthetic"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "patient_id"
patient = "patient_id"
categorical = ["site"]
numeric = ["size", "age"]
"""


def make(tmp_path, n=300, seed=0, spec_text=SPEC, edit=None):
    rng = np.random.default_rng(seed)
    size = rng.gamma(2.0, 2.0, n)
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "patient_id": [f"P{i // 5}" for i in range(n)],
            "site": rng.choice(["arm", "leg", "back"], n),
            "size": size,
            "age": rng.normal(55, 10, n).round(),
            "target": (size + rng.normal(scale=1.0, size=n) > 7).astype(int),
        }
    )
    if edit:
        frame = edit(frame)
    frame.to_csv(tmp_path / "metadata.csv", index=False)
    (tmp_path / "dataset.toml").write_text(spec_text)
    return load_spec(tmp_path / "dataset.toml"), frame


def test_fit_gbdt_writes_the_stage(tmp_path):
    spec, frame = make(tmp_path)
    run = tmp_path / "run"
    metrics = fit_gbdt(spec, run, config=FAST)
    stage = run / "gbdt"
    for name in (
        "encoder.json",
        "features.json",
        "params.json",
        "oof.csv",
        "metrics.json",
        "importance.csv",
        "fold0_seed0.txt",
        "fold4_seed1.txt",
    ):
        assert (stage / name).exists(), name
    oof = pd.read_csv(stage / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "fold", "target", "p"]
    assert oof["id"].tolist() == frame["image_id"].tolist()  # the run's frame order
    folds = pd.read_csv(run / "folds.csv", dtype={"id": str}).set_index("id")
    assert (oof["fold"].to_numpy() == folds.loc[oof["id"], "fold"].to_numpy()).all()
    assert oof["p"].between(0, 1).all()
    stored = json.loads((stage / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(metrics))
    assert stored["dataset"] == "synthetic" and stored["rows"] == 300
    for key in (
        "pauc80",
        "roc_auc",
        "pr_auc",
        "threshold",
        "target_sensitivity",
        "recall",
        "specificity",
        "tp",
        "fp",
        "tn",
        "fn",
        "per_fold",
    ):
        assert key in stored
    assert stored["tuned"] is False and "untuned" not in stored
    assert stored["roc_auc"] > 0.8
    assert roc_auc(oof["target"], oof["p"]) == pytest.approx(stored["roc_auc"])
    importance = pd.read_csv(stage / "importance.csv")
    assert importance["feature"].iloc[0] in {"size", "size_patient_norm"}
    params = json.loads((stage / "params.json").read_text())
    assert params["params"]["objective"] == "binary" and params["config"]["seeds"] == [0, 1]
    # The saved stage scores new rows (per-patient features from the scored rows only).
    p = GBDTModel.load(run / "gbdt").predict(frame.drop(columns=["target"]).iloc[:20], spec=spec)
    assert p.shape == (20,)


def test_fit_gbdt_with_trials_records_untuned_figures(tmp_path):
    spec, _ = make(tmp_path, n=200)
    config = GBDTConfig(seeds=(0,), num_boost_round=40, early_stopping_rounds=5, num_threads=1)
    metrics = fit_gbdt(spec, tmp_path / "run", trials=3, config=config)
    stage = tmp_path / "run" / "gbdt"
    assert metrics["trials"]["finished"] == 3 and metrics["trials"]["run_now"] == 3
    assert "pauc80" in metrics["untuned"] and "roc_auc" in metrics["untuned"]
    assert (stage / "optuna.db").exists() and (stage / "best_params.json").exists()
    assert (stage / "oof_untuned.csv").exists()
    best = json.loads((stage / "best_params.json").read_text())["params"]
    used = json.loads((stage / "params.json").read_text())["params"]
    assert used == best or metrics["tuned"] is False
    # A rerun asks for 4: one more trial, not four.
    again = fit_gbdt(spec, tmp_path / "run", trials=4, config=config)
    assert again["trials"]["finished"] == 4 and again["trials"]["run_now"] == 1


def test_fit_gbdt_with_extra_matrix(tmp_path):
    spec, frame = make(tmp_path, n=200)
    rng = np.random.default_rng(0)
    extra = rng.normal(size=(200, 16)).astype(np.float32)
    extra[:, 3] += 2.0 * frame["target"].to_numpy()
    config = GBDTConfig(
        seeds=(0,), extra_components=5, num_boost_round=40, early_stopping_rounds=5, num_threads=1
    )
    metrics = fit_gbdt(spec, tmp_path / "run", extra=extra, config=config)
    assert metrics["extra"] == {"dim": 16, "components": 5}
    features = json.loads((tmp_path / "run" / "gbdt" / "features.json").read_text())
    # The PCA components, then the image's patient context (the spec names a patient column).
    assert features["folds"][0]["features"][-8:] == [
        *(f"img_pca_{i}" for i in range(5)),
        *PATIENT_CONTEXT,
    ]
    assert GBDTModel.load(tmp_path / "run" / "gbdt").predict(frame, extra=extra).shape == (200,)
    with pytest.raises(DataError, match="extra: expected 200 rows"):
        fit_gbdt(spec, tmp_path / "run", extra=extra[:10], config=config)


def test_fit_gbdt_metadata_only_with_zero_extra_components(tmp_path):
    """`invoke train-gbdt --image-pca 0` (and any tabular-only spec) passes extra_components=0."""
    spec, _ = make(tmp_path, n=200)
    metrics = fit_gbdt(spec, tmp_path / "run", extra_components=0, seeds=(0,))
    assert metrics["extra"] is None and metrics["rows"] == 200
    params = json.loads((tmp_path / "run" / "gbdt" / "params.json").read_text())
    assert params["config"]["extra_components"] == 0


def test_fit_gbdt_refuses_an_extra_matrix_with_zero_components(tmp_path):
    spec, _ = make(tmp_path, n=200)
    extra = np.zeros((200, 8), dtype=np.float32)
    with pytest.raises(
        DataError,
        match=r"extra_components: 0 keeps no image features, but an extra "
        r"matrix of shape \(200, 8\) was given",
    ):
        fit_gbdt(spec, tmp_path / "run", extra=extra, extra_components=0, seeds=(0,))


def test_fit_gbdt_refuses_bad_input(tmp_path):
    spec, _ = make(tmp_path, n=100, edit=lambda f: f.assign(site=np.nan))
    with pytest.raises(DataError, match="categorical column 'site' has no value"):
        fit_gbdt(spec, tmp_path / "run", config=FAST)
    spec, _ = make(tmp_path, n=100)
    with pytest.raises(DataError, match="trials: expected an integer >= 0, got -1"):
        fit_gbdt(spec, tmp_path / "run2", trials=-1, config=FAST)


def _rare(frame):
    """About 2% positives: 300 rows keep 6, so a training part holds about 5 (and 235 negatives)."""
    target = np.zeros(len(frame), dtype=int)
    target[frame["size"].nlargest(6).index] = 1
    return frame.assign(target=target)


def test_fit_gbdt_samples_negatives_by_default_below_one_percent_and_records_it(tmp_path):
    spec, _ = make(tmp_path, n=300, edit=_rare)
    config = GBDTConfig(
        seeds=(0, 1), neg_ratio=10, num_boost_round=30, early_stopping_rounds=5, num_threads=1
    )
    metrics = fit_gbdt(spec, tmp_path / "run", config=config)
    stored = json.loads((tmp_path / "run" / "gbdt" / "metrics.json").read_text())
    sampling = stored["negative_sampling"]
    assert stored["neg_ratio"] == 10 and sampling["neg_ratio"] == 10 and sampling["applied"] is True
    assert "validation parts are never sampled" in sampling["draw"]
    for fold in sampling["folds"]:
        assert fold["negatives_kept"] == 10 * fold["positives"] < fold["negatives"]
        assert fold["rows_per_model"] == 11 * fold["positives"]
    # Every row is scored out of fold, by models that never trained on it.
    oof = pd.read_csv(tmp_path / "run" / "gbdt" / "oof.csv")
    assert oof["p"].notna().all() and len(oof) == 300 == metrics["rows"]


def test_fit_gbdt_default_neg_ratio_and_zero_turns_it_off(tmp_path):
    spec, _ = make(tmp_path, n=200)
    # neg_ratio=None (what `invoke train-gbdt` passes without --neg-ratio) is the default, which
    # leaves a 20%-positive table whole.
    metrics = fit_gbdt(spec, tmp_path / "run", seeds=(0,), extra_components=0, neg_ratio=None)
    assert metrics["neg_ratio"] == 50 and metrics["negative_sampling"]["applied"] is False
    spec, _ = make(tmp_path, n=300, edit=_rare)
    metrics = fit_gbdt(spec, tmp_path / "run2", seeds=(0,), extra_components=0, neg_ratio=0)
    assert metrics["neg_ratio"] == 0 and metrics["negative_sampling"]["applied"] is False
    assert all(f["negatives_kept"] == f["negatives"] for f in metrics["negative_sampling"]["folds"])
    with pytest.raises(
        DataError,
        match=r"neg_ratio: expected a number >= 0 \(negatives kept per positive; "
        r"0 keeps every negative, None the default 50\), got -5",
    ):
        fit_gbdt(spec, tmp_path / "run3", seeds=(0,), extra_components=0, neg_ratio=-5)


def test_isic2024_mini_end_to_end_without_train_only_columns(shared_data, tmp_path):
    spec = load_spec(shared_data / "isic2024-mini")
    config = GBDTConfig(seeds=(0,), num_boost_round=20, early_stopping_rounds=5, num_threads=1)
    metrics = fit_gbdt(spec, tmp_path / "run", config=config)
    assert metrics["rows"] == 51
    features = json.loads((tmp_path / "run" / "gbdt" / "features.json").read_text())
    banned = [
        c.lower() for c in (*ISIC2024_TRAIN_ONLY, *ISIC2024_NOT_FEATURES, "isic_id", "patient_id")
    ]
    for fold in features["folds"]:
        assert "lesion_size_ratio" in fold["features"] and "lesions_per_patient" in fold["features"]
        for name in fold["features"]:
            assert not any(column in name.lower() for column in banned), name
    # Scoring the Kaggle test-format demo (no train-only columns at all).
    demo = pd.read_csv(shared_data / "isic2024-demo" / "test-metadata.csv")
    p = GBDTModel.load(tmp_path / "run" / "gbdt").predict(demo, spec=spec)
    assert p.shape == (3,) and np.isfinite(p).all()


def test_ham10000_metadata_only(shared_data, tmp_path):
    spec = load_spec(shared_data / "ham10000" / "dataset.toml")
    metrics = fit_gbdt(spec, tmp_path / "run", config=GBDTConfig(seeds=(0,), num_threads=1))
    # Sex, site and age alone: about 0.78 out-of-fold ROC AUC on unseen lesions.
    assert metrics["roc_auc"] > 0.74
    assert 0.05 < metrics["pauc80"] < 0.2
    assert metrics["recall"] >= 0.95


def test_a_bad_storage_fails_before_any_work(tmp_path, monkeypatch):
    import tabular.train as train

    spec, _ = make(tmp_path)

    def no_features(*args, **kwargs):
        raise AssertionError("features were built before the storage was checked")

    monkeypatch.setattr(train, "build_folds", no_features)
    with pytest.raises(
        DataError,
        match=r"storage 'bogus://x': unknown scheme 'bogus://'; .*sqlite:///path/study.db, "
        r"postgresql://.*mysql://.*journal:///path/study.log",
    ):
        fit_gbdt(spec, tmp_path / "run", trials=2, storage="bogus://x", config=FAST)
    assert not (tmp_path / "run").exists()  # not even the run folder


def test_a_failed_retrain_keeps_the_previous_stage_and_the_study(tmp_path, monkeypatch):
    import tabular.train as train

    spec, _ = make(tmp_path, n=120)
    run = tmp_path / "run"
    fit_gbdt(spec, run, trials=1, config=FAST)
    before = {p.name: p.read_bytes() for p in (run / "gbdt").iterdir() if p.name != "optuna.db"}
    assert "fold0_seed0.txt" in before and (run / "gbdt" / "optuna.db").exists()

    def fails(*args, **kwargs):
        raise DataError("stopped while fitting")

    monkeypatch.setattr(train, "fit_ensemble", fails)
    with pytest.raises(DataError, match="stopped while fitting"):
        fit_gbdt(spec, run, trials=2, config=FAST)
    after = {p.name: p.read_bytes() for p in (run / "gbdt").iterdir() if p.name != "optuna.db"}
    assert after == before
    assert sorted(p.name for p in run.iterdir() if ".new" in p.name) == []
    monkeypatch.undo()
    metrics = fit_gbdt(spec, run, trials=2, config=FAST)  # the study lived on in gbdt/optuna.db
    assert metrics["trials"]["finished"] == 2 and metrics["trials"]["run_now"] == 1
