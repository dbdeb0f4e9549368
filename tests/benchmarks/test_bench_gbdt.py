"""The LightGBM part: our stage and plain LightGBM, each in its own child process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.gbdt import bench_gbdt
from tabular.spec import load_spec

SPEC = """
[dataset]
name = "synthetic"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "patient_id"
patient = "patient_id"
categorical = ["site"]
numeric = ["size", "age"]
"""


def make(tmp_path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    size = rng.gamma(2.0, 2.0, n)
    frame = pd.DataFrame({
        "image_id": [f"img{i}" for i in range(n)],
        "patient_id": [f"P{i // 5}" for i in range(n)],
        "site": rng.choice(["arm", "leg", "back"], n),
        "size": size,
        "age": rng.normal(55, 10, n).round(),
        "target": (size + rng.normal(scale=1.0, size=n) > 7).astype(int),
    })
    frame.to_csv(tmp_path / "metadata.csv", index=False)
    (tmp_path / "dataset.toml").write_text(SPEC)
    return load_spec(tmp_path / "dataset.toml"), frame


@pytest.mark.slow
def test_bench_gbdt_small(tmp_path):
    spec, frame = make(tmp_path, n=300)
    report = bench_gbdt(frame, spec, n_folds=3, seeds=(0,), num_threads=1)
    for side in ("ours", "baseline"):
        assert report[side]["fit_seconds"] > 0 and report[side]["peak_rss_bytes"] > 10 * 1024**2
        assert 0 <= report[side]["pauc80"] <= 0.2
    assert report["ours"]["n_features"] > report["baseline"]["n_features"]
    assert report["ratios"]["fit_seconds"] > 0 and report["ratios"]["peak_rss"] > 0
    json.dumps(report)
