"""The LightGBM ensemble: one model per fold x seed, early-stopped on that fold's validation part.

Building blocks used by `tabular.train.fit_gbdt` (on folds built once, `tabular.gbdt_folds`) and
by `tabular.tuning` (which trains one seed per fold and trial):

- `map_folds` (from `tabular.gbdt_threads`): folds trained side by side on the CPUs LightGBM's
  threads leave idle; the same models as one after another (every LightGBM call in it names the
  models' threads: see `GBDTConfig.fold_workers`);
- `train_model`: one booster on every positive of the training part and at most `neg_ratio`
  negatives per positive (a different draw per seed and fold); validation parts are never
  sampled; `fit_model`: the same booster and its predictions of the validation part at the best
  iteration, copied from the scores LightGBM keeps for early stopping (no second pass of the
  trees over the validation rows);
- `fit_ensemble` / `save_ensemble` (read back by `tabular.gbdt_model.GBDTModel.load`),
  `importance_table`.

Models are saved as LightGBM text truncated at the best iteration; encoders as JSON; PCA as npy.
Nothing is pickled, and `tabular.gbdt_model` reads only those files.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.files import atomic_write_text
from tabular.gbdt_config import (
    DEFAULT_PARAMS,
    GBDTConfig,
    booster_params,
    dataset_params,
    lightgbm_threads,
)
from tabular.gbdt_folds import FoldData, seed_dataset
from tabular.gbdt_model import ENCODER_FILE, FEATURES_FILE
from tabular.gbdt_threads import map_folds
from tabular.metrics import MetricWarning, pauc80, roc_auc

__all__ = [
    "Ensemble",
    "fit_ensemble",
    "fit_model",
    "importance_table",
    "map_folds",
    "predict_best",
    "predict_valid",
    "save_ensemble",
    "train_model",
]

log = logging.getLogger(__name__)

_STAGE_FORMAT = 1
# LightGBM's other names of `objective` (its parameter aliases).
_OBJECTIVE_ALIASES = frozenset({"objective_type", "app", "application", "loss"})
# Validation scores within this of 0 or 1 keep too few digits of their log-odds to be moved back.
_SATURATED = 1e-12


def train_model(data: FoldData, params: Mapping, seed: int, config: GBDTConfig) -> lgb.Booster:
    """One booster on `data`'s training part (down-sampled: see `GBDTConfig.neg_ratio`),
    early-stopped on its whole validation part.

    Raises:
        DataError: `data` was built for another negative sample (`build_fold` with another
            neg_ratio, or without this seed).
    """
    return _train(data, params, seed, config)


def fit_model(
    data: FoldData, params: Mapping, seed: int, config: GBDTConfig
) -> tuple[lgb.Booster, np.ndarray]:
    """`train_model`, and its predictions of `data`'s validation part at the best iteration,
    shape (n_valid,): the values of `predict_valid` (equal to about 1e-15: the same leaf values,
    added in another order; rows that `predict_valid` ties stay tied) without its second pass of
    every tree over the validation rows.

    LightGBM keeps each validation row's score up to date for early stopping; a callback copies
    those scores whenever the stopping metric improves, so the copy left at the end is the best
    iteration's. Where the copy cannot stand for `predict_valid` (a best iteration it does not
    match; an iteration before it whose tree could not split, after which LightGBM's trees and
    iterations no longer line up; an objective whose output is not a logistic; a score saturated
    at 0 or 1), the predictions come from `predict_valid`.

    Raises:
        DataError: as `train_model`.
    """
    watch = _BestValidScores()
    booster = _train(data, params, seed, config, watch=watch)
    predictions = watch.predictions(booster, seed_dataset(data, seed, config)[1], params)
    if predictions is None:
        predictions = predict_valid(booster, data, config)
    return booster, predictions


class _BestValidScores:
    """LightGBM callback: a copy of the validation part's scores at the best iteration so far, as
    `lgb.early_stopping` judges it (the first metric of the first validation set, strictly better
    than every earlier iteration; the first iteration always).

    Runs after each iteration's evaluation and before the early-stopping callback (order 20 <
    30), so it sees every iteration that callback sees, the last one included. No copy (None)
    where an earlier iteration added no tree (see `__call__`).
    """

    order = 20

    def __init__(self) -> None:
        self.best: float | None = None
        self.iteration = -1
        self.scores: np.ndarray | None = None

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        results = env.evaluation_result_list
        if not results:
            return
        value, higher_better = results[0][2], results[0][3]
        if self.best is not None and not (
            value > self.best if higher_better else value < self.best
        ):
            return
        self.best, self.iteration = value, env.iteration
        # An iteration whose tree could not split adds no tree: the model's first k trees are then
        # not the first k iterations, and `predict_valid` (the first `best_iteration` trees) is
        # not the state early stopping scored. The copy stands for it only where they agree.
        model = env.model
        if isinstance(model, lgb.Booster) and model.current_iteration() == env.iteration + 1:
            self.scores = _valid_scores(model)
        else:
            self.scores = None  # (lgb.cv's CVBooster: never here; `fit_model` predicts)

    def predictions(
        self, booster: lgb.Booster, offset: float, params: Mapping
    ) -> np.ndarray | None:
        """The copy as `predict_valid` gives it, or None where it cannot stand for it.

        The copy holds sigmoid(init score + trees); a model's own prediction is sigmoid(trees),
        so the validation init score (`offset`, the log of the kept share of negatives) is taken
        back out of the log-odds: exact where it is 0, else to about 1e-15.
        """
        if self.scores is None or booster.best_iteration != self.iteration + 1:
            return None
        if offset == 0.0:
            return self.scores
        full = {**DEFAULT_PARAMS, **params}
        if (
            full["objective"] != "binary"
            or full.get("sigmoid", 1.0) != 1.0
            or _OBJECTIVE_ALIASES & set(full)  # another spelling of the objective: not checked
        ):
            return None
        p = self.scores
        if not bool(np.all((p > _SATURATED) & (p < 1.0 - _SATURATED))):
            return None  # the log-odds of a score at 0 or 1 are lost
        return 1.0 / (1.0 + np.exp(offset - (np.log(p) - np.log1p(-p))))


def _valid_scores(booster: lgb.Booster) -> np.ndarray | None:
    """A copy of the scores LightGBM keeps for the first validation set, shape (n_valid,), read
    from the booster's own buffer (the one its `eval_valid` hands a custom metric); None where
    this LightGBM has no such buffer (the caller then predicts with the trees)."""
    inner = getattr(booster, "_Booster__inner_predict", None)
    if inner is None:
        return None
    # The method returns the buffer it refills every iteration: copy it.
    return np.array(inner(data_idx=1), dtype=np.float64)


def _train(
    data: FoldData,
    params: Mapping,
    seed: int,
    config: GBDTConfig,
    watch: _BestValidScores | None = None,
) -> lgb.Booster:
    """`train_model`, with `watch` among the callbacks when given."""
    train_set, offset = seed_dataset(data, seed, config)
    valid_set = data.valid_set
    if valid_set is None:
        valid_set = lgb.Dataset(
            data.X_valid,
            label=data.y_valid,
            reference=data.train_set,
            params=dataset_params(config),
            free_raw_data=False,
        ).construct()
    callbacks: list[Callable[..., object]] = [
        lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False),
        lgb.log_evaluation(config.log_period),
    ]
    if watch is not None:
        callbacks.append(watch)
    # The fold's validation Dataset is shared by its models, which may train side by side: its
    # init score is written, and the booster reads it (and the Dataset's names and parameters),
    # under the fold's lock; the first iteration releases it (boosting only reads the Dataset).
    held = _HeldUntilFirstIteration(data.valid_lock)
    callbacks.append(held)
    try:
        valid_set.set_init_score(np.full(len(data.y_valid), offset))
        with warnings.catch_warnings():
            # One-class validation folds (tiny data) make LightGBM's AUC warn; metrics report NaN.
            warnings.simplefilter("ignore", UserWarning)
            booster = lgb.train(
                booster_params(params, seed, config),
                train_set,
                num_boost_round=config.num_boost_round,
                valid_sets=[valid_set],
                valid_names=["valid"],
                callbacks=callbacks,
            )
    finally:
        held.release()
    return booster


class _HeldUntilFirstIteration:
    """LightGBM callback holding `lock` (acquired here) until just before the first boosting
    iteration, or until `release()` (a failure before it); releases it once."""

    before_iteration = True
    order = 0

    def __init__(self, lock: threading.Lock) -> None:
        lock.acquire()
        self._lock: threading.Lock | None = lock

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


def predict_valid(
    booster: lgb.Booster, data: FoldData, config: GBDTConfig | None = None
) -> np.ndarray:
    """`predict_best` on `data`'s validation part, from one array kept in `data` (n_valid,), on
    `lightgbm_threads(config)` threads (default config: `GBDTConfig()`), the models' own, so that
    it is safe beside folds training in other threads (`map_folds`)."""
    if data.valid_matrix is None:
        data.valid_matrix = np.ascontiguousarray(data.X_valid.to_numpy(dtype=np.float32))
    best = booster.best_iteration if booster.best_iteration > 0 else None
    threads = lightgbm_threads(config or GBDTConfig())
    return np.asarray(booster.predict(data.valid_matrix, num_iteration=best, num_threads=threads))


def predict_best(booster: lgb.Booster, X: pd.DataFrame) -> np.ndarray:
    """Predictions at the booster's best iteration (all of them for a loaded model)."""
    best = booster.best_iteration if booster.best_iteration > 0 else None
    return np.asarray(booster.predict(X, num_iteration=best))


