"""Image features of the LightGBM stage: a per-fold PCA of the image embeddings and the image's
distance to its patient's other lesions.

- `FoldPCA`: PCA of an optional extra matrix (image embeddings, rows aligned to the frame),
  fitted on the training part of the fold only, saved as `.npy` (never pickled);
- `check_extra`: the extra matrix checked (2-D, numeric, finite, one row per metadata row);
- `patient_context` / `PATIENT_CONTEXT`: the "ugly duckling" distances in the PCA space;
- `with_extra`: a fold's metadata features with those columns appended.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview
from tabular.features_patient import patient_codes

__all__ = [
    "EXTRA_PREFIX",
    "PATIENT_CONTEXT",
    "FoldPCA",
    "check_extra",
    "patient_context",
    "with_extra",
]

log = logging.getLogger(__name__)

EXTRA_PREFIX = "img_pca_"


@dataclass
class FoldPCA:
    """Mean and components (k, d) of a PCA fitted on one fold's training rows."""

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(
        cls, extra: np.ndarray, n_components: int, seed: int = 0, max_rows: int = 50_000
    ) -> FoldPCA:
        """Fit on `extra` (n, d) rows; at most `max_rows` of them, sampled with `seed`."""
        rows = extra
        if len(extra) > max_rows:
            pick = np.sort(np.random.default_rng(seed).choice(len(extra), max_rows, replace=False))
            rows = extra[pick]
        k = min(n_components, rows.shape[1], len(rows))
        # imported here: scoring loads fitted components and never fits one
        from sklearn.decomposition import PCA

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
        named = [ids[int(i)] for i in rows] if ids is not None else rows.tolist()
        raise DataError(f"extra: rows with NaN or infinite values, ids {preview(named)}")
    return array


# The image relative to the patient's other lesions ("ugly duckling"), from the PCA projection.
PATIENT_CONTEXT = tuple(
    f"{EXTRA_PREFIX}{name}" for name in ("patient_dist", "patient_dist_ratio", "patient_dist_rank")
)


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
    # A row without a patient is its own patient, never pooled with other such rows.
    codes = patient_codes(pd.Series(patients, dtype=object).reset_index(drop=True))
    counts = np.bincount(codes)
    sums = np.zeros((len(counts), reduced.shape[1]))
    np.add.at(sums, codes, reduced)
    distance = np.linalg.norm(reduced - (sums / counts[:, None])[codes], axis=1)
    mean_distance = np.bincount(codes, weights=distance) / counts
    ratio = np.where(
        mean_distance[codes] > 0, distance / np.maximum(mean_distance[codes], 1e-12), 1.0
    )
    rank = pd.Series(distance).groupby(codes).rank(method="average", pct=True).to_numpy()
    return np.column_stack([distance, ratio, rank]).astype(np.float32)


def with_extra(
    features: pd.DataFrame, extra: np.ndarray | None, pca: FoldPCA | None, patients=None
) -> pd.DataFrame:
    """Append the PCA projection of `extra` to `features` (same rows, same order), and, when
    `patients` (each row's patient, None for none) is given, the image's patient context
    (`patient_context`)."""
    if pca is None:
        return features
    if extra is None:
        raise DataError(
            f"extra: the features include {len(pca.names)} image PCA components; pass the "
            "image embeddings (one row per metadata row)"
        )
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
