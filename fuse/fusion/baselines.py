"""The fusion MLP's baseline on the same folds: logistic regression on embedding + metadata.

C is picked per fold from a small grid on the same validation pauc80 that stops the MLP, so both
get the same selection (and the same small optimistic bias).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np

from fuse.fusion.embeddings import Embeddings
from fuse.fusion.model import encode_meta
from fuse.fusion.training import finite_or_none, stop_score
from tabular.features import FeatureEncoder
from tabular.run import Run

log = logging.getLogger(__name__)

__all__ = ["LOGREG_CS", "LOGREG_MAX_ROWS", "logistic_baseline"]

LOGREG_CS = (0.0003, 0.001, 0.003, 0.01)
# Rows of a training part the logistic-regression baseline fits on at most (positives all kept).
LOGREG_MAX_ROWS = 100_000


def logistic_baseline(
    run: Run,
    embeddings: Embeddings,
    encoders: dict[int, FeatureEncoder],
    cs: Sequence[float] = LOGREG_CS,
    max_rows: int = LOGREG_MAX_ROWS,
    seed: int = 0,
) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold probabilities of a logistic regression on mean-over-views embeddings + metadata.

    Features (the mean embedding and the fold's metadata matrix) are standardised on each
    training part; C is picked per fold from `cs` by validation pauc80. A training part larger
    than `max_rows` keeps all its positives and a random share of its negatives (inside the
    training part only), which bounds the baseline's memory and time on ISIC 2024-sized runs.

    Returns:
        (p of shape (n,), per-fold info: C, valid_pauc80, training rows used, seconds).
    """
    from sklearn.linear_model import LogisticRegression

    y = run.target
    # float16 like the store: the mean embedding of every row costs half a view of the store.
    image = embeddings.mean_over_views(dtype=np.float16)
    oof = np.full(len(y), np.nan)
    info = []
    rng = np.random.default_rng(seed)
    for k, encoder in encoders.items():
        started = time.perf_counter()
        train_rows = np.flatnonzero(run.fold != k)
        valid_rows = np.flatnonzero(run.fold == k)
        if len(train_rows) > max_rows:
            positive = train_rows[y[train_rows] == 1]
            negative = train_rows[y[train_rows] == 0]
            keep = rng.choice(negative, size=max(max_rows - len(positive), 1), replace=False)
            train_rows = np.sort(np.concatenate([positive, keep]))
        meta = encode_meta(encoder, run.frame)
        x_train = np.hstack([image[train_rows].astype(np.float32), meta[train_rows]])
        mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = x_train.std(axis=0, dtype=np.float64).astype(np.float32)
        std[std < 1e-6] = 1.0
        x_train -= mean
        x_train /= std
        x_valid = (np.hstack([image[valid_rows].astype(np.float32), meta[valid_rows]]) - mean) / std
        best: tuple[float, float | None, np.ndarray | None] = (-math.inf, None, None)
        for c in cs:
            model = LogisticRegression(C=c, max_iter=2000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter at large C
                model.fit(x_train, y[train_rows])
            p = model.predict_proba(x_valid)[:, 1]
            score = stop_score(y[valid_rows], p)
            if score > best[0]:
                best = (score, c, p)
        oof[valid_rows] = best[2]
        info.append(
            {
                "fold": k,
                "C": best[1],
                "valid_pauc80": finite_or_none(best[0]),
                "train_rows": int(len(train_rows)),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        log.info("logreg fold %d: C=%s, valid pauc80 %.4f", k, best[1], best[0])
        del x_train, x_valid
    return oof, info
