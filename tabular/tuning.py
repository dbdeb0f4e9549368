"""Optuna study over LightGBM parameters, scored on mean out-of-fold pAUC80 of the run's folds.

- One study per data set, named `gbdt-<data set>`, kept in a storage (default
  `sqlite:///<run>/gbdt/optuna.db`; any SQLAlchemy URL; or an Optuna journal file:
  `journal:///abs/path/study.log` or a path ending in `.log`), opened with `load_if_exists=True`.
- `n_trials` is the number of finished (complete or pruned) trials the study should hold: a rerun
  after an interruption, or a second worker on the same storage, runs only the missing ones.
- Each trial trains one model per fold (one seed, for speed) on the fold's Datasets built before
  the study, folds side by side where CPUs allow (`tabular.gbdt_ensemble.map_folds`), and reports the
  running mean pAUC80 after each fold in fold order, so that the MedianPruner can stop a hopeless
  trial early.
- The sampler is a seeded TPESampler, re-seeded from the trial number: reproducible in one
  process, and two workers on one study do not propose the same parameters.
- The full LightGBM parameters of each trial are kept as JSON in its user attributes; the best are
  written to `best_params.json`.
- A trial left RUNNING by a worker that died (kill -9, out of memory, a lost node) is marked
  failed once its heartbeat is older than `STALE_AFTER_SECONDS`, so its place in the budget is
  run again: RDB storages keep that heartbeat themselves; for a journal file (which has none in
  Optuna) each trial writes a `HEARTBEAT_ATTR` user attribute every `HEARTBEAT_SECONDS`.
  `LESIONFUSE_TRIAL_GRACE_SECONDS` (an integer >= 4) replaces that grace period, with a heartbeat
  every quarter of it, for every worker it is set for (see `heartbeat_timing`).
- A RUNNING trial with a fresh heartbeat may be another live worker's: it keeps its place, and
  when the missing places are all held by such trials the worker waits (polling every
  `WAIT_SECONDS`) until they finish or go stale, so that the study ends with `n_trials` finished
  trials. What was found and done is logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
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

from tabular.errors import DataError
from tabular.gbdt_config import DEFAULT_PARAMS, GBDTConfig
from tabular.gbdt_ensemble import map_folds, predict_valid, train_model
from tabular.gbdt_folds import FoldData
from tabular.metrics import MetricWarning, pauc80

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_ATTR = "heartbeat_unix_time"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 120
WAIT_SECONDS = 5
GRACE_ENV = "LESIONFUSE_TRIAL_GRACE_SECONDS"
# lambda_l1 / lambda_l2 are searched on a log scale whose floor stands for "no regularisation".
_LOG_FLOOR = 1e-8


def suggest_params(trial: optuna.Trial) -> dict:
    """LightGBM booster parameters for one trial (the search space).

    Booster parameters only: each fold's Datasets are binned once (`tabular.gbdt_config.DATASET_PARAMS`)
    and every trial trains on them, and LightGBM cannot change a constructed Dataset's binning
    (max_bin, min_data_in_bin, ...). Binning is also the least rewarding thing to tune here: the
    trees' own parameters move pAUC80 far more than 255 bins versus another count.
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
    names = ("learning_rate", "num_leaves", "max_depth", "min_child_samples", "feature_fraction",
             "bagging_fraction", "bagging_freq", "lambda_l1", "lambda_l2", "scale_pos_weight")
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

    def __init__(self, seed: int = 0, n_startup_trials: int = 10, first_params: Mapping | None = None) -> None:
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


def heartbeat_timing() -> tuple[float, float]:
    """(heartbeat interval, grace period) in seconds for the trials of a study.

    The grace period is how long a RUNNING trial may go without a heartbeat before it is taken as
    the trial of a worker that died, failed, and its place in the budget run again. Default
    (`HEARTBEAT_SECONDS`, `STALE_AFTER_SECONDS`). The environment variable `GRACE_ENV`
    (`LESIONFUSE_TRIAL_GRACE_SECONDS`) sets the grace period, in whole seconds >= 4, and the
    heartbeat to a quarter of it (rounded down): shorter where workers are often lost and trials
    are short, longer where a loaded database may delay heartbeats. Every worker of a study should
    run with the same value: a worker with a shorter one fails the live trials of the others.

    Raises:
        DataError: the variable is set but not an integer >= 4.
    """
    raw = os.environ.get(GRACE_ENV, "").strip()
    if not raw:
        return HEARTBEAT_SECONDS, STALE_AFTER_SECONDS
    try:
        grace = int(raw)
    except ValueError:
        grace = None
    if grace is None or grace < 4:
        raise DataError(
            f"{GRACE_ENV}: expected whole seconds >= 4 (a trial's heartbeat comes every quarter of "
            f"it), got {raw!r}; unset it for the default {STALE_AFTER_SECONDS} s"
        )
    return grace // 4, grace


# The SQLAlchemy dialects Optuna's RDB storage is used with (a driver may follow: postgresql+psycopg).
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
STORAGE_FORMS = ("sqlite:///path/study.db, postgresql://user:password@host/db, "
                 "mysql://user:password@host/db, or journal:///path/study.log (a journal file; "
                 "a path ending in .log also works)")


