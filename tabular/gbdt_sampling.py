"""Negative down-sampling of a fold's training part: which rows each seed's model trains on.

Every positive and at most `neg_ratio` negatives per positive, a different draw per seed and
fold (`GBDTConfig.neg_ratio`); validation parts are never sampled. `validation_offset` moves the
validation part's scores back to its own prevalence for early stopping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tabular.gbdt_config import GBDTConfig

if TYPE_CHECKING:
    from tabular.gbdt_folds import FoldData

__all__ = [
    "negative_sample",
    "sample_seed",
    "sampled_rows",
    "sampling_summary",
    "validation_offset",
]


def negative_sample(y: np.ndarray, neg_ratio: float | None, seed: int) -> np.ndarray | None:
    """Row positions keeping every positive and at most `neg_ratio` negatives per positive.

    Applied to a fold's training part only; validation rows are never dropped. None when
    nothing needs dropping: `neg_ratio` None or 0 (off), no positive to keep negatives for, or
    no more negatives than `neg_ratio` per positive.
    """
    if not neg_ratio:
        return None
    positives = np.flatnonzero(y == 1)
    negatives = np.flatnonzero(y == 0)
    if len(positives) == 0:
        return None
    keep = min(len(negatives), max(1, int(math.floor(neg_ratio * len(positives)))))
    if keep >= len(negatives):
        return None
    chosen = np.random.default_rng(seed).choice(negatives, keep, replace=False)
    return np.sort(np.concatenate([positives, chosen]))


def sample_seed(seed: int, fold: int) -> int:
    """The seed of one model's negative draw: another draw for every seed and fold."""
    return int(seed) + 7919 * int(fold)


def validation_offset(y_train: np.ndarray, keep: np.ndarray | None) -> float:
    """log(share of the training part's negatives in `keep`): 0 when nothing was dropped.

    A model trained on that share of the negatives predicts log-odds raised by -offset; adding
    the offset to the validation part's scores (its init score) makes early stopping watch the
    log loss at the validation part's own prevalence.
    """
    if keep is None:
        return 0.0
    positives = int((y_train == 1).sum())
    return math.log((len(keep) - positives) / (len(y_train) - positives))


def sampled_rows(y_train: np.ndarray, config: GBDTConfig, fold: int) -> np.ndarray | None:
    """Positions in a training part that some seed of `config` trains on; None = all of them."""
    draws = [negative_sample(y_train, config.neg_ratio, sample_seed(s, fold)) for s in config.seeds]
    if any(d is None for d in draws):
        return None
    rows = np.unique(np.concatenate([d for d in draws if d is not None]))
    return None if len(rows) == len(y_train) else rows


def sampling_summary(folds: Sequence[FoldData], config: GBDTConfig) -> dict:
    """What negative down-sampling did, for the stage's metrics.json.

    Returns:
        neg_ratio (0 = off), applied (some training part was down-sampled), and per fold the
        training part's positives and negatives, the negatives each model kept (the same count for
        every seed, each seed its own draw) and the rows each model trained on.
    """
    per_fold = []
    for data in folds:
        positives = int((data.y_train == 1).sum())
        negatives = int(len(data.y_train) - positives)
        keep = negative_sample(
            data.y_train, config.neg_ratio, sample_seed(config.seeds[0], data.fold)
        )
        kept = negatives if keep is None else int(len(keep) - positives)
        per_fold.append(
            {
                "fold": data.fold,
                "positives": positives,
                "negatives": negatives,
                "negatives_kept": kept,
                "rows_per_model": positives + kept,
            }
        )
    return {
        "neg_ratio": config.neg_ratio,
        "applied": any(f["negatives_kept"] < f["negatives"] for f in per_fold),
        "draw": "every positive and at most neg_ratio negatives per positive of each training "
        "part, a different draw per seed and fold; validation parts are never sampled; 0 = off",
        "folds": per_fold,
    }
