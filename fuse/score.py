"""Scoring new lesions with a trained run: images (and their metadata) in, one CSV row per lesion out.

The images are embedded with exactly the run's backbone and preprocessing (checked against the
`store.json` its image models recorded: weights hash, preprocessing, image size, views), the
metadata features are built by each fold's own encoder (per-patient features from the scored rows
themselves), each stage averages its fold models, and the run's final model (`stack/final.json`)
gives `probability`, flagged at the run's operating threshold.

Rows that cannot be fully scored are kept, never dropped:

- a row whose image is missing or unreadable: `probability` and `p_fusion` are empty (NaN), because
  both final models (stack and blend) need the fusion MLP and the fusion MLP needs the image;
  `p_gbdt` is still given when the LightGBM stage uses metadata only (it is empty when that stage
  also uses image features); `flagged` is empty; `error` says why. Guessing a final probability
  from metadata alone would put a number of another model on the final model's scale.
- an image without a metadata row (or no metadata file at all): scored with every metadata value
  missing (LightGBM routes missing values, the MLP uses its missing indicators), and `error` says
  so, although the row has a probability.

Train-only columns in the metadata file (the target, the diagnosis, ...) are dropped on reading:
only the id, the patient key and the spec's feature columns ever reach a model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fuse.errors import RunError
from fuse.stack import final_choice, predict_blend, predict_stack, require_run, require_stage
from tabular.errors import preview

log = logging.getLogger(__name__)

FORMATS = ("csv", "kaggle")
NO_METADATA = "no metadata row: scored with metadata treated as missing"
# Fields of a store identity that embeddings for a run's models must share with its training store.
IDENTITY_FIELDS = ("backbone", "weights_sha256", "preprocessing", "image_size", "views", "dtype", "dim")


def score(
    run_dir: Path | str,
    images: Path | str,
    metadata: Path | str | None,
    out: Path | str,
    format: str = "csv",
    batch_size: int = 32,
    device: str = "auto",
    *,
    weights: Path | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score the images in `images` (with their metadata rows) and write the predictions.

    Args:
        run_dir: a run with `gbdt/`, `fusion/` and `stack/` (see `invoke stack`).
        images: a folder of `<id>.jpg|.jpeg|.png`, or an HDF5 file keyed by id.
        metadata: CSV with the run's id column and feature columns (no target needed; extra
            columns, train-only ones included, are ignored). None = images only.
        out: the CSV to write (its folder is created).
        format: "csv" (id, probability, p_gbdt, p_fusion, flagged, error) or "kaggle"
            (`isic_id,target` with target = probability, the ISIC 2024 submission format; a row
            that could not be scored gets the operating threshold, logged by id).
        batch_size: images per forward pass.
        device: "auto", "cpu" or "cuda".
        weights: the backbone weights file (default: the cached weights, `invoke weights`); its
            sha256 must be the one the run was trained with.
        num_workers: image decoding processes (default: chosen for the device).
        progress: show a tqdm bar (images/s).

    Returns:
        The predictions in the "csv" layout, one row per input row: metadata rows in file order,
        then images without a metadata row in the image source's order. Shape (n, 6).

    Raises:
        RunError: no run; a stage is missing (names the command); `format` unknown; `images`
            or `metadata` missing; the metadata lacks the id column or a feature column, repeats
            an id, or holds text in a numeric column; the weights, preprocessing, image size or
            views differ from the run's (names the field).
    """
    started = time.perf_counter()
    if format not in FORMATS:
        raise RunError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RunError(f"batch_size: expected a positive integer, got {batch_size!r}")
    run_dir = require_run(run_dir)
    spec = _run_spec(run_dir)
    final = final_choice(run_dir)
    require_stage(run_dir, "gbdt", "features.json")
    identity = _run_identity(run_dir)
    images = Path(images)
    if not images.exists():
        raise RunError(f"images: {images} does not exist (expected a folder of <id>.jpg|.jpeg|.png or an .hdf5 file)")
    out = Path(out)

    from embed.errors import EmbedError
    from embed.sources import open_source

    try:
        source = open_source(images)
    except EmbedError as error:
        raise RunError(f"images: {error}") from error
    image_ids = [str(i) for i in source.ids()]
    frame, errors = _rows(metadata, spec, image_ids, images)
    ids = frame[spec.id].tolist()
    available = set(image_ids)
    has_image = np.array([i in available for i in ids], dtype=bool)

    weights_info, config = _embedding_setup(identity, weights, batch_size, device, num_workers)
    embeddings, failures, seconds = _embed(source, [i for i, ok in zip(ids, has_image, strict=True) if ok],
                                           weights_info, config, progress)
    for image_id, reason in failures.items():
        errors[image_id] = f"image unreadable: {reason}"
    embedded = np.array([i in embeddings for i in ids])
    views, dim = int(identity["views"]), int(identity["dim"])
    block = np.zeros((len(ids), views, dim), dtype=np.float16)
    for row in np.flatnonzero(embedded):
        block[row] = embeddings[ids[row]]

    p_fusion, p_gbdt = _base_predictions(run_dir, frame, spec, block, embedded, identity)
    probability = _final_predictions(run_dir, final["final"], frame, p_gbdt, p_fusion)
    threshold = float(final["threshold"])
    flagged = pd.array([None if math.isnan(p) else bool(p >= threshold) for p in probability], dtype="boolean")
    error = [_error_text(i, errors, embedded[n], p_gbdt[n]) for n, i in enumerate(ids)]
    result = pd.DataFrame({
        spec.id: ids,
        "probability": probability,
        "p_gbdt": p_gbdt,
        "p_fusion": p_fusion,
        "flagged": flagged,
        "error": error,
    })
    _write(result, out, format, spec, threshold)
    total = time.perf_counter() - started
    result.attrs.update({
        "seconds": total,
        "images_per_s": len(ids) / total if total > 0 else math.nan,
        "embedding_seconds": seconds,
        "final": final["final"],
        "threshold": threshold,
    })
    log.info(
        "scored %d rows (%d flagged, %d with an error) in %.1f s (%.1f rows/s end to end); final model %s, "
        "threshold %.4g; wrote %s",
        len(ids), int(result["flagged"].sum()), int((result["error"] != "").sum()), total,
        result.attrs["images_per_s"], final["final"], threshold, out,
    )
    return result


