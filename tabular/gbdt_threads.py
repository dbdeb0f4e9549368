"""Folds side by side: the LightGBM stage's one place that runs fold work in threads.

- `fold_workers`: how many folds (or models) run at once (`GBDTConfig.fold_workers`; 0 = the
  usable CPUs over each model's LightGBM threads);
- `map_folds`: a function of each fold (or model), up to that many at once, results in order.

Used to train the folds' models (`tabular.gbdt_ensemble.fit_ensemble`: each model a task;
`tabular.tuning`: each fold's model of a trial a task). The folds are built before, one after
another (`tabular.gbdt_folds.build_folds`): LightGBM bins each Dataset on every CPU itself.
Every LightGBM call made from these threads must name the models' threads (`lightgbm_threads`):
see `GBDTConfig.fold_workers`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TypeVar

from tabular.gbdt_config import GBDTConfig, lightgbm_threads, usable_cpus

__all__ = ["fold_workers", "map_folds"]

_T = TypeVar("_T")
_F = TypeVar("_F")


def fold_workers(config: GBDTConfig, n_folds: int) -> int:
    """Folds (or models) trained at once: `config.fold_workers`, else (0) the usable CPUs over
    each model's LightGBM threads; between 1 and `n_folds` (the tasks at hand)."""
    workers = config.fold_workers or usable_cpus() // lightgbm_threads(config)
    return max(1, min(int(workers), int(n_folds)))


def map_folds(
    function: Callable[[_F], _T], folds: Sequence[_F], config: GBDTConfig
) -> Generator[_T, None, None]:
    """`function(fold)` for each fold, up to `fold_workers` folds at once; yields the results in
    the order of `folds`, each as soon as it and those before it are done.

    LightGBM releases the GIL while it trains, so threads use the CPUs LightGBM's own threads
    leave idle (a single-threaded model on a 2-CPU machine). Every LightGBM call `function` makes
    must name `lightgbm_threads(config)` threads (`booster_params`, `dataset_params`,
    `predict_valid`): LightGBM's thread count is one process-wide value that each call with
    parameters sets, and a model training in one thread while another call changes it crashes
    (`GBDTConfig.fold_workers`). `folds` may be folds (a trial: one model each) or single
    models (`fit_ensemble`); models of one fold share its validation Dataset, whose init score
    each writes under the fold's lock (`tabular.gbdt_ensemble.train_model`). Closing the
    generator early (a pruned trial) cancels the folds not started and waits for those running,
    so that no thread is left training on a fold the caller goes on to use.
    """
    workers = fold_workers(config, len(folds))
    if workers == 1:
        for data in folds:
            yield function(data)
        return
    from concurrent.futures import ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gbdt-fold") as pool:
        futures = [pool.submit(function, data) for data in folds]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
            wait(futures)
