"""`invoke bench`'s printed table: every figure beside its baseline and ratio."""

from __future__ import annotations

from fuse.bench import format_table, machine


def test_table_prints_each_figure_with_its_baseline_and_ratio():
    result = {
        "machine": machine(),
        "parts": {
            "embedding": {
                "pipeline_images_per_s": 57.6,
                "naive_images_per_s": 18.2,
                "ceiling_images_per_s": 59.8,
                "reader_images_per_s": 1900.0,
                "pipeline_over_naive": 3.165,
                "pipeline_over_ceiling": 0.963,
                "pipeline_over_reader": 0.03,
                "min_cosine_to_naive": 0.9976,
                "images_checked": 65,
                "store_rows": 1000,
                "store_write_rows_per_s": 84000,
                "store_read_rows_per_s": 95000,
            },
            "gbdt": [
                {
                    "rows": 10000,
                    "ours": {"features_seconds": 0.1, "fit_seconds": 1.9, "peak_rss_bytes": 3.2e8},
                    "baseline": {"fit_seconds": 0.6, "peak_rss_bytes": 2.0e8},
                    "ratios": {"fit_seconds": 3.17, "peak_rss": 1.6},
                }
            ],
            "fusion": [
                {
                    "store": {"rows": 10000},
                    "mlp": {"seconds": 0.8, "rows_per_s": 12500, "peak_vs_store": 23.0},
                    "linear": {"seconds": 0.1, "rows_per_s": 100000},
                    "mlp_vs_linear_time": 8.0,
                }
            ],
            "scoring": {
                "n_images": 200,
                "score_images_per_s": 57.8,
                "embed_only_images_per_s": 58.4,
                "ratio": 0.99,
            },
        },
    }
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0]
    expected = {
        "embed pipeline images/s vs naive loop": ("57.6", "18.2", "3.17"),
        "embed pipeline images/s vs model-only ceiling": ("57.6", "59.8", "0.96"),
        "embed pipeline images/s vs its reader (decode only)": ("57.6", "1900.0", "0.03"),
        "embed vectors vs naive fp32, min centred cosine (65 images)": ("0.9976", ">=", "0.95"),
        "gbdt 5-fold fit s (10000 rows) vs raw LightGBM": ("1.9", "0.6", "3.17"),
        "fusion epoch s (10000 rows) vs linear pass": ("0.8", "0.1", "8.00"),
        "score images/s (200 images) vs embedding alone": ("57.8", "58.4", "0.99"),
    }
    for label, cells in expected.items():
        (line,) = [x for x in lines if x.startswith(label)]
        assert line[len(label) :].split()[:3] == list(cells), line
