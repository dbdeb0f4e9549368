"""Reading and checking a data set's metadata table against its spec.

Every refusal names the spec key or column, and the first offending ids with their count, so a
user can find the rows at fault in a table of hundreds of thousands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview
from tabular.spec import DatasetSpec

__all__ = ["check_images", "check_metadata", "check_rows", "read_metadata"]

log = logging.getLogger(__name__)


def read_metadata(spec: DatasetSpec, require_target: bool = True) -> pd.DataFrame:
    """Read `spec.metadata` and check it.

    The id column is read as text; categorical columns as text (NaN where empty); numeric
    columns as float. Train-only columns are kept in the frame (features never use them).

    Args:
        spec: the data set's spec.
        require_target: training needs the target; scoring does not.

    Returns:
        The table, one row per id, in file order.

    Raises:
        DataError: the file is missing, empty, or has a header but no rows; a column the spec
            names is missing; an id is duplicated or empty; the target is missing, not 0/1, or of
            one class only; the group has missing values; a numeric column holds text.
    """
    if not spec.metadata.exists():
        raise DataError(f"spec '{spec.name}': metadata file not found: {spec.metadata}")
    where = f"spec '{spec.name}': metadata file {spec.metadata}"
    size = spec.metadata.stat().st_size
    if size == 0:
        # A truncated copy or an interrupted export: pandas would only say "No columns to parse".
        raise DataError(
            f"{where} is empty (0 bytes); expected a CSV with a header line and one row per image"
        )
    text_columns = {spec.id, spec.group, *spec.categorical}
    if spec.patient:
        text_columns.add(spec.patient)
    try:
        frame = pd.read_csv(
            spec.metadata,
            dtype={c: "string" for c in text_columns},
            low_memory=False,
        )
    except pd.errors.EmptyDataError as error:
        raise DataError(
            f"{where} has no header line (only blank lines, {size} bytes); expected a CSV with a "
            "header line and one row per image"
        ) from error
    if frame.empty:
        # Checked before the columns: with no rows, the header is all there is to show.
        columns = [str(c) for c in frame.columns]
        shown = ", ".join(columns[:10]) + (
            f", ... ({len(columns) - 10} more)" if len(columns) > 10 else ""
        )
        raise DataError(f"{where} has a header but no rows (columns: {shown})")
    check_metadata(frame, spec, require_target=require_target)
    for column in spec.numeric:
        frame[column] = frame[column].astype("float64")
    for column in text_columns:
        # Plain object strings with NaN are what pandas, LightGBM and JSON all handle.
        frame[column] = frame[column].astype(object).where(frame[column].notna(), np.nan)
    return frame


def check_metadata(frame: pd.DataFrame, spec: DatasetSpec, require_target: bool = True) -> None:
    """Check a metadata frame against its spec; see `read_metadata` for what is refused."""
    where = f"metadata {spec.metadata.name}"
    needed = {"id": spec.id, "group": spec.group}
    if spec.patient:
        needed["patient"] = spec.patient
    if require_target:
        if not spec.target:
            raise DataError(f"spec '{spec.name}': key 'target' is not set, training needs it")
        needed["target"] = spec.target
    for key, column in needed.items():
        if column not in frame.columns:
            raise DataError(f"{where}: column '{column}' (spec key '{key}') is missing")
    for key in ("categorical", "numeric", "exclude"):
        for column in getattr(spec, key):
            if column not in frame.columns:
                raise DataError(f"{where}: column '{column}' (spec key '{key}') is missing")

    if frame.empty:
        raise DataError(f"{where}: has no rows")
    _check_ids(frame, spec, where)
    ids = frame[spec.id]

    group_missing = ids[frame[spec.group].isna()]
    if len(group_missing):
        raise DataError(
            f"{where}: column '{spec.group}' (spec key 'group') has missing values, "
            f"ids {preview(list(group_missing))}"
        )

    _check_numeric(frame, spec, where)

    if require_target:
        _check_target(frame, spec)


def check_rows(frame: pd.DataFrame, spec: DatasetSpec, where: str) -> None:
    """The checks every metadata row meets, for training (`check_metadata`) and for scoring
    (`fuse.scoring.rows.read_scoring_metadata`): `_check_ids`, then `_check_numeric`.

    `where` begins each message (e.g. "metadata train.csv"). The frame's rows are the file's rows
    in order (a fresh `read_csv`), so that row i is file line i + 2.

    Raises:
        DataError: see `_check_ids` and `_check_numeric`.
    """
    _check_ids(frame, spec, where)
    _check_numeric(frame, spec, where)


def _check_ids(frame: pd.DataFrame, spec: DatasetSpec, where: str) -> None:
    """Every id is present and unique.

    Raises:
        DataError: an id is empty (names the file lines, counted with the header as line 1), or
            repeated (names the ids).
    """
    ids = frame[spec.id]
    empty = np.flatnonzero((ids.isna() | (ids.astype(str).str.strip() == "")).to_numpy())
    if len(empty):
        raise DataError(
            f"{where}: column '{spec.id}' (spec key 'id') is empty in rows "
            f"{preview((empty + 2).tolist())} (file lines)"
        )
    duplicated = ids[ids.duplicated(keep=False)].unique()
    if len(duplicated):
        raise DataError(
            f"{where}: duplicate ids in column '{spec.id}', {preview(list(duplicated))}"
        )


def _check_numeric(frame: pd.DataFrame, spec: DatasetSpec, where: str) -> None:
    """The spec's numeric columns hold numbers (empty cells allowed); a column read as text is
    replaced in `frame` by its parsed values. Columns absent from `frame` are left to the caller.

    Raises:
        DataError: a numeric column holds text (names the column, the first value and the ids).
    """
    ids = frame[spec.id]
    for column in spec.numeric:
        if column not in frame.columns or pd.api.types.is_numeric_dtype(frame[column]):
            continue
        values = frame[column]
        parsed = pd.to_numeric(values, errors="coerce")
        bad = values.notna() & parsed.isna()
        if bad.any():
            raise DataError(
                f"{where}: numeric column '{column}' holds text, e.g. "
                f"{values[bad].iloc[0]!r} (ids {preview(list(ids[bad]))})"
            )
        frame[column] = parsed


def _check_target(frame: pd.DataFrame, spec: DatasetSpec) -> None:
    """The target must be 0/1 in every row, with both classes present."""
    where = f"metadata {spec.metadata.name}"
    target = pd.to_numeric(frame[spec.target], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        examples = frame.loc[bad, spec.target].head(3).tolist()
        raise DataError(
            f"{where}: column '{spec.target}' (spec key 'target') must be 0 or 1; got {examples} "
            f"in ids {preview(list(frame.loc[bad, spec.id]))}"
        )
    classes = sorted(target.unique().tolist())
    if len(classes) < 2:
        raise DataError(
            f"{where}: column '{spec.target}' (spec key 'target') has one class only "
            f"({int(classes[0])} in all {len(frame)} rows); training needs both 0 and 1"
        )
    frame[spec.target] = target.astype("int8")


def check_images(frame: pd.DataFrame, spec: DatasetSpec, available_ids: Iterable[str]) -> list[str]:
    """Match metadata rows to the image source's ids.

    Returns:
        Ids that have an image but no metadata row (listed in the log, not fatal).

    Raises:
        DataError: rows without an image, naming how many and the first few.
    """
    available = set(map(str, available_ids))
    rows = frame[spec.id].astype(str)
    missing = rows[~rows.isin(available)].tolist()
    if missing:
        raise DataError(
            f"spec '{spec.name}': rows without an image in {spec.images}, ids {preview(missing)}"
        )
    extra = sorted(available - set(rows))
    if extra:
        log.warning(
            "%d image(s) have no metadata row and are ignored: %s", len(extra), preview(extra)
        )
    return extra
