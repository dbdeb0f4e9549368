"""Stacking and blending out of fold: no leak, the run's own folds, threshold and final choice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fuse.errors import RunError
from fuse.stacking.patient_ranks import patient_rank
from fuse.stacking.stack import (
    BlendModel,
    StackConfig,
    StackModel,
    fit_stack_model,
    load_final,
    oof_stack,
    stack,
    stack_features,
)
from tabular.features import FeatureEncoder
from tabular.metrics import roc_auc, threshold_for_sensitivity

FAST = StackConfig(num_boost_round=150)
# Small leaves and many rounds: a model that sees a row in training memorises it, so a leak shows.
MEMORISING = StackConfig(num_boost_round=200, learning_rate=0.1, min_data_in_leaf=5)


def leaky_stack(frame, spec, y, p_fusion, p_gbdt, folds, config):
    """What a leaky stack does: one model fitted on every row, fold k's rows included."""
    encoder = FeatureEncoder().fit(frame, spec)
    model = fit_stack_model(stack_features(encoder, frame, p_fusion, p_gbdt), y, config)
    return model.predict(stack_features(encoder, frame, p_fusion, p_gbdt))


@pytest.mark.parametrize("leaking", ["fusion", "gbdt"])
def test_label_on_training_folds_noise_on_evaluated_fold_gives_no_skill(
    run_factory, oof_writer, leaking
):
    # The fake base column (p_fusion, or p_gbdt: the stack uses both as features) equals the label
    # on folds 1..4 and is noise on fold 0; the other base column is noise everywhere. Evaluated
    # on fold 0, an honest stack learnt "p_<leaking> = label" from folds 1..4 and meets noise: no
    # skill. A stack that also trained on fold 0 memorises fold 0's labels (its noise values are
    # unique) and looks excellent there. The metadata carry no signal, so only a leak can score.
    run = run_factory(signal=0.0)
    rng = np.random.default_rng(3)
    y, folds = run.target, run.fold
    evaluated = folds == 0
    base = {
        leaking: np.where(evaluated, rng.uniform(0, 1, len(y)), y.astype(float)),
        {"fusion": "gbdt", "gbdt": "fusion"}[leaking]: rng.uniform(0, 1, len(y)),
    }
    oof_writer(run, "fusion", base["fusion"])
    oof_writer(run, "gbdt", base["gbdt"])

    stack(run.dir, config=MEMORISING)
    oof = pd.read_csv(run.dir / "stack" / "oof.csv")
    honest = roc_auc(oof["target"][evaluated], oof["p"][evaluated])
    leaky = leaky_stack(run.frame, run.spec, y, base["fusion"], base["gbdt"], folds, MEMORISING)
    assert roc_auc(y[evaluated], leaky[evaluated]) > 0.95  # the test can see a leak
    assert honest < 0.75


def test_random_labels_give_chance_out_of_fold(run_factory):
    # Labels independent of every feature: out of fold the stack can only guess, while a model
    # scored on rows it trained on memorises them.
    run = run_factory(seed=5, signal=0.0)
    y = run.target
    rng = np.random.default_rng(7)
    p_fusion, p_gbdt = rng.uniform(0, 1, len(y)), rng.uniform(0, 1, len(y))
    ours = oof_stack(run.frame, run.spec, y, run.fold, p_fusion, p_gbdt, MEMORISING)
    leaky = leaky_stack(run.frame, run.spec, y, p_fusion, p_gbdt, run.fold, MEMORISING)
    assert roc_auc(y, leaky) > 0.95
    assert 0.3 < roc_auc(y, ours) < 0.75


def test_outputs_folds_threshold_and_final_choice(tabular_run):
    run = tabular_run
    record = stack(run.dir, sensitivity=0.9, config=FAST)
    for stage in ("stack", "blend"):
        oof = pd.read_csv(run.dir / stage / "oof.csv", dtype={"id": str})
        assert list(oof.columns) == ["id", "fold", "target", "p"]
        assert oof["id"].tolist() == run.frame[run.spec.id].tolist()
        np.testing.assert_array_equal(oof["fold"], run.fold)  # the run's folds, row for row
        assert oof["p"].notna().all()
        metrics = json.loads((run.dir / stage / "metrics.json").read_text())
        assert metrics["pauc80"] == pytest.approx(record["pauc80"][stage])
    assert sorted(p.name for p in (run.dir / "stack").glob("fold*.txt")) == [
        f"fold{k}.txt" for k in range(5)
    ]

    final = json.loads((run.dir / "stack" / "final.json").read_text())
    assert final == record
    assert final["final"] == max(("stack", "blend"), key=lambda name: final["pauc80"][name])
    oof = pd.read_csv(run.dir / final["final"] / "oof.csv")
    expected = threshold_for_sensitivity(oof["target"], oof["p"], 0.9)
    assert final["score_threshold"] == pytest.approx(
        expected
    )  # `threshold`: the same on the probability scale
    assert final["sensitivity"] == 0.9
    flagged = oof["p"] >= final["score_threshold"]
    assert flagged[oof["target"] == 1].mean() >= 0.9


