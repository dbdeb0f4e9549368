"""The LightGBM ensemble: one model per fold x seed, early-stopped on that fold's validation part.

Building blocks used by `tabular.train.fit_gbdt` (which builds the folds once, `build_folds`) and
by `tabular.tuning` (which trains one seed per fold and trial):

- `build_folds`: every fold of a run from one encoding of the metadata (each fold's encoder and
  features sliced from it, the same as encoding each training part on its own).
- `FoldData`: one fold's training part as a binned LightGBM Dataset (built once, reused by every
  seed and Optuna trial; each seed's down-sampled Dataset made once too, `seed_dataset`), its
  validation features and Dataset, and the encoder / PCA fitted on its training part.
- `map_folds`: folds trained side by side on the CPUs LightGBM's threads leave idle; the same
  models as one after another.
- `FoldPCA`: PCA of an optional extra matrix (image embeddings, rows aligned to the frame),
  fitted on the training part of the fold only, saved as `.npy` (never pickled).
- `negative_sample` / `train_model`: one booster, on every positive of the training part and at
  most `neg_ratio` negatives per positive (a different draw per seed and fold); validation parts
  are never sampled.
- `fit_ensemble` / `save_ensemble` (read back by `tabular.gbdt_model.GBDTModel.load`).

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

__all__ = [
    "DATASET_PARAMS", "DEFAULT_NEG_RATIO", "DEFAULT_PARAMS", "EXTRA_PREFIX", "PATIENT_CONTEXT",
    "STAGE_FORMAT", "Ensemble", "FoldData", "FoldPCA", "GBDTConfig", "booster_params", "build_fold",
    "check_extra", "fit_ensemble", "importance_table", "lightgbm_threads", "negative_sample",
    "patient_context", "pca_components_used", "predict_best", "sample_seed", "sampled_rows",
    "sampling_summary", "save_ensemble", "train_model", "validation_offset", "with_extra"
]

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
# Negatives kept per positive in each training part unless told otherwise (GBDTConfig.neg_ratio).
# A training part with fewer negatives per positive is left whole, so this down-samples only below
# about 2% prevalence: ISIC 2024 (0.1%, ~1,000 negatives per positive) to a twentieth of its
# negatives, ISIC 2020 (1.7%, ~59 per positive) barely, HAM10000 (19%) not at all. Chosen from
# out-of-fold pAUC80 and fit time at 10-200 negatives per positive against every negative, three
# seeds a set and several seed sets (`python -m benchmarks.gbdt`): on the synthetic 401,059-row
# ISIC 2024-like table every ratio from 20 to 200 kept pAUC80 within the seed-to-seed noise of the
# unsampled ensemble (50: +0.0003, noise 0.0033), and 50 fits in about a quarter of its time (fold
# building, the same at every ratio, is then half the cost, so lower ratios gain little); on
# ISIC 2020, 50 and every negative score the same (0.0755 and 0.0753). `invoke bench` measures the
# default beside the unsampled ensemble in every run.
DEFAULT_NEG_RATIO: float = 50.0


@dataclass(frozen=True)
class GBDTConfig:
    """How the ensemble is trained (booster parameters are passed separately).

    seeds: one model per fold and seed; their predictions are averaged.
    neg_ratio: keep every positive and at most this many negatives per positive in each training
        part, a different random draw per seed and fold (validation parts are never sampled);
        default `DEFAULT_NEG_RATIO` (None means the default too); 0 keeps every negative. A part
        with fewer negatives per positive is left whole. As in the ISIC 2024 winning LightGBM
        ensembles, trees train on a fraction of the rows, and each seed sees other negatives,
        which makes the seeds a bagging ensemble. Early stopping then watches the validation log
        loss of probabilities moved back to the validation part's prevalence (an init score of
        log(kept share of negatives)), so that it stops on the ranking learnt and not on the
        shift of the base rate (without it, ~7x more rounds and a lower, noisier pAUC80 on the
        synthetic ISIC 2024-like table). Saved models and their predictions keep their form:
        probabilities at the sampled prevalence, in the same order as at the true one.
    extra_components: PCA components kept from the extra matrix (image embeddings); 0 = metadata
        only, when no extra matrix is given.
    pca_fit_rows: PCA is fitted on at most this many training rows (a seeded sample) to bound
        memory on ISIC-sized data; the projection is applied to every row.
    patient_context: with image features and a spec that names a patient column, also the
        image's distance to the patient's other lesions (`patient_context`).
    num_boost_round / early_stopping_rounds: boosting stops when the first validation metric
        (log loss by default) has not improved for `early_stopping_rounds` rounds; the model is
        saved at its best iteration.
    log_period: LightGBM evaluation log every N rounds (0 = quiet).
    num_threads: LightGBM threads; 0 = half the logical CPUs (LightGBM runs best with one thread
        per physical core, and its OpenMP threads slow down sharply on an oversubscribed machine).
    fold_workers: folds whose models train at the same time (each fold's own models one after
        another: they share its validation Dataset); 0 = the logical CPUs over `num_threads`'s
        threads (2 on a 2-CPU machine, where LightGBM gets 1 thread a model), at most the folds.
        The models and their predictions are the same for any value. Default 1 (one fold after
        another): LightGBM trained from several Python threads in a process that has also loaded
        torch (two OpenMP runtimes) crashed with a segmentation fault in one of two `invoke demo`
        runs, so concurrent folds are an opt-in.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    neg_ratio: float | None = DEFAULT_NEG_RATIO
    extra_components: int = 64
    pca_fit_rows: int = 50_000
    patient_context: bool = True
    num_boost_round: int = 5000
    early_stopping_rounds: int = 50
    log_period: int = 0
    num_threads: int = 0
    fold_workers: int = 1

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int | np.integer) for s in self.seeds):
            raise DataError(f"seeds: expected a non-empty sequence of integers, got {self.seeds!r}")
        ratio = self.neg_ratio
        if ratio is None:
            object.__setattr__(self, "neg_ratio", DEFAULT_NEG_RATIO)
        elif (isinstance(ratio, bool) or not isinstance(ratio, int | float | np.integer | np.floating)
                or not (math.isfinite(ratio) and ratio >= 0)):
            raise DataError(
                f"neg_ratio: expected a number >= 0 (negatives kept per positive; 0 keeps every "
                f"negative, None the default {DEFAULT_NEG_RATIO:g}), got {ratio!r}"
            )
        else:
            object.__setattr__(self, "neg_ratio", float(ratio))
        # 0 = metadata only: a tabular-only spec, or `invoke train-gbdt --image-pca 0`.
        if (isinstance(self.extra_components, bool) or not isinstance(self.extra_components, int | np.integer)
                or self.extra_components < 0):
            raise DataError(f"extra_components: expected an integer >= 0, got {self.extra_components!r}")
        if (isinstance(self.fold_workers, bool) or not isinstance(self.fold_workers, int | np.integer)
                or self.fold_workers < 0):
            raise DataError(f"fold_workers: expected an integer >= 0 (0 = one per CPU left), got {self.fold_workers!r}")
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


