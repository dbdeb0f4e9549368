"""Small tabular test data: `make_spec` (a toy `DatasetSpec`) and `toy` (a metadata table for the
LightGBM stage's tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tabular.spec import DatasetSpec

__all__ = ["make_spec", "toy"]


def make_spec(**overrides) -> DatasetSpec:
    """The toy data sets' spec: id, target, patient groups, `site` categorical, `age` and `size`
    numeric; `overrides` replace fields."""
    fields = dict(
        name="toy",
        root=Path("."),
        metadata=Path("toy.csv"),
        images=None,
        id="id",
        target="target",
        group="patient",
        patient="patient",
        categorical=("site",),
        numeric=("age", "size"),
    )
    fields.update(overrides)
    return DatasetSpec(**fields)


def toy(n=400, seed=0):
    """(frame, spec, fold of each row): `n` rows, 4 rows a patient, 4 folds by patient; the
    target follows `x` (a noisy copy of the signal), `noise` and `site` carry none."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    frame = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "patient": [f"p{i // 4}" for i in range(n)],
            "site": rng.choice(["arm", "leg", "back"], n),
            "x": signal + rng.normal(scale=0.5, size=n),
            "noise": rng.normal(size=n),
            "target": (signal > 0.8).astype(int),
        }
    )
    spec = make_spec(numeric=("x", "noise"))
    folds = (np.arange(n) // 4) % 4  # patients never straddle folds
    return frame, spec, folds
