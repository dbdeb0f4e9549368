"""The detector's metadata part: numeric values beyond the training range widened by a margin
(the excess in units of the range) plus one per category never seen at fit."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fuse.applicability.config import ApplicabilityConfig
from runfolder.errors import RunError

__all__ = ["MetadataPart"]

log = logging.getLogger(__name__)

_MISSING = "<missing>"


class MetadataPart:
    """Numeric values beyond the training range (with a margin) and categories never seen."""

    name = "metadata"

    def __init__(self, ranges: dict[str, list[float]], seen: dict[str, list[str]]):
        self.ranges = ranges  # column -> [low, high, span]
        self.seen = seen  # column -> categories seen at fit (as text; missing as _MISSING)
        self._seen_sets = {c: set(v) for c, v in seen.items()}

    @property
    def columns(self) -> list[str]:
        return list(self.ranges) + list(self.seen)

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        numeric: Sequence[str],
        categorical: Sequence[str],
        config: ApplicabilityConfig,
    ) -> MetadataPart:
        ranges = {}
        for col in numeric:
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                raise RunError(
                    f"applicability: numeric column {col!r} has no numeric value in the training "
                    "rows"
                )
            low, high = float(values.min()), float(values.max())
            span = max(high - low, 1e-9)
            margin = config.numeric_margin * span
            ranges[col] = [low - margin, high + margin, span]
        seen = {col: sorted(set(_categories(frame[col]))) for col in categorical}
        return cls(ranges, seen)

    def _components(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        parts = {}
        for col, (low, high, span) in self.ranges.items():
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            excess = np.maximum(values - high, low - values) / span
            # Missing or non-numeric values are not "out of range" (validation reports text).
            parts[col] = np.where(np.isfinite(excess), np.maximum(excess, 0.0), 0.0)
        for col, known in self._seen_sets.items():
            parts[col] = np.array([v not in known for v in _categories(frame[col])], dtype=float)
        return parts

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        parts = self._components(frame)
        if not parts:
            return np.zeros(len(frame))
        return np.sum(list(parts.values()), axis=0)

    def detail(self, frame_row: pd.DataFrame) -> str:
        words = []
        for col, value in self._components(frame_row).items():
            if value[0] <= 0:
                continue
            raw = frame_row[col].iloc[0]
            if col in self.ranges:
                low, high, _ = self.ranges[col]
                words.append(f"{col} = {raw} outside training {low:.4g}..{high:.4g} (with margin)")
            elif pd.isna(raw):
                words.append(f"{col} missing, never missing in training")
            else:
                words.append(f"{col} = {raw!r} never seen in training")
        return ", ".join(words)

    def state(self) -> tuple[dict, dict]:
        return {"ranges": self.ranges, "seen": self.seen}, {}

    @classmethod
    def from_state(cls, record: dict, arrays: dict) -> MetadataPart:
        return cls(record["ranges"], record["seen"])


def _categories(series: pd.Series) -> list[str]:
    """The values as text, a missing one as `_MISSING`."""
    return [_MISSING if pd.isna(v) else str(v) for v in series.tolist()]
