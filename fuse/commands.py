"""One public function per command: each resolves names to paths and calls its stage.

`tasks.py` parses options and calls exactly one of these; tests and scripts can call them too.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from embed.pooled import DEFAULT_BLOCKS, DEFAULT_POOLING
from fuse.errors import RunError
from runfolder.paths import run_dir
from tabular.features import unknown_categories_said_once

# Each command imports its stages inside it: scoring a few images should not pay for the
# embedding pipeline, the folds' splitter or the training code (scikit-learn's model selection
# and metrics among them), which only the other commands use.
if TYPE_CHECKING:
    from embed.config import EmbedConfig, EmbedSummary

__all__ = [
    "DEFAULT_IMAGE_PCA",
    "embed_spec",
    "score_images",
    "stack_and_report",
    "train_fusion",
    "train_gbdt",
]

log = logging.getLogger(__name__)

# LightGBM on 64 PCA components of the embeddings + metadata beat the fusion MLP on HAM10000 lesions
# no model saw (measured when the default was set): the two then see the same information.
DEFAULT_IMAGE_PCA = 64


def embed_spec(
    spec,
    image_size: int = 224,
    views: int = 1,
    batch_size: int | None = None,
    device: str = "auto",
    weights_path: Path | str | None = None,
    shard: str = "0/1",
    num_workers: int | None = None,
    stores: Path | None = None,
    retry_failed: bool = False,
    blocks=DEFAULT_BLOCKS,
    pooling: str = DEFAULT_POOLING,
    variant: str = "auto",
    zoom: float | None = None,
) -> EmbedSummary:
    """`invoke embed`: every image a spec's metadata names into `artifacts/stores/<store>/`.

    `shard` "i/n" embeds only part i of n (0-based), so n workers can fill one store at once.
    `blocks` (e.g. "layer3,layer4") and `pooling` ("avg" or "gem") say which pooled backbone
    features the store keeps; each setting has its own store. `zoom` (e.g. 0.75) adds the centre
    zoom view (`embed.zoom`) as one more view per image; None (default) adds none. `variant`
    says how the backbone is computed (`embed.variants`; "auto" = the measured default for this
    machine), recorded in the store's identity.
    Rows without an image are refused before any model work (DataError naming them); images
    without a row are listed and skipped. Rerunning embeds only ids not yet stored, and ids whose
    image changed since it was stored.

    Returns:
        The store's `EmbedSummary` (embedded, already stored, failed ids with reasons).
    """
    from embed.config import EmbedConfig, parse_shard
    from embed.pipeline import build_store
    from embed.sources import open_source
    from embed.weights import ensure_weights
    from fuse.stores import store_path
    from tabular.spec import DatasetSpec, load_spec
    from tabular.validate import check_images, read_metadata

    shard_index, shard_count = parse_shard(shard)
    # The settings are checked before any file is read: a typo fails at once.
    config = EmbedConfig(
        image_size=image_size,
        views=views,
        zoom=zoom,
        blocks=blocks,
        pooling=pooling,
        variant=variant,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        shard_index=shard_index,
        shard_count=shard_count,
        retry_failed=retry_failed,
    )
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    if not spec.images:
        raise RunError(f"spec '{spec.name}' names no images (key 'images'); nothing to embed")
    frame = read_metadata(spec, require_target=False)
    source = open_source(spec.images)
    check_images(frame, spec, source.ids())
    weights = ensure_weights(Path(weights_path) if weights_path else None)
    store_dir = store_path(spec, weights, config, stores)
    config = _variant_of_existing_store(store_dir, config)
    summary = build_store(
        source, frame[spec.id].astype(str).tolist(), store_dir, spec.name, weights, config
    )
    print(f"store: {store_dir}")
    return summary


def _variant_of_existing_store(store_dir: Path, config: EmbedConfig) -> EmbedConfig:
    """With variant "auto", a store that exists keeps the variant it was built with: rerunning
    `invoke embed` to add images on another kind of CPU (whose default variant differs) then
    appends instead of being refused. An explicit --variant is left as asked (and refused by the
    store if it differs). A sharded build with only part manifests so far is a store too."""
    from embed.errors import EmbedError
    from embed.store_format import is_store, recorded_identity

    if config.variant != "auto" or not is_store(store_dir):
        return config
    try:
        recorded = recorded_identity(store_dir)["variant"]
    except EmbedError:
        return config  # the store's own checks will say what is wrong with it
    return replace(config, variant=str(recorded))


@unknown_categories_said_once()
def train_gbdt(
    spec,
    run,
    trials: int = 0,
    storage: str | None = None,
    image_pca: int | None = None,
    neg_ratio: float | None = None,
    store: Path | str | None = None,
    seeds=(0, 1, 2),
    config=None,
    trial_patience: int | None = None,
) -> dict:
    """`invoke train-gbdt`: LightGBM on metadata features, plus image PCA features when the spec
    has images.

    `image_pca` defaults to 64 components for a spec with images (its feature store must exist:
    `invoke embed --spec S`), 0 for a tabular-only spec. The store read is recorded in
    `gbdt/store.json`, and refused when another stage of the run was trained on other embeddings.
    `trial_patience`: early-stopping rounds of an Optuna trial's models (default: the ensembles'
    50). `config` (a `tabular.gbdt_config.GBDTConfig`) overrides `seeds`, `neg_ratio`,
    `trial_patience` and `image_pca`'s count.
    """
    from common.files import reporting_write_errors
    from fuse.stores import check_same_embeddings, open_for_training
    from runfolder.layout import RunLayout
    from tabular.run import open_run
    from tabular.spec import load_spec
    from tabular.train import fit_gbdt

    spec = load_spec(spec)
    if image_pca is None:
        image_pca = DEFAULT_IMAGE_PCA if spec.images else 0
    if image_pca < 0:
        raise RunError(f"--image-pca must be >= 0, got: {image_pca}")
    if trial_patience is not None and trial_patience < 1:
        raise RunError(f"--trial-patience must be >= 1, got: {trial_patience}")
    layout = RunLayout(run_dir(run))
    if trials:  # a storage that cannot be opened fails before the store is read
        from tabular.tuning_storage import check_storage

        check_storage(storage, layout.stage("gbdt") / "optuna.db")
    extra, reference = None, None
    if image_pca and not spec.images:
        raise RunError(
            f"--image-pca {image_pca}: spec '{spec.name}' has no images; use --image-pca 0"
        )
    # Opened once: its metadata is read and validated here, and fit_gbdt is handed the result.
    with reporting_write_errors("train-gbdt", layout.dir):  # a new run writes its folds
        opened_run = open_run(spec, layout.dir)
    if image_pca:
        ids = opened_run.frame[spec.id].astype(str).tolist()
        opened = open_for_training(spec, ids, store, run=layout)
        reference = opened.reference
        check_same_embeddings(
            layout, reference, f"feature store {str(opened.store.path)!r}", skip="gbdt"
        )
        extra = opened.mean_embeddings()
    metrics = fit_gbdt(
        spec,
        layout.dir,
        trials=trials,
        storage=storage,
        extra=extra,
        extra_components=image_pca,
        neg_ratio=neg_ratio,
        seeds=tuple(seeds),
        config=config,
        store_record=reference,
        run=opened_run,
        trial_patience=trial_patience,
    )
    return metrics


@unknown_categories_said_once()
def train_fusion(
    spec,
    run,
    store: Path | str | None = None,
    imbalance: str | None = None,
    max_epochs: int | None = None,
    members: int | None = None,
    config=None,
    mixup_alpha: float | None = None,
    ema_epochs: float | None = None,
    schedule: str | None = None,
) -> dict:
    """`invoke train-fusion`: the fusion MLP on the spec's feature store and metadata.

    Each option given replaces that field of `config` (default `FusionConfig()`); a bad value
    raises RunError naming it.
    """
    from fuse.fusion import train_fusion as fit
    from fuse.fusion.model import FusionConfig
    from tabular.spec import load_spec

    spec = load_spec(spec)
    config = config or FusionConfig()
    given = {
        "imbalance": imbalance,
        "max_epochs": max_epochs,
        "members": members,
        "mixup_alpha": mixup_alpha,
        "ema_epochs": ema_epochs,
        "schedule": schedule,
    }
    config = replace(config, **{name: value for name, value in given.items() if value is not None})
    return fit(spec, run_dir(run), store, config)


@unknown_categories_said_once()
def stack_and_report(run, sensitivity: float = 0.95, patient_ranks: bool | None = None) -> Path:
    """`invoke stack`: stack and blend the base models, choose the final one, write the report.

    `patient_ranks`: give the stack each base score's rank within its patient (specs with a
    patient column); None keeps `StackConfig`'s default.
    """
    from fuse.pages.report import write_report
    from fuse.stacking.stack import StackConfig, stack

    if not 0 < sensitivity < 1:
        raise RunError(f"--sensitivity must be in (0, 1), got: {sensitivity}")
    config = StackConfig()
    if patient_ranks is not None:
        config = StackConfig(patient_ranks=bool(patient_ranks))
    stack(run_dir(run), sensitivity=sensitivity, config=config)
    return write_report(run_dir(run), sensitivity=sensitivity)


@unknown_categories_said_once()
def score_images(
    run,
    images=None,
    out=None,
    metadata=None,
    output_format: str = "csv",
    batch_size: int | None = None,
    device: str = "auto",
    weights: Path | str | None = None,
    store: Path | str | None = None,
    prevalence: float | None = None,
    html: Path | str | None = None,
    page: bool = True,
    overlays: int = 20,
):
    """`invoke score`: score new images (and their metadata) with a trained run, or, for a
    tabular-only run (a spec without images), the rows of `metadata` alone (`images` optional).

    The triage page goes to `html`, by default beside `out` (`preds.csv` -> `preds.html`);
    `page=False` writes none. `overlays`: how many flagged lesions on it get a Grad-CAM saliency
    overlay (0 = none).
    """
    from fuse.scoring.score import score

    if out is None:
        raise RunError("--out: where to write the predictions (.csv or .parquet) is required")
    out = Path(out)
    html = (Path(html) if html else out.with_suffix(".html")) if page else None
    return score(
        run_dir(run),
        images=Path(images) if images else None,
        metadata=Path(metadata) if metadata else None,
        out=out,
        output_format=output_format,
        batch_size=batch_size,
        device=device,
        weights=weights,
        store=store,
        prevalence=prevalence,
        page=html,
        overlays=overlays,
    )
