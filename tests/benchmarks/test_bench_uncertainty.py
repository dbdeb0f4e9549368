"""The bootstrap part: the report's intervals timed in a child, beside the naive loop."""

import pytest

from benchmarks.uncertainty import bench_bootstrap


def test_bench_bootstrap_small_table_uses_ham10000_like_defaults():
    result = bench_bootstrap(2000, models=2, baseline_resamples=1)
    assert (result["rows"], result["positives"], result["groups"]) == (2000, 386, 1494)
    assert result["n_resamples"] == 1000 and result["figures"] == 6 and result["models"] == 2
    assert result["seconds"] > 0 and result["peak_rss_bytes"] > 0
    assert result["baseline_seconds_scaled"] == pytest.approx(
        result["baseline_seconds_per_resample"] * 1000, rel=0.01
    )
    interval = result["roc_auc_interval"]
    assert interval["low"] < interval["estimate"] < interval["high"]


def test_bench_bootstrap_large_defaults_follow_isic2024():
    # Only the defaults: 401,059 rows are measured by `python -m benchmarks.uncertainty`.
    result = bench_bootstrap(100_000, models=1, baseline_resamples=0)
    assert (result["positives"], result["groups"]) == (98, 1042)
    assert result["baseline_seconds_scaled"] is None