# The image relative to the patient's other lesions ("ugly duckling"), from the PCA projection.
PATIENT_CONTEXT = tuple(f"{EXTRA_PREFIX}{name}" for name in ("patient_dist", "patient_dist_ratio", "patient_dist_rank"))


def patient_context(reduced: np.ndarray, patients) -> np.ndarray:
    """How unlike its patient's other lesions each image is, from these rows only: (n, 3) float32.

    Dermatologists call a lesion that looks unlike the patient's other lesions an "ugly
    duckling", a sign of melanoma. Per row, in the PCA space of the image embeddings:
    - the Euclidean distance to the mean of the patient's rows (the row included),
    - that distance over the patient's mean distance (1 = typical for this patient),
    - its percentile rank within the patient (1 = the patient's most unusual lesion).
    Computed from the rows given, as the per-patient metadata features are: at scoring time
    from the scored rows of the patient; never from labels. A row without a patient, or the only
    row of its patient, has distance 0, ratio 1 and rank 1 (nothing to compare with).
    """
    reduced = np.asarray(reduced, dtype=np.float64)
    keys = pd.Series(patients, dtype=object).reset_index(drop=True)
    codes, _ = pd.factorize(keys, use_na_sentinel=True)
    lone = codes < 0
    # A row without a patient is its own patient, never pooled with other such rows.
    codes = codes.copy()
    codes[lone] = codes.max(initial=-1) + 1 + np.arange(int(lone.sum()))
    counts = np.bincount(codes)
    sums = np.zeros((len(counts), reduced.shape[1]))
    np.add.at(sums, codes, reduced)
    distance = np.linalg.norm(reduced - (sums / counts[:, None])[codes], axis=1)
    mean_distance = np.bincount(codes, weights=distance) / counts
    ratio = np.where(mean_distance[codes] > 0, distance / np.maximum(mean_distance[codes], 1e-12), 1.0)
    rank = pd.Series(distance).groupby(codes).rank(method="average", pct=True).to_numpy()
    return np.column_stack([distance, ratio, rank]).astype(np.float32)


