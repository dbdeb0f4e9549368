"""One public function per command: each resolves names to paths and calls its stage.

`tasks.py` parses options and calls exactly one of these; tests and scripts can call them too.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from embed.store import FeatureStore
from fuse.embedding import locate_store
from fuse.errors import RunError
from fuse.paths import run_dir
from tabular.spec import load_spec
from tabular.validate import read_metadata

log = logging.getLogger(__name__)

# LightGBM on 64 PCA components of the embeddings + metadata beat the fusion MLP on HAM10000 lesions
# no model saw (0.909 vs 0.897 ROC AUC, DESIGN.md): the two then see the same information.
DEFAULT_IMAGE_PCA = 64


def train_gbdt(spec, run, trials: int = 0, storage: str | None = None, image_pca: int | None = None,
               neg_ratio: float | None = None, store: Path | str | None = None, seeds=(0, 1, 2)) -> dict:
    """`invoke train-gbdt`: LightGBM on metadata features, plus image PCA features when the spec has images.

    `image_pca` defaults to 64 components for a spec with images (its feature store must exist:
    `invoke embed --spec S`), 0 for a tabular-only spec.
    """
    from tabular.train import fit_gbdt

    spec = load_spec(spec)
    if image_pca is None:
        image_pca = DEFAULT_IMAGE_PCA if spec.images else 0
    if image_pca < 0:
        raise RunError(f"--image-pca must be >= 0, got: {image_pca}")
    extra = None
    if image_pca:
        if not spec.images:
            raise RunError(f"--image-pca {image_pca}: spec '{spec.name}' has no images; use --image-pca 0")
        extra = mean_embeddings(spec, store)
    return fit_gbdt(spec, run_dir(run), trials=trials, storage=storage, extra=extra,
                    extra_components=image_pca, neg_ratio=neg_ratio, seeds=tuple(seeds))


def mean_embeddings(spec, store: Path | str | None = None) -> np.ndarray:
    """(n_rows, 2048) float32 embeddings of the spec's rows, averaged over views, in file order."""
    ids = read_metadata(spec, require_target=False)[spec.id].astype(str).tolist()
    features = FeatureStore.open(Path(store) if store else locate_store(spec))
    out = np.empty((len(ids), features.dim), dtype=np.float32)
    step = 8192  # bounded memory on ISIC-sized stores
    for start in range(0, len(ids), step):
        out[start:start + step] = features.read(ids[start:start + step]).astype(np.float32).mean(axis=1)
    return out


def train_fusion(spec, run, store: Path | str | None = None, imbalance: str | None = None,
                 max_epochs: int | None = None, config=None) -> dict:
    """`invoke train-fusion`: the fusion MLP on the spec's feature store and metadata."""
    from fuse.fusion import train_fusion as fit
    from fuse.model import FusionConfig

    spec = load_spec(spec)
    config = config or FusionConfig()
    if imbalance is not None:
        config = replace(config, imbalance=imbalance)
    if max_epochs is not None:
        config = replace(config, max_epochs=max_epochs)
    store_dir = Path(store) if store else locate_store(spec)
    return fit(spec, run_dir(run), store_dir, config)


def stack_and_report(run, sensitivity: float = 0.95) -> Path:
    """`invoke stack`: stack and blend the base models, choose the final one, write the report."""
    from fuse.report import write_report
    from fuse.stack import stack

    if not 0 < sensitivity < 1:
        raise RunError(f"--sensitivity must be in (0, 1), got: {sensitivity}")
    stack(run_dir(run), sensitivity=sensitivity)
    return write_report(run_dir(run), sensitivity=sensitivity)


def score_images(run, images, out, metadata=None, format: str = "csv", batch_size: int | None = None,
                 device: str = "auto", weights: Path | str | None = None, store: Path | str | None = None):
    """`invoke score`: score new images (and their metadata) with a trained run."""
    from fuse.score import score

    return score(run_dir(run), images=Path(images), metadata=Path(metadata) if metadata else None,
                 out=Path(out), format=format, batch_size=batch_size, device=device, weights=weights,
                 store=store)
