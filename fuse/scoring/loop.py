"""Embedding and predicting, overlapped: the rows' images are embedded chunk by chunk (in memory,
or through a `--store`), and each chunk is predicted in a worker thread while the next one embeds.

- `score_rows`: the loop; its `ScoredRows` holds every row's model outputs, which rows were
  embedded, the unreadable images, and the backbone it loaded (so that the triage page's overlays
  use the same one instead of loading and verifying the weights again);
- `patient_chunks`, `chunk_rows`: rows cut into chunks of whole patients (per-patient features
  need all of a patient's scored rows, and nothing else);
- with `--store`, the images are embedded into that feature store first (`embed.pipeline`), and a
  store that `invoke embed` made for a data set is refused (`SCORED_DATASET`).
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from embed.errors import EmbedError
from fuse.errors import RunError
from fuse.scoring.run_models import RunModels

if TYPE_CHECKING:
    from embed.backbone import PooledResNet

log = logging.getLogger(__name__)

# The data set name a store made by scoring records (followed by the image folder or file).
SCORED_DATASET = "scored images: "

__all__ = [
    "SCORED_DATASET",
    "ScoredRows",
    "chunk_rows",
    "patient_chunks",
    "rows_worth_predicting",
    "score_rows",
]


@dataclass
class ScoredRows:
    """What `score_rows` found, arrays in the scored frame's row order, shape (n,).

    p_gbdt, p_fusion, probability: the models' outputs (NaN where a row was not scored);
    reasons: the LightGBM stage's largest contributions per row, or None without `explain`;
    embedded: True where the row's image was embedded; failures: {id: reason} of unreadable
    images; seconds: the embedding loop's wall time; novelty: {column: array} of the
    applicability detector, or None for a run without it; backbone: the backbone loaded for
    in-memory embedding (None when nothing was embedded that way).
    """

    p_gbdt: np.ndarray
    p_fusion: np.ndarray
    probability: np.ndarray
    reasons: np.ndarray | None
    embedded: np.ndarray
    novelty: dict[str, np.ndarray] | None
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    backbone: PooledResNet | None = None


class _ChunkPredictor:
    """Predicts chunks of rows into a `ScoredRows` as their vectors arrive (run in the worker)."""

    def __init__(
        self,
        models: RunModels,
        frame: pd.DataFrame,
        spec,
        worth: np.ndarray,
        source,
        store: Path | None,
        explain: bool,
    ):
        n = len(frame)
        self.models, self.frame, self.worth, self.source, self.store = (
            models,
            frame,
            worth,
            source,
            store,
        )
        self.ids = frame[spec.id].tolist()
        self.vectors: dict[str, np.ndarray] = {}
        # A tabular-only run embeds nothing: its blocks are placeholders the models never read.
        identity = models.identity
        self.shape = (int(identity["views"]), int(identity["dim"])) if identity else (1, 1)
        p_gbdt, p_fusion, probability = (np.full(n, np.nan) for _ in range(3))
        self.scored = ScoredRows(
            p_gbdt=p_gbdt,
            p_fusion=p_fusion,
            probability=probability,
            reasons=np.full(n, "", dtype=object) if explain else None,
            embedded=np.zeros(n, dtype=bool),
            # The applicability detector's output per row (None: the run has no such stage).
            novelty=_empty_novelty(n) if models.applicability is not None else None,
        )

    def predict(self, rows: np.ndarray) -> None:
        models, scored, ids = self.models, self.scored, self.ids
        rows = rows[self.worth[rows]]
        if not len(rows):
            return
        block = np.zeros((len(rows), *self.shape), dtype=np.float16)
        done = np.zeros(len(rows), dtype=bool)
        for j, row in enumerate(rows):
            vector = self.vectors.pop(ids[row], None)
            if vector is not None:
                block[j], done[j] = vector, True
        scored.embedded[rows] = done
        batch = self.frame.iloc[rows].reset_index(drop=True)
        scored.p_gbdt[rows], scored.p_fusion[rows], scored.probability[rows] = models.predict(
            batch, block, done
        )
        if scored.reasons is not None:
            scored.reasons[rows] = models.reasons(batch, block, done)
        if scored.novelty is not None:
            cues = _chunk_cues(models, self.source, [ids[row] for row in rows], done, self.store)
            found = models.novelty(batch, block, done, cues)
            if found is None:  # the run has no detector (then `scored.novelty` is None too)
                return
            for column in scored.novelty:
                scored.novelty[column][rows] = found[column].to_numpy()


def score_rows(
    models: RunModels,
    frame: pd.DataFrame,
    spec,
    has_image: np.ndarray,
    source,
    weights,
    config,
    progress: bool,
    *,
    store: Path | None = None,
    images: Path | None = None,
    explain: bool = True,
) -> ScoredRows:
    """Embed the rows' images (or take them from `store`, embedding what it lacks) and predict,
    overlapping the two.

    Rows are cut into chunks of whole patients (`patient_chunks`) and images are embedded chunk
    after chunk; as soon as a chunk's images are done, a worker thread predicts it while the
    accelerator embeds the next.

    Returns:
        `ScoredRows`, arrays in `frame` row order.
    """
    from concurrent.futures import ThreadPoolExecutor

    ids = frame[spec.id].tolist()
    chunks = patient_chunks(frame, spec, chunk_rows(len(frame)))
    predictor = _ChunkPredictor(
        models,
        frame,
        spec,
        rows_worth_predicting(models, frame, spec, has_image),
        source,
        store,
        explain,
    )
    order = [ids[row] for rows in chunks for row in rows if has_image[row]]
    # Image rows up to and including chunk c, to know when a chunk's images are all through.
    ready_at = np.cumsum([int(has_image[rows].sum()) for rows in chunks])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as worker:
        pending: list[Any] = []
        next_chunk = 0

        def release(seen: int) -> None:
            nonlocal next_chunk
            while next_chunk < len(chunks) and ready_at[next_chunk] <= seen:
                # The worker runs in this thread's context, so what it collects (categories not
                # seen at fit, said once per column at the end) reaches the same collection.
                pending.append(
                    worker.submit(
                        contextvars.copy_context().run, predictor.predict, chunks[next_chunk]
                    )
                )
                next_chunk += 1

        release(0)  # chunks without any image
        if order:
            batches, predictor.scored.backbone = _batches(
                source, order, weights, config, progress, store, images
            )
            _embed(batches, predictor, len(order), progress, release)
        seconds = time.perf_counter() - started
        release(len(order))  # every chunk is predicted, whatever the loop yielded
        for future in pending:
            future.result()  # re-raises a prediction error here
    scored = predictor.scored
    scored.seconds = seconds
    if order:
        log.info(
            "embedded %d images (%d unreadable) in %.1f s (%.1f images/s, predictions overlapped)",
            len(order) - len(scored.failures),
            len(scored.failures),
            seconds,
            len(order) / max(seconds, 1e-9),
        )
    return scored


def _batches(
    source,
    order: list[str],
    weights,
    config,
    progress: bool,
    store: Path | None,
    images: Path | None,
):
    """(batches of (ids, vectors, failures), the backbone loaded for them or None with a store)."""
    if store is not None:
        return _stored_batches(
            source, order, weights, replace(config, progress=progress), store, images
        ), None
    from embed.backbone_cache import load_backbone_for
    from embed.config import resolve_device
    from embed.model_loop import embed_ids
    from embed.variants import resolve_variant

    # The eager variant's stages come from their TorchScript copy (`embed.backbone_cache`):
    # the same vectors without importing torchvision, which a few images wait for.
    variant = resolve_variant(config.variant, resolve_device(config.device), config.amp)
    backbone = load_backbone_for(
        weights, variant, "cpu", blocks=config.blocks, pooling=config.pooling
    )
    return embed_ids(source, order, backbone, config), backbone


def _embed(batches, predictor: _ChunkPredictor, total: int, progress: bool, release) -> None:
    """Collect the vectors of `batches` into `predictor`, releasing each chunk once it is in."""
    from tqdm.auto import tqdm

    seen = 0
    bar = tqdm(
        total=total,
        unit="img",
        desc="score",
        dynamic_ncols=True,
        disable=not progress,
        mininterval=1.0,
    )
    try:
        for batch_ids, batch, batch_failures in batches:
            for image_id, vector in zip(batch_ids, batch, strict=True):
                predictor.vectors[str(image_id)] = vector
            predictor.scored.failures.update(batch_failures)
            seen += len(batch_ids) + len(batch_failures)
            bar.update(len(batch_ids) + len(batch_failures))
            release(seen)
    finally:
        bar.close()


def _empty_novelty(n: int) -> dict[str, np.ndarray]:
    return {
        "novelty": np.full(n, np.nan),
        "unlike_training": np.zeros(n, dtype=bool),
        "reason": np.full(n, "", dtype=object),
    }


def _chunk_cues(
    models: RunModels, source, chunk_ids: list[str], done: np.ndarray, store: Path | None
):
    """Acquisition cues of a chunk's embedded images (NaN rows for the others), or None when the
    detector has no acquisition part. With `--store` they are cached beside it
    (`embed.cue_cache`), so rescoring the same images measures none."""
    from embed.acquisition import CUE_NAMES, acquisition_cues

    if models.applicability is None or "acquisition" not in models.applicability.parts:
        return None
    if source is None:
        return _nan_cues(chunk_ids)
    measured = [i for i, d in zip(chunk_ids, done, strict=True) if d]
    frame = pd.DataFrame(np.nan, index=pd.Index(chunk_ids), columns=list(CUE_NAMES))
    if measured:
        if store is not None:
            from embed.cue_cache import cached_cues
            from embed.store import FeatureStore

            table = cached_cues(
                store, source, measured, FeatureStore.open(store).fingerprints(measured)
            )
        else:
            table = acquisition_cues(source, measured)
        frame.loc[measured] = table.frame.to_numpy()
    return frame.reset_index(drop=True)


def _nan_cues(chunk_ids: list[str]) -> pd.DataFrame:
    from embed.acquisition import CUE_NAMES

    return pd.DataFrame(np.nan, index=pd.RangeIndex(len(chunk_ids)), columns=list(CUE_NAMES))


def rows_worth_predicting(
    models: RunModels, frame: pd.DataFrame, spec, has_image: np.ndarray
) -> np.ndarray:
    """Mask of the rows the models need to see, shape (n,).

    When both base models need the image (the fusion MLP, and a LightGBM stage with image
    features), a row without an image gets no score at all; it is still needed to encode the other
    rows of its patient (per-patient features), but a patient none of whose rows has an image is
    skipped whole. 100,000 metadata rows beside a folder of 10 images then cost the 10 images'
    patients, not 100,000 rows of LightGBM, SHAP and MLP passes whose results would be dropped.
    """
    n = len(frame)
    if not models.needs_images or not models.gbdt.uses_images or has_image.all():
        return np.ones(n, dtype=bool)
    if not spec.patient or spec.patient not in frame.columns:
        return has_image.copy()
    patients = frame[spec.patient]
    with_image = set(patients[has_image].dropna())
    return has_image | patients.isin(with_image).to_numpy()


def _stored_batches(
    source,
    order: list[str],
    weights,
    config,
    store: Path,
    images: Path | None,
    rows_per_read: int = 4096,
):
    """(ids, vectors, failures) in blocks, from `store` after embedding into it what it lacks.

    The store is filled by `embed.pipeline.build_store` (crash-safe, resumable); images it
    recorded as unreadable before are reported with the reason recorded then.
    """
    from embed.errors import StoreMismatchError
    from embed.pipeline import build_store
    from embed.store import FeatureStore

    dataset = f"{SCORED_DATASET}{images}"
    _keep_provenance(store, images)
    try:
        summary = build_store(source, order, store, dataset, weights, config)
    except StoreMismatchError as error:
        raise RunError(
            f"--store {store}: {error}. For this run, pass a new --store folder"
        ) from error
    log.info(
        "store %s: %d embedded now, %d already there, %d unreadable",
        store,
        summary.embedded,
        summary.skipped_existing,
        len(summary.failed) + len(summary.previously_failed),
    )
    failures = {**summary.previously_failed, **summary.failed}
    readable = [i for i in order if i not in failures]
    stored = FeatureStore.open(store)
    for start in range(0, len(readable), rows_per_read):
        block = readable[start : start + rows_per_read]
        yield block, stored.read(block), {}
    yield [], np.empty((0, stored.views, stored.dim), dtype=np.float16), failures


def _keep_provenance(store: Path, images) -> None:
    """Refuse a `--store` that `invoke embed` built for a data set (a training store): embedding
    scored images into it would rewrite its manifest's data set and source, and the store, which
    stages record as what they were trained on, would then claim to be made of scored images.
    Refusing keeps it as it was (recording additions beside its provenance would have its readers
    tell training rows from scored ones: a second meaning for one store). A store that scoring
    made (data set "scored images: <folder>") takes further images, as before.

    Raises:
        RunError: the store records a data set that scoring did not make (names it and its source).
    """
    from embed.store import FeatureStore
    from embed.store_format import is_store

    if not is_store(store):
        return  # a new store, or one that never finished its first shard
    try:
        manifest = FeatureStore.open(store).manifest
    except EmbedError as error:
        raise RunError(f"--store {store}: {error}") from error
    recorded = manifest.get("dataset")
    if recorded is None or str(recorded).startswith(SCORED_DATASET):
        return
    raise RunError(
        f"--store {store} is the feature store of data set {recorded!r} (from "
        f"{manifest.get('source', '?')}), "
        f"made by `invoke embed`; embedding {images} into it would rewrite what it records it was "
        "built "
        "from. Pass a new --store folder for scored images"
    )


def chunk_rows(n: int) -> int:
    """Rows per prediction chunk: about 16 chunks, each at least 256 and at most 16384 rows."""
    return int(min(16_384, max(256, math.ceil(n / 16))))


def patient_chunks(frame: pd.DataFrame, spec, size: int) -> list[np.ndarray]:
    """Row positions in chunks of about `size` rows, each holding whole patients.

    A row without a patient is a patient of its own. Without a patient column rows are
    independent and chunks follow the row order.
    """
    n = len(frame)
    if not spec.patient or spec.patient not in frame.columns:
        return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]
    codes, _ = pd.factorize(frame[spec.patient], use_na_sentinel=True)
    lone = codes < 0
    codes = codes.copy()
    codes[lone] = codes.max(initial=-1) + 1 + np.arange(int(lone.sum()))
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    boundaries = np.flatnonzero(np.diff(sorted_codes)) + 1  # where a new patient starts
    chunks, start = [], 0
    for boundary in [*boundaries.tolist(), n]:
        if boundary - start >= size or boundary == n:
            if boundary > start:
                chunks.append(order[start:boundary])
            start = boundary
    return chunks