def with_extra(features: pd.DataFrame, extra: np.ndarray | None, pca: FoldPCA | None,
               patients=None) -> pd.DataFrame:
    """Append the PCA projection of `extra` to `features` (same rows, same order), and, when
    `patients` (each row's patient, None for none) is given, the image's patient context
    (`patient_context`)."""
    if pca is None:
        return features
    reduced = pca.transform(extra)
    names = list(pca.names)
    if patients is not None:
        reduced = np.hstack([reduced, patient_context(reduced, patients)])
        names += list(PATIENT_CONTEXT)
    clash = set(names) & set(features.columns)
    if clash:
        raise DataError(f"extra: feature name(s) {sorted(clash)} clash with metadata features")
    block = pd.DataFrame(reduced, index=features.index, columns=names)
    return pd.concat([features, block], axis=1)


# ----------------------------------------------------------------------------------- folds


@dataclass
class FoldData:
    """One fold, ready to train on.

    `train_set` is a binned LightGBM Dataset of the training part (raw features freed): of all
    of it, or, where the config down-samples negatives, of only the rows some seed's draw keeps
    (`dataset_rows`, positions in the training part; binning then costs a fraction);
    `X_valid` (n_valid, n_features) float32 and `y_valid` are the validation part, `valid_set`
    its binned Dataset (built once, shared by every seed and trial); `valid_rows` are its row
    positions in the run's frame; `y_train` is the label of every row of the training part.
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
    dataset_rows: np.ndarray | None = None
    sampled: tuple[float, tuple[int, ...]] | None = None  # (neg_ratio, seeds) behind dataset_rows
    valid_set: lgb.Dataset | None = None
    # (neg_ratio, seed) -> (training Dataset of that seed's draw, validation offset), made at the
    # first model of that seed and reused by every later one (the other trials, the final fit).
    seed_sets: dict[tuple[float, int], tuple[lgb.Dataset, float]] = field(default_factory=dict, repr=False)
    # X_valid as one float32 array, for predictions (a DataFrame is converted on every call).
    valid_matrix: np.ndarray | None = field(default=None, repr=False)


def pca_components_used(n_components: int, extra_dim: int, fold_of_row: np.ndarray, max_rows: int) -> list[int]:
    """Components `FoldPCA.fit` keeps in each fold (sorted fold order): a PCA of r rows in d
    dimensions has at most min(r, d), so `n_components` is cut where it asks for more."""
    fold_of_row = np.asarray(fold_of_row)
    return [min(n_components, extra_dim, min(int(np.sum(fold_of_row != f)), max_rows))
            for f in sorted(np.unique(fold_of_row).tolist())]


def _warn_if_pca_cut(n_components: int, extra_dim: int, fold_of_row: np.ndarray, max_rows: int) -> None:
    used = pca_components_used(n_components, extra_dim, fold_of_row, max_rows)
    if min(used) >= n_components:
        return
    kept = f"{min(used)}" if min(used) == max(used) else f"{min(used)} to {max(used)} (by fold)"
    log.warning("--image-pca (extra_components) %d: %s components used; a PCA keeps at most as many as the "
                "embedding dimension (%d) and a fold's training rows (at most %d, the smallest fold's %d). "
                "Pass --image-pca %d or fewer to ask for what is used",
                n_components, kept, extra_dim, max_rows,
                min(int(np.sum(np.asarray(fold_of_row) != f)) for f in np.unique(fold_of_row)), min(used))


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
    they would be at scoring time. With negative down-sampling (`config.neg_ratio`), features are
    computed on the whole training part (per-patient figures need every row of the patient) and
    only the rows some seed of `config.seeds` trains on are binned; train this fold with the
    same `neg_ratio` and seeds (`train_model` refuses others).
    """
    config = config or GBDTConfig()
    train_rows = np.flatnonzero(fold_of_row != fold)
    valid_rows = np.flatnonzero(fold_of_row == fold)
    encoder = FeatureEncoder()
    X_train = encoder.fit_transform(frame.iloc[train_rows], spec)
    X_valid = encoder.transform(frame.iloc[valid_rows])
    return _fold_from_features(frame, spec, y, fold_of_row, fold, encoder, X_train, X_valid, extra, config)


