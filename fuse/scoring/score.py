"""Scoring new lesions with a trained run: images (and their metadata) in, one row per lesion out.

One loop, as timm's `inference.py`, in named steps: check the paths, load the run's models once
(`fuse.scoring.run_models.RunModels`, which also says which embeddings the run needs), read the rows
(`fuse.scoring.rows`), embed the images chunk by chunk and predict each chunk in a worker thread
while the next one embeds (`fuse.scoring.loop`), assemble the columns (`fuse.scoring.columns`),
write the predictions (`fuse.scoring.predictions`) and the triage page, whose saliency overlays
reuse the backbone the embedding loaded (`fuse.scoring.saliency`).

Rows that cannot be fully scored are kept, never dropped:

- a row whose image is missing or unreadable: `probability` and `p_fusion` are empty (NaN), because
  both final models (stack and blend) need the fusion MLP and the fusion MLP needs the image;
  `p_gbdt` is still given when the LightGBM stage uses metadata only (it is empty when that stage
  also uses image features); `flagged` is empty; `error` says why. Guessing a final probability
  from metadata alone would put a number of another model on the final model's scale.
- an image without a metadata row (or no metadata file at all): scored with every metadata value
  missing (LightGBM routes missing values, the MLP uses its missing indicators), and `error` says
  so, although the row has a probability.

The "csv" layout, one row per input row: metadata rows in file order, then images without a
metadata row in the image source's order: the id, probability, p_gbdt, p_fusion (not for a
tabular-only run), flagged, reasons (with `explain`), in_training (the id was a training row of
the run: warned), out_of_range ("" or the values far outside the training range,
`fuse.applicability.ranges`; absent for runs stacked before the ranges were recorded),
unlike_training / novelty / novelty_reason (the run's applicability detector,
`fuse.applicability.stage`, joined with the range check: empty for rows not scored and for runs
stacked before the detector existed; the count is warned), error (and prevalence when given).
Metadata rows without an image are not passed to the models when no score could come of them
(`fuse.scoring.loop.rows_worth_predicting`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import preview
from embed.config import embedding_identity
from embed.errors import EmbedError, StoreMismatchError
from embed.identity import UNFAITHFUL_VARIANTS, check_identity, with_legacy_values
from fuse.errors import RunError
from fuse.scoring.columns import (
    applicability_columns,
    error_text,
    in_training,
    outside_training_columns,
)
from fuse.scoring.loop import ScoredRows, chunk_rows, patient_chunks, score_rows
from fuse.scoring.predictions import check_out, check_page, write_predictions
from fuse.scoring.rows import NO_METADATA, metadata_rows, read_scoring_metadata, scoring_rows
from fuse.scoring.run_models import RunModels
from fuse.stacking.calibration import shift_prevalence

log = logging.getLogger(__name__)

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
        The predictions in the "csv" layout, one row per input row (the columns: see the module
        docstring).

    Raises:
        RunError: `out` is an input or a folder or has an unknown extension; no run; a stage is
            missing (names the command); `output_format` unknown; `images` or `metadata`
            missing (`images` None for a run that reads images, `metadata` None for a
            tabular-only one, which also refuses `store`); metadata rows and images that share
            no id; `store` made by `invoke embed` for a data set (its provenance is kept); the
            metadata lacks the id column or a feature column, repeats an id, or holds
            text in a numeric column; the weights, preprocessing, image size or views differ from
            the run's (names the field); `store` was made with other settings (names the field).
        StoreMismatchError: two stages of the run were trained on different embeddings.
    """
    started = time.perf_counter()
    _check_settings(batch_size, overlays)
    out_path, page_path, images_path = _check_paths(
        run_dir, images, metadata, out, output_format, store, weights, page
    )

    from embed.config import resolve_device

    models = RunModels.load(run_dir, resolve_device(device))
    trained_at = _training_prevalence(models, prevalence)
    inputs = _read_inputs(
        models, images_path, metadata, store, weights, batch_size, device, num_workers
    )
    scored = _score_inputs(models, inputs, store, images_path, progress, explain)
    result, threshold = _result_frame(models, inputs, scored, prevalence, trained_at)
    write_predictions(result, out_path, output_format, models.run_spec.id, threshold)
    if page_path is not None:
        pictures = _overlays(models, result, inputs, scored, overlays, device)
        _write_page(result, page_path, models, inputs, out_path, threshold, prevalence, pictures)
    _log_done(result, models, started, scored.seconds, threshold, out_path)
    return result


