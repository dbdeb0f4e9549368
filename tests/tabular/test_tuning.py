"""The Optuna study: storages, resumption, two workers on one study, parameters kept as JSON."""

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.trial import TrialState

from tabular.errors import DataError
from tabular.gbdt_config import GBDTConfig
from tabular.gbdt_folds import build_fold
from tabular.spec import DatasetSpec
from tabular.tuning import TrialSeededTPE, default_trial_params, suggest_params, tune
from tabular.tuning_storage import open_storage

REPO = Path(__file__).resolve().parents[2]
FAST = GBDTConfig(seeds=(0,), num_boost_round=30, early_stopping_rounds=5, num_threads=1)

# Shared by the tests and the worker processes, so that both build identical folds.
MAKE_FOLDS = """
def make_folds(n=240, seed=0):
    import numpy as np
    import pandas as pd
    from pathlib import Path
    from tabular.gbdt_config import GBDTConfig
    from tabular.gbdt_folds import build_fold
    from tabular.spec import DatasetSpec

    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    frame = pd.DataFrame({
        "id": [f"r{i}" for i in range(n)],
        "site": rng.choice(["arm", "leg"], n),
        "x": signal + rng.normal(scale=0.7, size=n),
        "target": (signal > 0.7).astype(int),
    })
    spec = DatasetSpec(name="toy", root=Path("."), metadata=Path("toy.csv"), images=None, id="id",
                       target="target", group="id", categorical=("site",), numeric=("x",))
    folds = np.arange(n) % 3
    y = frame["target"].to_numpy()
    config = GBDTConfig(seeds=(0,), num_boost_round=30, early_stopping_rounds=5, num_threads=1)
    return [build_fold(frame, spec, y, folds, k, config=config) for k in range(3)], config
"""
namespace: dict = {}
exec(MAKE_FOLDS, namespace)
make_folds = namespace["make_folds"]


@pytest.fixture(scope="module")
def folds():
    return make_folds()[0]


def finished(storage, name="gbdt-toy"):
    study = optuna.load_study(study_name=name, storage=storage)
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]


def test_open_storage_kinds(tmp_path):
    assert isinstance(open_storage(None, tmp_path / "gbdt" / "optuna.db"), RDBStorage)
    assert (tmp_path / "gbdt" / "optuna.db").exists()
    assert isinstance(
        open_storage(f"journal://{tmp_path}/a.log", tmp_path / "x.db"), JournalStorage
    )
    assert isinstance(open_storage(str(tmp_path / "b.log"), tmp_path / "x.db"), JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/c.db", tmp_path / "x.db"), RDBStorage)
    with pytest.raises(DataError, match="storage: 'study.txt' is neither a database URL"):
        open_storage("study.txt", tmp_path / "x.db")
    with pytest.raises(DataError, match="storage: got an empty string"):
        open_storage(" ", tmp_path / "x.db")


def test_first_trial_is_the_defaults_and_lies_in_search_space():
    sampler = TrialSeededTPE(seed=0, first_params=default_trial_params())
    study = optuna.create_study(direction="maximize", sampler=sampler)
    first = suggest_params(study.ask())
    for name, value in default_trial_params().items():
        assert first[name] == value
        distribution = study.trials[0].distributions[name]
        assert distribution.low <= value <= distribution.high
    assert suggest_params(study.ask())["num_leaves"] != first["num_leaves"]


def test_resumes_and_runs_only_missing_trials(tmp_path, folds):
    storage = f"sqlite:///{tmp_path}/study.db"
    first = tune(folds, "gbdt-toy", 3, tmp_path, storage=storage, config=FAST)
    assert (first.trials_run, first.trials_finished) == (3, 3)
    second = tune(folds, "gbdt-toy", 5, tmp_path, storage=storage, config=FAST)
    assert (second.trials_run, second.trials_finished) == (2, 5)
    third = tune(folds, "gbdt-toy", 5, tmp_path, storage=storage, config=FAST)
    assert third.trials_run == 0
    trials = finished(storage)
    assert len(trials) == 5
    # Trial 0 is the untuned defaults; every trial keeps its LightGBM parameters as JSON.
    assert trials[0].params["num_leaves"] == default_trial_params()["num_leaves"]
    for t in trials:
        params = t.user_attrs["lgbm_params"]
        assert params["objective"] == "binary" and "num_leaves" in params
        json.dumps(params)
        if t.state == TrialState.COMPLETE:
            assert len(t.user_attrs["fold_pauc80"]) == 3
            assert sorted(t.intermediate_values) == [0, 1, 2]
    best = json.loads((tmp_path / "best_params.json").read_text())
    assert best["params"] == second.best_params
    assert best["trials_finished"] == 5
    assert 0 < best["mean_fold_pauc80"] <= 0.2


def test_default_storage_and_journal(tmp_path, folds):
    result = tune(folds, "gbdt-toy", 2, tmp_path, config=FAST)
    assert (tmp_path / "optuna.db").exists() and result.storage.startswith("sqlite:///")
    journal = tmp_path / "study.log"
    tune(folds, "gbdt-toy", 2, tmp_path, storage=str(journal), config=FAST)
    assert (
        len(finished(JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))))) == 2
    )