@dataclass
class Ensemble:
    """The result of `fit_ensemble`: OOF predictions (n,) and one booster per (fold, seed)."""

    oof: np.ndarray
    boosters: dict[tuple[int, int], lgb.Booster]
    per_fold: list[dict]
    params: dict


def fit_ensemble(
    folds: Sequence[FoldData], n_rows: int, params: Mapping, config: GBDTConfig, desc: str = "gbdt"
) -> Ensemble:
    """Train fold x seed boosters; OOF predictions average the seeds of each row's fold.

    Returns:
        Ensemble with `oof` of shape (n_rows,) (NaN for rows in no validation part).
    """
    oof = np.full(n_rows, np.nan)
    boosters: dict[tuple[int, int], lgb.Booster] = {}
    per_fold = []
    bar = tqdm(total=len(folds) * len(config.seeds), desc=desc, unit="model", leave=False)
    # One task per model, fold by fold: side by side they keep the CPUs busy to the last model
    # (5 folds on 2 workers would leave one idle for the last fold).
    tasks = [(data, int(seed)) for data in folds for seed in config.seeds]

    def one_model(task: tuple[FoldData, int]) -> tuple[lgb.Booster, np.ndarray]:
        booster, prediction = fit_model(task[0], params, task[1], config)
        bar.update(1)
        return booster, prediction

    with warnings.catch_warnings():
        # Set once here: `catch_warnings` in each thread would restore the filters out of order.
        warnings.simplefilter("ignore", UserWarning)
        fitted = dict(
            zip(
                [(data.fold, seed) for data, seed in tasks],
                map_folds(one_model, tasks, config),
                strict=True,
            )
        )
    for data in folds:
        predictions = []
        iterations = []
        for seed in config.seeds:
            booster, prediction = fitted[(data.fold, int(seed))]
            boosters[(data.fold, int(seed))] = booster
            predictions.append(prediction)
            iterations.append(int(booster.best_iteration or booster.current_iteration()))
        p = np.mean(predictions, axis=0)
        oof[data.valid_rows] = p
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            fold_pauc, fold_auc = pauc80(data.y_valid, p), roc_auc(data.y_valid, p)
        bar.set_postfix(fold=data.fold, pauc80=f"{fold_pauc:.4f}")
        per_fold.append(
            {
                "fold": data.fold,
                "rows": int(len(data.valid_rows)),
                "positives": int(data.y_valid.sum()),
                "pauc80": None if math.isnan(fold_pauc) else fold_pauc,
                "roc_auc": None if math.isnan(fold_auc) else fold_auc,
                "best_iterations": iterations,
            }
        )
        log.info(
            "%s fold %d: pauc80 %.4f, ROC AUC %.4f, best iterations %s",
            desc,
            data.fold,
            fold_pauc,
            fold_auc,
            iterations,
        )
    bar.close()
    return Ensemble(oof=oof, boosters=boosters, per_fold=per_fold, params=dict(params))


