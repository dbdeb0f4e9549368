"""The LightGBM part: the default stage, the same on every negative, and plain LightGBM, each in its
own child process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.gbdt import PLAIN_ROUNDS, TARGET_FIT_VS_PLAIN, bench_gbdt, main, sweep_neg_ratio
from tabular.errors import DataError
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


def make(tmp_path, n=300, seed=0, positives=None):
    rng = np.random.default_rng(seed)
    size = rng.gamma(2.0, 2.0, n)
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "patient_id": [f"P{i // 5}" for i in range(n)],
            "site": rng.choice(["arm", "leg", "back"], n),
            "size": size,
            "age": rng.normal(55, 10, n).round(),
            "target": (size + rng.normal(scale=1.0, size=n) > 7).astype(int),
        }
    )
    if positives is not None:
        frame["target"] = 0
        frame.loc[frame["size"].nlargest(positives).index, "target"] = 1
    frame.to_csv(tmp_path / "metadata.csv", index=False)
    (tmp_path / "dataset.toml").write_text(SPEC)
    return load_spec(tmp_path / "dataset.toml"), frame


@pytest.mark.slow
def test_bench_gbdt_small(tmp_path):
    spec, frame = make(tmp_path, n=300)
    report = bench_gbdt(frame, spec, n_folds=3, seeds=(0,), num_threads=1)
    for side in ("ours", "unsampled", "baseline", "plain"):
        assert report[side]["fit_seconds"] > 0 and report[side]["peak_rss_bytes"] > 10 * 1024**2
        assert 0 <= report[side]["pauc80"] <= 0.2
    assert report["ours"]["n_features"] > report["baseline"]["n_features"]
    assert report["ratios"]["fit_seconds"] > 0 and report["ratios"]["peak_rss"] > 0
    assert report["ratios"]["fit_vs_unsampled"] > 0
    assert report["ratios"]["fit_vs_plain"] == pytest.approx(
        report["ours"]["fit_seconds"] / report["plain"]["fit_seconds"]
    )
    # 20% positives: the default ratio leaves every training part whole, so both fits are the same.
    assert report["neg_ratio"] == 50 and report["unsampled"]["neg_ratio"] == 0
    assert report["ours"]["negative_sampling"]["applied"] is False
    assert report["ours"]["pauc80"] == pytest.approx(report["unsampled"]["pauc80"])
    # Targets: each says where it holds; seconds and pAUC80 only at 401,059 rows.
    assert report["targets"]["fit_seconds"]["applies_to"].startswith("2-core AMD EPYC")
    assert report["targets"]["fit_vs_unsampled"]["applies_to"].startswith(
        "any CPU where LightGBM runs 1 thread"
    )
    assert report["lightgbm_threads"] == 1 and report["targets"]["fit_vs_unsampled_met"] is None
    # Threads named for the bench: every side runs them (by default plain LightGBM takes every CPU,
    # ours its folds side by side, `fold_workers`).
    assert report["plain"]["lightgbm_threads"] == report["lightgbm_threads"] == 1
    assert report["ours"]["lightgbm_threads"] == 1 and report["ours"]["fold_workers"] >= 1
    assert report["ours"]["fit_cpu_seconds"] > 0 and report["unsampled"]["fit_cpu_seconds"] > 0
    assert report["targets"]["fit_met"] is None and report["targets"]["pauc80_met"] is None
    assert len(report["load_average"]) == 3
    json.dumps(report)


@pytest.mark.slow
def test_bench_gbdt_samples_rare_positives(tmp_path):
    spec, frame = make(tmp_path, n=600, positives=12)
    report = bench_gbdt(frame, spec, n_folds=3, seeds=(0, 1), neg_ratio=5, num_threads=1)
    sampling = report["ours"]["negative_sampling"]
    assert sampling["applied"] is True and report["neg_ratio"] == 5
    assert all(f["negatives_kept"] == 5 * f["positives"] for f in sampling["folds"])
    assert report["unsampled"]["negative_sampling"]["applied"] is False
    assert report["ratios"]["pauc80_delta"] == pytest.approx(
        report["ours"]["pauc80"] - report["unsampled"]["pauc80"]
    )


def test_sweep_measures_each_ratio_with_its_seed_spread(tmp_path):
    spec, frame = make(tmp_path, n=600, positives=12)
    result = sweep_neg_ratio(
        frame, spec, ratios=(0, 5), seed_sets=2, set_size=1, n_folds=3, num_threads=1
    )
    assert len(result["fits"]) == 4 and [f["seeds"] for f in result["fits"]] == [[0], [0], [1], [1]]
    every, sampled = result["ratios"]["0"], result["ratios"]["5"]
    assert every["applied"] is False and sampled["applied"] is True
    assert (
        sampled["rows_per_model"] == 6 * 8 < every["rows_per_model"]
    )  # 8 positives a training part
    assert every["pauc80_minus_unsampled"] == 0.0 and every["seconds_vs_unsampled"] == 1.0
    assert sampled["pauc80_minus_unsampled"] == pytest.approx(
        sampled["pauc80_mean"] - every["pauc80_mean"]
    )
    assert every["sets"] == 2 and every["pauc80_sd"] is not None
    assert result["noise_delta"] == pytest.approx(2 * 2**0.5 * result["pooled_set_sd"])
    json.dumps(result)


def test_sweep_command_on_a_spec(tmp_path, capsys):
    make(tmp_path, n=600, positives=12)
    out = tmp_path / "sweep.json"
    main(
        [
            "--spec",
            str(tmp_path / "dataset.toml"),
            "--ratios",
            "0,5",
            "--seed-sets",
            "2",
            "--set-size",
            "1",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "600 rows, 12 positives" in printed and "pooled set-to-set sd" in printed
    assert json.loads(out.read_text())["dataset"] == "synthetic"
    with pytest.raises(SystemExit, match="--ratios: expected comma-separated numbers, got 'a,b'"):
        main(["--spec", str(tmp_path / "dataset.toml"), "--ratios", "a,b"])


def test_bench_judges_the_default_fit_against_one_plain_fit_on_every_row(tmp_path):
    spec, frame = make(tmp_path, n=300)
    report = bench_gbdt(frame, spec, n_folds=3, seeds=(0,), num_threads=1, sides=("plain",))
    plain = report["plain"]
    assert (
        plain["rounds"] == PLAIN_ROUNDS == 200
        and plain["n_features"] == 2
        and 0 <= plain["pauc80"] <= 0.2
    )
    assert report["unsampled"] is None and report["baseline"] is None
    assert report["ratios"]["fit_vs_plain"] == pytest.approx(
        report["ours"]["fit_seconds"] / plain["fit_seconds"]
    )
    assert report["ratios"]["fit_cpu_vs_plain"] == pytest.approx(
        report["ours"]["fit_cpu_seconds"] / plain["fit_cpu_seconds"]
    )
    assert report["ratios"]["fit_vs_unsampled"] is None and report["ratios"]["peak_rss"] is None
    assert report["targets"]["fit_vs_plain"]["value"] == TARGET_FIT_VS_PLAIN == 0.6
    # Judged at 401,059 rows only (the features' share of the fit grows on fewer rows).
    assert (
        report["targets"]["fit_vs_plain_met"] is None
        and report["targets"]["fit_vs_unsampled_met"] is None
    )
    json.dumps(report)
    with pytest.raises(
        DataError, match=r"sides: unknown \['fast'\]; choose from \['baseline', 'plain'"
    ):
        bench_gbdt(frame, spec, sides=("fast",))


def test_bench_table_prints_the_default_fit_beside_the_plain_fit_on_the_same_threads():
    from benchmarks.run import format_table

    side = {"fit_seconds": 2.0, "fit_cpu_seconds": 2.0, "peak_rss_bytes": 1e8, "pauc80": 0.1}
    gbdt = {
        "rows": 401059,
        "seeds": [0, 1, 2],
        "neg_ratio": 50.0,
        "ours": {**side, "features_seconds": 0.5, "fit_seconds": 30.0, "fit_cpu_seconds": 29.0},
        "baseline": side,
        "plain": {
            **side,
            "fit_seconds": 40.0,
            "fit_cpu_seconds": 40.0,
            "rounds": PLAIN_ROUNDS,
            "lightgbm_threads": 1,
        },
        "ratios": {
            "fit_seconds": 15.0,
            "peak_rss": 1.0,
            "fit_vs_plain": 0.75,
            "fit_cpu_vs_plain": 0.725,
        },
    }
    machine = {"cpu": "test CPU", "cores": 2, "gpu": None, "torch": "-"}
    table = format_table({"machine": machine, "parts": {"gbdt": [gbdt]}})
    line = next(t for t in table.splitlines() if "vs one plain LightGBM 5-fold fit" in t)
    assert "1 LightGBM thread(s) a model both" in line and "200 rounds" in line
    assert "30.0" in line and "40.0" in line and "0.75" in line
    assert f"<= {TARGET_FIT_VS_PLAIN:g}" in line
    cpu = next(t for t in table.splitlines() if "default fit CPU s (401059 rows) vs the plain" in t)
    assert "0.72" in cpu or "0.73" in cpu