def test_study_made_from_other_data_is_refused(tmp_path, folds):
    storage = f"sqlite:///{tmp_path}/study.db"
    tune(folds, "gbdt-toy", 1, tmp_path, storage=storage, config=FAST, study_attrs={"rows": 240})
    with pytest.raises(
        DataError, match="study 'gbdt-toy' was made with rows=240, this run has 999"
    ):
        tune(
            folds, "gbdt-toy", 2, tmp_path, storage=storage, config=FAST, study_attrs={"rows": 999}
        )


def test_trials_stop_with_their_own_patience_and_the_study_records_it(tmp_path, folds, monkeypatch):
    import tabular.tuning as tuning

    seen = []
    real = tuning.fit_model

    def recording(data, params, seed, config):
        seen.append(config.early_stopping_rounds)
        return real(data, params, seed, config)

    monkeypatch.setattr(tuning, "fit_model", recording)
    config = GBDTConfig(
        seeds=(0,),
        num_boost_round=30,
        early_stopping_rounds=25,
        trial_early_stopping_rounds=3,
        num_threads=1,
    )
    storage = f"sqlite:///{tmp_path}/study.db"
    tune(folds, "gbdt-toy", 2, tmp_path, storage=storage, config=config)
    # Every trial model stopped with the trials' patience, not the ensembles'.
    assert seen and set(seen) == {3}
    study = optuna.load_study(study_name="gbdt-toy", storage=storage)
    assert study.user_attrs["trial_early_stopping_rounds"] == 3
    # Trials scored with another patience are not mixed into the study.
    with pytest.raises(
        DataError,
        match=r"study 'gbdt-toy' was made with trial_early_stopping_rounds=3, this run has 50; "
        r"use another --storage \(or another run\) \(or --trial-patience 3 to go on with it\)",
    ):
        tune(
            folds,
            "gbdt-toy",
            3,
            tmp_path,
            storage=storage,
            config=GBDTConfig(seeds=(0,), num_boost_round=30, num_threads=1),
        )


def test_a_study_made_before_the_patience_was_recorded_counts_as_patience_50(tmp_path, folds):
    storage = f"sqlite:///{tmp_path}/study.db"
    old = optuna.create_study(study_name="gbdt-toy", storage=storage, direction="maximize")
    old.set_user_attr("rows", 240)  # what such a study recorded

    def tune_with_patience(patience: int):
        config = GBDTConfig(
            seeds=(0,), num_boost_round=30, trial_early_stopping_rounds=patience, num_threads=1
        )
        return tune(
            folds,
            "gbdt-toy",
            1,
            tmp_path,
            storage=storage,
            config=config,
            study_attrs={"rows": 240},
        )

    with pytest.raises(
        DataError,
        match=r"made with trial_early_stopping_rounds=50, this run has 10; .*"
        r"--trial-patience 50 to go on with it",
    ):
        tune_with_patience(10)
    assert tune_with_patience(50).trials_finished == 1


