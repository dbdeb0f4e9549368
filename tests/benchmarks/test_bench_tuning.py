"""The tuning bench: both patiences on the same folds, alternated, and its table rows."""

from __future__ import annotations

import pytest

import benchmarks.tuning as tuning_bench
from benchmarks.tuning import SHORT_PATIENCE, bench_tuning, tuning_rows


@pytest.mark.slow
def test_bench_tuning_times_both_patiences_on_isic2020(shared_data):
    result = bench_tuning(trials=2, rounds=1, spec_path=shared_data / "isic2020" / "dataset.toml")
    assert result["data"] == "isic2020-dev" and result["rows"] == 25822
    assert result["default"]["patience"] == 50 and result["short"]["patience"] == SHORT_PATIENCE
    (default,) = result["default"]["seconds_per_trial"]
    (short,) = result["short"]["seconds_per_trial"]
    assert default > 0 and short > 0
    assert result["ratio"] == pytest.approx(short / default, rel=1e-2)
    # Trial 0 of both studies is the untuned defaults; 2 trials each: both scored something.
    assert 0 < result["short"]["best_value"] < 1 and 0 < result["default"]["best_value"] < 1
    assert isinstance(result["same_best_params"], bool)
    rows = tuning_rows(result)
    assert rows[0][0].startswith("optuna trial s (isic2020-dev, 2 trials) --trial-patience 10 vs")
    assert rows[0][3] == f"{result['ratio']:.2f}" and rows[0][4] == "<= 0.5"


def test_bench_tuning_falls_back_to_the_synthetic_table(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning_bench, "ISIC2020_SPEC", tmp_path / "absent" / "dataset.toml")
    name, frame, spec = tuning_bench._data(tmp_path, None)
    assert name == "synthetic ISIC 2024-like, 25,000 rows"
    assert len(frame) == 25_000 and spec.target in frame.columns
