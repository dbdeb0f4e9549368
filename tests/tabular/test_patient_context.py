"""The image's patient context ("ugly duckling"): how unlike its patient's other lesions an image
is, from the rows given only. A planted signal that only the context reveals is found; nothing
crosses folds; no label is read; scoring computes it as training did."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tabular.gbdt_config import DEFAULT_PARAMS, GBDTConfig
from tabular.gbdt_ensemble import fit_ensemble, save_ensemble
from tabular.gbdt_folds import build_fold
from tabular.gbdt_image import PATIENT_CONTEXT, patient_context
from tabular.gbdt_model import GBDTModel
from tabular.metrics import roc_auc
from tabular.spec import DatasetSpec

CONFIG = GBDTConfig(
    seeds=(0,),
    extra_components=8,
    num_boost_round=200,
    early_stopping_rounds=20,
    num_threads=1,
    neg_ratio=0,
)
N_PATIENTS, PER_PATIENT, DIM = 120, 8, 24


def planted(seed: int = 0):
    """Embeddings where each patient has its own typical lesion (a large offset shared by all of
    the patient's rows) and a malignant lesion lies far from its patient's typical one in a random
    direction. Across patients malignant and benign images look alike; within a patient the
    malignant one stands out: only the patient context can find it. The metadata is noise."""
    rng = np.random.default_rng(seed)
    n = N_PATIENTS * PER_PATIENT
    patient = np.repeat(np.arange(N_PATIENTS), PER_PATIENT)
    target = np.zeros(n, dtype=int)
    for p in range(N_PATIENTS):  # one malignant lesion in two patients of three
        if p % 3:
            target[p * PER_PATIENT + rng.integers(PER_PATIENT)] = 1
    typical = rng.normal(0, 3.0, (N_PATIENTS, DIM))[patient]
    direction = rng.normal(size=(n, DIM))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    extra = typical + rng.normal(0, 0.5, (n, DIM)) + 4.0 * target[:, None] * direction
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "patient": [f"p{i}" for i in patient],
            "noise": rng.normal(size=n),
            "target": target,
        }
    )
    spec = DatasetSpec(
        name="planted",
        root=Path("."),
        metadata=Path("m.csv"),
        images=None,
        id="id",
        target="target",
        group="patient",
        patient="patient",
        categorical=(),
        numeric=("noise",),
    )
    folds = patient % 4  # grouped by patient, as ISIC 2024's folds are
    return frame, spec, folds, extra.astype(np.float32)


def oof_auc(frame, spec, folds, extra, config):
    y = frame["target"].to_numpy()
    data = [build_fold(frame, spec, y, folds, k, extra=extra, config=config) for k in range(4)]
    ensemble = fit_ensemble(data, len(frame), DEFAULT_PARAMS, config)
    return roc_auc(y, ensemble.oof), data, ensemble


def test_the_planted_ugly_duckling_is_found_only_with_the_patient_context():
    frame, spec, folds, extra = planted()
    with_context, data, _ = oof_auc(frame, spec, folds, extra, CONFIG)
    without, _, _ = oof_auc(frame, spec, folds, extra, replace(CONFIG, patient_context=False))
    assert data[0].feature_names[-3:] == list(PATIENT_CONTEXT)
    assert with_context > 0.9, with_context
    assert without < 0.7, without


def test_values_on_a_small_case():
    reduced = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [5.0, 5.0], [7.0, 7.0]])
    context = patient_context(reduced, ["a", "a", "a", None, None])
    # patient a: mean (1, 0); distances 1, 1, 0; mean distance 2/3.
    np.testing.assert_allclose(context[:3, 0], [1.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(context[:3, 1], [1.5, 1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(context[:3, 2], [5 / 6, 5 / 6, 1 / 3], atol=1e-6)
    # rows without a patient are each their own: nothing to compare with.
    np.testing.assert_allclose(context[3:], [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], atol=1e-6)


def test_nothing_crosses_folds_and_no_label_is_read():
    frame, spec, folds, extra = planted(seed=1)
    y = frame["target"].to_numpy()
    fold0 = build_fold(frame, spec, y, folds, 0, extra=extra, config=CONFIG)
    # The validation part's context depends on its own rows only: training rows' images moved
    # and every label flipped leave it unchanged (the PCA is refitted on the moved training
    # part, so the comparison is made with that fold's own PCA).
    moved = extra.copy()
    moved[fold0.train_rows] += np.random.default_rng(2).normal(0, 5, (len(fold0.train_rows), DIM))
    again = build_fold(
        frame.assign(target=1 - y), spec, 1 - y, folds, 0, extra=moved, config=CONFIG
    )
    reduced = again.pca.transform(extra[fold0.valid_rows])
    expected = patient_context(reduced, frame["patient"].to_numpy()[fold0.valid_rows])
    np.testing.assert_allclose(
        again.X_valid[list(PATIENT_CONTEXT)].to_numpy(), expected, rtol=1e-5, atol=1e-5
    )
    # A fold's validation context equals what scoring its rows alone computes.
    alone = patient_context(
        fold0.pca.transform(extra[fold0.valid_rows]), frame["patient"].to_numpy()[fold0.valid_rows]
    )
    np.testing.assert_allclose(
        fold0.X_valid[list(PATIENT_CONTEXT)].to_numpy(), alone, rtol=1e-5, atol=1e-5
    )


def test_shuffled_labels_leave_nothing_to_find():
    frame, spec, folds, extra = planted(seed=3)
    shuffled = frame.assign(target=np.random.default_rng(4).permutation(frame["target"].to_numpy()))
    auc, _, _ = oof_auc(shuffled, spec, folds, extra, CONFIG)
    assert 0.35 < auc < 0.65, auc


def test_saved_models_score_new_rows_with_their_patients_context(tmp_path):
    frame, spec, folds, extra = planted(seed=5)
    _, data, ensemble = oof_auc(frame, spec, folds, extra, CONFIG)
    save_ensemble(tmp_path, ensemble, data, CONFIG, extra_dim=DIM)
    model = GBDTModel.load(tmp_path)
    # Scoring one fold's patients alone gives that fold's out-of-fold predictions back.
    rows = data[0].valid_rows
    p = model.folds[0].boosters[0].predict(data[0].X_valid)
    np.testing.assert_allclose(p, ensemble.oof[rows], rtol=1e-9)
    scored = model.predict(frame.iloc[rows].drop(columns=["target"]), extra=extra[rows])
    assert roc_auc(frame["target"].to_numpy()[rows], scored) > 0.85
    with pytest.raises(Exception, match="patient"):
        model.predict(frame.iloc[rows].drop(columns=["target", "patient"]), extra=extra[rows])