def test_bad_trial_patience_is_refused_naming_it():
    for bad in (0, 2.5, True):
        with pytest.raises(
            DataError,
            match=r"trial_early_stopping_rounds: expected an integer >= 1 \(None = "
            rf"early_stopping_rounds\), got {bad!r}",
        ):
            GBDTConfig(trial_early_stopping_rounds=bad)
    assert GBDTConfig(early_stopping_rounds=7).trial_patience == 7
    assert GBDTConfig(trial_early_stopping_rounds=3).trial_patience == 3


def test_bad_trial_count(tmp_path, folds):
    with pytest.raises(DataError, match="trials: expected a positive integer, got 0"):
        tune(folds, "gbdt-toy", 0, tmp_path, config=FAST)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_processes_share_one_study(tmp_path, kind):
    storage = (
        f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal://{tmp_path}/study.log"
    )
    script = tmp_path / "worker.py"
    script.write_text(
        MAKE_FOLDS
        + textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from tabular.tuning import tune
        folds, config = make_folds()
        out = Path(sys.argv[1])
        result = tune(folds, "gbdt-toy", 5, out, storage={storage!r}, config=config)
        print(json.dumps({{"run": result.trials_run, "finished": result.trials_finished}}))
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"w{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for i in range(2)
    ]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    if kind == "sqlite":
        total = finished(storage)
    else:
        total = finished(
            JournalStorage(optuna.storages.journal.JournalFileBackend(f"{tmp_path}/study.log"))
        )
    assert len(total) == 5
    assert sum(r["run"] for r in results) == 5
    # Different trial numbers give different proposals, even with one sampler seed.
    params = [json.dumps(t.params, sort_keys=True) for t in total]
    assert len(set(params)) == len(params)


def test_fixture_folds_are_three(folds):
    assert [d.fold for d in folds] == [0, 1, 2]
    assert isinstance(folds[0].X_valid, pd.DataFrame) and np.isin(folds[0].y_valid, [0, 1]).all()
    assert build_fold is not None and DatasetSpec is not None


def _journal(path):
    return JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _finish_later(storage, number: int, seconds: float) -> threading.Timer:
    """Another worker finishing its trial `number` in `seconds`."""

    def finish():
        optuna.load_study(study_name="gbdt-toy", storage=storage).tell(number, 0.0)

    timer = threading.Timer(seconds, finish)
    timer.start()
    return timer


