"""Per-patient metadata features: each continuous feature normalised within its patient, and the
patient's lesion count, from the rows given only.

A malignant lesion tends to look unlike the patient's other lesions (the "ugly duckling" sign).
These figures come from the rows given to `FeatureEncoder.transform` only, so at scoring time
they come from the scored rows of that patient. A row without a patient is its own patient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["patient_codes", "patient_features"]

# Added to a patient's standard deviation, as in the public ISIC 2024 notebooks, so that a feature
# constant within a patient gives 0 rather than a division by zero.
_PATIENT_EPS = 1e-5
# Per-patient statistics are computed this many columns at a time to bound temporary memory.
_PATIENT_CHUNK = 16


def patient_codes(patients: pd.Series) -> np.ndarray:
    """One integer per row naming its patient, shape (n_rows,): rows of one patient share a code,
    and a row without a patient (NaN / None) gets a code of its own, never pooled with other such
    rows."""
    codes, _ = pd.factorize(patients, use_na_sentinel=True)
    lone = codes < 0
    if lone.any():
        codes = codes.copy()
        codes[lone] = codes.max(initial=-1) + 1 + np.arange(int(lone.sum()))
    return codes


def patient_features(
    patients: pd.Series,
    continuous: Mapping[str, np.ndarray],
    norm_columns: Sequence[dict],
    count_column: int,
    position: Mapping[str, int],
    out: np.ndarray,
) -> None:
    """Write per-patient features into `out` (n_rows, n_features), vectorised.

    Args:
        patients: each row's patient as text (NaN for none), shape (n_rows,).
        continuous: the continuous features by name, each (n_rows,).
        norm_columns: encoder columns of kind `patient_norm`; each `source` names a key of
            `continuous`; written `(x - patient mean) / (patient std + _PATIENT_EPS)`.
        count_column: position in `out` of the lesions-per-patient column.
        position: column name -> position in `out`.
    """
    codes = patient_codes(patients)
    counts = np.bincount(codes)
    out[:, count_column] = counts[codes]
    keys = pd.Series(codes, copy=False)
    for start in range(0, len(norm_columns), _PATIENT_CHUNK):
        chunk = norm_columns[start : start + _PATIENT_CHUNK]
        block = pd.DataFrame({c["source"]: continuous[c["source"]] for c in chunk})
        grouped = block.groupby(keys, sort=False)
        mean = grouped.transform("mean").to_numpy()
        std = grouped.transform("std").to_numpy()
        with np.errstate(all="ignore"):
            normalised = (block.to_numpy() - mean) / (std + _PATIENT_EPS)
        for j, column in enumerate(chunk):
            out[:, position[column["name"]]] = normalised[:, j]