def open_storage(storage: str | Path | None, default_path: Path):
    """An Optuna storage from a URL, a journal file, or the default sqlite file.

    An RDB storage gets the heartbeat and grace period of `heartbeat_timing`. Called before any
    work by `check_storage`, so a wrong URL costs nothing.

    Raises:
        DataError: an empty storage string; a scheme Optuna cannot store in (names the accepted
            ones); a database URL that cannot be opened (missing driver, no server, bad
            credentials: the reason, with any password hidden); a journal file whose folder
            cannot be made; a bad `LESIONFUSE_TRIAL_GRACE_SECONDS`.
    """
    if storage is None:
        default_path.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{default_path.resolve()}"
    storage = str(storage)
    if not storage.strip():
        raise DataError(f"storage: got an empty string; pass {STORAGE_FORMS}")
    if storage.startswith("journal://") or ("://" not in storage and storage.endswith(".log")):
        path = Path(storage[len("journal://"):] if storage.startswith("journal://") else storage)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"storage {storage!r}: cannot make the journal file's folder {path.parent}: "
                            f"{error.strerror}") from error
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in storage:
        raise DataError(
            f"storage: {storage!r} is neither a database URL (sqlite:///path.db, "
            f"postgresql://...) nor a journal file (journal:///path.log or a path ending in .log); pass {STORAGE_FORMS}"
        )
    scheme = storage.split("://", 1)[0]
    if scheme.split("+", 1)[0].lower() not in RDB_SCHEMES:
        raise DataError(
            f"storage {_masked(storage)!r}: unknown scheme {scheme + '://'!r}; Optuna stores studies in "
            f"{', '.join(s + '://' for s in RDB_SCHEMES)} databases or a journal file: pass {STORAGE_FORMS}"
        )
    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    heartbeat, grace = heartbeat_timing()
    # The heartbeat lets a later worker mark trials of a killed worker as failed, so they do not
    # hold a place in the trial budget forever.
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    storage,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=grace,
                )
        except (ArgumentError, NoSuchModuleError, ImportError) as error:
            # Retrying cannot help a malformed URL or a database driver that is not installed.
            raise DataError(f"storage {_masked(storage)!r} cannot be opened: {_first_line(error)}; "
                            f"pass {STORAGE_FORMS} (a server's driver must be installed, e.g. "
                            "pip install 'psycopg[binary]' for postgresql://)") from error
        except SQLAlchemyError as error:
            # Two workers creating the tables of a new database at once: one of them loses the
            # race on the schema version row; the tables exist a moment later.
            if attempt == 5:
                raise DataError(f"storage {_masked(storage)!r} cannot be opened: {_first_line(error)}; "
                                "check that the database server is reachable, the database exists "
                                "and the user may write to it") from error
            time.sleep(0.2 * 2**attempt + random.random() * 0.2)
    raise AssertionError("unreachable")


def check_storage(storage: str | Path | None, default_path: Path) -> None:
    """Open `storage` once (see `open_storage`) so that a bad URL fails before features are built.

    Raises:
        DataError: as `open_storage`.
    """
    if storage is not None:
        open_storage(storage, default_path)


def _masked(url: str) -> str:
    """`url` with the password of `user:password@host` hidden."""
    head, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{head}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class _Heartbeat:
    """While open, writes the current time into the trial's `HEARTBEAT_ATTR` every `seconds`."""

    def __init__(self, trial: optuna.Trial, seconds: float) -> None:
        self._trial = trial
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            self._trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            if self._stop.wait(self._seconds):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class RunningSweep:
    """RUNNING trials of a study, as `fail_stale_trials` found them.

    failed: (number, seconds since the last heartbeat or None where the storage does not say)
        of trials just marked FAIL; fresh: the same for trials left RUNNING (heartbeat recent).
    """

    failed: tuple[tuple[int, float | None], ...] = ()
    fresh: tuple[tuple[int, float | None], ...] = ()


def fail_stale_trials(study: optuna.Study, storage, stale_after: float | None = None) -> RunningSweep:
    """Mark failed the RUNNING trials of `study` whose last heartbeat (or, lacking one, start) is
    more than `stale_after` seconds (default: the grace period of `heartbeat_timing`) old.

    An RDBStorage keeps the heartbeat itself and applies its own grace period (the storage is
    opened with that of `heartbeat_timing`); a journal file relies on the trials' `HEARTBEAT_ATTR`.
    """
    stale_after = heartbeat_timing()[1] if stale_after is None else stale_after
    if isinstance(storage, optuna.storages.RDBStorage):
        return _fail_stale_rdb(study)
    now = time.time()
    failed, fresh = [], []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = trial.user_attrs.get(HEARTBEAT_ATTR)
        if last is None and trial.datetime_start is not None:
            last = trial.datetime_start.timestamp()
        age = None if last is None else now - float(last)
        if age is None or age <= stale_after:
            fresh.append((trial.number, age))
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except RuntimeError:  # finished meanwhile by its own worker, or failed by another
            continue
        failed.append((trial.number, age))
    return RunningSweep(failed=tuple(failed), fresh=tuple(fresh))


