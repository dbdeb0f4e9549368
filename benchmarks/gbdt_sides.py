"""The sides of the GBDT bench (`benchmarks.gbdt.bench_gbdt`), each fitted in a child interpreter
(`benchmarks.common.run_child`) so that its peak memory is its own.

`measure_fit(kind, work)`: "ours" (feature building alone, then the stage as `invoke train-gbdt`
fits it), "unsampled" (the stage with every negative), "baseline" (plain LightGBM on the raw
numeric columns with ours' folds, seeds and negative draws) or "plain" (plain LightGBM on every
row, one seed, `PLAIN_ROUNDS` rounds, LightGBM's default threads: every CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from benchmarks.common import peak_rss_bytes, ru_maxrss_bytes
from benchmarks.gbdt import PLAIN_ROUNDS
from tabular.spec import DatasetSpec

if TYPE_CHECKING:
    from tabular.gbdt_config import GBDTConfig

__all__ = ["measure_fit"]


def measure_fit(kind: str, work: str) -> dict:
    """One side's fit, in a child process: reads `<work>/job.json`, `frame.parquet`, `folds.npy`.

    kind: "ours" (features, then `fit_gbdt_frame`), "unsampled" (`fit_gbdt_frame` with every
    negative), "baseline" (plain LightGBM, raw columns, ours' negative draws) or "plain" (plain
    LightGBM on every row, raw columns, one seed, `PLAIN_ROUNDS` rounds, ours' threads).
    """
    from tabular.gbdt_config import DEFAULT_PARAMS, GBDTConfig
    from tabular.spec import spec_from_identity

    work_dir = Path(work)
    job = json.loads((work_dir / "job.json").read_text())
    options = job["options"]
    frame = pd.read_parquet(work_dir / "frame.parquet")
    folds = np.load(work_dir / "folds.npy", allow_pickle=False)
    spec = replace(spec_from_identity(job["spec"]), images=None)
    y = frame[spec.target].to_numpy().astype(np.int8)
    params = {**DEFAULT_PARAMS, **options["params"]}
    config = GBDTConfig(
        seeds=tuple(options["seeds"]),
        neg_ratio=0 if kind == "unsampled" else options["neg_ratio"],
        num_threads=options["num_threads"],
    )
    result: dict = {"rss_after_loading_bytes": peak_rss_bytes(), "neg_ratio": config.neg_ratio}
    if kind in ("ours", "unsampled"):
        result.update(_fit_stage(kind, frame, folds, spec, config, work_dir))
    elif kind == "plain":
        result.update(_fit_plain(frame, folds, spec, y, params, config))
    else:
        result.update(_fit_baseline(frame, folds, spec, y, params, config))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["ru_maxrss_bytes"] = ru_maxrss_bytes()
    return result


def _fit_stage(
    kind: str,
    frame: pd.DataFrame,
    folds: np.ndarray,
    spec: DatasetSpec,
    config: GBDTConfig,
    work_dir: Path,
) -> dict:
    """Ours (features alone first, then the stage) or the unsampled stage: `fit_gbdt_frame`."""
    from tabular.gbdt_config import lightgbm_threads
    from tabular.gbdt_threads import fold_workers
    from tabular.train import fit_gbdt_frame

    result: dict = {}
    if kind == "ours":
        from tabular.features import FeatureEncoder

        tick = time.perf_counter()
        features = FeatureEncoder().fit_transform(frame, spec)
        result["features_seconds"] = time.perf_counter() - tick
        result["n_features"] = int(features.shape[1])
        del features
    tick, cpu = time.perf_counter(), time.process_time()
    metrics = fit_gbdt_frame(frame, folds, spec, work_dir / f"gbdt-{kind}", config=config)
    result["fit_seconds"] = time.perf_counter() - tick
    result["fit_cpu_seconds"] = time.process_time() - cpu
    result["fit_breakdown_seconds"] = metrics["seconds"]
    result["lightgbm_threads"] = lightgbm_threads(config)
    result["fold_workers"] = fold_workers(config, len(np.unique(folds)))
    result["pauc80"] = metrics["pauc80"]
    result["roc_auc"] = metrics["roc_auc"]
    result["negative_sampling"] = metrics["negative_sampling"]
    result["best_iterations"] = [f["best_iterations"] for f in metrics["per_fold"]]
    result.setdefault("n_features", metrics["features"])
    return result


def _fit_plain(
    frame: pd.DataFrame,
    folds: np.ndarray,
    spec: DatasetSpec,
    y: np.ndarray,
    params: dict,
    config: GBDTConfig,
) -> dict:
    """Plain LightGBM on every row: raw numeric columns, seed 0, `PLAIN_ROUNDS` rounds, no early
    stopping, LightGBM's default threads (every CPU, as a user's first fit gets; `num_threads`
    where the bench names it), Datasets binned with the same: the whole machine, as ours uses it
    (its folds side by side, `GBDTConfig.fold_workers`)."""
    import lightgbm as lgb

    from tabular.gbdt_config import booster_params, usable_cpus

    columns = list(spec.numeric)
    threads = int(config.num_threads)  # 0: LightGBM's (OpenMP's) default, every CPU
    tick, cpu = time.perf_counter(), time.process_time()
    X = frame[columns].apply(pd.to_numeric, errors="coerce").astype(np.float32)
    oof = np.zeros(len(frame))
    for k in np.unique(folds):
        train, valid = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        plain = {**booster_params(params, 0, config), "num_threads": threads}
        booster = lgb.train(
            plain,
            lgb.Dataset(X.iloc[train], label=y[train], params={"num_threads": threads}),
            num_boost_round=PLAIN_ROUNDS,
        )
        oof[valid] = booster.predict(X.iloc[valid], num_threads=threads)
    result = {
        "fit_seconds": time.perf_counter() - tick,
        "fit_cpu_seconds": time.process_time() - cpu,
        "n_features": len(columns),
        "rounds": PLAIN_ROUNDS,
        "lightgbm_threads": threads or usable_cpus(),
    }
    return {**result, **_scores(y, oof)}


def _fit_baseline(
    frame: pd.DataFrame,
    folds: np.ndarray,
    spec: DatasetSpec,
    y: np.ndarray,
    params: dict,
    config: GBDTConfig,
) -> dict:
    """Plain LightGBM on the raw numeric columns with ours' folds, parameters, seeds, negative
    draws and early stopping: what the features cost."""
    import lightgbm as lgb

    from tabular.gbdt_config import booster_params
    from tabular.gbdt_sampling import negative_sample, sample_seed, validation_offset

    columns = list(spec.numeric)
    tick, cpu = time.perf_counter(), time.process_time()
    X = frame[columns].apply(pd.to_numeric, errors="coerce").astype(np.float32)
    oof = np.zeros(len(frame))
    for k in np.unique(folds):
        train, valid = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        train_set = lgb.Dataset(X.iloc[train], label=y[train], free_raw_data=True)
        for seed in config.seeds:
            keep = negative_sample(y[train], config.neg_ratio, sample_seed(int(seed), int(k)))
            valid_set = lgb.Dataset(
                X.iloc[valid],
                label=y[valid],
                reference=train_set,
                init_score=np.full(len(valid), validation_offset(y[train], keep)),
            )
            booster = lgb.train(
                booster_params(params, int(seed), config),
                train_set if keep is None else train_set.subset(keep.tolist()),
                num_boost_round=config.num_boost_round,
                valid_sets=[valid_set],
                callbacks=[
                    lgb.early_stopping(
                        config.early_stopping_rounds, first_metric_only=True, verbose=False
                    )
                ],
            )
            prediction = np.asarray(
                booster.predict(X.iloc[valid], num_iteration=booster.best_iteration)
            )
            oof[valid] += prediction / len(config.seeds)
    result = {
        "fit_seconds": time.perf_counter() - tick,
        "fit_cpu_seconds": time.process_time() - cpu,
        "n_features": len(columns),
    }
    return {**result, **_scores(y, oof)}


def _scores(y: np.ndarray, oof: np.ndarray) -> dict:
    """Out-of-fold pAUC80 and ROC AUC (NaN, quietly, where a metric is undefined)."""
    import warnings

    from tabular.metrics import MetricWarning, pauc80, roc_auc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        return {"pauc80": pauc80(y, oof), "roc_auc": roc_auc(y, oof)}
