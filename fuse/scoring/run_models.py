"""A trained run's models, loaded once through each stage's own `load`, predicting batch by batch.

`RunModels.load(run_dir)` asks each stage for its model through `runfolder.stage.load_stage`
(`GBDTModel`, `FusionModel`; the final model through `fuse.stacking.stack.load_final`), whose
missing-stage message is the run package's, and checks, before any image is embedded, that every
stage that reads embeddings was trained on the same ones (`<stage>/store.json`): its `identity`
is what new images must be embedded with. Nothing here reads a stage's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from embed.errors import StoreMismatchError
from fuse.applicability.ranges import load_ranges
from fuse.applicability.stage import load_detector
from fuse.fusion import FusionModel
from fuse.stacking.stack import FinalModel, load_final
from fuse.stores import run_identity
from runfolder.errors import RunError
from runfolder.layout import RunLayout
from runfolder.records import store_records
from runfolder.stage import load_stage
from tabular.errors import DataError
from tabular.gbdt_model import GBDTModel, positional
from tabular.spec import spec_from_identity

__all__ = ["EncodingCache", "RunModels"]


class EncodingCache:
    """`encode(encoder, frame)` that encodes a frame once per distinct encoder.

    The stages' encoders of one fold are usually equal (fitted on the same training part), so a
    batch of rows is encoded once per fold instead of once per stage. Use one cache per batch.
    """

    def __init__(self) -> None:
        self._keys: dict[int, str] = {}
        self._features: dict[str, pd.DataFrame] = {}
        # The batch itself is held, not its id: a freed frame's id can be reused by the next one.
        self._frame: pd.DataFrame | None = None

    def __call__(self, encoder, frame: pd.DataFrame) -> pd.DataFrame:
        if frame is not self._frame:  # a new batch: forget the last one's features
            self._frame, self._features = frame, {}
        key = self._keys.get(id(encoder))
        if key is None:
            key = self._keys[id(encoder)] = json.dumps(encoder.to_json(), sort_keys=True)
        if key not in self._features:
            self._features[key] = encoder.transform(frame)
        return self._features[key]


class RunModels:
    """The LightGBM stage, the fusion stage and the final model of one run.

    A tabular-only run (`fuse.stacking.stack.tabular_only`) has no fusion stage (`fusion` and
    `identity` are None) and scores metadata rows without images (`needs_images` is False).
    """

    def __init__(
        self,
        run: RunLayout,
        gbdt: GBDTModel,
        fusion: FusionModel | None,
        final: FinalModel,
        identity: dict | None,
    ):
        self.run, self.gbdt, self.fusion, self.final = run, gbdt, fusion, final
        self.identity = identity
        self.run_spec = spec_from_identity(run.read_record()["spec"])
        # The numeric columns' training ranges (None for runs stacked before they were recorded).
        self.ranges = load_ranges(run.stage("stack"))
        # How unlike the training rows a scored row is (None for runs stacked before it existed).
        self.applicability = load_detector(run)
        self._encode = EncodingCache()
        self._training_ids: set[str] | None = None

    @property
    def needs_images(self) -> bool:
        """False for a tabular-only run: its final model is LightGBM on metadata."""
        return self.fusion is not None

    @property
    def stages(self) -> tuple[str, ...]:
        """The base models whose scores appear as `p_<stage>` columns, by `Stage.STAGE` name."""
        return tuple(model.STAGE for model in (self.gbdt, self.fusion) if model is not None)

    def training_ids(self) -> set[str]:
        """The ids of the run's training rows (its `folds.csv`), read once."""
        if self._training_ids is None:
            from tabular.folds import read_folds

            self._training_ids = set(read_folds(self.run.folds)["id"].astype(str))
        return self._training_ids

    @property
    def threshold(self) -> float:
        return self.final.threshold

    @classmethod
    def load(cls, run_dir: Path | str, device="cpu") -> RunModels:
        """Load every stage a run's final model needs.

        Raises:
            RunError: no run; a stage is missing (names the command that makes it); an image-reading
                stage without its `store.json` (made by an older version: retrain it).
            RunError: also when two stages were trained on different embeddings (names the field
                and both stages).
        """
        run = RunLayout(Path(run_dir)).require()
        final = load_final(run.dir)
        try:
            gbdt = load_stage(run, GBDTModel)
        except DataError as error:
            raise RunError(f"run {run.dir}: {error}") from error
        if not final.model.NEEDS_FUSION:
            return cls(run, gbdt, None, final, None)
        fusion = load_stage(run, FusionModel, device=device)
        records = store_records(run)
        if gbdt.uses_images and "gbdt" not in records:
            raise RunError(
                f"run {run.dir}: stage 'gbdt' uses image features but does not record the feature "
                f"store it was trained on ({run.store_record('gbdt')} is missing: made by an older "
                "version); retrain it with `invoke train-gbdt --spec S --run R`"
            )
        try:
            identity = run_identity(run)
        except StoreMismatchError as error:
            raise RunError(
                f"run {run.dir}: its stages disagree on the embeddings they need: {error}"
            ) from error
        if identity is None:
            raise RunError(
                f"run {run.dir}: no stage records the feature store it was trained on; "
                "retrain with `invoke train-fusion --spec S --run R`"
            )
        return cls(run, gbdt, fusion, final, identity)

    def predict(self, frame: pd.DataFrame, block: np.ndarray, embedded: np.ndarray):
        """(p_gbdt, p_fusion, probability) of `frame`'s rows, each shape (n,), NaN where unscored.

        `block` (n, views, dim) holds zeros where `embedded` is False; those rows go through the
        encoders with the others (per-patient features count every scored row of a patient) and
        their image-model outputs are discarded.

        Raises:
            RunError: the rows cannot be encoded (e.g. a numeric column holds text).
        """
        try:
            return self._predict(positional(frame), block, embedded)
        except DataError as error:
            raise RunError(f"run {self.run.dir}: cannot score these rows: {error}") from error

    def reasons(self, frame: pd.DataFrame, block: np.ndarray, embedded: np.ndarray) -> list[str]:
        """The LightGBM stage's largest metadata contributions per row (see `GBDTModel.reasons`);
        "" for rows without an image when that stage needs one."""
        frame = positional(frame)
        extra = block.astype(np.float32).mean(axis=1) if self.gbdt.uses_images else None
        try:
            text = self.gbdt.reasons(frame, extra, encode=self._encode)
        except DataError as error:
            raise RunError(f"run {self.run.dir}: cannot explain these rows: {error}") from error
        if self.gbdt.uses_images:
            text = [t if done else "" for t, done in zip(text, embedded, strict=True)]
        return text

    def novelty(
        self, frame: pd.DataFrame, block: np.ndarray, embedded: np.ndarray, cues
    ) -> pd.DataFrame | None:
        """The applicability detector's view of `frame`'s rows (`Applicability.predict`: novelty,
        unlike_training, reason, novelty_<part>), or None for a run without that stage.

        `block` (n, views, dim) is ignored where `embedded` is False (those rows are scored by the
        other parts); `cues` is a CueTable or DataFrame of the same rows (NaN where unreadable).
        """
        if self.applicability is None:
            return None
        parts = self.applicability.parts
        embeddings = None
        if "image" in parts:
            embeddings = block.astype(np.float32).mean(axis=1)
            embeddings[~embedded] = np.nan
        return self.applicability.predict(
            embeddings,
            cues if "acquisition" in parts else None,
            positional(frame) if "metadata" in parts else None,
            identity=self.identity if "image" in parts else None,
        )

    def _predict(self, frame: pd.DataFrame, block: np.ndarray, embedded: np.ndarray):
        if self.fusion is None:  # a tabular-only run (`needs_images` False)
            p_gbdt = self.gbdt.predict(frame, None, encode=self._encode)
            return p_gbdt, np.full(len(frame), np.nan), self.final.probability(p_gbdt)
        p_fusion = self.fusion.predict(frame, block, encode=self._encode)
        p_fusion[~embedded] = np.nan
        extra = block.astype(np.float32).mean(axis=1) if self.gbdt.uses_images else None
        p_gbdt = self.gbdt.predict(frame, extra, encode=self._encode)
        if self.gbdt.uses_images:
            p_gbdt[~embedded] = np.nan

        probability = np.full(len(frame), np.nan)
        if self.final.model.READS_METADATA:
            if embedded.any():
                # Rows without an image need a placeholder fusion feature; their output is dropped.
                # A NaN p_gbdt (its stage needs the image too) is left to LightGBM as missing.
                filled = np.where(embedded, p_fusion, np.nanmean(p_fusion))
                score = self.final.model.predict(frame, p_gbdt, filled, self._encode)[embedded]
                probability[embedded] = self.final.probability(score)
        else:
            rows = embedded & np.isfinite(p_gbdt)
            probability[rows] = self.final.probability(
                self.final.model.predict(None, p_gbdt[rows], p_fusion[rows])
            )
        return p_gbdt, p_fusion, probability