def test_higher_sensitivity_lowers_the_threshold(tabular_run):
    high = stack(tabular_run.dir, sensitivity=0.95, config=FAST)
    low = stack(tabular_run.dir, sensitivity=0.5, config=FAST)
    assert high["final"] == low["final"]
    assert high["threshold"] < low["threshold"]


def test_blend_weight_is_chosen_without_the_evaluated_fold(run_factory, oof_writer):
    # gbdt is perfect on fold 0 and noise elsewhere; fusion is informative everywhere. A weight
    # chosen with fold 0 would favour gbdt on fold 0; chosen on folds 1..4 it favours fusion.
    run = run_factory(seed=2)
    rng = np.random.default_rng(0)
    y, folds = run.target, run.fold
    p_gbdt = np.where(folds == 0, y * 0.5 + rng.uniform(0, 0.5, len(y)), rng.uniform(0, 1, len(y)))
    p_fusion = 1 / (1 + np.exp(-(2 * (y - 0.5) * 2 + rng.normal(0, 1, len(y)))))
    oof_writer(run, "gbdt", p_gbdt)
    oof_writer(run, "fusion", p_fusion)
    stack(run.dir, config=FAST)
    blend = json.loads((run.dir / "blend" / "blend.json").read_text())
    assert blend["fold_weights"]["0"] <= 0.2


def test_scoring_helpers_average_the_fold_models(tabular_run):
    run = tabular_run
    stack(run.dir, config=FAST)
    new = run.frame.head(20).drop(columns=[run.spec.target])
    p_fusion = np.linspace(0.01, 0.99, 20)
    p_gbdt = np.linspace(0.99, 0.01, 20)
    model = StackModel.load(run.dir / "stack")
    p = model.predict(new, p_gbdt, p_fusion)
    assert p.shape == (20,) and np.all((p > 0) & (p < 1))
    # one row alone scores the same as among others (per-row features only in this spec)
    alone = model.predict(new.iloc[[3]], p_gbdt[[3]], p_fusion[[3]])
    assert alone[0] == pytest.approx(p[3])
    # a missing p_gbdt (its stage needed an unreadable image) is routed by LightGBM, not refused
    missing = model.predict(new, np.full(20, np.nan), p_fusion)
    assert np.all(np.isfinite(missing) & (missing > 0) & (missing < 1))
    b = BlendModel.load(run.dir / "blend").predict(None, np.linspace(0, 1, 20), p_fusion)
    assert np.all(np.diff(b) >= 0) and b.min() >= 0 and b.max() <= 1


