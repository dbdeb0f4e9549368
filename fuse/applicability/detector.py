"""Applicability: is a scored row like the lesions the run was trained on?

A probability learnt on dermoscopy need not hold for a crop of a total-body photograph, and a
model cannot tell by itself. This module fits, from a run's training rows, a detector with up to
three parts, each a raw "how unusual" score:

- image (the default, `image_method="pca-residual"`): the norm of the l2-normalised embedding's
  residual outside the 16 leading principal directions of the normalised training embeddings
  (fitted on a seeded subsample of at most `max_reference` rows, 20,000; saved as the mean and
  the directions, 64 KB at 1,024 dimensions). It separated the ISIC 2024 crops from held-out
  HAM10000 lesions better than the k-nearest-neighbour distance on the full HAM10000 store (see
  `_ResidualImagePart`). `image_method="knn"`: the embedding's cosine distance to its k nearest
  training embeddings (l2-normalised, not centred: the pooled features are non-negative and their
  overall direction is part of what an image of another kind changes; 1 - the mean of the k = 5
  largest similarities), against a reference set of at most 20,000 rows in float16 (41 MB).
- acquisition: the image file's acquisition cues (`embed.acquisition`) against the training
  images': each cue robustly standardised (median, 1.4826 x MAD, with a floor so that a cue
  every training image shares, such as a fixed size, still counts when it changes), then the
  Mahalanobis distance under a Ledoit-Wolf covariance of those standardised cues.
- metadata: numeric values beyond the training range widened by a margin (`numeric_margin` of
  the range on each side; the excess in units of the range) plus one per category never seen
  at fit.

Each raw score is turned into a percentile of the training rows' own out-of-fold scores: for
each fold of the run's `folds.csv` the parts are fitted on the other folds and score the
held-out one. A row's combined score is the largest of its part percentiles; `novelty` is where
that falls among the training rows' out-of-fold combined scores (0.99 = more unusual than 99% of
them), and `unlike_training` is novelty at or above the threshold that marks `marked_share`
(2.5%) of the training rows out of fold. `reason` names the parts that alone reach it.

Saved without pickles: `applicability.json` (settings, the store identity it was fitted on, the
parts' statistics, the hash of the arrays) and `applicability.npz` (read with
`allow_pickle=False`). `load(stage_dir).predict(embeddings, cues, metadata)` scores new rows.
A tabular-only run (no images) fits the metadata part alone.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write, atomic_write_json, sha256_file
from embed.acquisition import CUE_NAMES, CUES_VERSION, CueTable
from embed.identity import IDENTITY_FIELDS, check_identity, identity_of
from runfolder.errors import RunError

__all__ = [
    "ARRAYS",
    "FORMAT",
    "PARTS",
    "RECORD",
    "Applicability",
    "ApplicabilityConfig",
    "fit_applicability",
    "load",
]

log = logging.getLogger(__name__)

FORMAT = "lesionfuse-applicability/1"
RECORD = "applicability.json"
ARRAYS = "applicability.npz"
PARTS: tuple[str, ...] = ("image", "acquisition", "metadata")
_MISSING = "<missing>"
# Robust scale floors of the acquisition cues, in the cue's units: a cue that every training
# image shares (HAM10000's 200x150) has no spread, and any change of it must still count, by
# about this much per standard deviation. Sizes count 5% per unit; colours a few Lab units.
_CUE_FLOORS: dict[str, float] = {
    "width": 0.05,  # applied to log(width): see _acquisition_matrix
    "height": 0.05,
    "log_pixels": 0.05,
    "log_aspect": 0.05,
    "bytes_per_pixel": 0.01,
    "L_mean": 2.0,
    "L_std": 1.0,
    "a_mean": 2.0,
    "a_std": 0.5,
    "b_mean": 2.0,
    "b_std": 0.5,
    "saturation": 0.02,
    "sharpness": 0.1,
    "vignetting": 0.02,
    "dark_corners": 0.01,
}
_Z_CLIP = 50.0  # a standardised cue beyond this counts as this far: one cue cannot overflow
_CHUNK = 4096  # query rows per matrix product with the reference set


@dataclass(frozen=True)
class ApplicabilityConfig:
    """Settings of the detector.

    marked_share: share of the training rows marked unlike training, out of fold (0.025).
    neighbours: k of the image part's k-nearest-neighbour similarity (5).
    max_reference: most training embeddings kept as the image part's reference (20,000; a
        seeded subsample beyond that).
    numeric_margin: a numeric value counts as out of range beyond the training minimum or
        maximum by more than this share of the training range (0.1).
    seed: seed of the reference subsample (0).
    image_method: "pca-residual" (the default: the residual outside the training images'
        `image_components` principal directions) or "knn" (cosine distance to the `neighbours`
        nearest training embeddings); measured in `_ResidualImagePart`.
    image_components: principal directions of the pca-residual image part (16).
    """

    marked_share: float = 0.025
    neighbours: int = 5
    max_reference: int = 20_000
    numeric_margin: float = 0.1
    seed: int = 0
    image_method: str = "pca-residual"
    image_components: int = 16

    def __post_init__(self) -> None:
        share = self.marked_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 0.5:
            raise RunError(
                f"ApplicabilityConfig.marked_share: expected a share in (0, 0.5), e.g. 0.025, "
                f"got {share!r}"
            )
        if self.image_method not in ("pca-residual", "knn"):
            raise RunError(
                f"ApplicabilityConfig.image_method: expected 'pca-residual' or 'knn', got "
                f"{self.image_method!r}"
            )
        for name in ("neighbours", "max_reference", "image_components"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RunError(
                    f"ApplicabilityConfig.{name}: expected a positive integer, got {value!r}"
                )
        margin = self.numeric_margin
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise RunError(
                f"ApplicabilityConfig.numeric_margin: expected a number >= 0, got {margin!r}"
            )


# -- input checks -----------------------------------------------------------------------------


def _embedding_matrix(embeddings, n: int | None, where: str) -> np.ndarray:
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


def _cue_frame(cues, n: int | None, where: str) -> pd.DataFrame:
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
                f"{where}: cues must have shape (rows, {len(CUE_NAMES)}) (CUE_NAMES), got {array.shape}"
            )
        frame = pd.DataFrame(array, columns=list(CUE_NAMES))
    if n is not None and len(frame) != n:
        raise RunError(f"{where}: cues hold {len(frame)} rows but the other inputs {n}")
    return frame


def _metadata_frame(metadata, columns: Sequence[str], n: int | None, where: str) -> pd.DataFrame:
    if not isinstance(metadata, pd.DataFrame):
        raise RunError(f"{where}: metadata must be a pandas DataFrame, got {type(metadata).__name__}")
    missing = [c for c in columns if c not in metadata.columns]
    if missing:
        raise RunError(
            f"{where}: metadata lacks column(s) {missing} that the detector was fitted on "
            f"(columns present: {list(metadata.columns)[:10]})"
        )
    if n is not None and len(metadata) != n:
        raise RunError(f"{where}: metadata holds {len(metadata)} rows but the other inputs {n}")
    return metadata


# -- the parts ---------------------------------------------------------------------------------


class _ImagePart:
    """Cosine distance to the k nearest reference embeddings (l2-normalised, not centred)."""

    name = "image"

    def __init__(self, reference: np.ndarray, neighbours: int):
        self.reference = reference.astype(np.float16)
        self.neighbours = neighbours

    @property
    def dim(self) -> int:
        return self.reference.shape[1]

    @classmethod
    def fit(cls, x: np.ndarray, config: ApplicabilityConfig, rng: np.random.Generator) -> _ImagePart:
        keep = x
        if len(x) > config.max_reference:
            keep = x[np.sort(rng.choice(len(x), config.max_reference, replace=False))]
        return cls(_unit(keep.astype(np.float32)), config.neighbours)

    def score(self, x: np.ndarray) -> np.ndarray:
        """(rows,) 1 - mean of the k largest cosine similarities; NaN for rows with NaN."""
        out = np.full(len(x), np.nan)
        reference = self.reference.astype(np.float32)
        k = min(self.neighbours, len(reference))
        for start in range(0, len(x), _CHUNK):
            block = x[start : start + _CHUNK].astype(np.float32)
            ok = np.isfinite(block).all(axis=1)
            chunk = start + np.flatnonzero(ok)
            sims = _unit(block[ok]) @ reference.T
            top = np.partition(sims, len(reference) - k, axis=1)[:, -k:]
            out[chunk] = 1.0 - top.mean(axis=1)
        return out

    def detail(self, x_row: np.ndarray) -> str:
        return ""

    def state(self) -> tuple[dict, dict]:
        return {"neighbours": self.neighbours, "reference_rows": len(self.reference)}, {
            "image_reference": self.reference,
        }

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> _ImagePart:
        return cls(arrays["image_reference"], int(record["neighbours"]))


class _ResidualImagePart:
    """Distance of the l2-normalised embedding from the training images' principal subspace:
    the norm of what `components` (16) principal directions of the centred, normalised training
    vectors leave unexplained. Images of the training kind lie close to that subspace; another
    kind of image (another modality, another camera) has much of its direction outside it.

    Measured on the full HAM10000 store (8,034 images, each fold scored by a part fitted on the
    other four) against the 51 ISIC 2024 total-body-photography crops: ROC AUC crops vs held-out
    lesions 0.966 with 16 components (32: 0.927, 64: 0.926), k-nearest-neighbour cosine 0.956;
    crops above the held-out lesions' 97.5th percentile 63.5% vs 59.6%. Saved as the mean and the
    components (components x dim float32: 64 KB at 1,024 dimensions, whatever the training set).
    """

    name = "image"

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @classmethod
    def fit(cls, x: np.ndarray, config: ApplicabilityConfig, rng: np.random.Generator) -> _ResidualImagePart:
        keep = x
        if len(x) > config.max_reference:
            keep = x[np.sort(rng.choice(len(x), config.max_reference, replace=False))]
        keep = keep[np.isfinite(keep).all(axis=1)]
        dim = keep.shape[1]
        # Covariance accumulated chunk by chunk (dim x dim), then its top eigenvectors: the same
        # subspace as an SVD of the rows, at a fraction of the cost for many rows.
        mean = np.zeros(dim, dtype=np.float64)
        for start in range(0, len(keep), _CHUNK):
            mean += _unit(keep[start:start + _CHUNK].astype(np.float32)).sum(axis=0)
        mean /= max(len(keep), 1)
        scatter = np.zeros((dim, dim), dtype=np.float64)
        for start in range(0, len(keep), _CHUNK):
            block = _unit(keep[start:start + _CHUNK].astype(np.float32)) - mean
            scatter += block.T.astype(np.float64) @ block
        k = max(1, min(config.image_components, len(keep) - 1, dim))
        return cls(mean.astype(np.float32), _top_eigenvectors(scatter, k, rng).astype(np.float32))

    def score(self, x: np.ndarray) -> np.ndarray:
        """(rows,) norm of the residual outside the training subspace; NaN for rows with NaN."""
        out = np.full(len(x), np.nan)
        for start in range(0, len(x), _CHUNK):
            block = x[start : start + _CHUNK].astype(np.float32)
            ok = np.isfinite(block).all(axis=1)
            z = _unit(block[ok]) - self.mean
            residual = z - (z @ self.components.T) @ self.components
            out[start + np.flatnonzero(ok)] = np.linalg.norm(residual, axis=1)
        return out

    def detail(self, x_row: np.ndarray) -> str:
        return ""

    def state(self) -> tuple[dict, dict]:
        return {"method": "pca-residual", "components": int(len(self.components))}, {
            "image_mean": self.mean, "image_components": self.components,
        }

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> _ResidualImagePart:
        return cls(arrays["image_mean"], arrays["image_components"])


def _top_eigenvectors(matrix: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """(k, dim) leading eigenvectors of a symmetric positive semi-definite matrix by subspace
    iteration: a full `eigh` of 1,024 x 1,024 took 17 s on the loaded 2-core machine, this well
    under one, and the leading directions (well separated here) agree."""
    dim = len(matrix)
    width = min(dim, k + 32)  # oversampling: the k-th direction converges as fast as the others
    basis = _orthonormal(rng.standard_normal((dim, width)))
    for _ in range(iterations):
        basis = _orthonormal(matrix @ basis)
    values, vectors = np.linalg.eigh(basis.T @ matrix @ basis)
    return (basis @ vectors[:, ::-1][:, :k]).T


def _orthonormal(block: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning `block` (dim, width) through the eigenvectors of its small
    Gram matrix (LAPACK's QR of a tall block took 0.5 s here, this a millisecond)."""
    values, vectors = np.linalg.eigh(block.T @ block)
    keep = values > values.max() * 1e-12
    return block @ (vectors[:, keep] / np.sqrt(values[keep]))


