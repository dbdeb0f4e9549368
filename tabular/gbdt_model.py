"""A trained LightGBM stage, loaded once: `GBDTModel.load(stage_dir).predict(frame, extra)` (a
`runfolder.stage.Stage`).

The one reader of the files `tabular.gbdt_ensemble.save_ensemble` writes (`features.json`,
`encoder.json`, `fold{k}_seed{s}.txt`, the PCA `.npy` files); scoring, stacking and reports go
through it, so a change to the GBDT features is made in `tabular/` alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from runfolder.layout import require_stage_file
from tabular.errors import DataError
from tabular.features import FeatureEncoder, unknown_categories_said_once
from tabular.gbdt_image import EXTRA_PREFIX, PATIENT_CONTEXT, FoldPCA, check_extra, with_extra
from tabular.spec import DatasetSpec

__all__ = ["ENCODER_FILE", "FEATURES_FILE", "REASON_FLOOR", "Encode", "GBDTModel", "positional"]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.json"
# How the encoder names a one-hot column: "<column>__<category>".
_ONE_HOT_SEPARATOR = "__"
ENCODER_FILE = "encoder.json"
# The one-hot column that is 1 where a categorical value is missing: "<column>__missing".
_MISSING_LEVEL = "missing"
# The smallest contribution (log-odds) worth naming as a reason: 0.05 moves the odds by 5%, e.g.
# a probability of 0.20 to 0.21, below what changes a reading of the score; smaller ones are
# noise of the fold and seed models, and were shown as "(+0.00)" at two decimals.
REASON_FLOOR = 0.05

# `encode(encoder, frame)`: a caller's stand-in for `encoder.transform(frame)`, so that stages
# whose fold encoders are equal encode a batch of rows once (see
# `fuse.scoring.run_models.EncodingCache`).
Encode = Callable[[FeatureEncoder, pd.DataFrame], pd.DataFrame]


def _transform(encoder: FeatureEncoder, frame: pd.DataFrame) -> pd.DataFrame:
    return encoder.transform(frame)


def positional(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a 0..n-1 index: itself when it has one already, so that an `Encode` cache
    keyed by the frame object still recognises it."""
    index = frame.index
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return frame
    return frame.reset_index(drop=True)


@dataclass
class _Fold:
    fold: int
    encoder: FeatureEncoder
    pca: FoldPCA | None
    features: list[str]
    boosters: list[lgb.Booster]

    def patients(self, frame: pd.DataFrame):
        """Each row's patient when this fold's models use the image's patient context (its
        features say so; stages trained before it existed do not), else None."""
        if not set(PATIENT_CONTEXT) <= set(self.features):
            return None
        column = self.encoder.patient_column
        if column not in frame.columns:
            raise DataError(
                f"gbdt: column '{column}' (the patient) is missing from the rows to score"
            )
        return frame[column].to_numpy()


