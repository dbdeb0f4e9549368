"""The LightGBM ensemble: one model per fold x seed, early-stopped on that fold's validation part.

Building blocks used by `tabular.train.fit_gbdt` (which builds the features of each fold) and by
`tabular.tuning` (which trains one seed per fold and trial):

- `FoldData`: one fold's training part as a binned LightGBM Dataset (built once, reused by every
  seed and Optuna trial), its validation features, and the encoder / PCA fitted on its training
  part.
- `FoldPCA`: PCA of an optional extra matrix (image embeddings, rows aligned to the frame),
  fitted on the training part of the fold only, saved as `.npy` (never pickled).
- `train_model`: one booster, with optional down-sampling of negatives inside the training part.
- `fit_ensemble` / `save_ensemble` (read back by `tabular.gbdt_model.load`).

Models are saved as LightGBM text truncated at the best iteration; encoders as JSON; PCA as npy.
Nothing is pickled, and `tabular.gbdt_model` reads only those files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from tqdm.auto import tqdm

from tabular.errors import DataError, preview
from tabular.features import FeatureEncoder
from tabular.metrics import MetricWarning, pauc80, roc_auc
from tabular.spec import DatasetSpec

log = logging.getLogger(__name__)

STAGE_FORMAT = 1
EXTRA_PREFIX = "img_pca_"

# Booster parameters of the untuned model, inside the Optuna search space (tabular.tuning) so that
# they are also the study's first trial. Small trees: on the public metadata sets (HAM10000,
# ISIC 2020) deeper ones overfit within a few dozen rounds. Early stopping watches the log loss,
# which moves more smoothly than the AUC on validation parts with few positives.
DEFAULT_PARAMS: dict = {
    "objective": "binary",
    "metric": "binary_logloss",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": 5,
    "min_child_samples": 40,
    "feature_fraction": 0.6,
    "bagging_fraction": 0.7,
    "bagging_freq": 1,
    "lambda_l1": 0.0,
    "lambda_l2": 1.0,
    "scale_pos_weight": 1.0,
    "verbosity": -1,
}
# Dataset (binning) parameters, fixed: a binned Dataset is built once per fold and reused with
# other booster parameters, which LightGBM allows only when these do not change.
# feature_pre_filter=False lets trials lower min_child_samples on the same Dataset. Bin edges
# from 50,000 sampled rows (LightGBM's default is 200,000) make binning 320,000 ISIC 2024 rows
# x 200 features take about 3 s instead of 8 s, with about 200 rows per bin still.
DATASET_PARAMS: dict = {
    "max_bin": 255,
    "bin_construct_sample_cnt": 50_000,
    "feature_pre_filter": False,
    "verbosity": -1,
}


@dataclass(frozen=True)
class GBDTConfig:
    """How the ensemble is trained (booster parameters are passed separately).

    seeds: one model per fold and seed; their predictions are averaged.
    neg_ratio: keep at most this many negatives per positive in each training part (None = all).
        The ISIC 2024 winners kept about 1 negative in 100 at 0.1% prevalence: trees then train
        on a fraction of the rows, and each seed sees other negatives, which adds diversity.
    extra_components: PCA components kept from the extra matrix (image embeddings); 0 = metadata
        only, when no extra matrix is given.
    pca_fit_rows: PCA is fitted on at most this many training rows (a seeded sample) to bound
        memory on ISIC-sized data; the projection is applied to every row.
    num_boost_round / early_stopping_rounds: boosting stops when the first validation metric
        (log loss by default) has not improved for `early_stopping_rounds` rounds; the model is
        saved at its best iteration.
    log_period: LightGBM evaluation log every N rounds (0 = quiet).
    num_threads: LightGBM threads; 0 = half the logical CPUs (LightGBM runs best with one thread
        per physical core, and its OpenMP threads slow down sharply on an oversubscribed machine).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    neg_ratio: float | None = None
    extra_components: int = 64
    pca_fit_rows: int = 50_000
    num_boost_round: int = 5000
    early_stopping_rounds: int = 50
    log_period: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int | np.integer) for s in self.seeds):
            raise DataError(f"seeds: expected a non-empty sequence of integers, got {self.seeds!r}")
        if self.neg_ratio is not None and not (self.neg_ratio > 0 and math.isfinite(self.neg_ratio)):
            raise DataError(f"neg_ratio: expected a positive number or None, got {self.neg_ratio!r}")
        # 0 = metadata only: a tabular-only spec, or `invoke train-gbdt --image-pca 0`.
        if (isinstance(self.extra_components, bool) or not isinstance(self.extra_components, int | np.integer)
                or self.extra_components < 0):
            raise DataError(f"extra_components: expected an integer >= 0, got {self.extra_components!r}")
        if self.num_boost_round < 1 or self.early_stopping_rounds < 1:
            raise DataError(
                f"num_boost_round / early_stopping_rounds: expected >= 1, got "
                f"{self.num_boost_round!r} / {self.early_stopping_rounds!r}"
            )


# ------------------------------------------------------------------------------------ PCA


