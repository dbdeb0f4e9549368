"""The folds of the LightGBM stage, built once: each fold's features, encoder, PCA and binned
Datasets, reused by every seed, Optuna trial and the final fit.

- `build_folds`: every fold of a run from one encoding of the metadata (each fold's encoder and
  features sliced from it, the same as encoding each training part on its own);
- `build_fold`: one fold on its own (the fallback, and what tests compare with);
- `FoldData`: one fold's training part as a binned LightGBM Dataset, its validation features and
  Dataset, and the encoder / PCA fitted on its training part;
- `seed_dataset`: the training Dataset of one seed's negative draw, made once per fold and seed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tabular.errors import DataError
from tabular.features import FeatureEncoder
from tabular.gbdt_config import DATASET_PARAMS, GBDTConfig
from tabular.gbdt_image import FoldPCA, with_extra
from tabular.gbdt_sampling import negative_sample, sample_seed, sampled_rows, validation_offset
from tabular.spec import DatasetSpec

__all__ = ["FoldData", "build_fold", "build_folds", "seed_dataset"]

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """One fold, ready to train on.

    `train_set` is a binned LightGBM Dataset of the training part (raw features freed): of all
    of it, or, where the config down-samples negatives, of only the rows some seed's draw keeps
    (`dataset_rows`, positions in the training part; binning then costs a fraction);
    `X_valid` (n_valid, n_features) float32 and `y_valid` are the validation part, `valid_set`
    its binned Dataset (built once, shared by every seed and trial); `valid_rows` are its row
    positions in the run's frame; `y_train` is the label of every row of the training part.
    `valid_lock` is held by a model of this fold from setting `valid_set`'s init score until its
    booster has read it (models of one fold may train side by side: `tabular.gbdt_threads`).
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
    seed_sets: dict[tuple[float, int], tuple[lgb.Dataset, float]] = field(
        default_factory=dict, repr=False
    )
    # X_valid as one float32 array, for predictions (a DataFrame is converted on every call).
    valid_matrix: np.ndarray | None = field(default=None, repr=False)
    valid_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


def _pca_components_used(
    n_components: int, extra_dim: int, fold_of_row: np.ndarray, max_rows: int
) -> list[int]:
    """Components `FoldPCA.fit` keeps in each fold (sorted fold order): a PCA of r rows in d
    dimensions has at most min(r, d), so `n_components` is cut where it asks for more."""
    fold_of_row = np.asarray(fold_of_row)
    return [
        min(n_components, extra_dim, min(int(np.sum(fold_of_row != f)), max_rows))
        for f in sorted(np.unique(fold_of_row).tolist())
    ]


def _warn_if_pca_cut(
    n_components: int, extra_dim: int, fold_of_row: np.ndarray, max_rows: int
) -> None:
    used = _pca_components_used(n_components, extra_dim, fold_of_row, max_rows)
    if min(used) >= n_components:
        return
    kept = f"{min(used)}" if min(used) == max(used) else f"{min(used)} to {max(used)} (by fold)"
    log.warning(
        "--image-pca (extra_components) %d: %s components used; a PCA keeps at most as many as the "
        "embedding dimension (%d) and a fold's training rows (at most %d, the smallest fold's %d). "
        "Pass --image-pca %d or fewer to ask for what is used",
        n_components,
        kept,
        extra_dim,
        max_rows,
        min(int(np.sum(np.asarray(fold_of_row) != f)) for f in np.unique(fold_of_row)),
        min(used),
    )


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
    return _fold_from_features(
        frame, spec, y, fold_of_row, fold, encoder, X_train, X_valid, extra, config
    )