@dataclass
class _Inputs:
    """The rows to score and what embedding them takes: the image source (None for a
    tabular-only run scored without images), the rows, {id: error} known before scoring, and the
    checked weights and embedding settings (None for a tabular-only run)."""

    source: Any
    frame: pd.DataFrame
    errors: dict[str, str]
    weights: Any = None
    config: Any = None


def _score_inputs(
    models: RunModels,
    inputs: _Inputs,
    store,
    images: Path | None,
    progress: bool,
    explain: bool,
) -> ScoredRows:
    """`score_rows` on the rows of `inputs`: those with an image in the source are embedded."""
    spec = models.run_spec
    ids = inputs.frame[spec.id].tolist()
    source = inputs.source
    available = set(source.ids()) if source is not None and models.needs_images else set()
    has_image = np.array([i in available for i in ids], dtype=bool)
    return score_rows(
        models,
        inputs.frame,
        spec,
        has_image,
        source,
        inputs.weights,
        inputs.config,
        progress,
        store=Path(store) if store is not None else None,
        images=images,
        explain=explain,
    )


def _check_settings(batch_size: int | None, overlays: int) -> None:
    """RunError for a `batch_size` or `overlays` that is not a usable count."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise RunError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if isinstance(overlays, bool) or not isinstance(overlays, int) or overlays < 0:
        raise RunError(f"overlays: expected an integer >= 0, got {overlays!r}")


def _check_paths(
    run_dir, images, metadata, out, output_format: str, store, weights, page
) -> tuple[Path, Path | None, Path | None]:
    """(out, page, images) as paths, checked before any work (`check_out`, `check_page`)."""
    inputs = {
        "--images": images,
        "--metadata": metadata,
        "--run": run_dir,
        "--store": store,
        "--weights": weights,
    }
    out_path = check_out(out, output_format, inputs)
    page_path = check_page(page, {**inputs, "--out": out_path}) if page is not None else None
    images_path = Path(images) if images is not None else None
    if images_path is not None and not images_path.exists():
        raise RunError(
            f"images: {images_path} does not exist (expected a folder of <id>.jpg|.jpeg|.png or "
            "an .hdf5 file)"
        )
    return out_path, page_path, images_path


def _read_inputs(
    models: RunModels,
    images: Path | None,
    metadata,
    store,
    weights,
    batch_size: int | None,
    device: str,
    num_workers: int | None,
) -> _Inputs:
    """The rows to score, and for a run that reads images the weights and settings, checked
    against the run's embeddings before any image is embedded."""
    if not models.needs_images:
        return _Inputs(*_metadata_rows(models, images, metadata, store))
    if models.identity is None:  # `RunModels.load` refuses such a run; said here for the reader
        raise RunError(f"run {models.run.dir}: reads images but records no embedding identity")
    source, frame, errors = _image_rows(models, images, metadata)
    weights_info, config = _embedding_setup(
        models.identity, weights, batch_size, device, num_workers
    )
    return _Inputs(source, frame, errors, weights_info, config)


def _result_frame(
    models: RunModels,
    inputs: _Inputs,
    scored: ScoredRows,
    prevalence: float | None,
    trained_at: float,
) -> tuple[pd.DataFrame, float]:
    """The predictions in the "csv" layout, one row per input row, and the operating threshold
    on the scale of `probability` (moved with it when `prevalence` is given)."""
    spec, frame = models.run_spec, inputs.frame
    ids = frame[spec.id].tolist()
    errors = dict(inputs.errors)
    for image_id, reason in scored.failures.items():
        errors[image_id] = f"image unreadable: {reason}"
    probability, threshold = scored.probability, models.threshold
    flagged = pd.array(
        [None if math.isnan(p) else bool(p >= threshold) for p in probability], dtype="boolean"
    )
    if prevalence is not None:
        # A monotone map of both: the flagged lesions stay the same.
        probability = shift_prevalence(probability, trained_at, prevalence)
        threshold = float(shift_prevalence(np.array([threshold]), trained_at, prevalence)[0])
    unusual, unusual_text = outside_training_columns(models, frame, spec)
    error = [
        error_text(i, errors, scored.embedded[n] or not models.needs_images, scored.p_gbdt[n])
        for n, i in enumerate(ids)
    ]
    result = pd.DataFrame(
        {
            spec.id: ids,
            "probability": probability,
            "p_gbdt": scored.p_gbdt,
            **({"p_fusion": scored.p_fusion} if models.needs_images else {}),
            "flagged": flagged,
            **({"reasons": scored.reasons} if scored.reasons is not None else {}),
            "in_training": in_training(models, ids),
            # Rows with a value far outside its column's training range
            # (`fuse.applicability.ranges`): "" or which.
            **({"out_of_range": unusual_text} if unusual is not None else {}),
            **applicability_columns(models, scored.novelty, probability, unusual, unusual_text),
            "error": error,
        }
    )
    if prevalence is not None:
        result["prevalence"] = prevalence
    return result, threshold