# ---------------------------------------------------------------------------------- the run


def _run_spec(run_dir: Path):
    from tabular.spec import spec_from_identity

    record = json.loads((run_dir / "run.json").read_text())
    return spec_from_identity(record["spec"])


def _run_identity(run_dir: Path) -> dict:
    """The embedding identity the run's image models were trained on (`fusion/store.json`).

    Every other stage that recorded a store must agree: their models would otherwise need two
    different embeddings of one image.
    """
    path = require_stage(run_dir, "fusion", "store.json")
    identity = json.loads(path.read_text())
    for other in sorted(run_dir.glob("*/store.json")):
        if other == path:
            continue
        record = json.loads(other.read_text())
        for key in IDENTITY_FIELDS:
            if key in record and key in identity and record[key] != identity[key]:
                raise RunError(
                    f"run {run_dir}: {other} and {path} disagree on field '{key}' "
                    f"({record[key]!r} vs {identity[key]!r}); retrain one stage on the other's store"
                )
    return identity


def _embedding_setup(identity: dict, weights, batch_size: int, device: str, num_workers):
    """Weights and embedding settings for new images, checked against the run's identity."""
    from embed.errors import StoreMismatchError
    from embed.pipeline import EmbedConfig, store_identity
    from embed.weights import ensure_weights
    from fuse.fusion import check_identity

    info = ensure_weights(Path(weights) if weights else None)
    config = EmbedConfig(image_size=int(identity["image_size"]), views=int(identity["views"]),
                         batch_size=batch_size, device=device, num_workers=num_workers, progress=False)
    ours = store_identity(info, config)
    try:
        check_identity(identity, ours, "scoring")
    except StoreMismatchError as error:
        raise RunError(
            f"{error} (the run's image models were trained on the store recorded in fusion/store.json; "
            f"weights at hand: {info.path}; pass --weights with the file the run was trained with)"
        ) from error
    return info, config


# ------------------------------------------------------------------------------------- rows