# ---------------------------------------------------------------------------------- saving


def save_ensemble(
    stage_dir: Path,
    ensemble: Ensemble,
    folds: Sequence[FoldData],
    config: GBDTConfig,
    extra_dim: int | None,
) -> None:
    """Write models (`fold{k}_seed{s}.txt`), `encoder.json`, `features.json` (the file names
    `tabular.gbdt_model`, their one reader, declares), PCA `.npy`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest_folds: list[dict] = []
    manifest = {"format": _STAGE_FORMAT, "extra_dim": extra_dim, "folds": manifest_folds}
    encoders = {}
    for data in folds:
        models = []
        for seed in config.seeds:
            name = f"fold{data.fold}_seed{int(seed)}.txt"
            booster = ensemble.boosters[(data.fold, int(seed))]
            best = booster.best_iteration if booster.best_iteration > 0 else None
            booster.save_model(str(stage_dir / name), num_iteration=best)
            models.append(name)
        encoders[str(data.fold)] = data.encoder.to_json()
        manifest_folds.append(
            {
                "fold": data.fold,
                "models": models,
                "features": data.feature_names,
                "pca": data.pca.save(stage_dir, data.fold) if data.pca is not None else None,
            }
        )
    atomic_write_text(
        stage_dir / ENCODER_FILE, json.dumps({"format": _STAGE_FORMAT, "folds": encoders})
    )
    atomic_write_text(stage_dir / FEATURES_FILE, json.dumps(manifest, indent=1))


def importance_table(ensemble: Ensemble) -> pd.DataFrame:
    """Gain (and split count) importance per feature, averaged over all models.

    Columns: feature, gain (mean over models; 0 where a model lacks the feature), gain_std,
    gain_share (of the total), splits; sorted by gain, largest first.
    """
    gains: dict[str, list[float]] = {}
    splits: dict[str, list[float]] = {}
    n = len(ensemble.boosters)
    for booster in ensemble.boosters.values():
        names = booster.feature_name()
        for name, g, s in zip(
            names,
            booster.feature_importance("gain"),
            booster.feature_importance("split"),
            strict=True,
        ):
            gains.setdefault(name, []).append(float(g))
            splits.setdefault(name, []).append(float(s))
    rows = []
    for name, values in gains.items():
        padded = np.array(values + [0.0] * (n - len(values)))
        rows.append(
            {
                "feature": name,
                "gain": padded.mean(),
                "gain_std": padded.std(),
                "splits": float(np.sum(splits[name])) / n,
            }
        )
    table = pd.DataFrame(rows, columns=["feature", "gain", "gain_std", "splits"])
    total = table["gain"].sum()
    table.insert(3, "gain_share", table["gain"] / total if total > 0 else 0.0)
    return table.sort_values("gain", ascending=False, kind="stable").reset_index(drop=True)