def _overlays(
    models: RunModels,
    result: pd.DataFrame,
    inputs: _Inputs,
    scored: ScoredRows,
    overlays: int,
    device: str,
) -> dict[str, bytes]:
    """Grad-CAM overlays of the `overlays` most probable flagged lesions, by id ({} for none).

    They reuse the backbone the embedding loaded (`ScoredRows.backbone`): loading and verifying
    the weights a second time cost a few lesions' scoring as much as their embedding.
    """
    if not overlays or not models.needs_images:
        return {}
    spec = models.run_spec
    flagged_rows = result[result["flagged"].fillna(False).to_numpy(dtype=bool)]
    shown = flagged_rows.sort_values("probability", ascending=False, kind="stable")[spec.id]
    if not len(shown):
        return {}
    from fuse.scoring.saliency import saliency_overlays

    return saliency_overlays(
        models,
        inputs.frame,
        shown.head(overlays).tolist(),
        inputs.source,
        inputs.weights,
        device,
        backbone=scored.backbone,
        # The forward pass in the precision the scores were embedded with.
        amp=bool(inputs.config is not None and inputs.config.amp),
    )


def _log_done(
    result: pd.DataFrame,
    models: RunModels,
    started: float,
    embedding_seconds: float,
    threshold: float,
    out: Path,
) -> None:
    """Record the run's figures in `result.attrs` and log them."""
    total = time.perf_counter() - started
    result.attrs.update(
        {
            "seconds": total,
            "images_per_s": len(result) / total if total > 0 else math.nan,
            "embedding_seconds": embedding_seconds,
            "final": models.final.name,
            "threshold": threshold,
        }
    )
    log.info(
        "scored %d rows (%d flagged, %d with an error) in %.1f s (%.1f rows/s end to end); final "
        "model %s, "
        "threshold %.4g; wrote %s",
        len(result),
        int(result["flagged"].sum()),
        int((result["error"] != "").sum()),
        total,
        result.attrs["images_per_s"],
        models.final.name,
        threshold,
        out,
    )


def _image_rows(models: RunModels, images: Path | None, metadata):
    """(source, rows, {id: error}) for a run whose final model reads images.

    Raises:
        RunError: no `images`; neither images nor metadata rows; metadata rows and images that
            share no id.
    """
    from embed.sources import open_source

    spec = models.run_spec
    if images is None:
        raise RunError(
            f"--images: run {models.run.dir} reads images (its final model needs the fusion MLP); "
            "pass --images DIR|FILE.hdf5. Only a tabular-only run (a spec without images) "
            "scores --metadata alone"
        )
    try:
        source = open_source(images)
    except EmbedError as error:
        raise RunError(f"images: {error}") from error
    image_ids = [str(i) for i in source.ids()]
    frame, errors = scoring_rows(metadata, spec, image_ids, images)
    if frame.empty:
        raise RunError(
            f"images: {images} holds no image (<id>.jpg|.jpeg|.png files or HDF5 keys) and "
            "no metadata rows were given; nothing to score"
        )
    if metadata is not None:
        _require_common_ids(frame, spec, errors, image_ids, images, Path(metadata))
    return source, frame, errors


