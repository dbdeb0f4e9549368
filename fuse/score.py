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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from fuse.errors import RunError
from fuse.stack import blend_scores, final_choice, require_run, require_stage
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
    batch_size: int | None = None,
    device: str = "auto",
    *,
    weights: Path | str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    store: Path | str | None = None,
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
        batch_size: images per forward pass (None: 256 on CUDA, 32 on CPU).
        device: "auto", "cpu" or "cuda".
        weights: the backbone weights file (default: the cached weights, `invoke weights`); its
            sha256 must be the one the run was trained with.
        num_workers: image decoding processes (default: chosen for the device).
        progress: show a tqdm bar (images/s).
        store: a feature store folder to embed the images into first (made if absent). A rerun
            after an interruption embeds only the images not stored yet, and scoring the same
            images with another run of the same weights embeds nothing. Vectors are kept by id:
            use a new folder when images change under the same ids. None: embed in memory,
            predicting while the next images are embedded.

    Returns:
        The predictions in the "csv" layout, one row per input row: metadata rows in file order,
        then images without a metadata row in the image source's order. Shape (n, 6).

    Raises:
        RunError: no run; a stage is missing (names the command); `format` unknown; `images`
            or `metadata` missing; the metadata lacks the id column or a feature column, repeats
            an id, or holds text in a numeric column; the weights, preprocessing, image size or
            views differ from the run's (names the field).
        RunError: also when `store` was made with other weights, preprocessing, image size or
            views (names the field).
    """
    started = time.perf_counter()
    if format not in FORMATS:
        raise RunError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
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
    if frame.empty:
        raise RunError(f"images: {images} holds no image (<id>.jpg|.jpeg|.png files or HDF5 keys) and "
                       "no metadata rows were given; nothing to score")
    ids = frame[spec.id].tolist()
    available = set(image_ids)
    has_image = np.array([i in available for i in ids], dtype=bool)

    weights_info, config = _embedding_setup(identity, weights, batch_size, device, num_workers)
    p_gbdt, p_fusion, probability, embedded, failures, seconds = _score_rows(
        run_dir, final["final"], frame, spec, has_image, source, weights_info, config, identity, progress,
        store=Path(store) if store is not None else None, images=images)
    for image_id, reason in failures.items():
        errors[image_id] = f"image unreadable: {reason}"
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


def _embedding_setup(identity: dict, weights, batch_size: int | None, device: str, num_workers):
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


# ----------------------------------------------------------------- embedding and predicting


def _score_rows(run_dir: Path, final: str, frame: pd.DataFrame, spec, has_image: np.ndarray, source,
                weights, config, identity: dict, progress: bool, *, store: Path | None = None,
                images: Path | None = None):
    """Embed the rows' images (or take them from `store`, embedding what it lacks) and predict,
    overlapping the two.

    Rows are cut into chunks of whole patients (per-patient features need all of a patient's
    scored rows, and nothing else) and images are embedded chunk after chunk; as soon as a
    chunk's images are done, a worker thread predicts it while the accelerator embeds the next.
    The run's models are loaded once, in that thread, while the backbone loads.

    Returns (p_gbdt, p_fusion, probability, embedded mask, {id: reason} of unreadable images,
    seconds of the embedding loop), arrays in `frame` row order.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from embed.backbone import load_backbone
    from embed.pipeline import embed_ids, resolve_device

    n = len(frame)
    ids = frame[spec.id].tolist()
    chunks = patient_chunks(frame, spec, chunk_rows(n))
    p_gbdt, p_fusion, probability = (np.full(n, np.nan) for _ in range(3))
    embedded = np.zeros(n, dtype=bool)
    vectors: dict[str, np.ndarray] = {}
    failures: dict[str, str] = {}
    shape = (int(identity["views"]), int(identity["dim"]))

    def predict(models: LoadedRun, rows: np.ndarray) -> None:
        block = np.zeros((len(rows), *shape), dtype=np.float16)
        done = np.zeros(len(rows), dtype=bool)
        for j, row in enumerate(rows):
            vector = vectors.pop(ids[row], None)
            if vector is not None:
                block[j], done[j] = vector, True
        embedded[rows] = done
        p_gbdt[rows], p_fusion[rows], probability[rows] = models.predict(
            frame.iloc[rows].reset_index(drop=True), block, done)

    order = [ids[row] for rows in chunks for row in rows if has_image[row]]
    # Image rows up to and including chunk c, to know when a chunk's images are all through.
    ready_at = np.cumsum([int(has_image[rows].sum()) for rows in chunks])
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="score") as worker:
        loading = worker.submit(LoadedRun, run_dir, final, resolve_device(config.device))
        pending = []
        next_chunk, seen = 0, 0

        def release() -> None:
            nonlocal next_chunk
            while next_chunk < len(chunks) and ready_at[next_chunk] <= seen:
                pending.append(worker.submit(lambda rows: predict(loading.result(), rows), chunks[next_chunk]))
                next_chunk += 1

        release()  # chunks without any image
        if order:
            batches = (embed_ids(source, order, load_backbone(weights, "cpu"), config)
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
    return p_gbdt, p_fusion, probability, embedded, failures, seconds


def _stored_batches(source, order: list[str], weights, config, store: Path, images: Path | None,
                    rows_per_read: int = 4096):
    """(ids, vectors, failures) in blocks, from `store` after embedding into it what it lacks.

    The store is filled by `embed.pipeline.build_store` (crash-safe, resumable); images it
    recorded as unreadable before are reported with the reason recorded then.
    """
    from embed.errors import StoreMismatchError
    from embed.pipeline import build_store
    from embed.store import FeatureStore

    try:
        summary = build_store(source, order, store, f"scored images: {images}", weights, config)
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


class LoadedRun:
    """A run's stages (fold models, encoders, PCA) loaded once to predict chunk after chunk.

    `device`: where the fusion MLPs run (the scoring device). `predict(frame, block, embedded)` follows `fuse.fusion.predict_fusion`,
    `tabular.gbdt.predict_gbdt` and `fuse.stack.StackModels.predict` with the files read once, and
    encodes each distinct fold encoder once per chunk (the stages' encoders of one fold are
    usually the same).
    """

    def __init__(self, run_dir: Path, final: str, device="cpu"):
        import lightgbm as lgb

        from fuse.fusion import load_fold_models
        from tabular.features import FeatureEncoder
        from tabular.gbdt import FoldPCA

        self.run_dir, self.final = run_dir, final
        self._keys: dict[int, str] = {}  # encoder object -> its JSON, to share equal encoders' output
        record, _, models = load_fold_models(run_dir / "fusion")
        self.fusion_dim = int(record["n_image"])
        # The MLPs run where the backbone runs: on a GPU their 2048-wide image branch costs next
        # to nothing, on CPU cores it would cost more than the rest of the prediction together.
        self.device = device
        self.fusion = [(model.to(device), encoder) for model, encoder in models]
        gbdt_dir = run_dir / "gbdt"
        manifest = json.loads((gbdt_dir / "features.json").read_text())
        encoders = json.loads(require_stage(run_dir, "gbdt", "encoder.json").read_text())["folds"]
        self.extra_dim = manifest.get("extra_dim")
        self.gbdt = []
        for entry in manifest["folds"]:
            pca = FoldPCA.load(gbdt_dir, entry["pca"]) if entry.get("pca") else None
            boosters = [lgb.Booster(model_file=str(require_stage(run_dir, "gbdt", name)))
                        for name in entry["models"]]
            self.gbdt.append((FeatureEncoder.from_json(encoders[str(entry["fold"])]), pca,
                              entry["features"], boosters))
        if final == "stack":
            from fuse.stack import StackModels

            self.stack = StackModels.load(run_dir / "stack")
        elif final == "blend":
            record = json.loads(require_stage(run_dir, "blend", "blend.json").read_text())
            self.blend = (record["weight_gbdt"],
                          {name: np.asarray(values) for name, values in record["references"].items()})
        else:
            raise RunError(f"{run_dir / 'stack' / 'final.json'}: unknown final model {final!r}; "
                           "rerun `invoke stack --run R`")

    def predict(self, frame: pd.DataFrame, block: np.ndarray, embedded: np.ndarray):
        """(p_gbdt, p_fusion, probability) of `frame`'s rows, each shape (n,), NaN where unscored.

        `block` (n, views, dim) float16 holds zeros where `embedded` is False; those rows go
        through the encoders with the others (per-patient features) and their image-model
        outputs are discarded.
        """
        from tabular.errors import DataError

        try:
            return self._predict(frame, block, embedded)
        except DataError as error:
            raise RunError(f"run {self.run_dir}: cannot score these rows: {error}") from error

    def _predict(self, frame, block, embedded):
        import torch

        from embed.errors import StoreMismatchError
        from fuse.fusion import Embeddings, predict_rows
        from tabular.gbdt import with_extra

        cache: dict[str, pd.DataFrame] = {}

        def transform(encoder, rows: pd.DataFrame) -> pd.DataFrame:
            key = self._keys.get(id(encoder))
            if key is None:
                key = self._keys[id(encoder)] = json.dumps(encoder.to_json(), sort_keys=True)
            if key not in cache:
                cache[key] = encoder.transform(rows)
            return cache[key]

        n = len(frame)
        if block.shape[2] != self.fusion_dim:
            raise StoreMismatchError(f"embeddings: field 'dim' differs: the model was trained on "
                                     f"{self.fusion_dim}, got {block.shape[2]}")
        source = Embeddings.from_array(block)
        p_fusion = np.zeros(n)
        for model, encoder in self.fusion:
            meta = encoder.mlp_matrix(transform(encoder, frame)).to_numpy(dtype=np.float32)
            p_fusion += predict_rows(model, source, torch.from_numpy(meta), np.arange(n), 4096, self.device)
        p_fusion /= len(self.fusion)
        p_fusion[~embedded] = np.nan

        extra = block.astype(np.float32).mean(axis=1) if self.extra_dim else None
        p_gbdt = np.zeros(n)
        count = 0
        for encoder, pca, names, boosters in self.gbdt:
            features = with_extra(transform(encoder, frame), extra, pca)
            if list(features.columns) != names:
                raise RunError(f"run {self.run_dir}: gbdt features differ from gbdt/features.json; retrain the stage")
            for booster in boosters:
                p_gbdt += booster.predict(features)
                count += 1
        p_gbdt /= count
        if self.extra_dim:
            p_gbdt[~embedded] = np.nan

        probability = np.full(n, np.nan)
        if self.final == "stack":
            if embedded.any():
                # Rows without an image need a placeholder fusion feature; their output is dropped.
                # A NaN p_gbdt (its stage needs the image too) is left to LightGBM as missing.
                filled = np.where(embedded, p_fusion, np.nanmean(p_fusion))
                probability[embedded] = self.stack.predict(frame, filled, p_gbdt, transform)[embedded]
        else:
            rows = embedded & np.isfinite(p_gbdt)
            weight, references = self.blend
            probability[rows] = blend_scores(weight, references, p_gbdt[rows], p_fusion[rows])
        return p_gbdt, p_fusion, probability


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