def test_missing_stage_names_the_command(run_factory, oof_writer):
    run = run_factory()
    with pytest.raises(RunError, match=r"stage 'gbdt' is missing .*invoke train-gbdt"):
        stack(run.dir)
    oof_writer(run, "gbdt", np.full(len(run.frame), 0.5))
    # A spec with images needs its fusion stage (a tabular-only one makes LightGBM final instead).
    record = json.loads((run.dir / "run.json").read_text())
    record["spec"]["images"] = str(run.dir.parent / "images")
    (run.dir / "run.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"stage 'fusion' is missing .*invoke train-fusion"):
        stack(run.dir)


def test_run_not_found(tmp_path):
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        stack(tmp_path / "nowhere")


def test_oof_with_other_folds_is_refused(tabular_run):
    path = tabular_run.dir / "fusion" / "oof.csv"
    oof = pd.read_csv(path)
    oof.loc[:3, "fold"] = (oof.loc[:3, "fold"] + 1) % 5
    oof.to_csv(path, index=False)
    with pytest.raises(RunError, match=r"folds differ from the run's folds.csv"):
        stack(tabular_run.dir)


def test_oof_with_other_ids_is_refused(tabular_run):
    path = tabular_run.dir / "gbdt" / "oof.csv"
    oof = pd.read_csv(path)
    oof.iloc[:-2].to_csv(path, index=False)
    with pytest.raises(RunError, match=r"ids differ from the run's folds.csv \(missing 2:"):
        stack(tabular_run.dir)


def test_bad_sensitivity(tabular_run):
    with pytest.raises(RunError, match=r"sensitivity: expected a value in \(0, 1\], got 1.5"):
        stack(tabular_run.dir, sensitivity=1.5)


# ------------------------------------------------------------ stages that read other vectors


def store_record(vectors_sha256: str, ids_sha256: str = "i" * 64) -> dict:
    return {
        "backbone": "test-backbone",
        "weights_sha256": "a" * 64,
        "image_size": 32,
        "views": 1,
        "dim": 16,
        "dtype": "float16",
        "store": "/stores/s",
        "store_uid": "u1",
        "count": 300,
        "read": {"rows": 300, "ids_sha256": ids_sha256, "vectors_sha256": vectors_sha256},
    }


def test_stages_that_read_other_vectors_of_the_same_store_are_refused(tabular_run, monkeypatch):
    import os

    import fuse.stacking.stack
    from embed.errors import StoreMismatchError

    # The records below name a store that is not there; the applicability detector, which reads it,
    # has tests of its own (test_applicability.py, test_score.py).
    monkeypatch.setattr(fuse.stacking.stack, "_fit_applicability", lambda layout, run: None)

    layout_dir = tabular_run.dir
    (layout_dir / "gbdt" / "store.json").write_text(json.dumps(store_record("1" * 64)))
    (layout_dir / "fusion" / "store.json").write_text(json.dumps(store_record("2" * 64)))
    os.utime(layout_dir / "gbdt" / "store.json", (1_000_000, 1_000_000))  # gbdt trained first
    with pytest.raises(
        StoreMismatchError,
        match=r"stages 'fusion' and 'gbdt' were trained on different data from the same "
        r"feature store: the vectors of the run's 300 rows differ .*vectors sha256 "
        r"222222222222 in 'fusion', 111111111111 in 'gbdt'\); retrain the older one, "
        r"'gbdt', on the store as it is now: `invoke train-gbdt --spec S --run R`",
    ):
        stack(layout_dir)
    assert not (layout_dir / "stack").exists()
    (layout_dir / "gbdt" / "store.json").write_text(json.dumps(store_record("2" * 64, "j" * 64)))
    with pytest.raises(StoreMismatchError, match=r"their rows differ \(ids or their order\)"):
        stack(layout_dir)
    (layout_dir / "gbdt" / "store.json").write_text(json.dumps(store_record("2" * 64)))
    assert stack(layout_dir)["final"] in ("stack", "blend")


# ------------------------------------------------------------ a restack that fails or dies


def stage_files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_full_disk_during_a_restack_names_the_path_and_keeps_the_previous_stages(
    tabular_run, monkeypatch
):
    import errno

    import runfolder.layout
    from common.files import WriteError

    stack(tabular_run.dir)
    before = {name: stage_files(tabular_run.dir / name) for name in ("stack", "blend")}
    real = runfolder.layout.atomic_write_json  # final.json is written through the run's layout

    def full(path, obj, **kwargs):
        if path.name == "final.json":  # the last file of the new stage
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj, **kwargs)

    monkeypatch.setattr(runfolder.layout, "atomic_write_json", full)
    with pytest.raises(
        WriteError,
        match=r"stack: cannot write .*/stack\.new-\d+/final\.json: No space left on "
        r"device \(ENOSPC\); free some space there",
    ):
        stack(tabular_run.dir, sensitivity=0.9)
    assert {name: stage_files(tabular_run.dir / name) for name in ("stack", "blend")} == before
    assert sorted(p.name for p in tabular_run.dir.iterdir() if ".new" in p.name) == []
    assert (
        load_final(tabular_run.dir).threshold
        == json.loads((tabular_run.dir / "stack" / "final.json").read_text())["threshold"]
    )


def test_the_old_fold_models_are_kept_until_the_new_stack_is_whole(tabular_run, monkeypatch):
    """`stack` used to delete the fold models before fitting: a failure then left half a stage."""
    from fuse.stacking import stacker as stacking

    stack(tabular_run.dir)
    before = stage_files(tabular_run.dir / "stack")

    def fails(*args, **kwargs):
        raise RuntimeError("killed while fitting")

    monkeypatch.setattr(stacking, "fit_stack_model", fails)
    with pytest.raises(RuntimeError):
        stack(tabular_run.dir)
    assert stage_files(tabular_run.dir / "stack") == before


