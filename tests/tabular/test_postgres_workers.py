"""PostgreSQL as the Optuna storage, as README's "Tuning on several machines" uses it.

A real server is started for these tests (Debian's `postgresql` binaries, `initdb` + `pg_ctl` in a
temporary folder owned by an unprivileged user, listening on a unix socket in that folder only);
`invoke train-gbdt` workers, run as a user types them, share one study on it. The tests skip, with
the reason, where the server cannot start: no binaries, no driver, no user to run it as.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from tabular.errors import DataError
from tabular.tuning import tune
from tabular.tuning_storage import GRACE_ENV, open_storage

REPO = Path(__file__).resolve().parents[2]
INVOKE = Path(sys.executable).parent / "invoke"
# PostgreSQL refuses to run as root: as root, the server runs as this system user (made if absent).
SERVER_USER = "lesionfuse-test"
ROLE, DATABASE = "lesionfuse", "optuna"
SPEC_NAME = "isic2020-pg"
STUDY = f"gbdt-{SPEC_NAME}"
# A grace period short enough for a test (heartbeat every 2 s), long enough that a live worker on a
# loaded machine is not mistaken for a dead one.
GRACE = 8
ROWS = 2500
# Trials of the two workers together, then how many more the next workers are asked for.
BUDGET, MORE = 6, 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _postgres_bin() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: on PATH, else Debian's
    /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.parent.name)] or [0],
    )
    return versions[-1].parent if versions else None


def _server_user() -> pwd.struct_passwd | None:
    """Whom the server runs as: this user, or as root `SERVER_USER` (created if absent). Skips when
    root cannot switch to it."""
    if os.geteuid() != 0:
        return None
    if shutil.which("runuser") is None:
        pytest.skip("PostgreSQL refuses to run as root, and runuser (util-linux) is absent")
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        made = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_USER,
            ],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pytest.skip(
                f"PostgreSQL refuses to run as root, and user {SERVER_USER!r} could not be "
                f"created: {made.stderr.strip()}"
            )
        user = pwd.getpwnam(SERVER_USER)
    if (
        subprocess.run(["runuser", "-u", SERVER_USER, "--", "true"], capture_output=True).returncode
        != 0
    ):
        pytest.skip(f"cannot switch to user {SERVER_USER!r} with runuser to start PostgreSQL")
    return user


def _as(user: pwd.struct_passwd | None, command: list) -> list[str]:
    command = [str(part) for part in command]
    return ["runuser", "-u", user.pw_name, "--", *command] if user else command


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """`postgresql://lesionfuse@/optuna?host=<socket folder>` of a server that lives for the
    module."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries are absent (apt-get install postgresql; .ci/run does)"
        )
    url = f"postgresql://{ROLE}@/{DATABASE}?host={{folder}}"
    from sqlalchemy.engine import make_url

    driver = make_url(url.format(folder="/tmp")).get_dialect().driver
    try:
        __import__(driver)
    except ImportError:
        pytest.skip(
            f"the PostgreSQL driver SQLAlchemy uses for postgresql:// URLs ({driver}) is not "
            "installed: pip install -e '.[dev]'"
        )
    user = _server_user()
    # Short and private (0700): the socket's path must stay under ~100 bytes, and only this user
    # (and root) may connect, so the server can trust local connections without a password.
    folder = Path(tempfile.mkdtemp(prefix="lesionfuse-pg-"))
    started = False
    try:
        if user:
            os.chown(folder, user.pw_uid, user.pw_gid)
        data, log = folder / "data", folder / "server.log"
        init = subprocess.run(
            _as(
                user,
                [
                    bindir / "initdb",
                    "-D",
                    data,
                    "-U",
                    ROLE,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {(init.stdout + init.stderr)[-1500:]}")
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{folder}' -c fsync=off "
            "-c shared_buffers=16MB -c max_connections=40"
        )
        start = subprocess.run(
            _as(
                user,
                [
                    bindir / "pg_ctl",
                    "-D",
                    data,
                    "-l",
                    log,
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
            capture_output=True,
            text=True,
            timeout=90,
        )
        started = start.returncode == 0
        if not started:
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()} {_tail(log)}")
        made = subprocess.run(
            [bindir / "createdb", "-h", folder, "-U", ROLE, DATABASE],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        yield url.format(folder=folder)
    finally:
        if started:
            subprocess.run(
                _as(
                    user,
                    [bindir / "pg_ctl", "-D", folder / "data", "-m", "immediate", "-w", "stop"],
                ),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def spec_file(shared_data, tmp_path_factory) -> Path:
    """A ~2,500-row subset of ISIC 2020 (whole patients, a seeded draw): trials of ~1-3 s."""
    frame = pd.read_csv(shared_data / "isic2020" / "metadata.csv")
    sizes = frame.groupby("patient_id").size()
    order = np.random.default_rng(0).permutation(sizes.index.to_numpy())
    keep = order[: int(np.searchsorted(sizes[order].cumsum().to_numpy(), ROWS)) + 1]
    folder = tmp_path_factory.mktemp("isic2020-subset")
    frame[frame["patient_id"].isin(keep)].to_csv(folder / "metadata.csv", index=False)
    spec = (shared_data / "isic2020" / "dataset.toml").read_text()
    spec, named = re.subn(r'(?m)^name = ".*"$', f'name = "{SPEC_NAME}"', spec)
    assert named == 1
    (folder / "dataset.toml").write_text(spec)
    return folder / "dataset.toml"


class Worker:
    """`invoke train-gbdt` as a user types it, in its own artifacts folder (its own machine)."""

    def __init__(self, home: Path, spec: Path, url: str, trials: int) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "worker.log"
        env = {
            **os.environ,
            "LESIONFUSE_ARTIFACTS": str(home),
            GRACE_ENV: str(GRACE),
            "PYTHONPATH": str(REPO),
        }
        with self.log.open(
            "w"
        ) as out:  # a file, not a pipe: tqdm writes a lot, nobody reads a pipe
            self.process = subprocess.Popen(
                [
                    str(INVOKE),
                    "train-gbdt",
                    "--spec",
                    str(spec),
                    "--run",
                    "r1",
                    "--trials",
                    str(trials),
                    "--storage",
                    url,
                ],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )

    def wait(self, timeout: float = 240) -> int:
        return self.process.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def best(self) -> dict:
        return json.loads((self.home / "runs" / "r1" / "gbdt" / "best_params.json").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=url).get_trials(deepcopy=False)


def _check_numbers(trials) -> None:
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(numbers))), f"trial numbers repeated or missing: {numbers}"


@contextlib.contextmanager
def _start_line(url: str, waiters: int, timeout: float = 180) -> Iterator[None]:
    """Hold Optuna's `trials` table locked while the block starts workers, and release it once
    `waiters` connections wait on that lock: every worker's first look at the trials then comes
    after all of them have started, whatever their start-up time."""
    import sqlalchemy

    optuna.storages.RDBStorage(url)  # makes Optuna's tables, so there is one to lock
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as holder:
            holder.execute(sqlalchemy.text("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE"))
            yield
            deadline = time.monotonic() + timeout
            with engine.connect() as watcher:
                while True:
                    waiting = watcher.execute(
                        sqlalchemy.text(
                            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                            " WHERE c.relname = 'trials' AND NOT l.granted"
                        )
                    ).scalar_one()
                    if waiting >= waiters:
                        break
                    assert time.monotonic() < deadline, f"{waiting} of {waiters} workers waiting"
                    time.sleep(0.05)
            holder.rollback()  # ends the transaction: the lock goes, all of them go on
    finally:
        engine.dispose()


@pytest.mark.slow
def test_workers_share_a_postgres_study_and_a_killed_workers_trial_is_run_again(
    postgres_url, spec_file, tmp_path
):
    workers: list[Worker] = []
    try:
        # Two workers at once on one study: exactly --trials finished, each number once. They are
        # held at a start line (see `_start_line`) so that neither can run the whole budget while
        # the other is still importing: a trial takes well under a second, start-up seconds.
        with _start_line(postgres_url, waiters=2):
            workers = [
                Worker(tmp_path / f"machine{i}", spec_file, postgres_url, BUDGET) for i in range(2)
            ]
        for worker in workers:
            assert worker.wait() == 0, worker.text()[-3000:]
        trials = _trials(postgres_url)
        finished = [t for t in trials if t.state in FINISHED]
        assert len(finished) == BUDGET
        _check_numbers(trials)
        assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == BUDGET
        # They ran at the same time: some trial of one started before a trial of the other ended.
        spans = sorted((t.datetime_start, t.datetime_complete) for t in finished)
        assert any(
            later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)
        ), spans
        # Both read the whole study back: the same best trial, the same count.
        assert workers[0].best()["trial"] == workers[1].best()["trial"]
        assert (
            workers[0].best()["trials_finished"] == workers[1].best()["trials_finished"] == BUDGET
        )

        # kill -9 of a worker mid-trial (a fold reported, others to go: folds train side by side,
        # so two may report at once) leaves it RUNNING.
        killed = Worker(tmp_path / "machine2", spec_file, postgres_url, BUDGET + MORE)
        workers.append(killed)
        study = optuna.load_study(study_name=STUDY, storage=postgres_url)
        deadline = time.monotonic() + 180
        victim = None
        while victim is None and killed.process.poll() is None and time.monotonic() < deadline:
            running = [
                t
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if 1 <= len(t.intermediate_values) <= 3
            ]
            if running:
                os.kill(killed.process.pid, signal.SIGKILL)
                victim = running[0].number
            else:
                time.sleep(0.05)
        assert victim is not None, f"no trial caught running: {killed.text()[-3000:]}"
        assert killed.wait() == -signal.SIGKILL
        state = {t.number: t.state for t in _trials(postgres_url)}
        assert state[victim] == TrialState.RUNNING
        # Its heartbeat goes stale; the next worker fails it and runs its place in the budget.
        time.sleep(GRACE)
        following = Worker(tmp_path / "machine3", spec_file, postgres_url, BUDGET + MORE)
        workers.append(following)
        assert following.wait() == 0, following.text()[-3000:]

        trials = _trials(postgres_url)
        assert {t.number: t.state for t in trials}[victim] == TrialState.FAIL
        assert len([t for t in trials if t.state in FINISHED]) == BUDGET + MORE
        _check_numbers(trials)
        assert following.best()["trials_finished"] == BUDGET + MORE
        assert (
            f"study {STUDY}: found 1 trial(s) left RUNNING by a worker that stopped (trial numbers "
            f"{victim}): marked FAIL after {GRACE} s without a heartbeat"
        ) in following.text()
    finally:
        for worker in workers:
            worker.stop()


def test_grace_period_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(GRACE_ENV, " 12 ")
    storage = open_storage(f"sqlite:///{tmp_path}/study.db", tmp_path / "study.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (3, 12)
    monkeypatch.delenv(GRACE_ENV)
    storage = open_storage(f"sqlite:///{tmp_path}/study.db", tmp_path / "study.db")
    assert (storage.heartbeat_interval, storage.grace_period) == (30, 120)


@pytest.mark.parametrize("value", ["3", "0", "-8", "ten", "7.5"])
def test_a_bad_grace_period_is_refused_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv(GRACE_ENV, value)
    message = rf"{GRACE_ENV}: expected whole seconds >= 4 .* got '{re.escape(value)}'; unset it"
    with pytest.raises(DataError, match=message):
        tune([], "gbdt-toy", 1, tmp_path)
    with pytest.raises(DataError, match=message):
        open_storage(f"sqlite:///{tmp_path}/study.db", tmp_path / "study.db")
    assert not (tmp_path / "study.db").exists()