def _image_part_class(method: str):
    return _ResidualImagePart if method == "pca-residual" else _ImagePart


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _acquisition_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Cues as the part compares them: sizes as logs (a 10% change counts alike at any size)."""
    x = frame[list(CUE_NAMES)].to_numpy(dtype=np.float64).copy()
    for name in ("width", "height"):
        j = CUE_NAMES.index(name)
        x[:, j] = np.log(np.maximum(x[:, j], 1.0))
    return x


class _AcquisitionPart:
    """Mahalanobis distance of robustly standardised cues (Ledoit-Wolf covariance)."""

    name = "acquisition"

    def __init__(self, center, scale, precision, median_raw):
        self.center = np.asarray(center, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)
        self.median_raw = np.asarray(median_raw, dtype=np.float64)

    @classmethod
    def fit(cls, frame: pd.DataFrame, config: ApplicabilityConfig, rng) -> _AcquisitionPart:
        from sklearn.covariance import LedoitWolf

        raw = frame[list(CUE_NAMES)].to_numpy(dtype=np.float64)
        ok = np.isfinite(raw).all(axis=1)
        if ok.sum() < 10:
            raise RunError(
                f"applicability: only {int(ok.sum())} training images have acquisition cues; "
                "at least 10 are needed (are the images readable?)"
            )
        x = _acquisition_matrix(frame)[ok]
        center = np.median(x, axis=0)
        mad = 1.4826 * np.median(np.abs(x - center), axis=0)
        floors = np.array([_CUE_FLOORS[name] for name in CUE_NAMES])
        scale = np.maximum(mad, floors)
        z = np.clip((x - center) / scale, -_Z_CLIP, _Z_CLIP)
        if len(z) > config.max_reference:
            z = z[rng.choice(len(z), config.max_reference, replace=False)]
        covariance = LedoitWolf(assume_centered=True).fit(z).covariance_
        # Cues every training image shares have no variance; a floor keeps the inverse finite
        # (and a change of such a cue then counts by its robust z alone).
        covariance = covariance + np.eye(len(covariance)) * 1e-3
        return cls(center, scale, np.linalg.inv(covariance), np.median(raw[ok], axis=0))

    def _z(self, frame: pd.DataFrame) -> np.ndarray:
        return np.clip((_acquisition_matrix(frame) - self.center) / self.scale, -_Z_CLIP, _Z_CLIP)

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        z = self._z(frame)
        d2 = np.einsum("ij,jk,ik->i", np.nan_to_num(z), self.precision, np.nan_to_num(z))
        out = np.sqrt(np.maximum(d2, 0.0))
        out[~np.isfinite(z).all(axis=1)] = np.nan
        return out

    def detail(self, frame_row: pd.DataFrame) -> str:
        """The cues furthest from the training images' (|robust z| > 3, at most two)."""
        z = self._z(frame_row)[0]
        raw = frame_row[list(CUE_NAMES)].to_numpy(dtype=np.float64)[0]
        order = [j for j in np.argsort(-np.abs(z)) if abs(z[j]) > 3][:2]
        words = []
        size_said = False
        for j in order:
            name = CUE_NAMES[j]
            if name in ("width", "height", "log_pixels", "log_aspect"):
                if size_said:
                    continue
                size_said = True
                w, h = raw[CUE_NAMES.index("width")], raw[CUE_NAMES.index("height")]
                mw, mh = self.median_raw[CUE_NAMES.index("width")], self.median_raw[CUE_NAMES.index("height")]
                words.append(f"size {w:.0f}x{h:.0f} vs training {mw:.0f}x{mh:.0f}")
            else:
                words.append(f"{name} {raw[j]:.3g} vs training {self.median_raw[j]:.3g}")
        return ", ".join(words)

    def state(self) -> tuple[dict, dict]:
        return {"cues": list(CUE_NAMES), "cues_version": CUES_VERSION}, {
            "acquisition_center": self.center,
            "acquisition_scale": self.scale,
            "acquisition_precision": self.precision,
            "acquisition_median": self.median_raw,
        }

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> _AcquisitionPart:
        if record.get("cues") != list(CUE_NAMES) or record.get("cues_version") != CUES_VERSION:
            raise RunError(
                f"applicability detector was fitted on cues {record.get('cues_version')!r} "
                f"but this lesionfuse measures {CUES_VERSION!r}; fit it again (invoke stack)"
            )
        return cls(
            arrays["acquisition_center"],
            arrays["acquisition_scale"],
            arrays["acquisition_precision"],
            arrays["acquisition_median"],
        )


