"""The detector's image part: how far a row's embedding lies from the training images'.

- `ResidualImagePart` (the default, "pca-residual"): the norm of the l2-normalised embedding's
  residual outside the leading principal directions of the normalised training embeddings;
- `KnnImagePart` ("knn"): cosine distance to the k nearest training embeddings.

`image_part_class(method)` names the class of a method; both offer `fit`, `score`, `detail`,
`state` and `from_state`, as every part does.
"""

from __future__ import annotations

import logging

import numpy as np

from fuse.applicability.config import ApplicabilityConfig

__all__ = ["KnnImagePart", "ResidualImagePart", "image_part_class"]

log = logging.getLogger(__name__)

_CHUNK = 4096  # query rows per matrix product with the reference set


class KnnImagePart:
    """Cosine distance to the k nearest reference embeddings (l2-normalised, not centred)."""

    name = "image"

    def __init__(self, reference: np.ndarray, neighbours: int):
        self.reference = reference.astype(np.float16)
        self.neighbours = neighbours

    @property
    def dim(self) -> int:
        return self.reference.shape[1]

    @classmethod
    def fit(
        cls, x: np.ndarray, config: ApplicabilityConfig, rng: np.random.Generator
    ) -> KnnImagePart:
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
    def from_state(cls, record: dict, arrays: dict) -> KnnImagePart:
        return cls(arrays["image_reference"], int(record["neighbours"]))


class ResidualImagePart:
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
    def fit(
        cls, x: np.ndarray, config: ApplicabilityConfig, rng: np.random.Generator
    ) -> ResidualImagePart:
        keep = x
        if len(x) > config.max_reference:
            keep = x[np.sort(rng.choice(len(x), config.max_reference, replace=False))]
        keep = keep[np.isfinite(keep).all(axis=1)]
        dim = keep.shape[1]
        # Covariance accumulated chunk by chunk (dim x dim), then its top eigenvectors: the same
        # subspace as an SVD of the rows, at a fraction of the cost for many rows.
        mean = np.zeros(dim, dtype=np.float64)
        for start in range(0, len(keep), _CHUNK):
            mean += _unit(keep[start : start + _CHUNK].astype(np.float32)).sum(axis=0)
        mean /= max(len(keep), 1)
        scatter = np.zeros((dim, dim), dtype=np.float64)
        for start in range(0, len(keep), _CHUNK):
            block = _unit(keep[start : start + _CHUNK].astype(np.float32)) - mean
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
            "image_mean": self.mean,
            "image_components": self.components,
        }

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> ResidualImagePart:
        return cls(arrays["image_mean"], arrays["image_components"])


def _top_eigenvectors(
    matrix: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 30
) -> np.ndarray:
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


def image_part_class(method: str) -> type[ResidualImagePart] | type[KnnImagePart]:
    """The image part of `method`: "pca-residual", else (an older record) "knn"."""
    return ResidualImagePart if method == "pca-residual" else KnnImagePart


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)
