"""Where scoring writes its predictions, checked before any work, and how.

`check_out` runs before a single image is read: a predictions path that is one of the inputs
(the metadata CSV, the image HDF5 or folder, the run, the store) or an existing folder is refused,
so scoring can neither overwrite what it reads nor fail after an hour of embedding. The file is
written atomically (a temporary file beside it, then renamed): an interrupted write leaves the
older file whole.

Layouts:
- "csv": every column of the scoring output; written as CSV, or as Parquet when `--out` ends in
  `.parquet` (the extension chooses).
- "kaggle": `isic_id,target` (target = probability), the ISIC 2024 submission format (CSV only).

A CSV is opened in spreadsheets, which run a cell starting with `=`, `+`, `-` or `@` (or a tab or
carriage return, which some strip before looking) as a formula: an id such as `=HYPERLINK(...)`
in a metadata file would then act on the reader's machine. Text cells of a CSV are therefore
written as OWASP recommends (a single quote before such a cell; `escape_formulas`); numbers stay
numbers, and Parquet keeps every value as it is.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import preview
from common.files import atomic_write
from fuse.errors import RunError

log = logging.getLogger(__name__)

__all__ = [
    "FORMULA_STARTS",
    "LAYOUTS",
    "check_out",
    "check_page",
    "escape_formulas",
    "file_kind",
    "write_predictions",
]

LAYOUTS = ("csv", "kaggle")
# What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
EXTENSIONS = {".csv": "csv", ".parquet": "parquet"}


def file_kind(out: Path) -> str:
    """ "csv" or "parquet", from the extension of `out`."""
    return EXTENSIONS[out.suffix.lower()]


def check_out(out: Path | str, layout: str, inputs: dict[str, Path | str | None]) -> Path:
    """Refuse a predictions path that would destroy an input or cannot be written; say when an
    older predictions file will be replaced.

    Args:
        out: the predictions file asked for.
        layout: "csv" or "kaggle".
        inputs: {option name: path} of everything scoring reads (None entries are skipped).

    Returns:
        `out` as a Path.

    Raises:
        RunError: `layout` unknown; `out` is an existing folder, has an extension other than
            .csv / .parquet (or .parquet with the kaggle layout), or is (or lies inside) one of
            the inputs.
    """
    if layout not in LAYOUTS:
        raise RunError(f"format: expected one of {list(LAYOUTS)}, got {layout!r}")
    out = Path(out)
    if out.is_dir():
        raise RunError(
            f"--out {out}: is a folder; give a file path such as {out / 'predictions.csv'}"
        )
    target = out.resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source:
            raise RunError(
                f"--out {out} is the {option} input; scoring would overwrite it. "
                "Write the predictions to another file"
            )
        if source.is_dir() and source in target.parents and option in ("--run", "--store"):
            raise RunError(
                f"--out {out} lies inside the {option} folder {source}; write it elsewhere"
            )
    if out.suffix.lower() not in EXTENSIONS:
        raise RunError(
            f"--out {out}: expected a file ending in {' or '.join(EXTENSIONS)}, got "
            f"{out.suffix or 'no extension'!r}"
        )
    if layout == "kaggle" and file_kind(out) != "csv":
        raise RunError(f"--out {out}: the kaggle format is a CSV submission; use a .csv path")
    if out.exists():
        changed = dt.datetime.fromtimestamp(out.stat().st_mtime).isoformat(timespec="seconds")
        log.warning(
            "--out %s exists (last written %s); it will be replaced once scoring finishes",
            out,
            changed,
        )
    return out


def check_page(page: Path | str, inputs: dict[str, Path | str | None]) -> Path:
    """The triage page's path, checked like `check_out`: an `.html` file that is no input.

    Raises:
        RunError: `page` is a folder, does not end in .html, or is (or lies inside) an input.
    """
    page = Path(page)
    if page.is_dir():
        raise RunError(
            f"--html {page}: is a folder; give a file path such as {page / 'triage.html'}"
        )
    if page.suffix.lower() not in (".html", ".htm"):
        raise RunError(
            f"--html {page}: expected a file ending in .html, got {page.suffix or 'no extension'!r}"
        )
    target = page.resolve()
    for option, path in inputs.items():
        if path is not None and (
            target == Path(path).resolve()
            or Path(path).resolve() in target.parents
            and option in ("--run", "--store")
        ):
            raise RunError(
                f"--html {page} is, or lies inside, the {option} input; write it elsewhere"
            )
    return page


def write_predictions(
    result: pd.DataFrame, out: Path, layout: str, id_column: str, threshold: float
) -> None:
    """Write `result` (the "csv" layout's columns) to `out` in `layout`, atomically.

    In the kaggle layout a row that could not be scored gets the operating threshold (logged by id).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if layout == "kaggle":
        table = _kaggle(result, id_column, threshold)
    else:
        table = result
    if file_kind(out) == "parquet":
        atomic_write(out, lambda f: table.to_parquet(f, index=False))
    else:
        escaped = escape_formulas(table)
        atomic_write(out, lambda f: escaped.to_csv(f, index=False))


def escape_formulas(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of `table` whose text cells starting with a formula character (`FORMULA_STARTS`)
    have a single quote in front; numeric, boolean and missing cells are left as they are."""
    escaped = table.copy()
    for column in escaped.columns:
        values = escaped[column]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            continue
        text = values.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_STARTS))
        if text.any():
            escaped[column] = values.where(~text, "'" + values[text].astype(str))
    return escaped


def _kaggle(result: pd.DataFrame, id_column: str, threshold: float) -> pd.DataFrame:
    target = result["probability"].to_numpy(copy=True)
    missing = ~np.isfinite(target)
    if missing.any():
        # A submission needs a number per row; an unscored lesion is put at the flagging
        # level rather than at the bottom, where a missed melanoma would cost the most.
        log.warning(
            "kaggle format: %d row(s) could not be scored and get the operating threshold %.4g: %s",
            int(missing.sum()),
            threshold,
            preview(result.loc[missing, id_column].tolist()),
        )
        target[missing] = threshold
    return pd.DataFrame({"isic_id": result[id_column], "target": target})
