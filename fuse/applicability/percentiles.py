"""From raw part scores to percentiles of the training rows' own out-of-fold scores, the
combined score, the threshold that marks a share of the training rows, and its label."""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["combine", "marking_threshold", "pct_label", "percentile"]

log = logging.getLogger(__name__)


def percentile(reference_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Share of the reference scores strictly below each score (NaN stays NaN)."""
    out = np.searchsorted(reference_sorted, scores, side="left") / max(len(reference_sorted), 1)
    return np.where(np.isnan(scores), np.nan, out)


def combine(percentiles: dict[str, np.ndarray]) -> np.ndarray:
    """The largest available part percentile per row (NaN when no part could score it)."""
    stacked = np.vstack(list(percentiles.values()))
    has = np.isfinite(stacked).any(axis=0)
    out = np.full(stacked.shape[1], np.nan)
    out[has] = np.nanmax(stacked[:, has], axis=0)
    return out


def marking_threshold(novelty: np.ndarray, share: float) -> tuple[float, float]:
    """(threshold, share of rows at or above it): the lowest threshold among the rows' own
    values marking at most `share` of them (ties are marked together or not at all). When no
    value does (most rows tie at the top), 1.0: only rows beyond every training row's score
    are marked (no training row reaches 1.0, since its own score is not below itself)."""
    values = np.sort(novelty[np.isfinite(novelty)])
    n = len(values)
    for t in np.unique(values):
        marked = n - np.searchsorted(values, t, side="left")
        if marked / n <= share:
            return float(t), marked / n
    return 1.0, 0.0


def pct_label(p: float) -> str:
    """0.9993 -> '99.9th pct'; 1.0 (beyond every training row's out-of-fold score) -> 'beyond
    every training row'."""
    if p >= 1.0:
        return "beyond every training row"
    value = math.floor(p * 1000) / 10
    return f"{value:g}th pct"
