"""Benchmark of the LightGBM stage at ISIC 2024 scale, beside an in-run baseline.

`bench_gbdt(frame, spec)` takes a metadata table (the caller builds it, e.g. the synthetic
ISIC 2024-like table of `fuse.synthetic` with 401,059 rows) and measures, each in a fresh child
interpreter so that peak memory is that run's own (`benchmarks.common.run_child`):

- ours: feature building alone (encoder fit + transform of all rows), then one whole 5-fold fit
  of the stage at fixed parameters (`fit_gbdt_frame`: per-fold features, fold x seed models,
  out-of-fold metrics, files written);
- baseline: plain LightGBM on the raw numeric columns, same folds, same parameters, one model per
  fold and seed.

Peak memory is the child's peak resident set size (VmHWM, cross-checked with `ru_maxrss`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.common import cpu_count, peak_rss_bytes, ru_maxrss_bytes, run_child
from tabular.errors import DataError
from tabular.spec import DatasetSpec

log = logging.getLogger(__name__)

# Targets on the 2-core development machine for 401,059 rows.
TARGET_FIT_SECONDS = 180.0
TARGET_PEAK_BYTES = 4 * 1024**3

SIDES = ("baseline", "ours")


def measure_fit(kind: str, work: str) -> dict:
    """One side's fit, in a child process: reads `<work>/job.json`, `frame.parquet`, `folds.npy`.

    kind: "ours" (features, then `fit_gbdt_frame`) or "baseline" (plain LightGBM, raw columns).
    """
    import warnings

    from tabular.gbdt import DEFAULT_PARAMS, GBDTConfig
    from tabular.metrics import MetricWarning, pauc80, roc_auc
    from tabular.spec import spec_from_identity

    work_dir = Path(work)
    job = json.loads((work_dir / "job.json").read_text())
    options = job["options"]
    frame = pd.read_parquet(work_dir / "frame.parquet")
    folds = np.load(work_dir / "folds.npy", allow_pickle=False)
    spec = replace(spec_from_identity(job["spec"]), images=None)
    y = frame[spec.target].to_numpy().astype(np.int8)
    params = {**DEFAULT_PARAMS, **options["params"]}
    config = GBDTConfig(seeds=tuple(options["seeds"]), neg_ratio=options["neg_ratio"],
                        num_threads=options["num_threads"])
    result: dict = {"rss_after_loading_bytes": peak_rss_bytes()}
    if kind == "ours":
        from tabular.features import FeatureEncoder
        from tabular.train import fit_gbdt_frame

        tick = time.perf_counter()
        features = FeatureEncoder().fit_transform(frame, spec)
        result["features_seconds"] = time.perf_counter() - tick
        result["n_features"] = int(features.shape[1])
        del features
        tick = time.perf_counter()
        metrics = fit_gbdt_frame(frame, folds, spec, work_dir / "gbdt", config=config)
        result["fit_seconds"] = time.perf_counter() - tick
        result["fit_breakdown_seconds"] = metrics["seconds"]
        result["pauc80"] = metrics["pauc80"]
        result["roc_auc"] = metrics["roc_auc"]
    else:
        import lightgbm as lgb

        from tabular.gbdt import booster_params

        columns = list(spec.numeric)
        tick = time.perf_counter()
        X = frame[columns].apply(pd.to_numeric, errors="coerce").astype(np.float32)
        oof = np.zeros(len(frame))
        for k in np.unique(folds):
            train, valid = folds != k, folds == k
            train_set = lgb.Dataset(X[train], label=y[train], free_raw_data=True)
            for seed in config.seeds:
                valid_set = lgb.Dataset(X[valid], label=y[valid], reference=train_set)
                booster = lgb.train(
                    booster_params(params, int(seed), config), train_set, num_boost_round=config.num_boost_round,
                    valid_sets=[valid_set],
                    callbacks=[lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False)],
                )
                oof[valid] += booster.predict(X[valid], num_iteration=booster.best_iteration) / len(config.seeds)
        result["fit_seconds"] = time.perf_counter() - tick
        result["n_features"] = len(columns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            result["pauc80"] = pauc80(y, oof)
            result["roc_auc"] = roc_auc(y, oof)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["ru_maxrss_bytes"] = ru_maxrss_bytes()
    return result


def bench_gbdt(
    frame: pd.DataFrame,
    spec: DatasetSpec,
    n_folds: int = 5,
    seeds: tuple[int, ...] = (0,),
    neg_ratio: float | None = None,
    params: dict | None = None,
    num_threads: int = 0,
    work_dir: Path | None = None,
) -> dict:
    """Time and peak memory of the LightGBM stage beside plain LightGBM on raw numeric columns.

    Args:
        frame: metadata with the target (validated, e.g. by `tabular.validate.read_metadata`).
        spec: its spec (built-in ISIC 2024 for the engineered and per-patient features).
        n_folds: folds (grouped, stratified: `tabular.folds.make_folds`).
        seeds: models per fold; default one, for a benchmark of the fit's cost per model set.
        neg_ratio, params, num_threads: as in `GBDTConfig` / `DEFAULT_PARAMS`, for both sides.
        work_dir: where the children exchange files (default: a temporary folder, removed).

    Returns:
        dict: rows, positives, ours {features_seconds, fit_seconds, peak_rss_bytes, pauc80,
        roc_auc, n_features, ...}, baseline {...}, ratios (ours / baseline for fit time and peak
        memory), targets and whether they are met.

    Raises:
        DataError: no target column, or a child process failed.
    """
    from tabular.folds import make_folds

    if not spec.target or spec.target not in frame.columns:
        raise DataError(f"bench: the frame lacks the target column '{spec.target}'")
    folds = make_folds(frame, spec, n_folds=n_folds, seed=42)["fold"].to_numpy()
    options = {"seeds": [int(s) for s in seeds], "neg_ratio": neg_ratio, "params": dict(params or {}),
               "num_threads": int(num_threads)}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        frame.reset_index(drop=True).to_parquet(work / "frame.parquet", index=False)
        np.save(work / "folds.npy", folds, allow_pickle=False)
        (work / "job.json").write_text(json.dumps({"spec": spec.identity(), "options": options}))
        results = {}
        for kind in SIDES:
            log.info("bench: %s fit on %d rows", kind, len(frame))
            tick = time.perf_counter()
            results[kind] = run_child("benchmarks.gbdt:measure_fit", {"kind": kind, "work": str(work)},
                                      label=kind, error=DataError)
            results[kind]["process_seconds"] = time.perf_counter() - tick
    ours, baseline = results["ours"], results["baseline"]
    report = {
        "rows": len(frame),
        "positives": int(frame[spec.target].sum()),
        "patients": int(frame[spec.patient].nunique()) if spec.patient else None,
        "n_folds": n_folds,
        "seeds": list(options["seeds"]),
        "neg_ratio": neg_ratio,
        "cpus": cpu_count(),
        "ours": ours,
        "baseline": baseline,
        "ratios": {
            "fit_seconds": ours["fit_seconds"] / baseline["fit_seconds"],
            "peak_rss": ours["peak_rss_bytes"] / baseline["peak_rss_bytes"],
        },
        "targets": {
            "fit_seconds": TARGET_FIT_SECONDS,
            "peak_rss_bytes": TARGET_PEAK_BYTES,
            "fit_met": ours["fit_seconds"] <= TARGET_FIT_SECONDS,
            "memory_met": ours["peak_rss_bytes"] <= TARGET_PEAK_BYTES,
        },
    }
    log.info(
        "bench: features %.1f s; fit %.1f s (baseline %.1f s, x%.1f); peak %.2f GB (baseline %.2f GB)",
        ours["features_seconds"], ours["fit_seconds"], baseline["fit_seconds"], report["ratios"]["fit_seconds"],
        ours["peak_rss_bytes"] / 1e9, baseline["peak_rss_bytes"] / 1e9,
    )
    return report