def _fold_from_features(frame: pd.DataFrame, spec: DatasetSpec, y: np.ndarray, fold_of_row: np.ndarray, fold: int,
                        encoder: FeatureEncoder, X_train: pd.DataFrame, X_valid: pd.DataFrame,
                        extra: np.ndarray | None, config: GBDTConfig) -> FoldData:
    """The rest of `build_fold` once the fold's metadata features are made: image PCA, the
    negative sample, the binned Datasets."""
    train_rows = np.flatnonzero(fold_of_row != fold)
    valid_rows = np.flatnonzero(fold_of_row == fold)
    pca = None
    if extra is not None:
        if fold == np.min(fold_of_row):  # said once per fit, not once per fold
            _warn_if_pca_cut(config.extra_components, extra.shape[1], fold_of_row, config.pca_fit_rows)
        pca = FoldPCA.fit(extra[train_rows], config.extra_components, seed=fold, max_rows=config.pca_fit_rows)
        # Each part's patient context comes from its own rows (a patient is in one part only
        # when folds are grouped by patient, as the ISIC 2024 spec's are).
        patients = spec.patient if config.patient_context and spec.patient else None
        X_train = with_extra(X_train, extra[train_rows], pca,
                             None if patients is None else frame[patients].iloc[train_rows].to_numpy())
        X_valid = with_extra(X_valid, extra[valid_rows], pca,
                             None if patients is None else frame[patients].iloc[valid_rows].to_numpy())
    names = list(X_train.columns)
    y_train = y[train_rows]
    dataset_rows = sampled_rows(y_train, config, fold)
    if dataset_rows is not None:
        X_train = X_train.iloc[dataset_rows]
    X_train = X_train.reset_index(drop=True)
    X_valid = X_valid.reset_index(drop=True)
    label = y_train if dataset_rows is None else y_train[dataset_rows]
    train_set = lgb.Dataset(X_train, label=label, params=dict(DATASET_PARAMS), free_raw_data=True)
    train_set.construct()
    del X_train
    # Raw data kept (it is X_valid itself): LightGBM may rebuild it for other booster parameters.
    valid_set = lgb.Dataset(X_valid, label=y[valid_rows], reference=train_set, params=dict(DATASET_PARAMS),
                            free_raw_data=False)
    valid_set.construct()
    return FoldData(
        fold=fold,
        train_rows=train_rows,
        valid_rows=valid_rows,
        y_train=y_train,
        train_set=train_set,
        X_valid=X_valid,
        y_valid=y[valid_rows],
        encoder=encoder,
        pca=pca,
        feature_names=names,
        dataset_rows=dataset_rows,
        sampled=None if dataset_rows is None else (config.neg_ratio, tuple(int(s) for s in config.seeds)),
        valid_set=valid_set,
    )


