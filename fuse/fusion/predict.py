"""A trained fusion stage, loaded once: `FusionModel.load(stage_dir).predict(frame, embeddings)`
(a `runfolder.stage.Stage`).

The one reader of the files `fuse.fusion.cross_validation` writes (`config.json`, `store.json`,
`fold{k}.pt` loaded with `weights_only=True`, `encoder_fold{k}.json`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.errors import preview
from embed.errors import StoreMismatchError
from embed.identity import check_identity, identity_of
from fuse.fusion.embeddings import Embeddings
from fuse.fusion.model import FusionConfig, FusionMLP, encode_meta
from fuse.fusion.training import predict_rows
from runfolder.errors import RunError
from runfolder.layout import STORE_RECORD, require_stage_file
from tabular.features import FeatureEncoder
from tabular.gbdt_model import Encode, positional
from tabular.spec import DatasetSpec

__all__ = ["CONFIG_FILE", "FusionModel", "member_file"]

# Written by `fuse.fusion.cross_validation` once every fold is trained: marks a complete stage.
CONFIG_FILE = "config.json"


def member_file(k: int, member: int) -> str:
    """The state dict file of fold k's member (member 0: `fold{k}.pt`, as a single model's)."""
    return f"fold{k}.pt" if member == 0 else f"fold{k}_member{member}.pt"


class FusionModel:
    """The fold models of a `fusion/` folder with their metadata encoders.

    `folds` holds one (MLP, encoder) entry per fold and seed-ensemble member (`members` of the
    config; one by default); predictions are the mean over all entries.

    Attributes: `store` (the record of the store the models were trained on), `dim` (embedding
    width), `device` (where the MLPs run).
    """

    STAGE = "fusion"
    MARKER = CONFIG_FILE
    READS_METADATA = True
    NEEDS_FUSION = True

    def __init__(
        self,
        record: dict,
        store: dict,
        folds: list[tuple[FusionMLP, FeatureEncoder]],
        device: torch.device | str = "cpu",
    ):
        self.record, self.store = record, store
        self.dim = int(record["n_image"])
        self.device = torch.device(device)
        self.folds = [(model.to(self.device), encoder) for model, encoder in folds]

    @property
    def identity(self) -> dict:
        """The embedding identity the models were trained on."""
        return identity_of(self.store)

    @property
    def encoders(self) -> list[FeatureEncoder]:
        return [encoder for _, encoder in self.folds]

    @classmethod
    def load(cls, stage_dir: Path | str, device: torch.device | str = "cpu") -> FusionModel:
        """Read `config.json`, `store.json` and each fold's state dict and encoder.

        Raises:
            RunError: the folder holds no trained fusion models (`config.json` or `store.json`
                missing: `runfolder`'s "stage missing" message), or a fold's file is missing.
        """
        stage_dir = Path(stage_dir)
        record = json.loads(require_stage_file(stage_dir, CONFIG_FILE).read_text())
        store = json.loads(require_stage_file(stage_dir, STORE_RECORD).read_text())
        config = FusionConfig.from_dict(
            {k: v for k, v in record.items() if k in FusionConfig.__dataclass_fields__}
        )
        folds = []
        for k in range(int(record["n_folds"])):
            encoder_path = stage_dir / f"encoder_fold{k}.json"
            state_paths = [stage_dir / member_file(k, m) for m in range(config.members)]
            for path in (*state_paths, encoder_path):
                if not path.exists():
                    raise RunError(f"fusion: {path} is missing; retrain with `invoke train-fusion`")
            encoder = FeatureEncoder.from_json(json.loads(encoder_path.read_text()))
            for state_path in state_paths:
                model = FusionMLP(int(record["n_image"]), int(record["n_meta"][str(k)]), config)
                model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
                model.eval()
                folds.append((model, encoder))
        return cls(record, store, folds, device)

    def predict(
        self,
        frame: pd.DataFrame,
        embeddings: np.ndarray,
        *,
        identity: dict | None = None,
        spec: DatasetSpec | None = None,
        encode: Encode | None = None,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Probabilities of malignancy: the mean over fold models and over views.

        Args:
            frame: metadata rows (the spec's feature columns; no target needed).
            embeddings: shape (len(frame), views, dim), the rows' embeddings in frame order.
            identity: the embeddings' identity, compared with the training store's (None: the
                caller has checked it).
            spec: names the id column in messages.
            encode: shared encoding of `frame` (see `tabular.gbdt_model.Encode`).

        Returns:
            Shape (len(frame),) float64 in [0, 1].

        Raises:
            StoreMismatchError: `identity` differs from the training store's (names the field), or
                the embeddings' width differs from the models'.
            RunError: embeddings of the wrong shape or with non-finite values.
        """
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 3 or embeddings.shape[0] != len(frame):
            raise RunError(
                f"embeddings: expected shape ({len(frame)}, views, {self.dim}), "
                f"got {embeddings.shape}"
            )
        if embeddings.shape[2] != self.dim:
            raise StoreMismatchError(
                f"embeddings: field 'dim' differs: the model was trained on {self.dim}, "
                f"got {embeddings.shape[2]}"
            )
        if identity is not None:
            check_identity(
                identity,
                self.identity,
                "the embeddings given",
                "the fusion models were trained on",
                hint="embed with the same weights and settings, or train a new run",
            )
        bad = ~np.isfinite(embeddings).all(axis=(1, 2))
        if bad.any():
            ids = (
                frame[spec.id].astype(str).to_numpy()[bad]
                if spec is not None and spec.id in frame.columns
                else np.flatnonzero(bad)
            )
            raise RunError(f"embeddings: non-finite values in rows {preview(list(ids))}")
        frame = positional(frame)
        source = Embeddings.from_array(embeddings)
        rows = np.arange(len(frame))
        total = np.zeros(len(frame))
        for model, encoder in self.folds:
            features = encode(encoder, frame) if encode is not None else None
            meta = torch.from_numpy(encode_meta(encoder, frame, features))
            total += predict_rows(model, source, meta, rows, batch_size, self.device)
        return total / len(self.folds)
