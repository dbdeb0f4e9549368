"""The fusion part: one MLP epoch and one linear pass over the same synthetic store."""

from __future__ import annotations

import pytest

from benchmarks.fusion import bench_fusion_epoch


@pytest.mark.slow
def test_epoch_benchmark_reports_both_learners_and_memory(tmp_path):
    report = bench_fusion_epoch(
        n_rows=300, dim=32, views=2, n_meta=4, batch_size=64, workdir=tmp_path
    )
    assert report["store"]["bytes"] >= 300 * 2 * 32 * 2
    for kind in ("mlp", "linear"):
        assert report[kind]["rows"] == 300 and report[kind]["rows_per_s"] > 0
        assert report[kind]["peak_rss_bytes"] >= report[kind]["rss_before_bytes"] > 0
    assert report["mlp_vs_linear_time"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone
