"""`fit_gbdt`: the LightGBM stage of a run, from metadata (and optional image PCA) to `gbdt/`.

For each fold of the run the feature encoder (and the PCA of the extra matrix) is fitted on the
training part only; the validation part is encoded as new rows would be. The ensemble is trained
with the default parameters, optionally tuned with Optuna on the same folds, and retrained with
the best parameters. Figures with and without tuning are both recorded; note that tuning on the
folds that also measure the result makes the tuned out-of-fold figures slightly optimistic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common.files import atomic_write, reporting_write_errors
from runfolder.layout import RunLayout
from runfolder.records import record_store
from tabular.errors import DataError, preview
from tabular.gbdt_config import DATASET_PARAMS, DEFAULT_PARAMS, GBDTConfig
from tabular.gbdt_ensemble import Ensemble, fit_ensemble, importance_table, save_ensemble
from tabular.gbdt_folds import FoldData, build_folds
from tabular.gbdt_image import check_extra
from tabular.gbdt_sampling import sampling_summary
from tabular.metrics import summarize
from tabular.spec import DatasetSpec

if TYPE_CHECKING:
    from tabular.run import Run
    from tabular.tuning import TuneResult

__all__ = ["STAGE", "fit_gbdt", "fit_gbdt_frame"]

log = logging.getLogger(__name__)

STAGE = "gbdt"


def fit_gbdt(
    spec: DatasetSpec,
    run_dir: Path | str,
    trials: int = 0,
    storage: str | None = None,
    extra: np.ndarray | None = None,
    extra_components: int = 64,
    seeds: tuple[int, ...] = (0, 1, 2),
    neg_ratio: float | None = None,
    config: GBDTConfig | None = None,
    store_record: dict | None = None,
    run: Run | None = None,
    trial_patience: int | None = None,
) -> dict:
    """Train the LightGBM stage of the run in `run_dir` and write `<run>/gbdt/`.

    The stage is written into `<run>/gbdt.new-<pid>/` and swapped in whole once complete: a
    failed or killed retrain leaves the previous `gbdt/` as it was. The default Optuna study
    (`gbdt/optuna.db`) lives in the current stage folder and moves into the new one.

    Args:
        spec: the data set's spec (the run is created from it, or checked against it).
        run_dir: the run folder (created with its folds on first use).
        trials: Optuna trials the study should hold (0 = default parameters, no study). A rerun
            runs only the trials still missing.
        storage: Optuna storage URL or journal file (default `sqlite:///<run>/gbdt/optuna.db`).
        extra: optional (n_rows, d) matrix aligned to the metadata rows (image embeddings);
            reduced per fold by PCA to `extra_components` columns fitted on the training part.
        extra_components: PCA components kept from `extra` (0 = metadata only: `extra` must be
            None).
        seeds: one model per fold and seed.
        neg_ratio: keep every positive and at most this many negatives per positive in each
            training part, a different draw per seed and fold (validation parts are never
            sampled); None = the default (`tabular.gbdt_config.DEFAULT_NEG_RATIO`, 50: on only
            where a training part has more negatives per positive, e.g. ISIC 2024), 0 = every
            negative.
        config: full ensemble settings (overrides seeds / neg_ratio / extra_components /
            trial_patience).
        store_record: what the stage records as the feature store (and vectors) `extra` came
            from, written as `gbdt/store.json` inside the new stage (None: no file).
        run: the run in `run_dir` as the caller opened it (`tabular.run.open_run` with this
            spec), so that its metadata is read and validated once; None: opened here.
        trial_patience: early-stopping rounds of an Optuna trial's models; None = the
            ensembles' own (50).

    Returns:
        The `metrics.json` content: `summarize()` of the out-of-fold predictions plus the data
        set name, row count, per-fold figures, untuned figures when tuned, timings, and the
        negative sampling applied (`negative_sampling`: ratio, whether any training part was
        down-sampled, per fold the negatives there and kept per model).

    Raises:
        DataError: invalid metadata or run (see `tabular.run.open_run`), bad features (see
            `FeatureEncoder`), a bad `extra` matrix, or bad options; a `storage` that cannot be
            opened (checked before any work, see `tabular.tuning_storage.open_storage`).
        WriteError: the run folder cannot be written (read-only, full): names the path.
    """
    from tabular.run import open_run
    from tabular.tuning_storage import check_storage

    if config is None:
        config = GBDTConfig(
            seeds=tuple(int(s) for s in seeds),
            neg_ratio=neg_ratio,
            extra_components=extra_components,
            trial_early_stopping_rounds=trial_patience,
        )
    if trials:
        check_storage(storage, Path(run_dir) / STAGE / "optuna.db")
    with reporting_write_errors("train-gbdt", run_dir):
        if run is None:
            run = open_run(spec, Path(run_dir))
        elif Path(run.dir) != Path(run_dir) or run.spec != spec:
            raise DataError(
                f"fit_gbdt: run= is {run.dir} opened with spec '{run.spec.name}', but "
                f"run_dir is {run_dir} and spec '{spec.name}'; pass the run opened for them"
            )
        layout = RunLayout(run.dir)
        if trials and storage is None:
            # The study outlives each fit: it stays in the current stage folder while tuning
            # (a rerun resumes it) and moves into the new folder when that is swapped in.
            storage = f"sqlite:///{(layout.make_stage(STAGE) / 'optuna.db').resolve()}"
        with layout.rewriting(STAGE, carry=("optuna.db*",)) as new_dir:
            metrics = fit_gbdt_frame(
                run.frame,
                run.folds["fold"].to_numpy(),
                spec,
                new_dir,
                trials=trials,
                storage=storage,
                extra=extra,
                config=config,
            )
            if store_record is not None:
                record_store(layout, new_dir.name, store_record)
    return metrics


def fit_gbdt_frame(
    frame: pd.DataFrame,
    fold_of_row: np.ndarray,
    spec: DatasetSpec,
    stage_dir: Path,
    trials: int = 0,
    storage: str | None = None,
    extra: np.ndarray | None = None,
    config: GBDTConfig | None = None,
) -> dict:
    """`fit_gbdt` on a frame and fold assignment already in memory (benchmarks, tests).

    `fold_of_row` has shape (len(frame),); other arguments as `fit_gbdt`. Steps: check the
    inputs, build every fold once, fit (and tune), write the stage's files, then its metrics.
    """
    started = time.perf_counter()
    config = config or GBDTConfig()
    frame, fold_of_row, extra = _checked_inputs(
        frame, fold_of_row, spec, stage_dir, trials, storage, extra, config
    )
    ids = frame[spec.id].astype(str).tolist()
    y = frame[spec.target].to_numpy().astype(np.int8)
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    tick = time.perf_counter()
    # Each fold's features and Datasets once, for every seed, trial and the final fit.
    folds = build_folds(frame, spec, y, fold_of_row, extra=extra, config=config)
    timings["features"] = time.perf_counter() - tick
    log.info(
        "gbdt: %d rows, %d folds, %d features (fold 0)",
        len(frame),
        len(folds),
        len(folds[0].feature_names),
    )

    untuned, final, tuning = _fit_and_tune(
        folds, spec, ids, fold_of_row, stage_dir, trials, storage, extra, config, timings
    )
    missing = np.flatnonzero(np.isnan(final.oof))
    if len(missing):
        raise DataError(
            f"folds: rows in no validation fold, ids {preview([ids[i] for i in missing])}"
        )
    _write_stage(stage_dir, untuned, final, tuning, folds, ids, fold_of_row, y, extra, config)

    timings["total"] = time.perf_counter() - started
    metrics = _stage_metrics(spec, y, folds, untuned, final, tuning, trials, extra, config, timings)
    RunLayout(stage_dir.parent).write_metrics(stage_dir.name, metrics)
    log.info(
        "gbdt %s: OOF pAUC80 %.4f, ROC AUC %.4f%s (%.0f s)",
        spec.name,
        metrics["pauc80"] or float("nan"),
        metrics["roc_auc"] or float("nan"),
        f"; untuned pAUC80 {metrics['untuned']['pauc80']:.4f}" if tuning is not None else "",
        timings["total"],
    )
    return metrics


def _checked_inputs(
    frame: pd.DataFrame,
    fold_of_row: np.ndarray,
    spec: DatasetSpec,
    stage_dir: Path,
    trials: int,
    storage: str | None,
    extra: np.ndarray | None,
    config: GBDTConfig,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None]:
    """The inputs of `fit_gbdt_frame` checked before any work: (frame with a fresh 0..n-1 index,
    fold numbers as an array, the checked extra matrix or None).

    Raises:
        DataError: `trials` not an integer >= 0; a `storage` that cannot be opened; no target
            column; not one fold number per row; a bad `extra` matrix, or one given with
            `extra_components` 0.
    """
    if not isinstance(trials, int | np.integer) or trials < 0:
        raise DataError(f"trials: expected an integer >= 0, got {trials!r}")
    if trials:
        from tabular.tuning_storage import check_storage

        check_storage(storage, Path(stage_dir) / "optuna.db")
    if not spec.target or spec.target not in frame.columns:
        raise DataError(f"spec '{spec.name}': training needs the target column (spec key 'target')")
    frame = frame.reset_index(drop=True)
    fold_of_row = np.asarray(fold_of_row)
    if len(fold_of_row) != len(frame):
        raise DataError(
            f"folds: expected {len(frame)} fold numbers (one per row), got {len(fold_of_row)}"
        )
    if extra is not None:
        extra = check_extra(extra, len(frame), frame[spec.id].astype(str).tolist())
        if config.extra_components == 0:
            raise DataError(
                f"extra_components: 0 keeps no image features, but an extra matrix of shape "
                f"{extra.shape} was given; pass extra=None for metadata only, or extra_components "
                ">= 1"
            )
    return frame, fold_of_row, extra


def _fit_and_tune(
    folds: Sequence[FoldData],
    spec: DatasetSpec,
    ids: list[str],
    fold_of_row: np.ndarray,
    stage_dir: Path,
    trials: int,
    storage: str | None,
    extra: np.ndarray | None,
    config: GBDTConfig,
    timings: dict[str, float],
) -> tuple[Ensemble, Ensemble, TuneResult | None]:
    """(untuned ensemble, final ensemble, tuning result or None): the ensemble with the default
    parameters; with `trials`, the Optuna study on the same folds and, unless the defaults stay
    the best, the ensemble retrained with the best parameters. Adds each step's seconds to
    `timings`."""
    tick = time.perf_counter()
    untuned = fit_ensemble(
        folds, len(ids), DEFAULT_PARAMS, config, desc="gbdt (default parameters)"
    )
    timings["untuned"] = time.perf_counter() - tick
    if trials <= 0:
        return untuned, untuned, None
    from tabular.tuning import tune

    tick = time.perf_counter()
    tuning = tune(
        folds,
        study_name=f"gbdt-{spec.name}",
        n_trials=int(trials),
        stage_dir=stage_dir,
        storage=storage,
        config=config,
        study_attrs=_study_attrs(spec, ids, fold_of_row, folds, extra, config),
    )
    timings["tuning"] = time.perf_counter() - tick
    if _same_params(tuning.best_params, DEFAULT_PARAMS):
        log.info("gbdt: the default parameters remain the best; keeping the untuned ensemble")
        return untuned, untuned, tuning
    tick = time.perf_counter()
    final = fit_ensemble(
        folds, len(ids), tuning.best_params, config, desc="gbdt (tuned parameters)"
    )
    timings["final"] = time.perf_counter() - tick
    return untuned, final, tuning


def _write_stage(
    stage_dir: Path,
    untuned: Ensemble,
    final: Ensemble,
    tuning: TuneResult | None,
    folds: Sequence[FoldData],
    ids: list[str],
    fold_of_row: np.ndarray,
    y: np.ndarray,
    extra: np.ndarray | None,
    config: GBDTConfig,
) -> None:
    """The stage's files but `metrics.json`: models, encoders and PCA (`save_ensemble`),
    `oof.csv` (and `oof_untuned.csv` when tuned), `importance.csv`, `params.json`."""
    _clear_models(stage_dir)
    save_ensemble(
        stage_dir, final, folds, config, extra_dim=None if extra is None else int(extra.shape[1])
    )
    layout = RunLayout(stage_dir.parent)
    layout.write_oof(stage_dir.name, ids, fold_of_row, y, final.oof)
    if tuning is not None:
        layout.write_oof(stage_dir.name, ids, fold_of_row, y, untuned.oof, name="oof_untuned.csv")
    importance = importance_table(final)
    atomic_write(stage_dir / "importance.csv", lambda f: importance.to_csv(f, index=False))
    layout.write_params(
        stage_dir.name,
        {
            "params": final.params,
            "tuned": final is not untuned,
            "dataset_params": DATASET_PARAMS,
            "config": _jsonable(asdict(config)),
            "best_iterations": {str(f["fold"]): f["best_iterations"] for f in final.per_fold},
        },
    )


def _stage_metrics(
    spec: DatasetSpec,
    y: np.ndarray,
    folds: Sequence[FoldData],
    untuned: Ensemble,
    final: Ensemble,
    tuning: TuneResult | None,
    trials: int,
    extra: np.ndarray | None,
    config: GBDTConfig,
    timings: dict[str, float],
) -> dict:
    """The `metrics.json` content (see `fit_gbdt`'s Returns)."""
    pca = folds[0].pca
    metrics = {
        "stage": STAGE,
        "dataset": spec.name,
        "rows": len(y),
        "n_folds": len(folds),
        "seeds": [int(s) for s in config.seeds],
        "neg_ratio": config.neg_ratio,
        "negative_sampling": sampling_summary(folds, config),
        "features": len(folds[0].feature_names),
        "extra": None
        if extra is None or pca is None
        else {"dim": int(extra.shape[1]), "components": len(pca.names)},
        **summarize(y, final.oof),
        "tuned": final is not untuned,
        "per_fold": final.per_fold,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    if tuning is not None:
        metrics["untuned"] = summarize(y, untuned.oof)
        metrics["untuned"]["per_fold"] = untuned.per_fold
        metrics["trials"] = {
            "requested": int(trials),
            "finished": tuning.trials_finished,
            "run_now": tuning.trials_run,
            "best_mean_fold_pauc80": tuning.best_value,
            "study": tuning.study_name,
            "storage": tuning.storage,
            "note": "tuned on these folds: the tuned out-of-fold figures are slightly optimistic",
        }
    return metrics


def _clear_models(stage_dir: Path) -> None:
    """Remove models of an earlier fit (another seed count would leave stale files behind)."""
    for pattern in ("fold*_seed*.txt", "pca_fold*_*.npy"):
        for path in stage_dir.glob(pattern):
            path.unlink()


def _same_params(a: dict, b: dict) -> bool:
    keys = set(b) - {"verbosity", "metric", "objective"}
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, float) or isinstance(y, float):
            # The search space stores an L1/L2 of 0 as its 1e-8 floor.
            if x is None or y is None or abs(float(x) - float(y)) > 1e-6:
                return False
        elif x != y:
            return False
    return True


def _study_attrs(spec, ids, fold_of_row, folds, extra, config) -> dict:
    digest = hashlib.sha256()
    for i, k in zip(ids, fold_of_row, strict=True):
        digest.update(f"{i}\t{k}\n".encode())
    features = hashlib.sha256("\n".join(folds[0].feature_names).encode()).hexdigest()[:16]
    return {
        "dataset": spec.name,
        "rows": len(ids),
        "folds_sha256": digest.hexdigest()[:16],
        "features_sha256": features,
        "extra_dim": None if extra is None else int(extra.shape[1]),
        # 0 (off) as None: a study made before sampling was on by default matches --neg-ratio 0.
        "neg_ratio": config.neg_ratio or None,
    }


def _jsonable(value):
    return json.loads(
        json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )
