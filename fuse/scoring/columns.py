"""The scoring output's columns beyond the models' outputs: whether a row was a training row,
how unlike the training rows it is (the applicability detector joined with the range check), and
why a row has no score.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from common.errors import preview
from fuse.applicability.ranges import outside_training
from fuse.scoring.run_models import RunModels

log = logging.getLogger(__name__)

__all__ = ["applicability_columns", "error_text", "in_training", "outside_training_columns"]


def in_training(models: RunModels, ids: list[str]) -> np.ndarray:
    """True where the id was one of the run's training rows (logged: those scores are in-sample)."""
    training = models.training_ids()
    mask = np.array([i in training for i in ids], dtype=bool)
    if mask.any():
        seen = [i for i, m in zip(ids, mask, strict=True) if m]
        log.warning(
            "%d of the %d scored id(s) were in run %s's training data: their scores are in-sample "
            "(better than the out-of-fold figures promise), marked in column in_training: %s",
            len(seen),
            len(ids),
            models.run.dir.name,
            preview(seen),
        )
    return mask


def outside_training_columns(models: RunModels, frame: pd.DataFrame, spec):
    """(mask, text per row) of rows with a value far outside the training range, or (None, None)
    for a run that did not record its ranges. Logs each column with the ids."""
    if models.ranges is None:
        return None, None
    mask, text, by_column = outside_training(frame, models.ranges)
    ids = frame[spec.id].to_numpy()
    for column, rows in by_column.items():
        bounds = models.ranges[column]
        log.warning(
            "column '%s': %d row(s) hold values far outside the training range %s..%s, so their "
            "scores extrapolate (marked in column out_of_range): %s",
            column,
            int(rows.sum()),
            bounds["min"],
            bounds["max"],
            preview(ids[rows].tolist()),
        )
    return mask, text


def applicability_columns(
    models: RunModels,
    novelty: dict | None,
    probability: np.ndarray,
    outside: np.ndarray | None,
    outside_text: list[str] | None,
) -> dict:
    """The columns `unlike_training`, `novelty` and `novelty_reason`, one notion of "unlike
    training": the detector's (image, acquisition, metadata) joined with the range check of
    `fuse.applicability.ranges` (a value far outside the training range marks the row too, its text
    in the reason). Rows without a probability (not scored) get empty values; a run without the
    applicability stage gets the three columns empty (logged once by `RunModels`).
    """
    n = len(probability)
    scored = np.isfinite(probability)
    if novelty is None:
        return {
            "unlike_training": pd.array([None] * n, dtype="boolean"),
            "novelty": np.full(n, np.nan),
            "novelty_reason": [""] * n,
        }
    unlike = novelty["unlike_training"].astype(bool).copy()
    reason = [str(r) for r in novelty["reason"]]
    if outside is not None and outside_text is not None:
        for row in np.flatnonzero(outside):
            # The detector's metadata part already names values beyond its own (narrower) range.
            if outside_text[row] and "metadata" not in reason[row]:
                extra = f"metadata far outside the training range: {outside_text[row]}"
                reason[row] = f"{reason[row]}; {extra}" if reason[row] else extra
        unlike |= outside
    values = np.where(scored, novelty["novelty"], np.nan)
    flags = pd.array(
        [bool(u) if s else None for u, s in zip(unlike, scored, strict=True)], dtype="boolean"
    )
    reason = [r if s and u else "" for r, u, s in zip(reason, unlike, scored, strict=True)]
    marked = int((unlike & scored).sum())
    if marked:
        what = "images" if models.needs_images else "rows"
        log.warning(
            "%d of %d %s look unlike the %s this run was trained on: their probabilities may not "
            "hold (marked in columns unlike_training and novelty_reason)",
            marked,
            int(scored.sum()),
            what,
            what,
        )
    return {"unlike_training": flags, "novelty": values, "novelty_reason": reason}


def error_text(image_id: str, errors: dict[str, str], embedded: bool, p_gbdt: float) -> str:
    reason = errors.get(image_id, "")
    if embedded or not reason:
        return reason
    tail = "p_gbdt is from metadata only" if math.isfinite(p_gbdt) else "p_gbdt needs the image too"
    return f"{reason}; not scored: the final model needs the image ({tail})"
