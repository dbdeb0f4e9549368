"""Optuna study over LightGBM parameters, scored on mean out-of-fold pAUC80 of the run's folds.

- One study per data set, named `gbdt-<data set>`, kept in a storage (default
  `sqlite:///<run>/gbdt/optuna.db`; any SQLAlchemy URL; or an Optuna journal file:
  `journal:///abs/path/study.log` or a path ending in `.log`), opened with `load_if_exists=True`.
- `n_trials` is the number of finished (complete or pruned) trials the study should hold: a rerun
  after an interruption, or a second worker on the same storage, runs only the missing ones.
- Each trial trains one model per fold (one seed, for speed) on the fold's Datasets built before
  the study, stopping after `GBDTConfig.trial_patience` rounds without gain (the ensembles'
  patience unless `--trial-patience` says otherwise; recorded in the study, so that trials scored
  with another patience are not mixed), folds side by side where CPUs allow
  (`tabular.gbdt_threads.map_folds`), and reports the running mean pAUC80 after each fold in fold
  order, so that the MedianPruner can stop a hopeless trial early.
- The sampler is a seeded TPESampler, re-seeded from the trial number: reproducible in one
  process, and two workers on one study do not propose the same parameters.
- The full LightGBM parameters of each trial are kept as JSON in its user attributes; the best are
  written to `best_params.json`.
- A trial left RUNNING by a worker that died (kill -9, out of memory, a lost node) is marked
  failed once its heartbeat is older than the grace period, so its place in the budget is run
  again (`tabular.tuning_storage`: the storages, the heartbeat and the grace period).
- A RUNNING trial with a fresh heartbeat may be another live worker's: it keeps its place, and
  when the missing places are all held by such trials the worker waits (polling every
  `WAIT_SECONDS`) until they finish or go stale, so that the study ends with `n_trials` finished
  trials. What was found and done is logged.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState
from tqdm.auto import tqdm

from common.files import atomic_write_text
from tabular.errors import DataError
from tabular.gbdt_config import DEFAULT_PARAMS, GBDTConfig
from tabular.gbdt_ensemble import fit_model
from tabular.gbdt_folds import FoldData
from tabular.gbdt_threads import map_folds
from tabular.metrics import MetricWarning, pauc80
from tabular.tuning_storage import Heartbeat, fail_stale_trials, heartbeat_timing, open_storage

__all__ = [
    "PATIENCE_ATTR",
    "WAIT_SECONDS",
    "TrialSeededTPE",
    "TuneResult",
    "default_trial_params",
    "suggest_params",
    "tune",
]

log = logging.getLogger(__name__)

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_SECONDS = 5
# The study attribute naming its trials' early-stopping patience; studies made before it was
# recorded scored every trial with the ensembles' patience, 50 rounds (`_BEFORE_RECORDED`).
PATIENCE_ATTR = "trial_early_stopping_rounds"
_BEFORE_RECORDED = {PATIENCE_ATTR: 50}
# Study attributes a command-line option sets: a refusal names the option that goes on with it.
_OPTION_OF = {PATIENCE_ATTR: "--trial-patience"}
# lambda_l1 / lambda_l2 are searched on a log scale whose floor stands for "no regularisation".
_LOG_FLOOR = 1e-8


def suggest_params(trial: optuna.Trial) -> dict:
    """LightGBM booster parameters for one trial (the search space).

    Booster parameters only: each fold's Datasets are binned once
    (`tabular.gbdt_config.DATASET_PARAMS`) and every trial trains on them, and LightGBM cannot
    change a constructed Dataset's binning (max_bin, min_data_in_bin, ...). Binning is also the
    least rewarding thing to tune here: the trees' own parameters move pAUC80 far more than 255
    bins versus another count.
    """
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.2, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 8, 256, log=True),
        "max_depth": trial.suggest_int("max_depth", 3, 12),
        "min_child_samples": trial.suggest_int("min_child_samples", 5, 200, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.3, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.4, 1.0),
        "bagging_freq": trial.suggest_int("bagging_freq", 0, 7),
        "lambda_l1": trial.suggest_float("lambda_l1", _LOG_FLOOR, 10.0, log=True),
        "lambda_l2": trial.suggest_float("lambda_l2", _LOG_FLOOR, 10.0, log=True),
        "scale_pos_weight": trial.suggest_float("scale_pos_weight", 1.0, 4.0),
    }
    return {**DEFAULT_PARAMS, **params}


def default_trial_params() -> dict:
    """DEFAULT_PARAMS expressed in the search space (enqueued as the study's first trial)."""
    names = (
        "learning_rate",
        "num_leaves",
        "max_depth",
        "min_child_samples",
        "feature_fraction",
        "bagging_fraction",
        "bagging_freq",
        "lambda_l1",
        "lambda_l2",
        "scale_pos_weight",
    )
    values = {name: DEFAULT_PARAMS[name] for name in names}
    for name in ("lambda_l1", "lambda_l2"):
        values[name] = max(values[name], _LOG_FLOOR)
    return values


class TrialSeededTPE(BaseSampler):
    """A TPESampler seeded with `seed + trial.number` for each trial.

    Trial 0 takes `first_params` (the untuned defaults) instead of sampling: the study then never
    ends worse than the defaults on its own objective. Keying this on the trial number, rather
    than enqueueing a trial, keeps two workers starting together from both running the defaults.
    """

    def __init__(
        self, seed: int = 0, n_startup_trials: int = 10, first_params: Mapping | None = None
    ) -> None:
        self._seed = seed
        self._n_startup = n_startup_trials
        self._first = dict(first_params or {})
        self._tpe = TPESampler(seed=seed, n_startup_trials=n_startup_trials)

    def before_trial(self, study, trial) -> None:
        self._tpe = TPESampler(seed=self._seed + trial.number, n_startup_trials=self._n_startup)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        if trial.number == 0 and self._first:
            return {}
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number == 0 and param_name in self._first:
            return self._first[param_name]
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def _numbers(trials) -> str:
    return ", ".join(str(n) for n, _ in trials)


def _ages(trials) -> str:
    ages = [age for _, age in trials if age is not None]
    if not ages:
        return ""
    low, high = min(ages), max(ages)
    return (
        f" (last {low:.0f} s ago)"
        if round(low) == round(high)
        else f" (last {low:.0f} to {high:.0f} s ago)"
    )


@dataclass(frozen=True)
class TuneResult:
    """What `tune` found: the best full LightGBM parameters and their mean fold pAUC80, the
    finished trials the study holds and those run by this call, the study and its storage."""

    best_params: dict
    best_value: float
    trials_finished: int
    trials_run: int
    study_name: str
    storage: str


class _BudgetReached(Exception):
    """Another worker took the last places in the trial budget."""


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def tune(
    folds: Sequence[FoldData],
    study_name: str,
    n_trials: int,
    stage_dir: Path,
    storage: str | Path | None = None,
    config: GBDTConfig | None = None,
    seed: int = 0,
    study_attrs: Mapping | None = None,
) -> TuneResult:
    """Run the study until it holds `n_trials` finished trials; write `best_params.json`.

    Args:
        folds: the run's folds (see `tabular.gbdt_folds.build_folds`), built once for every trial.
        study_name: e.g. f"gbdt-{spec.name}".
        n_trials: finished (complete + pruned) trials the study should hold in total.
        stage_dir: where `best_params.json` (and the default sqlite storage) go.
        storage: see `open_storage`.
        config: ensemble settings; trials use its first seed only.
        seed: sampler seed.
        study_attrs: what the study is about (data set, features, folds); a study in the
            storage recorded with other values is refused.

    Returns:
        TuneResult with the best parameters (full LightGBM parameters) and counts.

    Raises:
        DataError: `n_trials` < 1, the stored study was made from other data/features, or a bad
            `LESIONFUSE_TRIAL_GRACE_SECONDS` (see `heartbeat_timing`).
    """
    if not isinstance(n_trials, int | np.integer) or n_trials < 1:
        raise DataError(f"trials: expected a positive integer, got {n_trials!r}")
    heartbeat, stale_after = heartbeat_timing()
    config = config or GBDTConfig()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resolved = open_storage(storage, stage_dir / "optuna.db")
    study = optuna.create_study(
        study_name=study_name,
        storage=resolved,
        direction="maximize",
        sampler=TrialSeededTPE(seed=seed, first_params=default_trial_params()),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        load_if_exists=True,
    )
    # Trials scored with another patience are not comparable with this run's: part of the study.
    attrs = {**(study_attrs or {}), PATIENCE_ATTR: config.trial_patience}
    _check_attrs(study, attrs, storage)
    objective = _Objective(
        folds,
        n_trials,
        replace(
            config,
            seeds=(config.seeds[0],),
            early_stopping_rounds=config.trial_patience,
        ),
        heartbeat=None if isinstance(resolved, optuna.storages.RDBStorage) else heartbeat,
    )
    run = _run_missing_trials(study, resolved, objective, n_trials, stale_after)
    return _write_best(study, storage, stage_dir, run)


class _Objective:
    """One trial: `suggest_params`, one model per fold (the first seed of `trial_config`), the
    running mean fold pAUC80 reported after each fold in fold order for the pruner.

    `heartbeat`: seconds between the trial's `HEARTBEAT_ATTR` writes (a journal file); None where
    the storage keeps its own heartbeat (RDB).

    Raises (from a call):
        _BudgetReached: the study already holds `n_trials` finished or earlier running trials.
        optuna.TrialPruned: the pruner stopped the trial.
    """

    def __init__(
        self,
        folds: Sequence[FoldData],
        n_trials: int,
        trial_config: GBDTConfig,
        heartbeat: float | None,
    ) -> None:
        self._folds = folds
        self._n_trials = n_trials
        self._config = trial_config
        self._heartbeat = heartbeat

    def __call__(self, trial: optuna.Trial) -> float:
        if self._heartbeat is None:
            return self._measured(trial)
        with Heartbeat(trial, self._heartbeat):
            return self._measured(trial)

    def _measured(self, trial: optuna.Trial) -> float:
        ahead = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(*_FINISHED, TrialState.RUNNING))
            if t.state != TrialState.RUNNING or t.number < trial.number
        ]
        if len(ahead) >= self._n_trials:
            raise _BudgetReached
        params = suggest_params(trial)
        trial.set_user_attr("lgbm_params", json.loads(json.dumps(params)))
        scores: list[float] = []
        iterations: list[int] = []
        # Folds train side by side (`map_folds`) but are reported in order, as one after another
        # would be, so the pruner sees the same steps; a pruned trial stops the folds not begun.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            warnings.simplefilter("ignore", UserWarning)
            results = map_folds(
                functools.partial(self._fold_model, params), self._folds, self._config
            )
            try:
                for step, (score, best_iteration) in enumerate(results):
                    scores.append(score)
                    iterations.append(best_iteration)
                    trial.report(_nanmean(scores), step)
                    if trial.should_prune():
                        _record_folds(trial, scores, iterations)
                        raise optuna.TrialPruned()
            finally:
                results.close()
        _record_folds(trial, scores, iterations)
        return _nanmean(scores)

    def _fold_model(self, params: Mapping, data: FoldData) -> tuple[float, int]:
        """(fold pAUC80, best iteration) of one model with `params` on `data`. The fold's Datasets
        (and this seed's negative draw) were built once, before the study: a trial only trains
        and predicts."""
        booster, predictions = fit_model(data, params, int(self._config.seeds[0]), self._config)
        return pauc80(data.y_valid, predictions), int(booster.best_iteration)