class GBDTModel:
    """Every fold x seed booster of a `gbdt/` folder, with each fold's encoder and PCA.

    `extra_dim`: the width of the image embeddings the models use (None: metadata only).
    """

    STAGE = "gbdt"
    MARKER = FEATURES_FILE
    READS_METADATA = True
    NEEDS_FUSION = False

    def __init__(
        self, stage_dir: Path, folds: list[_Fold], extra_dim: int | None, dataset: str | None
    ):
        self.stage_dir = stage_dir
        self.folds = folds
        self.extra_dim = extra_dim
        self.dataset = dataset

    @property
    def uses_images(self) -> bool:
        return bool(self.extra_dim)

    @property
    def encoders(self) -> list[FeatureEncoder]:
        return [f.encoder for f in self.folds]

    @classmethod
    def load(cls, stage_dir: Path | str) -> GBDTModel:
        """Read a trained `gbdt/` folder.

        Raises:
            RunError: the folder holds no trained stage (`runfolder`'s "stage missing" message,
                naming the command that makes one).
            DataError: a model file it lists is missing.
        """
        stage_dir = Path(stage_dir)
        manifest = json.loads(require_stage_file(stage_dir, FEATURES_FILE).read_text())
        encoders = json.loads((stage_dir / ENCODER_FILE).read_text())["folds"]
        folds = []
        for entry in manifest["folds"]:
            paths = [stage_dir / name for name in entry["models"]]
            absent = [str(p) for p in paths if not p.is_file()]
            if absent:
                raise DataError(
                    f"gbdt: model file(s) {absent} missing; retrain with `invoke train-gbdt`"
                )
            folds.append(
                _Fold(
                    fold=int(entry["fold"]),
                    encoder=FeatureEncoder.from_json(encoders[str(entry["fold"])]),
                    pca=FoldPCA.load(stage_dir, entry["pca"]) if entry.get("pca") else None,
                    features=list(entry["features"]),
                    boosters=[lgb.Booster(model_file=str(p)) for p in paths],
                )
            )
        first: dict = next(iter(encoders.values()), {})
        dataset = first.get("dataset")
        return cls(stage_dir, folds, manifest.get("extra_dim"), dataset)

    # One warning per column for every fold's encoder, not one per fold.
    @unknown_categories_said_once()
    def predict(
        self,
        frame: pd.DataFrame,
        extra: np.ndarray | None = None,
        *,
        spec: DatasetSpec | None = None,
        encode: Encode | None = None,
    ) -> np.ndarray:
        """Mean probability over every fold x seed model, shape (len(frame),) float64.

        Each fold's models see that fold's encoding of `frame` (per-patient features computed
        from `frame`'s rows only) and that fold's PCA of `extra`.

        Args:
            frame: metadata rows (a target column, if present, is ignored).
            extra: (len(frame), d) image embeddings aligned with `frame`, required iff the models
                use image features; rows of zeros may stand for missing images (their
                predictions are then the caller's to discard).
            spec: when given, a data set name other than the training one is logged.
            encode: shared encoding (see `Encode`).

        Raises:
            DataError: `extra` missing, unexpected or of the wrong width; a feature column missing
                or bad (see `FeatureEncoder.transform`); features that differ from training.
        """
        encode = encode or _transform
        if spec is not None and self.dataset is not None and self.dataset != spec.name:
            log.warning(
                "gbdt: models were trained on data set %r, scoring rows of %r",
                self.dataset,
                spec.name,
            )
        extra = self._checked_extra(extra, len(frame))
        frame = positional(frame)
        total = np.zeros(len(frame))
        count = 0
        for fold in self.folds:
            features = with_extra(
                encode(fold.encoder, frame), extra, fold.pca, fold.patients(frame)
            )
            if list(features.columns) != fold.features:
                raise DataError(
                    f"gbdt: fold {fold.fold} features differ from "
                    f"{self.stage_dir / FEATURES_FILE}; "
                    "retrain the stage with `invoke train-gbdt`"
                )
            for booster in fold.boosters:
                total += booster.predict(features)
                count += 1
        return total / count

    @unknown_categories_said_once()
    def reasons(
        self,
        frame: pd.DataFrame,
        extra: np.ndarray | None = None,
        *,
        top: int = 3,
        encode: Encode | None = None,
    ) -> list[str]:
        """The largest metadata contributions to each row's score, as text.

        Contributions are LightGBM's own SHAP values (`pred_contrib=True`, in log-odds), averaged
        over every fold x seed model; the image PCA features are left out (they are the image's
        share, not a metadata reason). Only contributions that raise the score by at least
        `REASON_FLOOR` are named, largest first, and only from values the row has (a missing
        number, or any level of a missing category such as "sex != male", is never a reason),
        e.g. "age_approx = 71 (+0.80); anatom_site_general = back (+0.31)"; a row whose metadata
        lowers its score, or has none, gets "".

        Args: as `predict`; `top` is the most reasons per row.
        """
        encode = encode or _transform
        extra = self._checked_extra(extra, len(frame))
        frame = positional(frame)
        total: pd.DataFrame | None = None
        count = 0
        values = None
        for fold in self.folds:
            features = with_extra(
                encode(fold.encoder, frame), extra, fold.pca, fold.patients(frame)
            )
            if values is None:
                values = features
            for booster in fold.boosters:
                contrib = np.asarray(booster.predict(features, pred_contrib=True))[
                    :, :-1
                ]  # last: the bias
                block = pd.DataFrame(contrib, columns=features.columns)
                total = block if total is None else total.add(block, fill_value=0.0)
                count += 1
        if total is None or values is None:  # no fold: `load` found no model
            raise DataError(
                f"gbdt: no models in {self.stage_dir}; retrain the stage (invoke train-gbdt)"
            )
        mean = (total / count).drop(
            columns=[c for c in total.columns if c.startswith(EXTRA_PREFIX)]
        )
        return [_reason_text(mean.iloc[i], values.iloc[i], top) for i in range(len(frame))]

    def _checked_extra(self, extra, n_rows: int) -> np.ndarray | None:
        if self.extra_dim and extra is None:
            raise DataError(
                f"extra: the models in {self.stage_dir} use image features "
                f"({self.extra_dim}-dimensional "
                "embeddings); pass extra with one row per frame row"
            )
        if extra is None:
            return None
        if not self.extra_dim:
            raise DataError(
                f"extra: the models in {self.stage_dir} were trained without image features; "
                "pass extra=None"
            )
        extra = check_extra(extra, n_rows)
        if extra.shape[1] != self.extra_dim:
            raise DataError(
                f"extra: expected {self.extra_dim} columns (as in training), got {extra.shape[1]}"
            )
        return extra


def _reason_text(
    contributions: pd.Series, values: pd.Series, top: int, floor: float = REASON_FLOOR
) -> str:
    largest = contributions[contributions >= floor].sort_values(ascending=False)
    kept = [(name, value) for name, value in largest.items() if _present(name, values)][:top]
    return "; ".join(f"{_condition(name, values.get(name))} ({value:+.2f})" for name, value in kept)


def _present(name: str, values: pd.Series) -> bool:
    """False when feature `name` stands for a value the row lacks: a missing number (NaN) or a
    one-hot level of a categorical column whose "<column>__missing" indicator is set."""
    value = values.get(name)
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return False
    column, _, category = name.partition(_ONE_HOT_SEPARATOR)
    if not category:
        return True
    missing = values.get(f"{column}{_ONE_HOT_SEPARATOR}{_MISSING_LEVEL}")
    return not _is_one(missing)


def _is_one(value) -> bool:
    """True for a number equal to 1 (a set one-hot indicator); False for None, NaN or text."""
    return (
        isinstance(value, int | float | np.number | np.bool_)
        and not pd.isna(value)
        and float(value) == 1.0
    )


def _condition(name: str, value) -> str:
    """ "age = 71"; a one-hot column `site__back` reads "site = back" (1) or "site != back" (0)."""
    column, _, category = name.partition(_ONE_HOT_SEPARATOR)
    if category and not (np.isscalar(value) and pd.isna(value)) and float(value) in (0.0, 1.0):
        return f"{column} {'=' if float(value) == 1.0 else '!='} {category}"
    return f"{name} = {_shown(value)}"


def _shown(value) -> str:
    """A feature value as a person reads it: integers without decimals, NaN as "missing"."""
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return "missing"
    if isinstance(value, float | np.floating):
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
    return str(value)
