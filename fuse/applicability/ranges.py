"""The training range of each numeric metadata column, and which scored values lie far outside it.

`invoke stack` records, per numeric feature column of the spec, the smallest and largest value
seen in the run's training rows (`stack/ranges.json`; this module writes and reads it). Scoring
then marks a row whose value lies beyond that range by more than `MARGIN` of its width (age 250
against training ages 0..85), or is negative where no training value was (age -5): LightGBM
extends its outermost leaf to any value beyond the range, and the MLP extrapolates linearly, so
such a score is a guess of another kind than the others. The check is one small function
(`outside_training`) that the applicability work (`unlike_training`, `novelty`) can call as one
of its signals.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["MARGIN", "RANGES_FILE", "load_ranges", "outside_training", "write_ranges"]

RANGES_FILE = "ranges.json"
# How far beyond the training range a value may lie before it is marked, as a share of the
# range's width: a little beyond the oldest patient seen is still a plausible patient, far beyond
# the span is a typo or another unit. A quarter keeps the check quiet on new rows of the same
# population even when the training set is small (its extremes then fall short of the
# population's); a sign no training value had (age -5) is marked whatever the margin.
MARGIN = 0.25


def _training_ranges(frame: pd.DataFrame, columns) -> dict[str, dict[str, float]]:
    """{column: {"min", "max", "rows"}} over the non-missing values of `frame`'s numeric `columns`
    (columns absent, or without any value, are left out)."""
    ranges = {}
    for column in columns:
        if column not in frame.columns:
            continue
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            ranges[str(column)] = {
                "min": float(values.min()),
                "max": float(values.max()),
                "rows": int(len(values)),
            }
    return ranges


def write_ranges(stage_dir: Path, frame: pd.DataFrame, columns) -> Path:
    """Write `<stage_dir>/ranges.json` (atomically) from the training rows; returns its path."""
    path = Path(stage_dir) / RANGES_FILE
    atomic_write_json(path, {"margin": MARGIN, "columns": _training_ranges(frame, columns)})
    return path


def load_ranges(stage_dir: Path) -> dict[str, dict[str, float]] | None:
    """The ranges `write_ranges` recorded, or None for a run stacked before they were (logged)."""
    path = Path(stage_dir) / RANGES_FILE
    if not path.is_file():
        log.info(
            "%s is absent (run stacked by an older version): values far outside the training "
            "range are not marked; rerun `invoke stack --run R` to record the ranges",
            path,
        )
        return None
    return json.loads(path.read_text())["columns"]


def outside_training(
    frame: pd.DataFrame, ranges: dict[str, dict[str, float]], margin: float = MARGIN
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Which rows of `frame` hold a value far outside its column's training range.

    Args:
        frame: the rows to score, shape (n, ...); missing values are never outside.
        ranges: {column: {"min", "max", "rows"}}, as `load_ranges` returns them.
        margin: share of a range's width a value may lie beyond it.

    Returns:
        (mask of shape (n,), text per row such as "age_approx = 250 (training 15..85)" or "",
        {column: mask of its rows outside}) for the columns with at least one row outside.
    """
    n = len(frame)
    mask = np.zeros(n, dtype=bool)
    notes: list[list[str]] = [[] for _ in range(n)]
    by_column: dict[str, np.ndarray] = {}
    for column, bounds in ranges.items():
        if column not in frame.columns:
            continue
        low, high = float(bounds["min"]), float(bounds["max"])
        slack = margin * (high - low)
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            beyond = (values < low - slack) | (values > high + slack)
            negative = (values < 0) & (low >= 0)
            outside = np.isfinite(values) & (beyond | negative)
        if not outside.any():
            continue
        by_column[column] = outside
        mask |= outside
        for row in np.flatnonzero(outside):
            notes[row].append(
                f"{column} = {_number(values[row])} (training {_number(low)}..{_number(high)})"
            )
    return mask, ["; ".join(note) for note in notes], by_column


def _number(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) and float(value).is_integer() else f"{value:.4g}"