def build_folds(
    frame: pd.DataFrame,
    spec: DatasetSpec,
    y: np.ndarray,
    fold_of_row: np.ndarray,
    extra: np.ndarray | None = None,
    config: GBDTConfig | None = None,
) -> list[FoldData]:
    """Every fold of the run (sorted by fold number), its metadata features computed once.

    The same folds as `build_fold` for each fold in turn, value for value (the models and their
    predictions are identical), at the cost of one encoding of the frame instead of one per fold:
    the frame is encoded once and each fold takes its rows, with the encoder `build_fold` would
    fit on its training part (`FeatureEncoder.restrict`: that part's categories and MLP
    standardisation). That holds when per-patient features depend only on the patient's own rows
    and each patient lies in one part of every fold (the spec has no patient column, or the folds
    are grouped by patient, as the ISIC 2024 spec's are); otherwise, or when the one encoding
    cannot be made (a column fine in a part but not in the whole), every fold is built on its own
    by `build_fold`, which also raises its errors. The image PCA (`extra`) stays per fold: it is
    fitted on each training part.

    Args:
        frame: metadata, one row per `y` and `fold_of_row` entry (index ignored).
        y: (n_rows,) 0/1 labels; fold_of_row: (n_rows,) fold number of each row.
        extra, config: as `build_fold`.

    Raises:
        DataError: as `build_fold`.
    """
    config = config or GBDTConfig()
    fold_of_row = np.asarray(fold_of_row)
    numbers = sorted(np.unique(fold_of_row).tolist())
    frame = frame.reset_index(drop=True)
    shared = _encode_once(frame, spec, fold_of_row)
    bar = tqdm(numbers, desc="features", unit="fold", leave=False)
    if shared is None:
        return [build_fold(frame, spec, y, fold_of_row, k, extra=extra, config=config) for k in bar]
    encoder, features = shared
    folds = []
    for k in bar:
        train_rows = np.flatnonzero(fold_of_row != k)
        try:
            fold_encoder, X_train, picks = encoder.restrict(features, train_rows)
        except DataError:
            # A training part the fold's own fit refuses: let it say why, as it always has.
            folds.append(build_fold(frame, spec, y, fold_of_row, k, extra=extra, config=config))
            continue
        valid_rows = np.flatnonzero(fold_of_row == k)
        block = features.to_numpy(copy=False)[valid_rows]
        _warn_unseen(block, encoder, picks, k)
        X_valid = pd.DataFrame(block[:, picks] if len(picks) < block.shape[1] else block,
                               index=valid_rows, columns=fold_encoder.feature_names, copy=False)
        folds.append(_fold_from_features(frame, spec, y, fold_of_row, k, fold_encoder, X_train, X_valid,
                                         extra, config))
    return folds


def _encode_once(frame: pd.DataFrame, spec: DatasetSpec,
                 fold_of_row: np.ndarray) -> tuple[FeatureEncoder, pd.DataFrame] | None:
    """(encoder fitted on every row, its features of every row), or None where the folds' own
    encodings could differ from slices of it (see `build_folds`)."""
    if spec.patient and spec.patient in frame.columns:
        patients = frame[spec.patient]
        present = patients.notna().to_numpy()
        # A row without a patient is its own patient: always within one part.
        folds_per_patient = pd.Series(fold_of_row[present]).groupby(patients[present].astype(str).to_numpy()).nunique()
        if (folds_per_patient > 1).any():
            log.info("gbdt: patients in several folds (%d); features are built per fold",
                     int((folds_per_patient > 1).sum()))
            return None
    encoder = FeatureEncoder()
    try:
        features = encoder.fit_transform(frame, spec)
    except DataError:
        return None
    return encoder, features


def _warn_unseen(block: np.ndarray, encoder: FeatureEncoder, picks: Sequence[int], fold: int) -> None:
    """Log, as `FeatureEncoder.transform` does, validation rows (`block`: `encoder`'s features)
    holding a category the fold's training part lacks (a one-hot column not in `picks`)."""
    kept = set(picks)
    for i, c in enumerate(encoder.to_json()["columns"]):
        if c["kind"] == "onehot" and i not in kept:
            rows = int(block[:, i].sum())
            if rows:
                log.warning("categorical column '%s': %d row(s) of fold %d hold category %r, absent from "
                            "its training part: encoded as all-zero", c["source"], rows, fold, c["value"])


# --------------------------------------------------------------------------------- training