class _MetadataPart:
    """Numeric values beyond the training range (with a margin) and categories never seen."""

    name = "metadata"

    def __init__(self, ranges: dict[str, list[float]], seen: dict[str, list[str]]):
        self.ranges = ranges  # column -> [low, high, span]
        self.seen = seen  # column -> categories seen at fit (as text; missing as _MISSING)
        self._seen_sets = {c: set(v) for c, v in seen.items()}

    @property
    def columns(self) -> list[str]:
        return list(self.ranges) + list(self.seen)

    @classmethod
    def fit(cls, frame: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str],
            config: ApplicabilityConfig) -> _MetadataPart:
        ranges = {}
        for col in numeric:
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                raise RunError(
                    f"applicability: numeric column {col!r} has no numeric value in the training rows"
                )
            low, high = float(values.min()), float(values.max())
            span = max(high - low, 1e-9)
            margin = config.numeric_margin * span
            ranges[col] = [low - margin, high + margin, span]
        seen = {col: sorted(set(_categories(frame[col]))) for col in categorical}
        return cls(ranges, seen)

    def _components(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        parts = {}
        for col, (low, high, span) in self.ranges.items():
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            excess = np.maximum(values - high, low - values) / span
            # Missing or non-numeric values are not "out of range" (validation reports text).
            parts[col] = np.where(np.isfinite(excess), np.maximum(excess, 0.0), 0.0)
        for col, known in self._seen_sets.items():
            parts[col] = np.array([v not in known for v in _categories(frame[col])], dtype=float)
        return parts

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        parts = self._components(frame)
        if not parts:
            return np.zeros(len(frame))
        return np.sum(list(parts.values()), axis=0)

    def detail(self, frame_row: pd.DataFrame) -> str:
        words = []
        for col, value in self._components(frame_row).items():
            if value[0] <= 0:
                continue
            raw = frame_row[col].iloc[0]
            if col in self.ranges:
                low, high, _ = self.ranges[col]
                words.append(f"{col} = {raw} outside training {low:.4g}..{high:.4g} (with margin)")
            elif pd.isna(raw):
                words.append(f"{col} missing, never missing in training")
            else:
                words.append(f"{col} = {raw!r} never seen in training")
        return ", ".join(words)

    def state(self) -> tuple[dict, dict]:
        return {"ranges": self.ranges, "seen": self.seen}, {}

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> _MetadataPart:
        return cls(record["ranges"], record["seen"])


def _categories(series: pd.Series) -> list[str]:
    return [_MISSING if pd.isna(v) else str(v) for v in series.tolist()]


# -- percentiles --------------------------------------------------------------------------------


def _percentile(reference_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Share of the reference scores strictly below each score (NaN stays NaN)."""
    out = np.searchsorted(reference_sorted, scores, side="left") / max(len(reference_sorted), 1)
    return np.where(np.isnan(scores), np.nan, out)


def _combine(percentiles: dict[str, np.ndarray]) -> np.ndarray:
    """The largest available part percentile per row (NaN when no part could score it)."""
    stacked = np.vstack(list(percentiles.values()))
    has = np.isfinite(stacked).any(axis=0)
    out = np.full(stacked.shape[1], np.nan)
    out[has] = np.nanmax(stacked[:, has], axis=0)
    return out


def _threshold(novelty: np.ndarray, share: float) -> tuple[float, float]:
    """(threshold, share of rows at or above it): the lowest threshold among the rows' own
    values marking at most `share` of them (ties are marked together or not at all). When no
    value does (most rows tie at the top), 1.0: only rows beyond every training row's score
    are marked (no training row reaches 1.0, since its own score is not below itself)."""
    values = np.sort(novelty[np.isfinite(novelty)])
    n = len(values)
    for t in np.unique(values):
        marked = n - np.searchsorted(values, t, side="left")
        if marked / n <= share:
            return float(t), marked / n
    return 1.0, 0.0


# -- the detector --------------------------------------------------------------------------------


class Applicability:
    """A fitted detector; `predict` scores rows, `summary` describes the fit for a report."""

    def __init__(self, record: dict, parts: dict, oof: dict[str, np.ndarray]):
        self.record = record
        self.parts = parts  # name -> part, in PARTS order
        self.oof = {k: np.sort(v[np.isfinite(v)]) for k, v in oof.items()}
        self.threshold = float(record["threshold"])

    @property
    def identity(self) -> dict | None:
        """The embedding identity of the store it was fitted on (None for tabular-only)."""
        return self.record.get("identity")

    @property
    def training_novelty(self) -> np.ndarray:
        """The training rows' out-of-fold novelty, sorted (for the report's distribution)."""
        return self.oof["novelty"]

    def summary(self) -> dict:
        """Plain values: parts, rows, threshold, the share marked out of fold (all and per part)."""
        keep = ("parts", "rows", "folds", "threshold", "marked_share", "marked_share_out_of_fold",
                "marked_by_part_out_of_fold", "fit_seconds", "identity", "config")
        return {k: self.record[k] for k in keep if k in self.record}

    def check_identity(self, identity: dict) -> None:
        """Raise StoreMismatchError naming the first field where `identity` (a store's
        `reference()` or identity) differs from the store the detector was fitted on."""
        check_identity(
            identity_of(identity), self.identity, "the embeddings to score (feature store)",
            "the applicability detector was fitted on",
        )

    def predict(self, embeddings=None, cues=None, metadata: pd.DataFrame | None = None, *,
                identity: dict | None = None) -> pd.DataFrame:
        """Score rows: DataFrame with `novelty` (0..1), `unlike_training` (bool), `reason`
        (empty unless unlike training) and `novelty_<part>` per fitted part, one row per input
        row (the metadata's index when given).

        embeddings: (rows, dim) or (rows, views, dim), required when the detector has an image
            part, with `identity` (the store's identity or `reference()`), checked against the
            fit's. cues: CueTable, DataFrame or (rows, len(CUE_NAMES)) array, required with an
            acquisition part. metadata: DataFrame holding the fitted columns, required with a
            metadata part. Rows whose embedding or cues are NaN (images that could not be read)
            are scored by the other parts; a row no part could score has NaN novelty and is
            not marked.

        Raises RunError naming the missing input or column, or a shape that does not fit;
        StoreMismatchError naming the identity field that differs.
        """
        n = None
        inputs = {"image": embeddings, "acquisition": cues, "metadata": metadata}
        for name in self.parts:
            if inputs[name] is None:
                what = {"image": "embeddings (and identity)", "acquisition": "cues",
                        "metadata": "metadata"}[name]
                raise RunError(
                    f"applicability.predict: the detector has a {name} part; pass {what}"
                )
            n = len(inputs[name]) if n is None else n
        percentiles = {}
        matrices = {}
        if "image" in self.parts:
            if identity is None:
                raise RunError(
                    "applicability.predict: identity is required with embeddings (the feature "
                    "store's reference() or identity), so that vectors of other weights are refused"
                )
            self.check_identity(identity)
            x = _embedding_matrix(embeddings, n, "applicability.predict")
            expected = self.parts["image"].dim
            if x.shape[1] != expected:
                raise RunError(
                    f"applicability.predict: embeddings have dim {x.shape[1]}, the detector {expected}"
                )
            matrices["image"] = x
        if "acquisition" in self.parts:
            matrices["acquisition"] = _cue_frame(cues, n, "applicability.predict")
        if "metadata" in self.parts:
            matrices["metadata"] = _metadata_frame(
                metadata, self.parts["metadata"].columns, n, "applicability.predict"
            )
        for name, part in self.parts.items():
            percentiles[name] = _percentile(self.oof[name], part.score(matrices[name]))
        combined = _combine(percentiles)
        novelty = _percentile(self.oof["combined"], combined)
        unlike = np.nan_to_num(novelty, nan=0.0) >= self.threshold
        reasons = [""] * len(novelty)
        for i in np.flatnonzero(unlike):
            reasons[i] = self._reason(i, percentiles, matrices)
        index = metadata.index if isinstance(metadata, pd.DataFrame) else pd.RangeIndex(len(novelty))
        out = pd.DataFrame({"novelty": novelty, "unlike_training": unlike, "reason": reasons},
                           index=index)
        for name, p in percentiles.items():
            out[f"novelty_{name}"] = p
        return out

    def _reason(self, i: int, percentiles: dict, matrices: dict) -> str:
        words = []
        for name, part in self.parts.items():
            p = percentiles[name][i]
            if not np.isfinite(p) or _percentile(self.oof["combined"], np.array([p]))[0] < self.threshold:
                continue
            matrix = matrices[name]
            row = matrix.iloc[[i]] if isinstance(matrix, pd.DataFrame) else matrix[i]
            detail = part.detail(row)
            pct = _pct_label(p)
            if name == "image":
                words.append(f"image unlike training ({pct})")
            else:
                words.append(f"{name} ({pct}): {detail}" if detail else f"{name} ({pct})")
        return "; ".join(words)


def _pct_label(p: float) -> str:
    """0.9993 -> '99.9th pct'; 1.0 (beyond every training row's out-of-fold score) -> 'beyond
    every training row'."""
    if p >= 1.0:
        return "beyond every training row"
    value = math.floor(p * 1000) / 10
    return f"{value:g}th pct"


def _fit_parts(rows: np.ndarray, inputs: dict, numeric, categorical, config, rng) -> dict:
    parts = {}
    if inputs.get("image") is not None:
        parts["image"] = _image_part_class(config.image_method).fit(inputs["image"][rows], config, rng)
    if inputs.get("acquisition") is not None:
        parts["acquisition"] = _AcquisitionPart.fit(inputs["acquisition"].iloc[rows], config, rng)
    if inputs.get("metadata") is not None:
        parts["metadata"] = _MetadataPart.fit(inputs["metadata"].iloc[rows], numeric, categorical, config)
    return parts


def fit_applicability(
    stage_dir: Path | str,
    folds: Sequence[int] | np.ndarray,
    *,
    embeddings=None,
    identity: dict | None = None,
    cues=None,
    metadata: pd.DataFrame | None = None,
    numeric: Sequence[str] = (),
    categorical: Sequence[str] = (),
    config: ApplicabilityConfig | None = None,
) -> Applicability:
    """Fit the detector on a run's training rows and save it in `stage_dir`.

    All inputs hold the same rows in the same order (the run's `folds.csv` order):
    folds: (rows,) fold of each row (at least 2 distinct folds; rows of one group share one).
    embeddings: (rows, dim) or (rows, views, dim) from the run's feature store, with
        `identity` (the store's `reference()` or identity; recorded and checked at predict).
    cues: acquisition cues of the same images (`embed.acquisition.acquisition_cues`).
    metadata: DataFrame holding the `numeric` and `categorical` columns.
    At least one of embeddings, cues and (metadata with columns) is needed; a tabular-only run
    passes metadata alone.

    Returns the fitted `Applicability` (also saved: `applicability.json` + `.npz`). Raises
    RunError naming the input that is missing, misshapen or holds too few folds.
    """
    started = time.perf_counter()
    config = config or ApplicabilityConfig()
    folds = np.asarray(folds)
    n = len(folds)
    unique_folds = np.unique(folds)
    if len(unique_folds) < 2:
        raise RunError(
            f"fit_applicability: folds must hold at least 2 distinct folds (out-of-fold scores "
            f"set the threshold), got {list(unique_folds)}"
        )
    inputs: dict = {}
    if embeddings is not None:
        if identity is None:
            raise RunError(
                "fit_applicability: identity is required with embeddings (the feature store's "
                "reference()), so that the detector refuses vectors of other weights"
            )
        inputs["image"] = _embedding_matrix(embeddings, n, "fit_applicability")
    if cues is not None:
        inputs["acquisition"] = _cue_frame(cues, n, "fit_applicability")
    columns = list(numeric) + list(categorical)
    if metadata is not None and columns:
        inputs["metadata"] = _metadata_frame(metadata, columns, n, "fit_applicability")
    if not inputs:
        raise RunError(
            "fit_applicability: nothing to fit on; pass embeddings, cues, or metadata with "
            "numeric/categorical columns"
        )
    rng = np.random.default_rng(config.seed)
    oof_raw = {name: np.full(n, np.nan) for name in inputs}
    for fold in unique_folds:
        held = folds == fold
        parts = _fit_parts(np.flatnonzero(~held), inputs, numeric, categorical, config, rng)
        for name, part in parts.items():
            matrix = inputs[name]
            rows = matrix.iloc[np.flatnonzero(held)] if isinstance(matrix, pd.DataFrame) else matrix[held]
            oof_raw[name][held] = part.score(rows)
    oof = {name: np.sort(v[np.isfinite(v)]) for name, v in oof_raw.items()}
    oof_pct = {name: _percentile(oof[name], v) for name, v in oof_raw.items()}
    combined = _combine(oof_pct)
    oof["combined"] = np.sort(combined[np.isfinite(combined)])
    novelty = _percentile(oof["combined"], combined)
    oof["novelty"] = np.sort(novelty[np.isfinite(novelty)])
    threshold, marked = _threshold(novelty, config.marked_share)
    by_part = {
        name: float(np.mean(_percentile(oof["combined"], oof_pct[name][np.isfinite(oof_pct[name])])
                            >= threshold))
        for name in inputs
    }
    parts = _fit_parts(np.arange(n), inputs, numeric, categorical, config, rng)
    record = {
        "format": FORMAT,
        "config": asdict(config),
        "parts": list(parts),
        "rows": int(n),
        "folds": [int(f) if np.issubdtype(type(f), np.integer) else str(f) for f in unique_folds],
        "identity": (
            {k: v for k, v in identity_of(identity).items() if k in IDENTITY_FIELDS}
            if "image" in inputs else None
        ),
        "threshold": threshold,
        "marked_share": config.marked_share,
        "marked_share_out_of_fold": float(marked),
        "marked_by_part_out_of_fold": by_part,
        "fit_seconds": round(time.perf_counter() - started, 3),
    }
    detector = Applicability(record, parts, oof)
    _save(Path(stage_dir), detector)
    log.info("applicability: fitted %s on %d rows in %.1f s; threshold %.4f marks %.2f%% out of fold",
             "+".join(parts), n, record["fit_seconds"], threshold, 100 * marked)
    return detector


def _save(stage_dir: Path, detector: Applicability) -> None:
    """Arrays first, then the record naming their hash: a reader sees a matching pair or
    refuses a half-written one."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"oof_{k}": v for k, v in detector.oof.items()}
    states = {}
    for name, part in detector.parts.items():
        state, part_arrays = part.state()
        states[name] = state
        arrays.update(part_arrays)

    def write(f) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getvalue())

    atomic_write(stage_dir / ARRAYS, write)
    record = {**detector.record, "part_states": states,
              "arrays_sha256": sha256_file(stage_dir / ARRAYS)}
    detector.record = record
    atomic_write_json(stage_dir / RECORD, record)


_PART_CLASSES = {"image": _ImagePart, "acquisition": _AcquisitionPart, "metadata": _MetadataPart}


def load(stage_dir: Path | str) -> Applicability:
    """The detector saved in `stage_dir` by `fit_applicability`.

    Raises RunError naming the file when it is absent, of another format, or when the arrays do
    not match the record (a write interrupted between the two files): fit it again.
    """
    stage_dir = Path(stage_dir)
    record_path, arrays_path = stage_dir / RECORD, stage_dir / ARRAYS
    for path in (record_path, arrays_path):
        if not path.is_file():
            raise RunError(
                f"applicability detector: {str(path)!r} is missing; fit it with "
                "fuse.applicability.fit_applicability (invoke stack)"
            )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"applicability detector: cannot read {str(record_path)!r}: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise RunError(
            f"applicability detector: {str(record_path)!r} has format {found!r}, expected "
            f"{FORMAT!r}; fit it again"
        )
    if sha256_file(arrays_path) != record.get("arrays_sha256"):
        raise RunError(
            f"applicability detector: {str(arrays_path)!r} does not match the sha256 recorded in "
            f"{str(record_path)!r} (an interrupted or altered write); fit it again"
        )
    with np.load(arrays_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    parts = {}
    for name in record["parts"]:
        state = record["part_states"][name]
        cls = _image_part_class(state.get("method", "knn")) if name == "image" else _PART_CLASSES[name]
        parts[name] = cls.from_state(state, arrays)
    oof = {k[len("oof_"):]: v for k, v in arrays.items() if k.startswith("oof_")}
    return Applicability(record, parts, oof)