def _require_common_ids(
    frame: pd.DataFrame,
    spec,
    errors: dict[str, str],
    image_ids: list[str],
    images: Path,
    metadata: Path,
) -> None:
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
        f"row(s), e.g. {preview(listed, 3)}; {len(image_ids)} image(s), e.g. "
        f"{preview(image_ids, 3)}): "
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
        raise RunError(
            f"--metadata: run {run} is tabular-only (its spec names no images; LightGBM on "
            "metadata is its final model); pass --metadata CSV with the rows to score"
        )
    if store is not None:
        raise RunError(
            f"--store {store}: run {run} is tabular-only and embeds no image; omit --store"
        )
    source = None
    if images is not None:
        from embed.sources import open_source

        log.warning(
            "run %s is tabular-only: the images in %s are not scored, only shown on the triage "
            "page",
            run,
            images,
        )
        try:
            source = open_source(images)
        except EmbedError as error:
            raise RunError(f"images: {error}") from error
    frame = metadata_rows(Path(metadata), models.run_spec)
    if frame.empty:
        raise RunError(f"--metadata {metadata}: holds no row; nothing to score")
    return source, frame, {}


def _write_page(
    result: pd.DataFrame,
    page: Path,
    models: RunModels,
    inputs: _Inputs,
    out: Path,
    threshold: float,
    prevalence: float | None,
    overlays: dict[str, bytes] | None = None,
) -> None:
    """The triage page of `result`: thumbnails read from the image source for the rows shown."""
    from fuse.pages.report import read_operating_point

    spec, frame, source = models.run_spec, inputs.frame, inputs.source
    from fuse.pages.triage import write_triage_page

    def thumbnail(image_id: str) -> bytes | None:
        if source is None:  # a tabular-only run scored without --images
            return None
        try:
            return source.read_bytes(image_id)
        except Exception:  # noqa: BLE001 - a page shows a placeholder for any unreadable image
            return None

    patient = (
        frame[spec.patient].reset_index(drop=True)
        if spec.patient and spec.patient in frame.columns
        else None
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    write_triage_page(
        result,
        page,
        id_column=spec.id,
        threshold=threshold,
        run_name=models.run.dir.name,
        thumbnail=thumbnail,
        patient=patient,
        csv_name=out.name,
        prevalence=prevalence,
        overlays=overlays,
        operating_point=read_operating_point(models.run.dir),
    )
    log.info("triage page: %s", page)


def _training_prevalence(models: RunModels, prevalence: float | None) -> float:
    """The prevalence the run's probabilities hold at; RunError when `prevalence` cannot apply."""
    if prevalence is None:
        return math.nan
    calibrator = models.final.calibrator
    if calibrator is None:
        raise RunError(
            f"--prevalence: run {models.run.dir} was stacked before calibration, so its "
            "scores are not probabilities to move; rerun `invoke stack --run R` first"
        )
    shift_prevalence(
        np.array([0.5]), calibrator.prevalence, prevalence
    )  # checks both are in (0, 1)
    log.info(
        "probabilities moved from the training prevalence %.4g to %.4g",
        calibrator.prevalence,
        prevalence,
    )
    return calibrator.prevalence


def _embedding_setup(identity: dict, weights, batch_size: int | None, device: str, num_workers):
    """Weights and embedding settings for new images, checked against the run's identity.

    A run trained on a faithful variant's store (`embed.identity.UNFAITHFUL_VARIANTS` are the
    others) is scored with this machine's default for an unknown number of images ("auto"): the
    faithful variants compute one function (they share a store), and the one that built the store
    may not suit scoring: int8-mixed calibrates on the data set it embeds (its ranges belong to
    that data set, and its setup would cost every scoring of a few lesions more than it saves),
    jit-frozen and compiled spend 15-60 s before the first image. An unfaithful variant's run is
    scored with that variant, since its models learned its vectors.
    """
    from embed.config import config_for_identity
    from embed.variants import AUTO
    from embed.weights import ensure_weights

    info = ensure_weights(Path(weights) if weights else None)
    recorded = with_legacy_values(identity)
    faithful = recorded.get("variant") not in UNFAITHFUL_VARIANTS
    config = config_for_identity(
        recorded,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=False,
        **({"variant": AUTO} if faithful else {}),
    )
    have = embedding_identity(info, config)
    want = {**recorded, "variant": have["variant"]} if faithful else identity
    try:
        check_identity(
            have,
            want,
            "scoring",
            "the run's models were trained on",
            hint=f"weights at hand: {info.path}; pass --weights with the file the run was trained "
            "with",
        )
    except StoreMismatchError as error:
        raise RunError(str(error)) from error
    return info, config