def _run_missing_trials(
    study: optuna.Study, storage, objective: _Objective, n_trials: int, stale_after: float
) -> int:
    """Run trials until the study holds `n_trials` finished ones; returns how many ran here.

    Each round fails the trials of dead workers (`fail_stale_trials`), then runs one trial, or
    waits (`WAIT_SECONDS`) while the missing places are held by other workers' live trials.
    """
    run = 0
    bar = tqdm(
        total=max(0, n_trials - _count(study, _FINISHED)),
        desc=f"tuning {study.study_name}",
        unit="trial",
        leave=False,
    )
    told: set[tuple] = set()  # (fresh RUNNING trials, waiting) already reported, not to repeat it
    while True:
        sweep = fail_stale_trials(study, storage, stale_after)
        finished = _count(study, _FINISHED)
        fresh = sweep.fresh
        if sweep.failed:
            log.warning(
                "study %s: found %d trial(s) left RUNNING by a worker that stopped (trial numbers "
                "%s): "
                "marked FAIL after %.0f s without a heartbeat%s; %d more trial(s) will run to "
                "reach "
                "--trials %d",
                study.study_name,
                len(sweep.failed),
                _numbers(sweep.failed),
                stale_after,
                _ages(sweep.failed),
                max(0, n_trials - finished - len(fresh)),
                n_trials,
            )
        if finished >= n_trials:
            break
        waiting = finished + len(fresh) >= n_trials
        key = (tuple(n for n, _ in fresh), waiting)
        if fresh and key not in told:
            told.add(key)
            _say_running(study.study_name, fresh, waiting, finished, n_trials, stale_after)
        if waiting:
            # The missing places are held by RUNNING trials: wait until they finish (another
            # worker's) or go stale (a dead worker's, then run here), so the budget is met.
            time.sleep(WAIT_SECONDS)
            continue
        try:
            study.optimize(objective, n_trials=1, catch=())
        except _BudgetReached:
            # Another worker took the place meanwhile; the trial that found out is FAIL and not
            # counted. Back to the top: wait for the others' trials or run what is still missing.
            continue
        run += 1
        bar.update(1)
        try:
            bar.set_postfix(best=f"{study.best_value:.4f}")
        except ValueError:  # no complete trial yet (all pruned)
            pass
    bar.close()
    return run


