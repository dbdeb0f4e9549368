"""Scoring new lesions with a trained run: images (and their metadata) in, one row per lesion out.

One loop, as timm's `inference.py`: check the output path, load the run's models once
(`fuse.scoring.run_models.RunModels`, which also says which embeddings the run needs), read the rows
(`fuse.scoring.rows`), embed the images chunk by chunk and predict each chunk in a worker thread
while the next one embeds, then write the predictions (`fuse.scoring.predictions`).

Rows that cannot be fully scored are kept, never dropped:

- a row whose image is missing or unreadable: `probability` and `p_fusion` are empty (NaN), because
  both final models (stack and blend) need the fusion MLP and the fusion MLP needs the image;
  `p_gbdt` is still given when the LightGBM stage uses metadata only (it is empty when that stage
  also uses image features); `flagged` is empty; `error` says why. Guessing a final probability
  from metadata alone would put a number of another model on the final model's scale.
- an image without a metadata row (or no metadata file at all): scored with every metadata value
  missing (LightGBM routes missing values, the MLP uses its missing indicators), and `error` says
  so, although the row has a probability.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import preview
from embed.config import embedding_identity
from embed.errors import EmbedError, StoreMismatchError
from embed.identity import check_identity
from fuse.applicability.ranges import outside_training
from fuse.errors import RunError
from fuse.scoring.predictions import check_out, check_page, write_predictions
from fuse.scoring.rows import NO_METADATA, metadata_rows, read_scoring_metadata, scoring_rows
from fuse.scoring.run_models import RunModels
from fuse.stacking.calibration import shift_prevalence

log = logging.getLogger(__name__)

# The data set name a store made by scoring records (followed by the image folder or file).
SCORED_DATASET = "scored images: "

__all__ = ["NO_METADATA", "chunk_rows", "patient_chunks", "read_scoring_metadata", "score"]


def score(
    run_dir: Path | str,
    images: Path | str | None,
    metadata: Path | str | None,
    out: Path | str,
    output_format: str = "csv",
    batch_size: int | None = None,
    device: str = "auto",
    *,
    weights: Path | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    store: Path | str | None = None,
    prevalence: float | None = None,
    explain: bool = True,
    page: Path | str | None = None,
    overlays: int = 20,
) -> pd.DataFrame:
    """Score the images in `images` (with their metadata rows), or for a tabular-only run the
    rows of `metadata` alone, and write the predictions.

    Args:
        run_dir: a run with `gbdt/`, `fusion/` and `stack/` (see `invoke stack`), or a
            tabular-only run (a spec without images: `gbdt/` and `stack/`, LightGBM final).
        images: a folder of `<id>.jpg|.jpeg|.png`, or an HDF5 file keyed by id. Optional for a
            tabular-only run, where it only supplies the triage page's thumbnails.
        metadata: CSV with the run's id column and feature columns (no target needed; extra
            columns, train-only ones included, are ignored). None = images only; required for
            a tabular-only run.
        out: the predictions file: `.csv`, or `.parquet` for Parquet (its folder is created).
            Checked before any work: never one of the inputs, never a folder.
        output_format: "csv" (id, probability, p_gbdt, p_fusion, flagged, error) or "kaggle"
            (`isic_id,target` with target = probability, the ISIC 2024 submission format; a row
            that could not be scored gets the operating threshold, logged by id).
        batch_size: images per forward pass (None: 256 on CUDA, 32 on CPU).
        device: "auto", "cpu" or "cuda".
        weights: the backbone weights file (default: the cached weights, `invoke weights`); its
            sha256 must be the one the run was trained with.
        num_workers: image decoding processes (default: chosen for the device).
        progress: show a tqdm bar (images/s).
        store: a feature store folder to embed the images into first (made if absent). A rerun
            after an interruption embeds only the images not stored yet, scoring the same images
            with another run of the same weights embeds nothing, and an image that changed since
            it was stored is embedded again. None: embed in memory, predicting while the next
            images are embedded.
        prevalence: the share of malignant lesions where the images come from, when it differs
            from the training data's: `probability` (and the operating threshold with it, so the
            same lesions are flagged) is moved to that prior, and a `prevalence` column records it.
        explain: add the `reasons` column (the LightGBM stage's largest metadata contributions,
            from its SHAP values).
        page: also write the triage page (one self-contained HTML file) there: flagged lesions
            first, with thumbnails, scores and reasons. Checked like `out`.
        overlays: with `page`, how many flagged lesions (highest probability first) get a Grad-CAM
            saliency overlay of the fusion MLP on the page (`fuse.scoring.saliency`; a backward pass
            each); 0 = none.

    Returns:
        The predictions in the "csv" layout, one row per input row: metadata rows in file order,
        then images without a metadata row in the image source's order: the id, probability,
        p_gbdt, p_fusion (not for a tabular-only run), flagged, reasons (with `explain`),
        in_training (the id was a training row of the run: warned), out_of_range ("" or the
        values far outside the training range, `fuse.applicability.ranges`; absent for runs stacked before the
        ranges were recorded), unlike_training / novelty / novelty_reason (the run's
        applicability detector, `fuse.applicability.stage`, joined with the range check: empty
        for rows not scored and for runs stacked before the detector existed; the count is
        warned), error (and prevalence when given). Metadata rows without an
        image are not passed to the models when no score could come of them (see
        `_rows_worth_predicting`).

    Raises:
        RunError: `out` is an input or a folder or has an unknown extension; no run; a stage is
            missing (names the command); `output_format` unknown; `images` or `metadata`
            missing (`images` None for a run that reads images, `metadata` None for a
            tabular-only one, which also refuses `store`); metadata rows and images that share
            no id; `store` made by `invoke embed` for a data set (its provenance is kept); the metadata lacks the id column or a feature column, repeats an id, or holds
            text in a numeric column; the weights, preprocessing, image size or views differ from
            the run's (names the field); `store` was made with other settings (names the field).
        StoreMismatchError: two stages of the run were trained on different embeddings.
    """
    started = time.perf_counter()
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise RunError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(overlays, bool) or not isinstance(overlays, int) or overlays < 0:
        raise RunError(f"overlays: expected an integer >= 0, got {overlays!r}")
    inputs = {"--images": images, "--metadata": metadata, "--run": run_dir, "--store": store, "--weights": weights}
    out = check_out(out, output_format, inputs)
    if page is not None:
        page = check_page(page, {**inputs, "--out": out})
    images = Path(images) if images is not None else None
    if images is not None and not images.exists():
        raise RunError(f"images: {images} does not exist (expected a folder of <id>.jpg|.jpeg|.png or an .hdf5 file)")

    from embed.config import resolve_device

    models = RunModels.load(run_dir, resolve_device(device))
    trained_at = _training_prevalence(models, prevalence)
    spec = models.run_spec
    if models.needs_images:
        source, frame, errors = _image_rows(models, images, metadata)
        weights_info, config = _embedding_setup(models.identity, weights, batch_size, device, num_workers)
    else:
        source, frame, errors = _metadata_rows(models, images, metadata, store)
        weights_info = config = None
    ids = frame[spec.id].tolist()
    available = set(source.ids()) if source is not None and models.needs_images else set()
    has_image = np.array([i in available for i in ids], dtype=bool)
    in_training = _in_training(models, ids)
    unusual, unusual_text = _outside_training(models, frame, spec)

    p_gbdt, p_fusion, probability, reasons, embedded, failures, seconds, novelty = _score_rows(
        models, frame, spec, has_image, source, weights_info, config, progress,
        store=Path(store) if store is not None else None, images=images, explain=explain)
    for image_id, reason in failures.items():
        errors[image_id] = f"image unreadable: {reason}"
    threshold = models.threshold
    flagged = pd.array([None if math.isnan(p) else bool(p >= threshold) for p in probability], dtype="boolean")
    if prevalence is not None:
        # A monotone map of both: the flagged lesions stay the same.
        probability = shift_prevalence(probability, trained_at, prevalence)
        threshold = float(shift_prevalence(np.array([threshold]), trained_at, prevalence)[0])
    error = [_error_text(i, errors, embedded[n] or not models.needs_images, p_gbdt[n]) for n, i in enumerate(ids)]
    applicability = _applicability_columns(models, novelty, probability, unusual, unusual_text)
    result = pd.DataFrame({
        spec.id: ids,
        "probability": probability,
        "p_gbdt": p_gbdt,
        **({"p_fusion": p_fusion} if models.needs_images else {}),
        "flagged": flagged,
        **({"reasons": reasons} if reasons is not None else {}),
        "in_training": in_training,
        # Rows with a value far outside its column's training range (`fuse.applicability.ranges`): "" or which.
        **({"out_of_range": unusual_text} if unusual is not None else {}),
        **applicability,
        "error": error,
    })
    if prevalence is not None:
        result["prevalence"] = prevalence
    write_predictions(result, out, output_format, spec.id, threshold)
    if page is not None:
        pictures = {}
        if overlays and models.needs_images:
            from fuse.scoring.saliency import saliency_overlays

            flagged_rows = result[result["flagged"].fillna(False).to_numpy(dtype=bool)]
            shown = flagged_rows.sort_values("probability", ascending=False, kind="stable")[spec.id]
            if len(shown):
                pictures = saliency_overlays(models, frame, shown.head(overlays).tolist(), source,
                                             weights_info, device)
        _write_page(result, page, models, frame, spec, source, out, threshold, prevalence, pictures)
    total = time.perf_counter() - started
    result.attrs.update({
        "seconds": total,
        "images_per_s": len(ids) / total if total > 0 else math.nan,
        "embedding_seconds": seconds,
        "final": models.final.name,
        "threshold": threshold,
    })
    log.info(
        "scored %d rows (%d flagged, %d with an error) in %.1f s (%.1f rows/s end to end); final model %s, "
        "threshold %.4g; wrote %s",
        len(ids), int(result["flagged"].sum()), int((result["error"] != "").sum()), total,
        result.attrs["images_per_s"], models.final.name, threshold, out,
    )
    return result


def _image_rows(models: RunModels, images: Path | None, metadata):
    """(source, rows, {id: error}) for a run whose final model reads images.

    Raises:
        RunError: no `images`; neither images nor metadata rows; metadata rows and images that
            share no id.
    """
    from embed.sources import open_source

    spec = models.run_spec
    if images is None:
        raise RunError(f"--images: run {models.run.dir} reads images (its final model needs the fusion MLP); "
                       "pass --images DIR|FILE.hdf5. Only a tabular-only run (a spec without images) "
                       "scores --metadata alone")
    try:
        source = open_source(images)
    except EmbedError as error:
        raise RunError(f"images: {error}") from error
    image_ids = [str(i) for i in source.ids()]
    frame, errors = scoring_rows(metadata, spec, image_ids, images)
    if frame.empty:
        raise RunError(f"images: {images} holds no image (<id>.jpg|.jpeg|.png files or HDF5 keys) and "
                       "no metadata rows were given; nothing to score")
    if metadata is not None:
        _require_common_ids(frame, spec, errors, image_ids, images, Path(metadata))
    return source, frame, errors


def _require_common_ids(frame: pd.DataFrame, spec, errors: dict[str, str], image_ids: list[str],
                        images: Path, metadata: Path) -> None:
    """Refuse metadata rows none of which has an image: every row would end in an error (the
    wrong folder, or another data set's ids), and the scoring would look like it succeeded."""
    listed = [i for i in frame[spec.id] if errors.get(i) != NO_METADATA]
    if not listed:
        return
    available = set(image_ids)
    if any(i in available for i in listed):
        return
    raise RunError(
        f"--metadata {metadata} and --images {images} have no id in common ({len(listed)} metadata "
        f"row(s), e.g. {preview(listed, 3)}; {len(image_ids)} image(s), e.g. {preview(image_ids, 3)}): "
        f"no row could be scored. Check that --images is the folder of these lesions and that the "
        f"column '{spec.id}' holds the image file names without extension"
    )


def _metadata_rows(models: RunModels, images: Path | None, metadata, store):
    """(source or None, rows, {id: error}) for a tabular-only run: the metadata rows alone.

    Raises:
        RunError: no `metadata`; a `store` given (a tabular-only run embeds nothing).
    """
    run = models.run.dir
    if metadata is None:
        raise RunError(f"--metadata: run {run} is tabular-only (its spec names no images; LightGBM on "
                       "metadata is its final model); pass --metadata CSV with the rows to score")
    if store is not None:
        raise RunError(f"--store {store}: run {run} is tabular-only and embeds no image; omit --store")
    source = None
    if images is not None:
        from embed.sources import open_source

        log.warning("run %s is tabular-only: the images in %s are not scored, only shown on the triage page",
                    run, images)
        try:
            source = open_source(images)
        except EmbedError as error:
            raise RunError(f"images: {error}") from error
    frame = metadata_rows(Path(metadata), models.run_spec)
    if frame.empty:
        raise RunError(f"--metadata {metadata}: holds no row; nothing to score")
    return source, frame, {}


def _in_training(models: RunModels, ids: list[str]) -> np.ndarray:
    """True where the id was one of the run's training rows (logged: those scores are in-sample)."""
    training = models.training_ids()
    mask = np.array([i in training for i in ids], dtype=bool)
    if mask.any():
        seen = [i for i, m in zip(ids, mask, strict=True) if m]
        log.warning("%d of the %d scored id(s) were in run %s's training data: their scores are in-sample "
                    "(better than the out-of-fold figures promise), marked in column in_training: %s",
                    len(seen), len(ids), models.run.dir.name, preview(seen))
    return mask


def _outside_training(models: RunModels, frame: pd.DataFrame, spec):
    """(mask, text per row) of rows with a value far outside the training range, or (None, None)
    for a run that did not record its ranges. Logs each column with the ids."""
    if models.ranges is None:
        return None, None
    mask, text, by_column = outside_training(frame, models.ranges)
    ids = frame[spec.id].to_numpy()
    for column, rows in by_column.items():
        bounds = models.ranges[column]
        log.warning("column '%s': %d row(s) hold values far outside the training range %s..%s, so their "
                    "scores extrapolate (marked in column out_of_range): %s", column, int(rows.sum()),
                    bounds["min"], bounds["max"], preview(ids[rows].tolist()))
    return mask, text


def _write_page(result: pd.DataFrame, page: Path, models: RunModels, frame: pd.DataFrame, spec, source,
                out: Path, threshold: float, prevalence: float | None,
                overlays: dict[str, bytes] | None = None) -> None:
    """The triage page of `result`: thumbnails read from the image source for the rows shown."""
    from fuse.pages.report import read_operating_point
    from fuse.pages.triage import write_triage_page

    def thumbnail(image_id: str) -> bytes | None:
        if source is None:  # a tabular-only run scored without --images
            return None
        try:
            return source.read_bytes(image_id)
        except Exception:  # noqa: BLE001 - a page shows a placeholder for any unreadable image
            return None

    patient = frame[spec.patient].reset_index(drop=True) if spec.patient and spec.patient in frame.columns else None
    page.parent.mkdir(parents=True, exist_ok=True)
    write_triage_page(result, page, id_column=spec.id, threshold=threshold, run_name=models.run.dir.name,
                      thumbnail=thumbnail, patient=patient, csv_name=out.name, prevalence=prevalence,
                      overlays=overlays, operating_point=read_operating_point(models.run.dir))
    log.info("triage page: %s", page)


def _training_prevalence(models: RunModels, prevalence: float | None) -> float:
    """The prevalence the run's probabilities hold at; RunError when `prevalence` cannot apply."""
    if prevalence is None:
        return math.nan
    calibrator = models.final.calibrator
    if calibrator is None:
        raise RunError(f"--prevalence: run {models.run.dir} was stacked before calibration, so its "
                       "scores are not probabilities to move; rerun `invoke stack --run R` first")
    shift_prevalence(np.array([0.5]), calibrator.prevalence, prevalence)  # checks both are in (0, 1)
    log.info("probabilities moved from the training prevalence %.4g to %.4g", calibrator.prevalence, prevalence)
    return calibrator.prevalence


def _embedding_setup(identity: dict, weights, batch_size: int | None, device: str, num_workers):
    """Weights and embedding settings for new images, checked against the run's identity."""
    from embed.config import config_for_identity
    from embed.weights import ensure_weights

    info = ensure_weights(Path(weights) if weights else None)
    config = config_for_identity(identity, batch_size=batch_size, device=device, num_workers=num_workers,
                                 progress=False)
    try:
        check_identity(embedding_identity(info, config), identity, "scoring", "the run's models were trained on",
                       hint=f"weights at hand: {info.path}; pass --weights with the file the run was trained with")
    except StoreMismatchError as error:
        raise RunError(str(error)) from error
    return info, config


# ----------------------------------------------------------------- embedding and predicting


def _score_rows(models: RunModels, frame: pd.DataFrame, spec, has_image: np.ndarray, source,
                weights, config, progress: bool, *, store: Path | None = None,
                images: Path | None = None, explain: bool = True):
    """Embed the rows' images (or take them from `store`, embedding what it lacks) and predict,
    overlapping the two.

    Rows are cut into chunks of whole patients (per-patient features need all of a patient's
    scored rows, and nothing else) and images are embedded chunk after chunk; as soon as a
    chunk's images are done, a worker thread predicts it while the accelerator embeds the next.

    Returns (p_gbdt, p_fusion, probability, reasons, embedded mask, {id: reason} of unreadable
    images, seconds of the embedding loop, {column: array} of the applicability detector or
    None), arrays in `frame` row order.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from embed.backbone import load_backbone
    from embed.model_loop import embed_ids

    n = len(frame)
    ids = frame[spec.id].tolist()
    chunks = patient_chunks(frame, spec, chunk_rows(n))
    p_gbdt, p_fusion, probability = (np.full(n, np.nan) for _ in range(3))
    # The applicability detector's output per row (None: the run has no such stage).
    novelty = _empty_novelty(n) if models.applicability is not None else None
    reasons = np.full(n, "", dtype=object) if explain else None
    embedded = np.zeros(n, dtype=bool)
    vectors: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    # A tabular-only run embeds nothing: its blocks are placeholders the models never read.
    shape = (int(models.identity["views"]), int(models.identity["dim"])) if models.identity else (1, 1)
    worth = _rows_worth_predicting(models, frame, spec, has_image)

    def predict(rows: np.ndarray) -> None:
        rows = rows[worth[rows]]
        if not len(rows):
            return
        block = np.zeros((len(rows), *shape), dtype=np.float16)
        done = np.zeros(len(rows), dtype=bool)
        for j, row in enumerate(rows):
            vector = vectors.pop(ids[row], None)
            if vector is not None:
                block[j], done[j] = vector, True
        embedded[rows] = done
        batch = frame.iloc[rows].reset_index(drop=True)
        p_gbdt[rows], p_fusion[rows], probability[rows] = models.predict(batch, block, done)
        if reasons is not None:
            reasons[rows] = models.reasons(batch, block, done)
        if novelty is not None:
            cues = _chunk_cues(models, source, [ids[row] for row in rows], done, store)
            found = models.novelty(batch, block, done, cues)
            for column in novelty:
                novelty[column][rows] = found[column].to_numpy()

    order = [ids[row] for rows in chunks for row in rows if has_image[row]]
    # Image rows up to and including chunk c, to know when a chunk's images are all through.
    ready_at = np.cumsum([int(has_image[rows].sum()) for rows in chunks])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as worker:
        pending = []
        next_chunk, seen = 0, 0

        def release() -> None:
            nonlocal next_chunk
            while next_chunk < len(chunks) and ready_at[next_chunk] <= seen:
                # The worker runs in this thread's context, so what it collects (categories not
                # seen at fit, said once per column at the end) reaches the same collection.
                pending.append(worker.submit(contextvars.copy_context().run, predict, chunks[next_chunk]))
                next_chunk += 1

        release()  # chunks without any image
        if order:
            batches = (embed_ids(source, order, load_backbone(weights, "cpu", blocks=config.blocks, pooling=config.pooling), config)
                       if store is None else
                       _stored_batches(source, order, weights, replace(config, progress=progress), store, images))
            bar = tqdm(total=len(order), unit="img", desc="score", dynamic_ncols=True,
                       disable=not progress, mininterval=1.0)
            try:
                for batch_ids, batch, batch_failures in batches:
                    for image_id, vector in zip(batch_ids, batch, strict=True):
                        vectors[str(image_id)] = vector
                    failures.update(batch_failures)
                    seen += len(batch_ids) + len(batch_failures)
                    bar.update(len(batch_ids) + len(batch_failures))
                    release()
            finally:
                bar.close()
        seconds = time.perf_counter() - started
        seen = len(order)  # every chunk is predicted, whatever the loop yielded
        release()
        for future in pending:
            future.result()  # re-raises a prediction error here
    if order:
        log.info("embedded %d images (%d unreadable) in %.1f s (%.1f images/s, predictions overlapped)",
                 len(order) - len(failures), len(failures), seconds, len(order) / max(seconds, 1e-9))
    return p_gbdt, p_fusion, probability, reasons, embedded, failures, seconds, novelty


def _empty_novelty(n: int) -> dict[str, np.ndarray]:
    return {"novelty": np.full(n, np.nan), "unlike_training": np.zeros(n, dtype=bool),
            "reason": np.full(n, "", dtype=object)}


def _chunk_cues(models: RunModels, source, chunk_ids: list[str], done: np.ndarray, store: Path | None):
    """Acquisition cues of a chunk's embedded images (NaN rows for the others), or None when the
    detector has no acquisition part. With `--store` they are cached beside it
    (`embed.cue_cache`), so rescoring the same images measures none."""
    from embed.acquisition import CUE_NAMES, acquisition_cues

    if "acquisition" not in models.applicability.parts or source is None:
        return None if "acquisition" not in models.applicability.parts else _nan_cues(chunk_ids)
    measured = [i for i, d in zip(chunk_ids, done, strict=True) if d]
    frame = pd.DataFrame(np.nan, index=pd.Index(chunk_ids), columns=list(CUE_NAMES))
    if measured:
        if store is not None:
            from embed.cue_cache import cached_cues
            from embed.store import FeatureStore

            table = cached_cues(store, source, measured, FeatureStore.open(store).fingerprints(measured))
        else:
            table = acquisition_cues(source, measured)
        frame.loc[measured] = table.frame.to_numpy()
    return frame.reset_index(drop=True)


def _nan_cues(chunk_ids: list[str]) -> pd.DataFrame:
    from embed.acquisition import CUE_NAMES

    return pd.DataFrame(np.nan, index=pd.RangeIndex(len(chunk_ids)), columns=list(CUE_NAMES))


def _applicability_columns(models: RunModels, novelty: dict | None, probability: np.ndarray,
                           outside: np.ndarray | None, outside_text: list[str] | None) -> dict:
    """The columns `unlike_training`, `novelty` and `novelty_reason`, one notion of "unlike
    training": the detector's (image, acquisition, metadata) joined with the range check of
    `fuse.applicability.ranges` (a value far outside the training range marks the row too, its text in the
    reason). Rows without a probability (not scored) get empty values; a run without the
    applicability stage gets the three columns empty (logged once by `RunModels`).
    """
    n = len(probability)
    scored = np.isfinite(probability)
    if novelty is None:
        return {"unlike_training": pd.array([None] * n, dtype="boolean"),
                "novelty": np.full(n, np.nan), "novelty_reason": [""] * n}
    unlike = novelty["unlike_training"].astype(bool).copy()
    reason = [str(r) for r in novelty["reason"]]
    if outside is not None:
        for row in np.flatnonzero(outside):
            # The detector's metadata part already names values beyond its own (narrower) range.
            if outside_text[row] and "metadata" not in reason[row]:
                extra = f"metadata far outside the training range: {outside_text[row]}"
                reason[row] = f"{reason[row]}; {extra}" if reason[row] else extra
        unlike |= outside
    values = np.where(scored, novelty["novelty"], np.nan)
    flags = pd.array([bool(u) if s else None for u, s in zip(unlike, scored, strict=True)], dtype="boolean")
    reason = [r if s and u else "" for r, u, s in zip(reason, unlike, scored, strict=True)]
    marked = int((unlike & scored).sum())
    if marked:
        what = "images" if models.needs_images else "rows"
        log.warning("%d of %d %s look unlike the %s this run was trained on: their probabilities may not "
                    "hold (marked in columns unlike_training and novelty_reason)", marked, int(scored.sum()),
                    what, what)
    return {"unlike_training": flags, "novelty": values, "novelty_reason": reason}


def _rows_worth_predicting(models: RunModels, frame: pd.DataFrame, spec, has_image: np.ndarray) -> np.ndarray:
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


def _stored_batches(source, order: list[str], weights, config, store: Path, images: Path | None,
                    rows_per_read: int = 4096):
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
        raise RunError(f"--store {store}: {error}. For this run, pass a new --store folder") from error
    log.info("store %s: %d embedded now, %d already there, %d unreadable", store, summary.embedded,
             summary.skipped_existing, len(summary.failed) + len(summary.previously_failed))
    failures = {**summary.previously_failed, **summary.failed}
    readable = [i for i in order if i not in failures]
    stored = FeatureStore.open(store)
    for start in range(0, len(readable), rows_per_read):
        block = readable[start:start + rows_per_read]
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
        f"--store {store} is the feature store of data set {recorded!r} (from {manifest.get('source', '?')}), "
        f"made by `invoke embed`; embedding {images} into it would rewrite what it records it was built "
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


def _error_text(image_id: str, errors: dict[str, str], embedded: bool, p_gbdt: float) -> str:
    reason = errors.get(image_id, "")
    if embedded or not reason:
        return reason
    tail = ("p_gbdt is from metadata only" if math.isfinite(p_gbdt)
            else "p_gbdt needs the image too")
    return f"{reason}; not scored: the final model needs the image ({tail})"
