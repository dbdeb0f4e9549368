"""`invoke embed`: a spec's images into its feature store, and finding that store again later.

The spec (tabular) says which ids a data set has and where its images are; the embedding side
(embed) knows nothing of specs. This module joins the two.
"""

from __future__ import annotations

import logging
from pathlib import Path

from embed.pipeline import EmbedConfig, build_store, parse_shard
from embed.sources import open_source
from embed.store import store_name
from embed.weights import WeightsInfo, ensure_weights
from fuse.errors import RunError
from fuse.paths import stores_root
from tabular.spec import DatasetSpec, load_spec
from tabular.validate import check_images, read_metadata

log = logging.getLogger(__name__)


def embed_spec(spec, image_size: int = 224, views: int = 1, batch_size: int | None = None, device: str = "auto",
               weights_path: Path | str | None = None, shard: str = "0/1",
               num_workers: int | None = None, stores: Path | None = None, retry_failed: bool = False):
    """Embed every image a spec's metadata names into `artifacts/stores/<store>/`.

    `shard` "i/n" embeds only part i of n (0-based), so n workers can fill one store at once.
    Rows without an image are refused before any model work (DataError naming them); images
    without a row are listed and skipped. Rerunning embeds only ids not yet stored.

    Returns:
        The store's `EmbedSummary` (embedded, already stored, failed ids with reasons).
    """
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    if not spec.images:
        raise RunError(f"spec '{spec.name}' names no images (key 'images'); nothing to embed")
    shard_index, shard_count = parse_shard(shard)
    frame = read_metadata(spec, require_target=False)
    source = open_source(spec.images)
    check_images(frame, spec, source.ids())
    weights = ensure_weights(Path(weights_path) if weights_path else None)
    config = EmbedConfig(image_size=image_size, views=views, batch_size=batch_size, device=device,
                         num_workers=num_workers, shard_index=shard_index, shard_count=shard_count,
                         retry_failed=retry_failed)
    store_dir = store_path(spec, weights, image_size, views, stores)
    summary = build_store(source, frame[spec.id].astype(str).tolist(), store_dir, spec.name, weights, config)
    print(f"store: {store_dir}")
    return summary


def store_path(spec: DatasetSpec, weights: WeightsInfo, image_size: int, views: int,
               stores: Path | None = None) -> Path:
    """Where the store for (data set, weights, image size, views) lives."""
    return (stores or stores_root()) / store_name(spec.name, weights.sha256, image_size, views)


def locate_store(spec: DatasetSpec, weights: WeightsInfo | None = None, stores: Path | None = None) -> Path:
    """The spec's feature store for the current weights.

    Prefers the plain 224 px single-view store when several exist; otherwise there must be exactly
    one. Raises RunError naming the command that makes one, or the candidates to choose from.
    """
    weights = weights or ensure_weights()
    root = stores or stores_root()
    preferred = root / store_name(spec.name, weights.sha256, 224, 1)
    # Same data set and weights, any image size or views; a store has at least one manifest
    # (`manifest.json`, or the part manifests of a sharded build still in progress).
    prefix = preferred.name.removesuffix("224px-1v")
    candidates = sorted(p for p in root.glob(prefix + "*") if any(p.glob("manifest*.json")))
    if not candidates:
        raise RunError(
            f"no feature store for data set '{spec.name}' with weights {weights.sha256[:12]} under {root}; "
            f"make it with `invoke embed --spec {spec.source or spec.metadata}`"
        )
    if preferred in candidates:
        return preferred
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise RunError(f"several feature stores for '{spec.name}': {names}; choose one with --store")
    return candidates[0]
