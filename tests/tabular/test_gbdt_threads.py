"""Folds side by side (`tabular.gbdt_threads`): when they run, that LightGBM's process-wide thread
count is never changed under a running fold, and that the models are those of one fold after
another."""

import ctypes
import threading
from dataclasses import replace

import lightgbm as lgb
import numpy as np
import pytest
from toytable import toy

import tabular.gbdt_config as gbdt_config
import tabular.gbdt_threads as gbdt_threads
from tabular.gbdt_config import DEFAULT_PARAMS, GBDTConfig, lightgbm_threads
from tabular.gbdt_ensemble import fit_ensemble
from tabular.gbdt_folds import build_folds
from tabular.gbdt_threads import fold_workers
from tabular.tuning import tune


@pytest.mark.parametrize(
    "cpus, config, folds, expected",
    [
        (2, GBDTConfig(), 5, 2),  # the default: 1 LightGBM thread a model, 2 folds at once
        (8, GBDTConfig(), 5, 2),  # 4 threads a model
        (8, GBDTConfig(num_threads=1), 5, 5),  # at most the folds
        (1, GBDTConfig(), 5, 1),
        (2, GBDTConfig(fold_workers=1), 5, 1),  # one after another, as asked
        (2, GBDTConfig(fold_workers=3), 2, 2),
    ],
)
def test_folds_run_side_by_side_on_the_cpus_lightgbm_leaves_idle(
    monkeypatch, cpus, config, folds, expected
):
    monkeypatch.setattr(gbdt_config, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(gbdt_threads, "usable_cpus", lambda: cpus)
    assert GBDTConfig().fold_workers == 0
    assert fold_workers(config, folds) == expected


# C API calls that set LightGBM's process-wide thread count from their parameters.
_SETS_THREADS = (
    "LGBM_DatasetCreate",
    "LGBM_DatasetGetSubset",
    "LGBM_BoosterCreate",
    "LGBM_BoosterResetParameter",
    "LGBM_BoosterPredictFor",
)


class _Recorder:
    """Stands for `lightgbm.basic._LIB`: records, per call from a thread other than the main
    one, the C function's name and its parameter strings."""

    def __init__(self, lib):
        self._lib = lib
        self.calls: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        function = getattr(self._lib, name)
        if not name.startswith(_SETS_THREADS):
            return function

        def call(*args):
            if threading.current_thread() is not threading.main_thread():
                texts = [
                    a.value.decode() for a in args if isinstance(a, ctypes.c_char_p) and a.value
                ]
                with self._lock:
                    self.calls.append((name, texts))
            return function(*args)

        return call


def test_every_lightgbm_call_in_fold_threads_names_the_models_threads(monkeypatch, tmp_path):
    import tabular.gbdt_ensemble as ensemble

    frame, spec, folds = toy()
    config = GBDTConfig(
        seeds=(0, 1),
        neg_ratio=1.0,
        num_boost_round=40,
        early_stopping_rounds=5,
        num_threads=1,
        fold_workers=2,
    )
    y = frame["target"].to_numpy()
    recorder = _Recorder(lgb.basic._LIB)
    monkeypatch.setattr(lgb.basic, "_LIB", recorder)
    # The predictions' fallback (a second pass of the trees) runs too.
    monkeypatch.setattr(ensemble, "_valid_scores", lambda booster: None)
    data = build_folds(frame, spec, y, folds, config=config)
    fit_ensemble(data, len(frame), DEFAULT_PARAMS, config)
    tune(data, "gbdt-toy", 2, tmp_path, storage=f"sqlite:///{tmp_path}/s.db", config=config)
    names = {name for name, _ in recorder.calls}
    # The seeds' subsets, the boosters and the predictions all ran in worker threads...
    assert {"LGBM_DatasetGetSubset", "LGBM_BoosterCreate"} <= names
    assert any(n.startswith("LGBM_BoosterPredictFor") for n in names)
    # ...and each named the models' one thread: none set LightGBM's default (every CPU).
    threads = f"num_threads={lightgbm_threads(config)}"
    unnamed = [(n, t) for n, t in recorder.calls if not any(threads in x.split() for x in t)]
    assert unnamed == []


def test_folds_side_by_side_build_and_train_the_same_models():
    frame, spec, folds = toy()
    y = frame["target"].to_numpy()
    config = GBDTConfig(
        seeds=(0, 1), neg_ratio=1.0, num_boost_round=60, early_stopping_rounds=10, num_threads=1
    )
    results = {}
    for workers in (1, 2):
        run = replace(config, fold_workers=workers)
        data = build_folds(frame, spec, y, folds, config=run)
        ensemble = fit_ensemble(data, len(frame), DEFAULT_PARAMS, run)
        models = {k: b.model_to_string() for k, b in ensemble.boosters.items()}
        results[workers] = (ensemble.oof, models, [d.encoder.to_json() for d in data])
    np.testing.assert_array_equal(results[1][0], results[2][0])
    assert results[1][1] == results[2][1] and results[1][2] == results[2][2]


def test_a_model_that_fails_before_boosting_leaves_its_fold_free():
    from tabular.gbdt_ensemble import train_model

    frame, spec, folds = toy()
    config = GBDTConfig(seeds=(0,), neg_ratio=1.0, num_boost_round=5, num_threads=1)
    data = build_folds(frame, spec, frame["target"].to_numpy(), folds, config=config)
    with pytest.raises(lgb.basic.LightGBMError, match="Unknown objective"):
        train_model(data[0], {"objective": "no-such-objective"}, 0, config)
    # The fold's validation Dataset is free for its other models.
    assert not data[0].valid_lock.locked()
    assert train_model(data[0], DEFAULT_PARAMS, 0, config).current_iteration() >= 1
    assert not data[0].valid_lock.locked()