def _say_running(
    study_name: str, fresh, waiting: bool, finished: int, n_trials: int, stale_after: float
) -> None:
    """Log the RUNNING trials with a fresh heartbeat, and whether this worker waits for them."""
    log.info(
        "study %s: trial(s) %s RUNNING with a heartbeat in the last %.0f s (another worker may "
        "still be running them): counted toward --trials %d; %s",
        study_name,
        _numbers(fresh),
        stale_after,
        n_trials,
        "waiting for them to finish (a trial whose worker stopped is marked FAIL once it has "
        f"had no heartbeat for {stale_after:.0f} s, and run again here)"
        if waiting
        else f"{n_trials - finished - len(fresh)} more trial(s) will run here",
    )


def _write_best(study: optuna.Study, storage, stage_dir: Path, run: int) -> TuneResult:
    """The study's best trial as a `TuneResult`, also written to `<stage_dir>/best_params.json`.

    Raises:
        DataError: the study has no complete trial (all pruned or failed).
    """
    study_name = study.study_name
    try:
        best = study.best_trial
    except ValueError as error:
        raise DataError(
            f"tuning: study {study_name} has no complete trial (all pruned or failed)"
        ) from error
    best_params = best.user_attrs.get("lgbm_params") or {**DEFAULT_PARAMS, **best.params}
    result = TuneResult(
        best_params=best_params,
        best_value=float(study.best_value),
        trials_finished=_count(study, _FINISHED),
        trials_run=run,
        study_name=study_name,
        storage=_describe(storage, stage_dir / "optuna.db"),
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        stage_dir / "best_params.json",
        json.dumps(
            {
                "params": best_params,
                "mean_fold_pauc80": result.best_value,
                "trial": best.number,
                "trials_finished": result.trials_finished,
                "study": study_name,
                "storage": result.storage,
            },
            indent=2,
        ),
    )
    log.info(
        "tuning %s: best mean fold pAUC80 %.4f (trial %d of %d finished)",
        study_name,
        result.best_value,
        best.number,
        result.trials_finished,
    )
    return result


def _record_folds(trial: optuna.Trial, scores: list[float], iterations: list[int]) -> None:
    """Per-fold pAUC80 and best iterations as trial attributes, written once per trial (each
    write is a storage transaction)."""
    trial.set_user_attr("fold_pauc80", [None if math.isnan(s) else s for s in scores])
    trial.set_user_attr("best_iterations", iterations)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else 0.0


def _describe(storage, default_path: Path) -> str:
    return str(storage) if storage is not None else f"sqlite:///{default_path.resolve()}"


def _check_attrs(study: optuna.Study, attrs: dict, storage) -> None:
    stored = study.user_attrs
    if not stored:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    for key, value in attrs.items():
        made_with = stored.get(key, _BEFORE_RECORDED.get(key))
        if (key in stored or key in _BEFORE_RECORDED) and made_with != value:
            option = _OPTION_OF.get(key)
            hint = f" (or {option} {made_with} to go on with it)" if option else ""
            raise DataError(
                f"storage {storage or 'default'}: study '{study.study_name}' was made with {key}="
                f"{made_with!r}, this run has {value!r}; use another --storage (or another "
                f"run){hint}"
            )
