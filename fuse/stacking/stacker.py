"""The stacker: LightGBM on the metadata features plus the base models' out-of-fold predictions.

`p_fusion` (the fusion MLP) and `p_gbdt` (the LightGBM ensemble, which also saw the image PCA
components the stack itself lacks) are two more features, and for a spec with a `patient` column
(with `StackConfig.patient_ranks`) so is each one's rank among its patient's rows
(`fuse.stacking.patient_ranks`); the shape of the ISIC 2024 winners' second stage. Trained and
evaluated with the run's own folds (`oof_stack`): for fold k it learns on the rows of the other
folds, using *their* out-of-fold base predictions, and predicts fold k from fold k's out-of-fold
base predictions. At scoring time (`StackModel`) the base features are the fold-averaged base
predictions and the stack's fold models are averaged.

Why stacking on out-of-fold predictions does not leak fold k's labels into fold k's figures (the
same reasoning holds for each base feature, `p_fusion` and `p_gbdt` alike, since both base stages
were trained on the same run folds and both files are out of fold): the feature value of an
evaluated row of fold k is its out-of-fold base prediction, made by the base model that did not
see fold k. The training rows' feature values came from base models that *did* see fold k's rows
(each training row's own base model left out that row's fold, not fold k), so fold k's labels
shaped those values; but only through a model that had to generalise to the training row, never
by copying fold k's labels into fold k's features. What the stack learns is "honest out-of-fold
base scores -> label", and fold k's rows get exactly that kind of scores. A stack that also
learnt from fold k's rows would leak: tests/fuse/test_stack.py builds one, shows that it scores on
labels it should not know (random labels; a fusion or gbdt column equal to the label on the
training folds and noise on the evaluated one), and that this module does not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import lightgbm as lgb
import numpy as np
import pandas as pd

from common.files import atomic_write, atomic_write_json
from fuse.errors import RunError
from fuse.stacking.patient_ranks import patient_rank, rank_feature
from runfolder.layout import require_stage_file
from tabular.gbdt_model import Encode, positional

if TYPE_CHECKING:
    from tabular.features import FeatureEncoder

__all__ = [
    "BASE_FEATURES",
    "FUSION_FEATURE",
    "GBDT_FEATURE",
    "StackConfig",
    "StackModel",
    "fit_stack_model",
    "load_encoder",
    "oof_stack",
    "stack_features",
    "stack_patient",
]

log = logging.getLogger(__name__)

FUSION_FEATURE = "p_fusion"
GBDT_FEATURE = "p_gbdt"
# The base-model features the stack appends to the metadata features, in this column order.
BASE_FEATURES = (FUSION_FEATURE, GBDT_FEATURE)


@dataclass(frozen=True)
class StackConfig:
    """The stack's LightGBM parameters, its patient ranks and the blend's weight grid.

    A fixed number of rounds, no early stopping: stopping on fold k would pick the round count on
    the rows being evaluated. `patient_ranks`: for a spec with a `patient` column, also give the
    stack each base prediction's rank within its patient (ignored without one); off by default
    (on the synthetic ISIC 2024-like demo run it changed the stack's out-of-fold pAUC80 by less
    than its seed noise: LightGBM's per-patient features carry that context already).
    """

    num_boost_round: int = 300
    learning_rate: float = 0.03
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    seed: int = 0
    patient_ranks: bool = False
    blend_weights: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

    def lgb_params(self) -> dict:
        return {
            "objective": "binary",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "num_threads": 1,
            "verbosity": -1,
        }


# ----------------------------------------------------------------------------------- the stack


def stack_features(
    encoder,
    frame: pd.DataFrame,
    p_fusion: np.ndarray,
    p_gbdt: np.ndarray | None = None,
    features: pd.DataFrame | None = None,
    patient: str | None = None,
) -> pd.DataFrame:
    """The stack's input: the encoder's metadata features plus `p_fusion` and `p_gbdt` as the last
    columns (in that order; `p_gbdt` omitted when None, as for a stack saved before it was a
    feature), then, with `patient` (a column of `frame`), each one's rank within its patient
    among `frame`'s rows (`p_fusion_patient_rank`, `p_gbdt_patient_rank`). NaN in `p_gbdt` is
    passed through: LightGBM routes missing values.

    `features`, when given, is `encoder.transform(frame)` computed already.

    Raises:
        RunError: a metadata feature has a base feature's name; `patient` is not a column of
            `frame`.
    """
    features = (encoder.transform(frame) if features is None else features.copy()).reset_index(
        drop=True
    )
    base = {FUSION_FEATURE: p_fusion}
    if p_gbdt is not None:
        base[GBDT_FEATURE] = p_gbdt
    if patient is not None:
        if patient not in frame.columns:
            raise RunError(
                f"patient column {patient!r}: missing from the rows to stack; the stack "
                "ranks each base score within its patient, so give the rows their "
                "patient ids"
            )
        for name in list(base):
            base[rank_feature(name)] = patient_rank(
                frame[patient].to_numpy(), np.asarray(base[name])
            )
    for name, values in base.items():
        if name in features.columns:
            raise RunError(
                f"metadata feature name {name!r} clashes with the stack's base-model feature"
            )
        features[name] = np.asarray(values, dtype=np.float32)
    return features


def stack_patient(spec, config: StackConfig) -> str | None:
    """The column the stack ranks base scores within: the spec's patient column when it has one
    and `config.patient_ranks` is set, else None."""
    return spec.patient if config.patient_ranks and spec.patient else None


def fit_stack_model(features: pd.DataFrame, y: np.ndarray, config: StackConfig) -> lgb.Booster:
    """One stack LightGBM on (features, y); the rows given are the only rows it learns from."""
    data = lgb.Dataset(features, label=np.asarray(y), free_raw_data=True)
    return lgb.train(config.lgb_params(), data, num_boost_round=config.num_boost_round)


def _fit_encoder(frame: pd.DataFrame, spec):
    from tabular.features import FeatureEncoder

    return FeatureEncoder().fit(frame, spec)


def load_encoder(path: Path):
    """A fold's `FeatureEncoder` from its JSON file."""
    from tabular.features import FeatureEncoder

    return FeatureEncoder.from_json(json.loads(path.read_text()))


def oof_stack(
    frame: pd.DataFrame,
    spec,
    y: np.ndarray,
    folds: np.ndarray,
    p_fusion: np.ndarray,
    p_gbdt: np.ndarray,
    config: StackConfig,
    out_dir: Path | None = None,
) -> np.ndarray:
    """Out-of-fold stack predictions, shape (n,); fold k's rows never reach fold k's model.

    `p_fusion`, `p_gbdt`: the base models' out-of-fold predictions on the run's folds.
    For each fold k the encoder and the model are fitted on the rows of the other folds only;
    patient ranks (`stack_patient`) are taken within the training part and within fold k apart.
    With `out_dir`, each fold's model (`fold{k}.txt`) and encoder (`encoder_fold{k}.json`) are
    saved.
    """
    p = np.full(len(frame), np.nan)
    patient = stack_patient(spec, config)
    for k in np.unique(folds):
        # Fold k's model sees only the other folds' rows, their out-of-fold fusion and gbdt
        # predictions and an encoder fitted on them; fold k's own base predictions came from the
        # base models that left fold k out (see the module docstring for why this does not leak).
        train = np.flatnonzero(folds != k)
        valid = np.flatnonzero(folds == k)
        train_frame = frame.iloc[train].reset_index(drop=True)
        encoder = _fit_encoder(train_frame, spec)
        model = fit_stack_model(
            stack_features(encoder, train_frame, p_fusion[train], p_gbdt[train], patient=patient),
            y[train],
            config,
        )
        valid_frame = frame.iloc[valid].reset_index(drop=True)
        p[valid] = model.predict(
            stack_features(encoder, valid_frame, p_fusion[valid], p_gbdt[valid], patient=patient)
        )
        if out_dir is not None:
            payload = model.model_to_string().encode("utf-8")
            atomic_write(out_dir / f"fold{k}.txt", partial(_write_bytes, payload))
            atomic_write_json(out_dir / f"encoder_fold{k}.json", encoder.to_json(), indent=None)
    return p


def _write_bytes(payload: bytes, f: BinaryIO) -> None:
    f.write(payload)


class StackModel:
    """The stack's fold models and encoders, loaded once to score many batches of rows (a
    `runfolder.stage.Stage`)."""

    STAGE = "stack"
    MARKER = "stack.json"
    READS_METADATA = True
    NEEDS_FUSION = True

    def __init__(
        self,
        folds: list[tuple[FeatureEncoder, lgb.Booster]],
        uses_gbdt: bool = True,
        patient: str | None = None,
    ):
        self.folds = folds
        self.uses_gbdt = (
            uses_gbdt  # False for a stack saved when p_fusion was its only base feature
        )
        self.patient = patient  # the column base scores are ranked within; None: no patient ranks

    @property
    def encoders(self) -> list:
        return [encoder for encoder, _ in self.folds]

    @classmethod
    def load(cls, stage_dir: Path | str) -> StackModel:
        """Read `stack.json`, `fold{k}.txt` and `encoder_fold{k}.json` of a `stack/` folder.

        Raises:
            RunError: a file is missing (names it and `invoke stack`).
        """
        stage_dir = Path(stage_dir)
        record = json.loads(_stage_file(stage_dir, "stack.json").read_text())
        folds = []
        for k in record["folds"]:
            model_path = _stage_file(stage_dir, f"fold{k}.txt")
            encoder = load_encoder(_stage_file(stage_dir, f"encoder_fold{k}.json"))
            folds.append((encoder, lgb.Booster(model_file=str(model_path))))
        return cls(
            folds,
            uses_gbdt=GBDT_FEATURE in record.get("features", [record.get("feature")]),
            patient=record.get("patient"),
        )

    def predict(
        self,
        frame: pd.DataFrame,
        p_gbdt: np.ndarray,
        p_fusion: np.ndarray,
        encode: Encode | None = None,
    ) -> np.ndarray:
        """Mean of the fold models on `frame`'s rows, shape (n,).

        `p_gbdt`, `p_fusion`: the LightGBM ensemble's and the fusion MLP's fold-averaged
        predictions for the same rows (NaN in `p_gbdt` is routed by LightGBM as missing).
        With patient ranks, each row's rank is taken among the rows of its patient in `frame`
        (so give a patient's rows together: `invoke score` cuts chunks of whole patients).
        `encode`, when given, is called as `encode(encoder, frame)` in place of
        `encoder.transform(frame)` (to share encoded features between stages).
        """
        frame = positional(frame)
        gbdt = p_gbdt if self.uses_gbdt else None
        total = np.zeros(len(frame))
        for encoder, model in self.folds:
            features = encode(encoder, frame) if encode is not None else None
            total += model.predict(
                stack_features(encoder, frame, p_fusion, gbdt, features, patient=self.patient)
            )
        return total / len(self.folds)


def _stage_file(stage_dir: Path, name: str) -> Path:
    return require_stage_file(stage_dir, name)