@dataclass
class FoldPCA:
    """Mean and components (k, d) of a PCA fitted on one fold's training rows."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, extra: np.ndarray, n_components: int, seed: int = 0, max_rows: int = 50_000) -> FoldPCA:
        """Fit on `extra` (n, d) rows; at most `max_rows` of them, sampled with `seed`."""
        rows = extra
        if len(extra) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(extra), max_rows, replace=False))
            rows = extra[pick]
        k = min(n_components, rows.shape[1], len(rows))
        pca = PCA(n_components=k, random_state=seed)
        pca.fit(np.asarray(rows, dtype=np.float32))
        return cls(mean=pca.mean_.astype(np.float32), components=pca.components_.astype(np.float32))

    @property
    def names(self) -> list[str]:
        return [f"{EXTRA_PREFIX}{i}" for i in range(len(self.components))]

    def transform(self, extra: np.ndarray, chunk: int = 16_384) -> np.ndarray:
        """(n, d) -> (n, k) float32, in chunks to bound memory."""
        out = np.empty((len(extra), len(self.components)), dtype=np.float32)
        for start in range(0, len(extra), chunk):
            block = np.asarray(extra[start : start + chunk], dtype=np.float32) - self.mean
            out[start : start + chunk] = block @ self.components.T
        return out

    def save(self, stage_dir: Path, fold: int) -> dict:
        files = {"mean": f"pca_fold{fold}_mean.npy", "components": f"pca_fold{fold}_components.npy"}
        np.save(stage_dir / files["mean"], self.mean, allow_pickle=False)
        np.save(stage_dir / files["components"], self.components, allow_pickle=False)
        return files

    @classmethod
    def load(cls, stage_dir: Path, files: Mapping[str, str]) -> FoldPCA:
        return cls(
            mean=np.load(stage_dir / files["mean"], allow_pickle=False),
            components=np.load(stage_dir / files["components"], allow_pickle=False),
        )


def check_extra(extra, n_rows: int, ids: Sequence[str] | None = None) -> np.ndarray:
    """Validate an extra matrix: 2-D, numeric, finite, one row per frame row.

    Raises:
        DataError: naming `extra`, its shape and the first offending rows.
    """
    array = np.asarray(extra)
    if array.ndim != 2:
        raise DataError(f"extra: expected a 2-D array (n_rows, d), got shape {array.shape}")
    if len(array) != n_rows:
        raise DataError(f"extra: expected {n_rows} rows (one per metadata row), got {len(array)}")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"extra: expected numbers, got dtype {array.dtype}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        named = [ids[i] for i in rows] if ids is not None else rows.tolist()
        raise DataError(f"extra: rows with NaN or infinite values, ids {preview(named)}")
    return array


def with_extra(features: pd.DataFrame, extra: np.ndarray | None, pca: FoldPCA | None) -> pd.DataFrame:
    """Append the PCA projection of `extra` to `features` (same rows, same order)."""
    if pca is None:
        return features
    reduced = pca.transform(extra)
    clash = set(pca.names) & set(features.columns)
    if clash:
        raise DataError(f"extra: feature name(s) {sorted(clash)} clash with metadata features")
    block = pd.DataFrame(reduced, index=features.index, columns=pca.names)
    return pd.concat([features, block], axis=1)


# ----------------------------------------------------------------------------------- folds


@dataclass
class FoldData:
    """One fold, ready to train on.

    `train_set` is a binned LightGBM Dataset of the training part (raw features freed);
    `X_valid` (n_valid, n_features) float32 and `y_valid` are the validation part;
    `valid_rows` are its row positions in the run's frame.
    """

    fold: int
    train_rows: np.ndarray
    valid_rows: np.ndarray
    y_train: np.ndarray
    train_set: lgb.Dataset
    X_valid: pd.DataFrame
    y_valid: np.ndarray
    encoder: FeatureEncoder
    pca: FoldPCA | None = None
    feature_names: list[str] = field(default_factory=list)


def build_fold(
    frame: pd.DataFrame,
    spec: DatasetSpec,
    y: np.ndarray,
    fold_of_row: np.ndarray,
    fold: int,
    extra: np.ndarray | None = None,
    config: GBDTConfig | None = None,
) -> FoldData:
    """Fit the encoder (and PCA) on the training part of `fold`, and build its data.

    Per-patient features of the validation part are computed from the validation rows only, as
    they would be at scoring time.
    """
    config = config or GBDTConfig()
    train_rows = np.flatnonzero(fold_of_row != fold)
    valid_rows = np.flatnonzero(fold_of_row == fold)
    encoder = FeatureEncoder()
    X_train = encoder.fit_transform(frame.iloc[train_rows], spec)
    X_valid = encoder.transform(frame.iloc[valid_rows])
    pca = None
    if extra is not None:
        pca = FoldPCA.fit(extra[train_rows], config.extra_components, seed=fold, max_rows=config.pca_fit_rows)
        X_train = with_extra(X_train, extra[train_rows], pca)
        X_valid = with_extra(X_valid, extra[valid_rows], pca)
    names = list(X_train.columns)
    X_train = X_train.reset_index(drop=True)
    X_valid = X_valid.reset_index(drop=True)
    train_set = lgb.Dataset(X_train, label=y[train_rows], params=dict(DATASET_PARAMS), free_raw_data=True)
    train_set.construct()
    del X_train
    return FoldData(
        fold=fold,
        train_rows=train_rows,
        valid_rows=valid_rows,
        y_train=y[train_rows],
        train_set=train_set,
        X_valid=X_valid,
        y_valid=y[valid_rows],
        encoder=encoder,
        pca=pca,
        feature_names=names,
    )


# --------------------------------------------------------------------------------- training


def negative_sample(y: np.ndarray, neg_ratio: float | None, seed: int) -> np.ndarray | None:
    """Row positions keeping every positive and at most `neg_ratio` negatives per positive.

    Applied to a fold's training part only; validation rows are never dropped. None when
    nothing needs dropping.
    """
    if neg_ratio is None:
        return None
    positives = np.flatnonzero(y == 1)
    negatives = np.flatnonzero(y == 0)
    keep = min(len(negatives), max(1, int(math.floor(neg_ratio * len(positives)))))
    if keep >= len(negatives):
        return None
    chosen = np.random.default_rng(seed).choice(negatives, keep, replace=False)
    return np.sort(np.concatenate([positives, chosen]))


def booster_params(params: Mapping, seed: int, config: GBDTConfig) -> dict:
    """Full LightGBM parameters for one model of the ensemble."""
    full = {**DEFAULT_PARAMS, **params}
    # Per-seed randomness without `seed`, which would also reset the Dataset's binning seed.
    for key in ("bagging_seed", "feature_fraction_seed", "extra_seed", "drop_seed", "objective_seed"):
        full[key] = int(seed)
    full["num_threads"] = config.num_threads or max(1, (os.cpu_count() or 2) // 2)
    full["verbosity"] = -1
    return full


def train_model(data: FoldData, params: Mapping, seed: int, config: GBDTConfig) -> lgb.Booster:
    """One booster on `data`'s training part, early-stopped on its validation part."""
    train_set = data.train_set
    keep = negative_sample(data.y_train, config.neg_ratio, seed + 7919 * data.fold)
    if keep is not None:
        train_set = data.train_set.subset(keep.tolist())
    valid_set = lgb.Dataset(data.X_valid, label=data.y_valid, reference=train_set, params=dict(DATASET_PARAMS))
    callbacks = [
        lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False),
        lgb.log_evaluation(config.log_period),
    ]
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
    return booster