def _rows(metadata, spec, image_ids: list[str], images: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows to score (metadata rows, then images without one) and the errors known so far."""
    errors: dict[str, str] = {}
    if metadata is None:
        frame = pd.DataFrame({spec.id: image_ids})
        errors.update(dict.fromkeys(image_ids, NO_METADATA))
        log.warning("no metadata file: %d images scored with metadata treated as missing", len(image_ids))
    else:
        frame = read_scoring_metadata(Path(metadata), spec)
        available = set(image_ids)
        no_image = [i for i in frame[spec.id] if i not in available]
        if no_image:
            log.warning("%d metadata row(s) have no image in %s: %s", len(no_image), images, preview(no_image))
            errors.update(dict.fromkeys(no_image, f"no image for this id in {images}"))
        listed = set(frame[spec.id])
        extra = [i for i in image_ids if i not in listed]
        if extra:
            log.warning("%d image(s) have no metadata row and are scored with metadata treated as "
                        "missing: %s", len(extra), preview(extra))
            frame = pd.concat([frame, pd.DataFrame({spec.id: extra})], ignore_index=True)
            errors.update(dict.fromkeys(extra, NO_METADATA))
    for column in _model_columns(spec):
        if column not in frame.columns:
            frame[column] = np.nan
    for column in _text_columns(spec):
        if column in frame.columns:
            frame[column] = frame[column].astype(object)
    return frame.reset_index(drop=True), errors


def _model_columns(spec) -> list[str]:
    columns = list(spec.feature_columns)
    if spec.patient:
        columns.append(spec.patient)
    return columns


def _text_columns(spec) -> list[str]:
    columns = [spec.id, *spec.categorical]
    if spec.patient:
        columns.append(spec.patient)
    return columns


def read_scoring_metadata(path: Path, spec) -> pd.DataFrame:
    """A metadata CSV for scoring: only the id, the patient key and the feature columns are kept.

    Returns:
        One row per id in file order; ids as text, categorical values as text or NaN, numeric
        values as float.

    Raises:
        RunError: the file is missing; the id column, the patient column or a feature column is
            missing; an id is empty or repeated; a numeric column holds text.
    """
    if not path.is_file():
        raise RunError(f"metadata: no such file {path}")
    try:
        header = pd.read_csv(path, nrows=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise RunError(f"metadata {path}: not a readable CSV ({error})") from error
    if spec.id not in header.columns:
        raise RunError(
            f"metadata {path}: the id column '{spec.id}' (the run's spec key 'id') is missing; "
            f"columns are {preview(list(header.columns))}"
        )
    needed = _model_columns(spec)
    missing = [c for c in needed if c not in header.columns]
    if missing:
        raise RunError(
            f"metadata {path}: the run's feature column(s) {preview(missing)} are missing (empty "
            "values are allowed, a missing column is not; omit --metadata to score images alone)"
        )
    ignored = [c for c in header.columns if c not in (spec.id, *needed)]
    if ignored:
        log.info("metadata: %d column(s) not used by the run's models are ignored: %s", len(ignored), preview(ignored))
    text = [c for c in dict.fromkeys(_text_columns(spec)) if c in (spec.id, *needed)]
    frame = pd.read_csv(path, usecols=[spec.id, *needed], dtype={c: "string" for c in text}, low_memory=False)
    frame = frame[[spec.id, *dict.fromkeys(needed)]]
    ids = frame[spec.id]
    empty = ids.isna() | (ids.str.strip() == "")
    if empty.any():
        raise RunError(f"metadata {path}: column '{spec.id}' is empty in rows {preview((np.flatnonzero(empty) + 2).tolist())} (file lines)")
    repeated = ids[ids.duplicated(keep=False)].unique().tolist()
    if repeated:
        raise RunError(f"metadata {path}: repeated ids in column '{spec.id}', {preview(repeated)}")
    for column in spec.numeric:
        if column not in frame.columns or pd.api.types.is_numeric_dtype(frame[column]):
            continue
        parsed = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & parsed.isna()
        if bad.any():
            raise RunError(
                f"metadata {path}: numeric column '{column}' holds text, e.g. "
                f"{frame.loc[bad, column].iloc[0]!r} (ids {preview(ids[bad].tolist())})"
            )
        frame[column] = parsed
    for column in text:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), np.nan)
    return frame


# -------------------------------------------------------------------------------- embedding


def _embed(source, ids: list[str], weights, config, progress: bool):
    """{id: (views, dim) float16}, {id: reason} for unreadable images, seconds of the loop."""
    from tqdm.auto import tqdm

    from embed.backbone import load_backbone
    from embed.pipeline import embed_ids

    vectors: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    if not ids:
        return vectors, failures, 0.0
    started = time.perf_counter()
    model = load_backbone(weights, "cpu")
    bar = tqdm(total=len(ids), unit="img", desc="score", dynamic_ncols=True, disable=not progress,
               mininterval=1.0)
    try:
        for batch_ids, batch, batch_failures in embed_ids(source, ids, model, config):
            for image_id, vector in zip(batch_ids, batch, strict=True):
                vectors[str(image_id)] = vector
            failures.update(batch_failures)
            bar.update(len(batch_ids) + len(batch_failures))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    log.info("embedded %d images (%d unreadable) in %.1f s (%.1f images/s)",
             len(vectors), len(failures), seconds, len(ids) / seconds if seconds > 0 else math.nan)
    return vectors, failures, seconds


# ------------------------------------------------------------------------------ predictions


def _base_predictions(run_dir: Path, frame: pd.DataFrame, spec, block: np.ndarray,
                      embedded: np.ndarray, identity: dict) -> tuple[np.ndarray, np.ndarray]:
    """(p_fusion, p_gbdt), each shape (n,), NaN where a model cannot score a row.

    Every row (with an image or not) goes through the encoders together, so per-patient features
    see all of a patient's scored rows; rows without an embedding get zeros, and their outputs
    from image models are discarded.
    """
    from fuse.fusion import predict_fusion
    from tabular.errors import DataError
    from tabular.gbdt import predict_gbdt

    p_fusion = np.full(len(frame), np.nan)
    p_gbdt = np.full(len(frame), np.nan)
    try:
        if embedded.any():
            fusion = predict_fusion(run_dir / "fusion", frame, spec, block)
            p_fusion[embedded] = fusion[embedded]
        manifest = json.loads((run_dir / "gbdt" / "features.json").read_text())
        if manifest.get("extra_dim"):
            if embedded.any():
                extra = block.astype(np.float32).mean(axis=1)
                gbdt = predict_gbdt(run_dir / "gbdt", frame, spec, extra=extra)
                p_gbdt[embedded] = gbdt[embedded]
        else:
            p_gbdt = predict_gbdt(run_dir / "gbdt", frame, spec)
    except DataError as error:
        raise RunError(f"run {run_dir}: cannot score these rows: {error}") from error
    return p_fusion, p_gbdt


def _final_predictions(run_dir: Path, final: str, frame: pd.DataFrame, p_gbdt: np.ndarray,
                       p_fusion: np.ndarray) -> np.ndarray:
    probability = np.full(len(frame), np.nan)
    if final == "stack":
        rows = np.isfinite(p_fusion)
        if rows.any():
            # The stack's fold models see the whole frame (per-patient features); the fusion
            # feature of rows without an image is a placeholder whose output is discarded.
            filled = np.where(rows, p_fusion, np.nanmean(p_fusion))
            probability[rows] = predict_stack(run_dir / "stack", frame, filled)[rows]
    elif final == "blend":
        rows = np.isfinite(p_fusion) & np.isfinite(p_gbdt)
        if rows.any():
            probability[rows] = predict_blend(run_dir / "blend", p_gbdt[rows], p_fusion[rows])
    else:
        raise RunError(f"{run_dir / 'stack' / 'final.json'}: unknown final model {final!r}; rerun `invoke stack --run R`")
    return probability


def _error_text(image_id: str, errors: dict[str, str], embedded: bool, p_gbdt: float) -> str:
    reason = errors.get(image_id, "")
    if embedded or not reason:
        return reason
    tail = ("p_gbdt is from metadata only" if math.isfinite(p_gbdt)
            else "p_gbdt needs the image too")
    return f"{reason}; not scored: the final model needs the image ({tail})"


# ---------------------------------------------------------------------------------- writing


def _write(result: pd.DataFrame, out: Path, format: str, spec, threshold: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if format == "kaggle":
        target = result["probability"].to_numpy(copy=True)
        missing = ~np.isfinite(target)
        if missing.any():
            # A submission needs a number per row; an unscored lesion is put at the flagging
            # level rather than at the bottom, where a missed melanoma would cost the most.
            log.warning("kaggle format: %d row(s) could not be scored and get the operating "
                        "threshold %.4g: %s", int(missing.sum()), threshold,
                        preview(result.loc[missing, spec.id].tolist()))
            target[missing] = threshold
        pd.DataFrame({"isic_id": result[spec.id], "target": target}).to_csv(tmp, index=False)
    else:
        result.to_csv(tmp, index=False)
    tmp.replace(out)