def test_a_dead_workers_trial_is_failed_and_its_place_run_again(
    tmp_path, folds, monkeypatch, caplog
):
    """A journal file has no heartbeat of its own: a trial left RUNNING by a killed worker
    would hold a place in the budget forever."""
    import tabular.tuning as tuning

    monkeypatch.setattr(tuning, "WAIT_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="tabular.tuning")
    storage = f"journal://{tmp_path}/study.log"
    tune(folds, "gbdt-toy", 1, tmp_path, storage=storage, config=FAST)
    study = optuna.load_study(study_name="gbdt-toy", storage=_journal(tmp_path / "study.log"))
    dead = study.ask()  # RUNNING, its worker gone
    study._storage.set_trial_user_attr(dead._trial_id, "heartbeat_unix_time", time.time() - 1000)
    alive = study.ask()  # RUNNING, its worker beating a moment ago
    study._storage.set_trial_user_attr(alive._trial_id, "heartbeat_unix_time", time.time())
    # The live worker finishes its trial while this one waits for the last place.
    timer = _finish_later(_journal(tmp_path / "study.log"), alive.number, 1.0)

    result = tune(folds, "gbdt-toy", 4, tmp_path, storage=storage, config=FAST)
    timer.join()

    states = {
        t.number: t.state
        for t in optuna.load_study(
            study_name="gbdt-toy", storage=_journal(tmp_path / "study.log")
        ).trials
    }
    assert states[dead.number] == TrialState.FAIL
    assert states[alive.number] == TrialState.COMPLETE  # run by the other worker, not again here
    assert result.trials_finished == 4 and result.trials_run == 2
    assert re.search(
        r"study gbdt-toy: found 1 trial\(s\) left RUNNING by a worker that stopped \(trial numbers "
        r"1\): "
        r"marked FAIL after 120 s without a heartbeat \(last 1\d{3} s ago\); 2 more trial\(s\) "
        r"will run "
        r"to reach --trials 4",
        caplog.text,
    )
    assert re.search(
        r"study gbdt-toy: trial\(s\) 2 RUNNING with a heartbeat in the last 120 s \(another worker "
        r"may "
        r"still be running them\): counted toward --trials 4; waiting for them to finish",
        caplog.text,
    )


def test_resume_after_kill_on_sqlite_fails_the_stale_trial_and_meets_the_budget(
    tmp_path, folds, caplog
):
    """The default storage: a worker killed (kill -9) mid-trial leaves it RUNNING with an old
    heartbeat; a rerun asking for the same budget must run its place, not stop one short."""
    caplog.set_level(logging.INFO, logger="tabular.tuning")
    path = tmp_path / "optuna.db"
    storage = f"sqlite:///{path}"
    tune(folds, "gbdt-toy", 3, tmp_path, storage=storage, config=FAST)
    rdb = open_storage(storage, path)  # with the heartbeat, as the killed worker had it
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # a heartbeat outside Study.optimize, on purpose
        killed = optuna.load_study(study_name="gbdt-toy", storage=rdb).ask()
    rdb.record_heartbeat(killed._trial_id)
    with sqlite3.connect(path) as db:  # its last heartbeat, 1000 s before the rerun
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1000 seconds')")

    result = tune(folds, "gbdt-toy", 4, tmp_path, storage=storage, config=FAST)

    study = optuna.load_study(study_name="gbdt-toy", storage=storage)
    assert study.trials[killed.number].state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert result.trials_finished == 4 and result.trials_run == 1
    assert re.search(
        r"study gbdt-toy: found 1 trial\(s\) left RUNNING by a worker that stopped \(trial numbers "
        r"3\): "
        r"marked FAIL after 120 s without a heartbeat; 1 more trial\(s\) will run to reach "
        r"--trials 4",
        caplog.text,
    )


def test_a_fresh_running_trial_whose_worker_died_is_waited_for_then_run_again(
    tmp_path, folds, monkeypatch, caplog
):
    """Killed a moment ago: its heartbeat is still fresh, so it may be another live worker's; the
    rerun waits until it finishes or goes stale, and then runs its place."""
    import tabular.tuning as tuning
    import tabular.tuning_storage as tuning_storage

    monkeypatch.setattr(tuning, "WAIT_SECONDS", 0.05)
    monkeypatch.setattr(tuning_storage, "STALE_AFTER_SECONDS", 1.0)
    caplog.set_level(logging.INFO, logger="tabular.tuning")
    storage = f"journal://{tmp_path}/study.log"
    tune(folds, "gbdt-toy", 2, tmp_path, storage=storage, config=FAST)
    study = optuna.load_study(study_name="gbdt-toy", storage=_journal(tmp_path / "study.log"))
    killed = study.ask()
    study._storage.set_trial_user_attr(killed._trial_id, "heartbeat_unix_time", time.time())

    result = tune(folds, "gbdt-toy", 3, tmp_path, storage=storage, config=FAST)

    assert result.trials_finished == 3 and result.trials_run == 1
    text = caplog.text
    waiting = text.index("study gbdt-toy: trial(s) 2 RUNNING with a heartbeat in the last 1 s")
    failed = text.index(
        "study gbdt-toy: found 1 trial(s) left RUNNING by a worker that stopped (trial numbers 2)"
    )
    assert waiting < failed


def test_trials_on_a_journal_write_a_heartbeat(tmp_path, folds, monkeypatch):
    import tabular.tuning_storage as tuning_storage

    monkeypatch.setattr(tuning_storage, "HEARTBEAT_SECONDS", 0.001)
    tune(folds, "gbdt-toy", 2, tmp_path, storage=f"journal://{tmp_path}/study.log", config=FAST)
    trials = optuna.load_study(
        study_name="gbdt-toy", storage=_journal(tmp_path / "study.log")
    ).trials
    assert all(
        t.user_attrs["heartbeat_unix_time"] >= t.datetime_start.timestamp() - 1 for t in trials
    )
    # An RDB storage keeps its own heartbeat; nothing is written into the trials there.
    tune(folds, "gbdt-toy", 1, tmp_path, config=FAST)
    (trial,) = optuna.load_study(
        study_name="gbdt-toy", storage=f"sqlite:///{tmp_path}/optuna.db"
    ).trials
    assert "heartbeat_unix_time" not in trial.user_attrs


def test_storages_that_cannot_be_opened_are_named_with_the_accepted_schemes(tmp_path):
    with pytest.raises(
        DataError,
        match=r"storage 'bogus://x': unknown scheme 'bogus://'; Optuna stores studies "
        r"in sqlite://, postgresql://.*journal:///path/study.log",
    ):
        open_storage("bogus://x", tmp_path / "x.db")
    with pytest.raises(
        DataError,
        match=r"storage 'postgresql\+nosuchdriver://me:\*\*\*@host/db' cannot be "
        r"opened: .*pip install 'psycopg\[binary\]'",
    ):
        open_storage("postgresql+nosuchdriver://me:secret@host/db", tmp_path / "x.db")


def test_the_search_space_leaves_binning_alone():
    """Each fold's Datasets are binned once and reused by every trial; LightGBM refuses another
    max_bin (or any binning parameter) on a constructed Dataset, so the study never tunes one."""
    from tabular.gbdt_config import DATASET_PARAMS

    study = optuna.create_study(direction="maximize")
    params = suggest_params(study.ask())
    binning = {
        "max_bin",
        "max_bin_by_feature",
        "min_data_in_bin",
        "bin_construct_sample_cnt",
        "data_random_seed",
        "feature_pre_filter",
        "use_missing",
        "zero_as_missing",
        "linear_tree",
        "categorical_feature",
    }
    assert not (set(params) & binning) and set(DATASET_PARAMS) - {"verbosity"} <= binning
    # min_child_samples is tuned: the Datasets are built without the pre-filter that would fix it.
    assert "min_child_samples" in params and DATASET_PARAMS["feature_pre_filter"] is False


def test_trials_reuse_each_folds_datasets_and_do_not_depend_on_parallel_folds(tmp_path):
    from dataclasses import replace

    from tabular.gbdt_folds import seed_dataset

    results = {}
    for workers in (1, 3):
        data, config = make_folds()
        config = replace(config, fold_workers=workers)
        made = [seed_dataset(d, 0, config)[0] for d in data]
        storage = f"sqlite:///{tmp_path}/w{workers}.db"
        tune(data, "gbdt-toy", 4, tmp_path, storage=storage, config=config)
        # Every trial trained on the Datasets made before the study: none was rebuilt.
        assert [seed_dataset(d, 0, config)[0] for d in data] == made
        assert all(len(d.seed_sets) == 1 for d in data)
        results[workers] = [
            (
                t.number,
                t.state,
                t.value,
                t.user_attrs["fold_pauc80"],
                t.user_attrs["best_iterations"],
                t.intermediate_values,
            )
            for t in finished(storage)
        ]
    assert results[1] == results[3] and len(results[1]) == 4


def test_map_folds_yields_in_order_and_leaves_no_fold_running():
    from tabular.gbdt_ensemble import map_folds

    lock = threading.Lock()
    running: set[int] = set()

    def work(k):
        with lock:
            running.add(k)
        time.sleep(0.02 * (4 - k))
        with lock:
            running.discard(k)
        return 10 * k

    config = GBDTConfig(fold_workers=2)
    assert list(map_folds(work, [0, 1, 2, 3], config)) == [0, 10, 20, 30]
    results = map_folds(work, [0, 1, 2, 3], config)
    assert next(results) == 0
    results.close()  # a pruned trial: folds not begun are cancelled, running ones waited for
    assert running == set()
    with pytest.raises(DataError, match="fold_workers: expected an integer >= 0"):
        GBDTConfig(fold_workers=-1)