def negative_sample(y: np.ndarray, neg_ratio: float | None, seed: int) -> np.ndarray | None:
    """Row positions keeping every positive and at most `neg_ratio` negatives per positive.

    Applied to a fold's training part only; validation rows are never dropped. None when
    nothing needs dropping: `neg_ratio` None or 0 (off), no positive to keep negatives for, or
    no more negatives than `neg_ratio` per positive.
    """
    if not neg_ratio:
        return None
    positives = np.flatnonzero(y == 1)
    negatives = np.flatnonzero(y == 0)
    if len(positives) == 0:
        return None
    keep = min(len(negatives), max(1, int(math.floor(neg_ratio * len(positives)))))
    if keep >= len(negatives):
        return None
    chosen = np.random.default_rng(seed).choice(negatives, keep, replace=False)
    return np.sort(np.concatenate([positives, chosen]))


def sample_seed(seed: int, fold: int) -> int:
    """The seed of one model's negative draw: another draw for every seed and fold."""
    return int(seed) + 7919 * int(fold)


def validation_offset(y_train: np.ndarray, keep: np.ndarray | None) -> float:
    """log(share of the training part's negatives in `keep`): 0 when nothing was dropped.

    A model trained on that share of the negatives predicts log-odds raised by -offset; adding
    the offset to the validation part's scores (its init score) makes early stopping watch the
    log loss at the validation part's own prevalence.
    """
    if keep is None:
        return 0.0
    positives = int((y_train == 1).sum())
    return math.log((len(keep) - positives) / (len(y_train) - positives))


def sampled_rows(y_train: np.ndarray, config: GBDTConfig, fold: int) -> np.ndarray | None:
    """Positions in a training part that some seed of `config` trains on; None = all of them."""
    draws = [negative_sample(y_train, config.neg_ratio, sample_seed(s, fold)) for s in config.seeds]
    if any(d is None for d in draws):
        return None
    rows = np.unique(np.concatenate(draws))
    return None if len(rows) == len(y_train) else rows


def sampling_summary(folds: Sequence[FoldData], config: GBDTConfig) -> dict:
    """What negative down-sampling did, for the stage's metrics.json.

    Returns:
        neg_ratio (0 = off), applied (some training part was down-sampled), and per fold the
        training part's positives and negatives, the negatives each model kept (the same count for
        every seed, each seed its own draw) and the rows each model trained on.
    """
    per_fold = []
    for data in folds:
        positives = int((data.y_train == 1).sum())
        negatives = int(len(data.y_train) - positives)
        keep = negative_sample(data.y_train, config.neg_ratio, sample_seed(config.seeds[0], data.fold))
        kept = negatives if keep is None else int(len(keep) - positives)
        per_fold.append({"fold": data.fold, "positives": positives, "negatives": negatives,
                         "negatives_kept": kept, "rows_per_model": positives + kept})
    return {
        "neg_ratio": config.neg_ratio,
        "applied": any(f["negatives_kept"] < f["negatives"] for f in per_fold),
        "draw": "every positive and at most neg_ratio negatives per positive of each training part, "
                "a different draw per seed and fold; validation parts are never sampled; 0 = off",
        "folds": per_fold,
    }


def booster_params(params: Mapping, seed: int, config: GBDTConfig) -> dict:
    """Full LightGBM parameters for one model of the ensemble."""
    full = {**DEFAULT_PARAMS, **params}
    # Per-seed randomness without `seed`, which would also reset the Dataset's binning seed.
    for key in ("bagging_seed", "feature_fraction_seed", "extra_seed", "drop_seed", "objective_seed"):
        full[key] = int(seed)
    full["num_threads"] = lightgbm_threads(config)
    full["verbosity"] = -1
    return full