def predict_best(booster: lgb.Booster, X: pd.DataFrame) -> np.ndarray:
    """Predictions at the booster's best iteration (all of them for a loaded model)."""
    best = booster.best_iteration if booster.best_iteration > 0 else None
    return booster.predict(X, num_iteration=best)


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
    for data in folds:
        predictions = []
        iterations = []
        for seed in config.seeds:
            booster = train_model(data, params, int(seed), config)
            boosters[(data.fold, int(seed))] = booster
            predictions.append(predict_best(booster, data.X_valid))
            iterations.append(int(booster.best_iteration or booster.current_iteration()))
            bar.update(1)
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
        log.info("%s fold %d: pauc80 %.4f, ROC AUC %.4f, best iterations %s",
                 desc, data.fold, fold_pauc, fold_auc, iterations)
    bar.close()
    return Ensemble(oof=oof, boosters=boosters, per_fold=per_fold, params=dict(params))


# ---------------------------------------------------------------------------------- saving


def save_ensemble(stage_dir: Path, ensemble: Ensemble, folds: Sequence[FoldData], config: GBDTConfig,
                  extra_dim: int | None) -> None:
    """Write models (`fold{k}_seed{s}.txt`), `encoder.json`, `features.json`, PCA `.npy`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": STAGE_FORMAT, "extra_dim": extra_dim, "folds": []}
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
        manifest["folds"].append(
            {
                "fold": data.fold,
                "models": models,
                "features": data.feature_names,
                "pca": data.pca.save(stage_dir, data.fold) if data.pca is not None else None,
            }
        )
    (stage_dir / "encoder.json").write_text(json.dumps({"format": STAGE_FORMAT, "folds": encoders}))
    (stage_dir / "features.json").write_text(json.dumps(manifest, indent=1))


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
        for name, g, s in zip(names, booster.feature_importance("gain"),
                              booster.feature_importance("split"), strict=True):
            gains.setdefault(name, []).append(float(g))
            splits.setdefault(name, []).append(float(s))
    rows = []
    for name, values in gains.items():
        padded = np.array(values + [0.0] * (n - len(values)))
        rows.append({"feature": name, "gain": padded.mean(), "gain_std": padded.std(),
                     "splits": float(np.sum(splits[name])) / n})
    table = pd.DataFrame(rows, columns=["feature", "gain", "gain_std", "splits"])
    total = table["gain"].sum()
    table.insert(3, "gain_share", table["gain"] / total if total > 0 else 0.0)
    return table.sort_values("gain", ascending=False, kind="stable").reset_index(drop=True)
