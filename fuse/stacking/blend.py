"""The rank blend of a run's two base models: `w * rank(p_gbdt) + (1 - w) * rank(p_fusion)`.

A rank is taken against a reference distribution (quantiles of the out-of-fold predictions of the
training part), not within the batch being scored, so one row scores the same alone or among
thousands. The weight is chosen on the training folds only (`oof_blend`), and for the saved blend
on every row (`BlendModel`, `blend/blend.json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from runfolder.layout import require_stage_file
from tabular.gbdt_model import Encode
from tabular.metrics import pauc80

__all__ = [
    "REFERENCE_POINTS",
    "BlendModel",
    "blend_scores",
    "choose_blend_weight",
    "oof_blend",
    "rank_reference",
    "to_rank",
]

# Quantiles kept per base model as the blend's rank reference: fine enough that the top 0.1% of
# an ISIC-sized set (the part pAUC80 looks at) keeps distinct ranks, small enough for JSON.
REFERENCE_POINTS = 4097


def rank_reference(p: np.ndarray, points: int = REFERENCE_POINTS) -> np.ndarray:
    """Strictly increasing quantiles of `p` that define its rank function (see `to_rank`)."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) <= points:
        return np.unique(p)
    return np.unique(np.quantile(p, np.linspace(0.0, 1.0, points)))


def to_rank(reference: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The share of the reference below `p` (0..1), linear between the reference's quantiles."""
    reference = np.asarray(reference, dtype=np.float64)
    if len(reference) == 1:
        return np.where(np.asarray(p) >= reference[0], 1.0, 0.0)
    levels = np.linspace(0.0, 1.0, len(reference))
    return np.interp(np.asarray(p, dtype=np.float64), reference, levels)


def blend_scores(
    weight_gbdt: float, references: dict, p_gbdt: np.ndarray, p_fusion: np.ndarray
) -> np.ndarray:
    """`w * rank(p_gbdt) + (1 - w) * rank(p_fusion)`, ranks against the stored references."""
    return weight_gbdt * to_rank(references["gbdt"], p_gbdt) + (1.0 - weight_gbdt) * to_rank(
        references["fusion"], p_fusion
    )


def choose_blend_weight(
    y: np.ndarray, p_gbdt: np.ndarray, p_fusion: np.ndarray, weights: tuple[float, ...]
) -> tuple[float, dict]:
    """The weight of gbdt that maximises pAUC80 on these rows (ties: the one nearest 0.5).

    Returns (weight, references) where references are the rank references of these rows.
    """
    references = {"gbdt": rank_reference(p_gbdt), "fusion": rank_reference(p_fusion)}
    if y.min() == y.max():
        return 0.5, references
    best, best_score = 0.5, -math.inf
    for w in sorted(weights, key=lambda w: abs(w - 0.5)):
        score = pauc80(y, blend_scores(w, references, p_gbdt, p_fusion))
        if score > best_score + 1e-12:
            best, best_score = float(w), score
    return best, references


def oof_blend(
    y: np.ndarray,
    folds: np.ndarray,
    p_gbdt: np.ndarray,
    p_fusion: np.ndarray,
    weights: Sequence[float],
) -> tuple[np.ndarray, dict[int, float]]:
    """Out-of-fold blend scores, shape (n,), and the weight each fold used.

    `weights`: the grid of gbdt weights tried (`StackConfig.blend_weights`). Fold k's weight and
    rank references come from the other folds' rows only.
    """
    p = np.full(len(y), np.nan)
    chosen = {}
    for k in np.unique(folds):
        train = folds != k
        weight, references = choose_blend_weight(
            y[train], p_gbdt[train], p_fusion[train], tuple(weights)
        )
        p[~train] = blend_scores(weight, references, p_gbdt[~train], p_fusion[~train])
        chosen[int(k)] = weight
    return p, chosen


class BlendModel:
    """The blend's weight and rank references, loaded once (`blend/blend.json`; a
    `runfolder.stage.Stage`)."""

    STAGE = "blend"
    MARKER = "blend.json"
    READS_METADATA = False
    NEEDS_FUSION = True
    encoders: list = []

    def __init__(self, weight_gbdt: float, references: dict[str, np.ndarray]):
        self.weight_gbdt, self.references = weight_gbdt, references

    @classmethod
    def load(cls, stage_dir: Path | str) -> BlendModel:
        record = json.loads(require_stage_file(Path(stage_dir), "blend.json").read_text())
        return cls(
            record["weight_gbdt"],
            {name: np.asarray(values) for name, values in record["references"].items()},
        )

    def predict(
        self,
        frame: pd.DataFrame | None,
        p_gbdt: np.ndarray,
        p_fusion: np.ndarray,
        encode: Encode | None = None,
    ) -> np.ndarray:
        """The blend on new rows from the base models' fold-averaged predictions, shape (n,).

        `frame` and `encode` are not used (the blend sees the base models only); they keep the
        signature of `StackModel.predict`.
        """
        return blend_scores(self.weight_gbdt, self.references, p_gbdt, p_fusion)
