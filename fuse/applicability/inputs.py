"""The detector's inputs checked and brought to one shape: embeddings as a (rows, dim) matrix,
acquisition cues as a DataFrame of `CUE_NAMES` columns, metadata holding the fitted columns.

Each raises RunError naming the input, the shape or columns it got and what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from embed.acquisition import CUE_NAMES, CUES_VERSION, CueTable
from runfolder.errors import RunError

__all__ = ["cue_frame", "embedding_matrix", "metadata_frame"]

log = logging.getLogger(__name__)


def embedding_matrix(embeddings, n: int | None, where: str) -> np.ndarray:
    """(rows, dim) from (rows, dim) or a store's (rows, views, dim) (views averaged), in the
    store's float16 where it is one: chunks are widened to float32 only as they are scored,
    so 401,059 x 1,024 vectors take 0.8 GB, not 1.6."""
    x = np.asarray(embeddings)
    if x.ndim == 3:
        x = x.astype(np.float32).mean(axis=1)
    if x.ndim != 2 or x.shape[1] == 0:
        raise RunError(
            f"{where}: embeddings must have shape (rows, dim) or (rows, views, dim), got {x.shape}"
        )
    if n is not None and len(x) != n:
        raise RunError(f"{where}: embeddings hold {len(x)} rows but the other inputs {n}")
    if x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    return x


def cue_frame(cues, n: int | None, where: str) -> pd.DataFrame:
    """The cues as a DataFrame with `CUE_NAMES` columns (a CueTable, DataFrame or array)."""
    if isinstance(cues, CueTable):
        if cues.version != CUES_VERSION:
            raise RunError(
                f"{where}: cues of version {cues.version!r}, this detector reads {CUES_VERSION!r}; "
                "measure them again with embed.acquisition.acquisition_cues"
            )
        cues = cues.frame
    if isinstance(cues, pd.DataFrame):
        missing = [c for c in CUE_NAMES if c not in cues.columns]
        if missing:
            raise RunError(
                f"{where}: cues lack column(s) {missing}; measure them with "
                "embed.acquisition.acquisition_cues"
            )
        frame = cues[list(CUE_NAMES)].astype(np.float64)
    else:
        array = np.asarray(cues, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != len(CUE_NAMES):
            raise RunError(
                f"{where}: cues must have shape (rows, {len(CUE_NAMES)}) (CUE_NAMES), got "
                f"{array.shape}"
            )
        frame = pd.DataFrame(array, columns=list(CUE_NAMES))
    if n is not None and len(frame) != n:
        raise RunError(f"{where}: cues hold {len(frame)} rows but the other inputs {n}")
    return frame


def metadata_frame(metadata, columns: Sequence[str], n: int | None, where: str) -> pd.DataFrame:
    """`metadata` itself, once it is a DataFrame holding `columns` (and `n` rows when given)."""
    if not isinstance(metadata, pd.DataFrame):
        raise RunError(
            f"{where}: metadata must be a pandas DataFrame, got {type(metadata).__name__}"
        )
    missing = [c for c in columns if c not in metadata.columns]
    if missing:
        raise RunError(
            f"{where}: metadata lacks column(s) {missing} that the detector was fitted on "
            f"(columns present: {list(metadata.columns)[:10]})"
        )
    if n is not None and len(metadata) != n:
        raise RunError(f"{where}: metadata holds {len(metadata)} rows but the other inputs {n}")
    return metadata
