"""Metadata cells as the feature encoder reads them: categories as text, numeric columns as
float64 (text and infinity refused, naming the rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tabular.errors import DataError, preview

__all__ = ["as_text", "numeric_values"]


def as_text(values: pd.Series) -> pd.Series:
    """Categories compared as text; missing stays NaN (so 'nan' text is not confused with NaN)."""
    array = values.to_numpy(dtype=object, copy=True)
    present = ~pd.isna(array)
    # A column read from CSV already holds str: one C-level check instead of str() per cell.
    if pd.api.types.infer_dtype(array, skipna=True) not in ("string", "empty"):
        array[present] = [str(v) for v in array[present]]
    array[~present] = np.nan
    return pd.Series(array, index=values.index, dtype=object)


def numeric_values(values: pd.Series, column: str, ids: pd.Series) -> np.ndarray:
    """A numeric column as float64, NaN kept; text or infinity is refused naming the rows."""
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = (values.notna() & parsed.isna()).to_numpy()
        if bad.any():
            raise DataError(
                f"numeric column '{column}' holds text, e.g. {values[bad].iloc[0]!r} "
                f"(ids {preview(ids[bad].tolist())})"
            )
        array = parsed.to_numpy(dtype=np.float64, na_value=np.nan)
    infinite = np.isinf(array)
    if infinite.any():
        raise DataError(
            f"numeric column '{column}' holds infinite values, e.g. {float(array[infinite][0])} "
            f"(ids {preview(ids[infinite].tolist())})"
        )
    return array