PATIENT_SPEC = """[dataset]
name = "patients"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "patient_id"
patient = "patient_id"
categorical = ["sex"]
numeric = ["age"]
"""


def patient_run(root, seed=0, patients=80, lesions=8):
    """A run whose base scores carry a patient's level (large) plus a malignant lesion's rise
    above its own patient's other lesions (smaller): only the rank within the patient finds it."""
    from tabular.run import open_run
    from tabular.spec import load_spec

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    patient = np.repeat(np.arange(patients), lesions)
    target = np.zeros(len(patient), dtype=int)
    for p in rng.choice(patients, size=int(0.7 * patients), replace=False):
        target[p * lesions + rng.integers(lesions)] = 1
    level = rng.normal(0, 2.0, patients)[patient]
    frame = pd.DataFrame(
        {
            "image_id": [f"IMG_{i:05d}" for i in range(len(patient))],
            "patient_id": [f"P{p:03d}" for p in patient],
            "sex": rng.choice(["male", "female"], patients)[patient],
            "age": rng.normal(55, 10, patients).round()[patient],
            "target": target,
        }
    )
    frame.to_csv(root / "metadata.csv", index=False)
    (root / "spec.toml").write_text(PATIENT_SPEC)
    run = open_run(load_spec(root / "spec.toml"), root / "run", n_folds=5, seed=seed)

    def score(noise_seed):
        noise = np.random.default_rng(noise_seed).normal(0, 0.3, len(patient))
        return 1 / (1 + np.exp(-(level + 1.5 * run.target + noise)))

    return run, score(1), score(2)


def test_patient_rank_is_taken_within_each_patient_and_leaves_missing_values_out():
    patients = np.array(["a", "a", "b", None, "a", "b", "c"], dtype=object)
    scores = np.array([0.1, 0.5, 0.2, 0.3, np.nan, 0.2, 0.9])
    np.testing.assert_array_equal(
        patient_rank(patients, scores), [0.5, 1.0, 0.75, np.nan, np.nan, 0.75, 1.0]
    )


def test_the_stack_finds_a_lesion_that_stands_out_among_its_patients_lesions(tmp_path):
    run, p_fusion, p_gbdt = patient_run(tmp_path / "data")
    y = run.target
    with_ranks = oof_stack(
        run.frame,
        run.spec,
        y,
        run.fold,
        p_fusion,
        p_gbdt,
        StackConfig(num_boost_round=150, patient_ranks=True),
    )
    without = oof_stack(run.frame, run.spec, y, run.fold, p_fusion, p_gbdt, FAST)  # the default
    assert roc_auc(y, without) < 0.8  # the patient's level hides the malignant lesions
    assert roc_auc(y, with_ranks) > 0.9


def test_the_stack_records_its_patient_column_and_ranks_without_it_are_refused(
    tmp_path, oof_writer
):
    run, p_fusion, p_gbdt = patient_run(tmp_path / "data", patients=40)
    oof_writer(run, "fusion", p_fusion)
    oof_writer(run, "gbdt", p_gbdt)
    stack(run.dir, config=StackConfig(num_boost_round=150, patient_ranks=True))
    record = json.loads((run.dir / "stack" / "stack.json").read_text())
    assert record["patient"] == "patient_id"
    assert record["features"] == [
        "p_fusion",
        "p_gbdt",
        "p_fusion_patient_rank",
        "p_gbdt_patient_rank",
    ]
    model = StackModel.load(run.dir / "stack")
    rows = run.frame.head(16).drop(columns=[run.spec.target])
    p = model.predict(rows, p_gbdt[:16], p_fusion[:16])
    assert p.shape == (16,) and np.all((p > 0) & (p < 1))
    # Features encoded already (shared between stages at scoring) on rows without patient ids.
    encoder = model.encoders[0]
    features = encoder.transform(rows)
    with pytest.raises(
        RunError, match=r"patient column 'patient_id': missing from the rows to stack"
    ):
        stack_features(
            encoder,
            rows.drop(columns=["patient_id"]),
            p_fusion[:16],
            p_gbdt[:16],
            features=features,
            patient="patient_id",
        )
    stack(run.dir, config=StackConfig(num_boost_round=30))
    assert StackModel.load(run.dir / "stack").patient is None  # off by default