def _fail_stale_rdb(study: optuna.Study) -> RunningSweep:
    # Optuna fails stale trials itself only when a trial starts; a resumed worker that finds the
    # budget taken by a dead trial would never start one, so this is asked for explicitly.
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not before:
        return RunningSweep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    # The RDB heartbeat's age is not exposed by Optuna: only the grace period is known.
    failed = tuple((n, None) for n in sorted(before) if after.get(n) == TrialState.FAIL)
    fresh = tuple((n, None) for n in sorted(before) if after.get(n) == TrialState.RUNNING)
    return RunningSweep(failed=failed, fresh=fresh)


def _numbers(trials) -> str:
    return ", ".join(str(n) for n, _ in trials)


def _ages(trials) -> str:
    ages = [age for _, age in trials if age is not None]
    if not ages:
        return ""
    low, high = min(ages), max(ages)
    return f" (last {low:.0f} s ago)" if round(low) == round(high) else f" (last {low:.0f} to {high:.0f} s ago)"


@dataclass(frozen=True)
class TuneResult:
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
    _check_attrs(study, dict(study_attrs or {}), storage)
    trial_config = replace(config, seeds=(config.seeds[0],))

    def objective(trial: optuna.Trial) -> float:
        if isinstance(resolved, optuna.storages.RDBStorage):
            return measured(trial)
        with _Heartbeat(trial, heartbeat):
            return measured(trial)

    def measured(trial: optuna.Trial) -> float:
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                 if t.state != TrialState.RUNNING or t.number < trial.number]
        if len(ahead) >= n_trials:
            raise _BudgetReached
        params = suggest_params(trial)
        trial.set_user_attr("lgbm_params", json.loads(json.dumps(params)))
        scores, iterations = [], []

        def fold_model(data: FoldData) -> tuple[float, int]:
            # The fold's Datasets (and this seed's negative draw) were built once, before the
            # study: a trial only trains and predicts.
            booster = train_model(data, params, int(trial_config.seeds[0]), trial_config)
            return pauc80(data.y_valid, predict_valid(booster, data)), int(booster.best_iteration)

        # Folds train side by side (`map_folds`) but are reported in order, as one after another
        # would be, so the pruner sees the same steps; a pruned trial stops the folds not begun.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MetricWarning)
            warnings.simplefilter("ignore", UserWarning)
            results = map_folds(fold_model, folds, trial_config)
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

    done = _count(study, FINISHED)
    run = 0
    bar = tqdm(total=max(0, n_trials - done), desc=f"tuning {study_name}", unit="trial", leave=False)
    told: set[tuple] = set()  # (fresh RUNNING trials, waiting) already reported, not to repeat it
    while True:
        sweep = fail_stale_trials(study, resolved, stale_after)
        finished = _count(study, FINISHED)
        fresh = sweep.fresh
        if sweep.failed:
            log.warning(
                "study %s: found %d trial(s) left RUNNING by a worker that stopped (trial numbers %s): "
                "marked FAIL after %.0f s without a heartbeat%s; %d more trial(s) will run to reach "
                "--trials %d",
                study_name, len(sweep.failed), _numbers(sweep.failed), stale_after,
                _ages(sweep.failed), max(0, n_trials - finished - len(fresh)), n_trials,
            )
        if finished >= n_trials:
            break
        waiting = finished + len(fresh) >= n_trials
        key = (tuple(n for n, _ in fresh), waiting)
        if fresh and key not in told:
            told.add(key)
            log.info(
                "study %s: trial(s) %s RUNNING with a heartbeat in the last %.0f s (another worker may "
                "still be running them): counted toward --trials %d; %s",
                study_name, _numbers(fresh), stale_after, n_trials,
                "waiting for them to finish (a trial whose worker stopped is marked FAIL once it has "
                f"had no heartbeat for {stale_after:.0f} s, and run again here)"
                if waiting else f"{n_trials - finished - len(fresh)} more trial(s) will run here",
            )
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
    try:
        best = study.best_trial
    except ValueError as error:
        raise DataError(f"tuning: study {study_name} has no complete trial (all pruned or failed)") from error
    best_params = best.user_attrs.get("lgbm_params") or {**DEFAULT_PARAMS, **best.params}
    result = TuneResult(
        best_params=best_params,
        best_value=float(best.value),
        trials_finished=_count(study, FINISHED),
        trials_run=run,
        study_name=study_name,
        storage=_describe(storage, stage_dir / "optuna.db"),
    )
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "best_params.json").write_text(
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
        )
    )
    log.info("tuning %s: best mean fold pAUC80 %.4f (trial %d of %d finished)",
             study_name, result.best_value, best.number, result.trials_finished)
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
        if key in stored and stored[key] != value:
            raise DataError(
                f"storage {storage or 'default'}: study '{study.study_name}' was made with {key}="
                f"{stored[key]!r}, this run has {value!r}; use another --storage (or another run)"
            )
