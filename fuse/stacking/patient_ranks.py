"""Each base score's rank among the scores of its patient's other lesions, as stack features.

A lesion that scores high for its patient stands out the way an "ugly duckling" does to a
dermatologist: the same score means more on a patient whose other lesions all score low. The stack
gets, per base model, the score's percentile rank within the rows of the same patient (a common
second-stage feature of the ISIC 2024 Challenge's solutions). It is computed from the rows at
hand, never from labels: out of fold over the training part and the evaluated part separately, at
scoring over the scored rows (which `invoke score` cuts into chunks of whole patients).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["RANK_SUFFIX", "patient_rank", "rank_feature"]

# `p_fusion` -> `p_fusion_patient_rank`.
RANK_SUFFIX = "_patient_rank"


def rank_feature(name: str) -> str:
    """The stack feature holding base feature `name`'s rank within its patient."""
    return f"{name}{RANK_SUFFIX}"


def patient_rank(patients: pd.Series | np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Percentile rank of each score among its patient's scores, shape (n,), in (0, 1].

    Ties share their average rank; a patient's highest score is 1.0 (also a patient's only
    lesion). A row with no patient id or no score (NaN) gets NaN, which LightGBM routes as missing;
    it is left out of its patient's other ranks.
    """
    frame = pd.DataFrame(
        {
            "patient": pd.Series(np.asarray(patients, dtype=object)),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    ranks = frame.groupby("patient", dropna=True)["score"].rank(method="average", pct=True)
    return ranks.reindex(frame.index).to_numpy(dtype=np.float64)
