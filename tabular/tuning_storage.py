"""Where an Optuna study lives, and how the trials of workers that died are found.

- `open_storage` / `check_storage`: a storage from a URL (`sqlite:///...`, any SQLAlchemy URL),
  an Optuna journal file (`journal:///abs/path/study.log` or a path ending in `.log`), or the
  default sqlite file; a URL that cannot be opened is refused before any work, with any password
  hidden.
- A trial left RUNNING by a worker that died (kill -9, out of memory, a lost node) is marked
  failed once its heartbeat is older than `STALE_AFTER_SECONDS` (`fail_stale_trials`), so its
  place in the budget is run again: RDB storages keep that heartbeat themselves; for a journal
  file (which has none in Optuna) each trial writes a `HEARTBEAT_ATTR` user attribute every
  `HEARTBEAT_SECONDS` (`Heartbeat`). `LESIONFUSE_TRIAL_GRACE_SECONDS` (an integer >= 4) replaces
  that grace period, with a heartbeat every quarter of it, for every worker it is set for (see
  `heartbeat_timing`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tabular.errors import DataError

__all__ = [
    "GRACE_ENV",
    "HEARTBEAT_ATTR",
    "HEARTBEAT_SECONDS",
    "STALE_AFTER_SECONDS",
    "Heartbeat",
    "RunningSweep",
    "check_storage",
    "fail_stale_trials",
    "heartbeat_timing",
    "open_storage",
]

log = logging.getLogger(__name__)

HEARTBEAT_ATTR = "heartbeat_unix_time"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 120
GRACE_ENV = "LESIONFUSE_TRIAL_GRACE_SECONDS"


def heartbeat_timing() -> tuple[int, int]:
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


# The SQLAlchemy dialects Optuna's RDB storage is used with (a driver may follow:
# postgresql+psycopg).
_RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
_STORAGE_FORMS = (
    "sqlite:///path/study.db, postgresql://user:password@host/db, "
    "mysql://user:password@host/db, or journal:///path/study.log (a journal file; "
    "a path ending in .log also works)"
)


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
        raise DataError(f"storage: got an empty string; pass {_STORAGE_FORMS}")
    if storage.startswith("journal://") or ("://" not in storage and storage.endswith(".log")):
        path = Path(storage[len("journal://") :] if storage.startswith("journal://") else storage)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(
                f"storage {storage!r}: cannot make the journal file's folder {path.parent}: "
                f"{error.strerror}"
            ) from error
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in storage:
        raise DataError(
            f"storage: {storage!r} is neither a database URL (sqlite:///path.db, "
            "postgresql://...) nor a journal file (journal:///path.log or a path ending in .log); "
            f"pass {_STORAGE_FORMS}"
        )
    scheme = storage.split("://", 1)[0]
    if scheme.split("+", 1)[0].lower() not in _RDB_SCHEMES:
        raise DataError(
            f"storage {_masked(storage)!r}: unknown scheme {scheme + '://'!r}; Optuna stores "
            "studies in "
            f"{', '.join(s + '://' for s in _RDB_SCHEMES)} databases or a journal file: pass "
            f"{_STORAGE_FORMS}"
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
            raise DataError(
                f"storage {_masked(storage)!r} cannot be opened: {_first_line(error)}; "
                f"pass {_STORAGE_FORMS} (a server's driver must be installed, e.g. "
                "pip install 'psycopg[binary]' for postgresql://)"
            ) from error
        except SQLAlchemyError as error:
            # Two workers creating the tables of a new database at once: one of them loses the
            # race on the schema version row; the tables exist a moment later.
            if attempt == 5:
                raise DataError(
                    f"storage {_masked(storage)!r} cannot be opened: {_first_line(error)}; "
                    "check that the database server is reachable, the database exists "
                    "and the user may write to it"
                ) from error
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


class Heartbeat:
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

    def __enter__(self) -> Heartbeat:
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


def fail_stale_trials(
    study: optuna.Study, storage, stale_after: float | None = None
) -> RunningSweep:
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