def lightgbm_threads(config: GBDTConfig) -> int:
    """LightGBM threads of each model: `config.num_threads`, else half the logical CPUs."""
    return config.num_threads or max(1, (os.cpu_count() or 2) // 2)


def fold_workers(config: GBDTConfig, n_folds: int) -> int:
    """Folds trained at once: `config.fold_workers`, else the logical CPUs over each model's
    LightGBM threads; between 1 and `n_folds`."""
    workers = config.fold_workers or (os.cpu_count() or 1) // lightgbm_threads(config)
    return max(1, min(int(workers), int(n_folds)))


def map_folds(function, folds: Sequence[FoldData], config: GBDTConfig):
    """`function(fold)` for each fold, up to `fold_workers` folds at once; yields the results in
    the order of `folds`, each as soon as it and those before it are done.

    LightGBM releases the GIL while it trains, so threads use the CPUs LightGBM's own threads
    leave idle (a single-threaded model on a 2-CPU machine). One fold's work stays on one thread,
    its models one after another: they share the fold's validation Dataset and its init score.
    Closing the generator early (a pruned trial) cancels the folds not started and waits for those
    running, so that no thread is left training on a fold the caller goes on to use.
    """
    workers = fold_workers(config, len(folds))
    if workers == 1:
        for data in folds:
            yield function(data)
        return
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gbdt-fold") as pool:
        futures = [pool.submit(function, data) for data in folds]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
            wait(futures)


def train_model(data: FoldData, params: Mapping, seed: int, config: GBDTConfig) -> lgb.Booster:
    """One booster on `data`'s training part (down-sampled: see `GBDTConfig.neg_ratio`),
    early-stopped on its whole validation part.

    Raises:
        DataError: `data` was built for another negative sample (`build_fold` with another
            neg_ratio, or without this seed).
    """
    train_set, offset = seed_dataset(data, seed, config)
    valid_set = data.valid_set
    if valid_set is None:
        valid_set = lgb.Dataset(data.X_valid, label=data.y_valid, reference=data.train_set,
                                params=dict(DATASET_PARAMS), free_raw_data=False).construct()
    valid_set.set_init_score(np.full(len(data.y_valid), offset))
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


def seed_dataset(data: FoldData, seed: int, config: GBDTConfig) -> tuple[lgb.Dataset, float]:
    """The training Dataset of one seed's negative draw in `data` and its validation offset
    (`validation_offset`), made once per fold, seed and ratio and kept in `data.seed_sets`.

    The binned rows are the same whatever booster parameters a trial brings (binning parameters
    are fixed, `DATASET_PARAMS`), so every trial and the final fit reuse it.

    Raises:
        DataError: as `train_model`.
    """
    key = (float(config.neg_ratio), int(seed))
    if key in data.seed_sets:
        return data.seed_sets[key]
    keep = negative_sample(data.y_train, config.neg_ratio, sample_seed(seed, data.fold))
    train_set = data.train_set
    if data.dataset_rows is not None:
        positions = None if keep is None else np.searchsorted(data.dataset_rows, keep)
        if (positions is None or positions[-1] >= len(data.dataset_rows)
                or not np.array_equal(data.dataset_rows[positions], keep)):
            ratio, seeds = data.sampled
            raise DataError(
                f"fold {data.fold}: built for neg_ratio {ratio:g} and seeds {list(seeds)}, which does not "
                f"hold the rows of neg_ratio {config.neg_ratio:g} seed {seed}; build the fold with the "
                f"config it is trained with"
            )
        if len(positions) < len(data.dataset_rows):
            train_set = data.train_set.subset(positions.tolist())
    elif keep is not None:
        train_set = data.train_set.subset(keep.tolist())
    data.seed_sets[key] = (train_set, validation_offset(data.y_train, keep))
    return data.seed_sets[key]


def predict_valid(booster: lgb.Booster, data: FoldData) -> np.ndarray:
    """`predict_best` on `data`'s validation part, from one array kept in `data` (n_valid,)."""
    if data.valid_matrix is None:
        data.valid_matrix = np.ascontiguousarray(data.X_valid.to_numpy(dtype=np.float32))
    best = booster.best_iteration if booster.best_iteration > 0 else None
    return booster.predict(data.valid_matrix, num_iteration=best)


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

    def fold_models(data: FoldData) -> list[tuple[int, lgb.Booster, np.ndarray]]:
        models = []
        for seed in config.seeds:
            booster = train_model(data, params, int(seed), config)
            models.append((int(seed), booster, predict_valid(booster, data)))
            bar.update(1)
        return models

    with warnings.catch_warnings():
        # Set once here: `catch_warnings` in each thread would restore the filters out of order.
        warnings.simplefilter("ignore", UserWarning)
        fitted = list(map_folds(fold_models, folds, config))
    for data, models in zip(folds, fitted, strict=True):
        predictions = []
        iterations = []
        for seed, booster, prediction in models:
            boosters[(data.fold, seed)] = booster
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