def _fold_from_features(
    frame: pd.DataFrame,
    spec: DatasetSpec,
    y: np.ndarray,
    fold_of_row: np.ndarray,
    fold: int,
    encoder: FeatureEncoder,
    X_train: pd.DataFrame,
    X_valid: pd.DataFrame,
    extra: np.ndarray | None,
    config: GBDTConfig,
) -> FoldData:
    """The rest of `build_fold` once the fold's metadata features are made: image PCA, the
    negative sample, the binned Datasets."""
    train_rows = np.flatnonzero(fold_of_row != fold)
    valid_rows = np.flatnonzero(fold_of_row == fold)
    pca = None
    if extra is not None:
        if fold == np.min(fold_of_row):  # said once per fit, not once per fold
            _warn_if_pca_cut(
                config.extra_components, extra.shape[1], fold_of_row, config.pca_fit_rows
            )
        pca = FoldPCA.fit(
            extra[train_rows], config.extra_components, seed=fold, max_rows=config.pca_fit_rows
        )
        # Each part's patient context comes from its own rows (a patient is in one part only
        # when folds are grouped by patient, as the ISIC 2024 spec's are).
        patients = spec.patient if config.patient_context and spec.patient else None
        X_train = with_extra(
            X_train,
            extra[train_rows],
            pca,
            None if patients is None else frame[patients].iloc[train_rows].to_numpy(),
        )
        X_valid = with_extra(
            X_valid,
            extra[valid_rows],
            pca,
            None if patients is None else frame[patients].iloc[valid_rows].to_numpy(),
        )
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
    valid_set = lgb.Dataset(
        X_valid,
        label=y[valid_rows],
        reference=train_set,
        params=dict(DATASET_PARAMS),
        free_raw_data=False,
    )
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
        sampled=None
        if dataset_rows is None
        else (config.negatives_per_positive, tuple(int(s) for s in config.seeds)),
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
        X_valid = pd.DataFrame(
            block[:, picks] if len(picks) < block.shape[1] else block,
            index=valid_rows,
            columns=fold_encoder.feature_names,
            copy=False,
        )
        folds.append(
            _fold_from_features(
                frame, spec, y, fold_of_row, k, fold_encoder, X_train, X_valid, extra, config
            )
        )
    return folds


def _encode_once(
    frame: pd.DataFrame, spec: DatasetSpec, fold_of_row: np.ndarray
) -> tuple[FeatureEncoder, pd.DataFrame] | None:
    """(encoder fitted on every row, its features of every row), or None where the folds' own
    encodings could differ from slices of it (see `build_folds`)."""
    if spec.patient and spec.patient in frame.columns:
        patients = frame[spec.patient]
        present = patients.notna().to_numpy()
        # A row without a patient is its own patient: always within one part.
        folds_per_patient = (
            pd.Series(fold_of_row[present])
            .groupby(patients[present].astype(str).to_numpy())
            .nunique()
        )
        if (folds_per_patient > 1).any():
            log.info(
                "gbdt: patients in several folds (%d); features are built per fold",
                int((folds_per_patient > 1).sum()),
            )
            return None
    encoder = FeatureEncoder()
    try:
        features = encoder.fit_transform(frame, spec)
    except DataError:
        return None
    return encoder, features


def _warn_unseen(
    block: np.ndarray, encoder: FeatureEncoder, picks: Sequence[int], fold: int
) -> None:
    """Log, as `FeatureEncoder.transform` does, validation rows (`block`: `encoder`'s features)
    holding a category the fold's training part lacks (a one-hot column not in `picks`)."""
    kept = set(picks)
    for i, c in enumerate(encoder.to_json()["columns"]):
        if c["kind"] == "onehot" and i not in kept:
            rows = int(block[:, i].sum())
            if rows:
                log.warning(
                    "categorical column '%s': %d row(s) of fold %d hold category %r, absent from "
                    "its training part: encoded as all-zero",
                    c["source"],
                    rows,
                    fold,
                    c["value"],
                )


def seed_dataset(data: FoldData, seed: int, config: GBDTConfig) -> tuple[lgb.Dataset, float]:
    """The training Dataset of one seed's negative draw in `data` and its validation offset
    (`validation_offset`), made once per fold, seed and ratio and kept in `data.seed_sets`.

    The binned rows are the same whatever booster parameters a trial brings (binning parameters
    are fixed, `DATASET_PARAMS`), so every trial and the final fit reuse it.

    Raises:
        DataError: as `train_model`.
    """
    key = (config.negatives_per_positive, int(seed))
    if key in data.seed_sets:
        return data.seed_sets[key]
    keep = negative_sample(data.y_train, config.neg_ratio, sample_seed(seed, data.fold))
    train_set = data.train_set
    if data.dataset_rows is not None:
        positions = None if keep is None else np.searchsorted(data.dataset_rows, keep)
        if (
            keep is None
            or positions is None
            or positions[-1] >= len(data.dataset_rows)
            or not np.array_equal(data.dataset_rows[positions], keep)
        ):
            built = (
                "another sample"
                if data.sampled is None
                else (f"neg_ratio {data.sampled[0]:g} and seeds {list(data.sampled[1])}")
            )
            raise DataError(
                f"fold {data.fold}: built for {built}, which does not "
                f"hold the rows of neg_ratio {config.neg_ratio:g} seed {seed}; build the fold with "
                "the "
                f"config it is trained with"
            )
        if len(positions) < len(data.dataset_rows):
            train_set = data.train_set.subset(positions.tolist())
    elif keep is not None:
        train_set = data.train_set.subset(keep.tolist())
    data.seed_sets[key] = (train_set, validation_offset(data.y_train, keep))
    return data.seed_sets[key]
