"""The rows to score: the metadata file's rows (only the columns the run's models use), then the
images that have no row.

Train-only columns in the metadata file (the target, the diagnosis, ...) are dropped on reading:
only the id, the patient key and the spec's feature columns ever reach a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import preview
from runfolder.errors import RunError
from tabular.errors import DataError
from tabular.validate import check_rows

log = logging.getLogger(__name__)

NO_METADATA = "no metadata row: scored with metadata treated as missing"
# Above this share of metadata rows without an image, `--images` is more likely the wrong folder
# than a folder with a few images missing: said before any image is embedded.
WRONG_FOLDER_SHARE = 0.5

__all__ = [
    "NO_METADATA",
    "WRONG_FOLDER_SHARE",
    "metadata_rows",
    "read_scoring_metadata",
    "scoring_rows",
]


def scoring_rows(
    metadata, spec, image_ids: list[str], images: Path
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows to score (metadata rows, then images without one) and the errors known so far."""
    errors: dict[str, str] = {}
    if metadata is None:
        frame = pd.DataFrame({spec.id: image_ids})
        errors.update(dict.fromkeys(image_ids, NO_METADATA))
        log.warning(
            "no metadata file: %d images scored with metadata treated as missing", len(image_ids)
        )
    else:
        frame = read_scoring_metadata(Path(metadata), spec)
        available = set(image_ids)
        no_image = [i for i in frame[spec.id] if i not in available]
        if no_image:
            log.warning(
                "%d metadata row(s) have no image in %s: %s",
                len(no_image),
                images,
                preview(no_image),
            )
        if (
            len(frame)
            and len(no_image) > WRONG_FOLDER_SHARE * len(frame)
            and len(no_image) < len(frame)
        ):
            log.warning(
                "%d of the %d metadata rows (%.0f%%) have no image in %s: is --images the folder "
                "of "
                "these lesions? Those rows are reported with an error and only the %d with an "
                "image "
                "are embedded and scored",
                len(no_image),
                len(frame),
                100 * len(no_image) / len(frame),
                images,
                len(frame) - len(no_image),
            )
        errors.update(dict.fromkeys(no_image, f"no image for this id in {images}"))
        listed = set(frame[spec.id])
        extra = [i for i in image_ids if i not in listed]
        if extra:
            log.warning(
                "%d image(s) have no metadata row and are scored with metadata treated as "
                "missing: %s",
                len(extra),
                preview(extra),
            )
            frame = pd.concat([frame, pd.DataFrame({spec.id: extra})], ignore_index=True)
            errors.update(dict.fromkeys(extra, NO_METADATA))
    return _with_model_columns(frame, spec), errors


def metadata_rows(metadata: Path, spec) -> pd.DataFrame:
    """The metadata file's rows alone (a tabular-only run scores no image), as
    `read_scoring_metadata` reads them."""
    return _with_model_columns(read_scoring_metadata(Path(metadata), spec), spec)


def _with_model_columns(frame: pd.DataFrame, spec) -> pd.DataFrame:
    """`frame` with every column the models read (absent ones as missing values), text as object."""
    for column in _model_columns(spec):
        if column not in frame.columns:
            frame[column] = np.nan
    for column in _text_columns(spec):
        if column in frame.columns:
            frame[column] = frame[column].astype(object)
    return frame.reset_index(drop=True)


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
            missing; an id is empty or repeated, or a numeric column holds text (the checks of
            `tabular.validate.check_rows`, shared with training, in its words).
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
        log.info(
            "metadata: %d column(s) not used by the run's models are ignored: %s",
            len(ignored),
            preview(ignored),
        )
    text = [c for c in dict.fromkeys(_text_columns(spec)) if c in (spec.id, *needed)]
    frame = pd.read_csv(
        path, usecols=[spec.id, *needed], dtype={c: "string" for c in text}, low_memory=False
    )
    frame = frame[[spec.id, *dict.fromkeys(needed)]]
    try:
        check_rows(frame, spec, f"metadata {path}")
    except DataError as error:
        raise RunError(str(error)) from error
    for column in text:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), np.nan)
    return frame
