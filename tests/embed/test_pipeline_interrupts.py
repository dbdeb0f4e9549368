"""build_store interrupted: SIGINT and SIGTERM mid-run, kill -9, and two processes building one
sharded store; each interrupted store opens, verifies, and a rerun completes it to equal the
uninterrupted one.

A random-initialised ResNet-50 at 32 px keeps these fast; what is checked is the plumbing
(which ids, which rows, which files), not the features themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from storetools import N_IMAGES, assert_same_vectors, tiny_config

from embed.errors import EmbedInterrupted
from embed.pipeline import build_store
from embed.sources import FolderSource
from embed.store import MANIFEST, FeatureStore

WORKER = Path(__file__).with_name("store_worker.py")


def _resume_equals_reference(store: Path, folder: Path, weights, reference, saved: int) -> None:
    """A rerun over the interrupted `store` embeds only the rest and ends equal to `reference`."""
    rest = build_store(FolderSource(folder), None, store, "toy", weights, tiny_config())
    assert (rest.embedded, rest.skipped_existing) == (N_IMAGES - saved, saved)
    assert_same_vectors(FeatureStore.open(store), reference)


# ----------------------------------------------------------------------------- interruptions


class _SignalAt(FolderSource):
    """Sends signals to this process while reading given ids: a signal arriving mid-batch."""

    def __init__(self, root, signals: dict[str, int]):
        super().__init__(root)
        self.signals = signals

    def read_bytes(self, image_id: str) -> bytes:
        if image_id in self.signals:
            os.kill(os.getpid(), self.signals[image_id])
        return super().read_bytes(image_id)


class _SignalEscaped(Exception):
    """A signal reached the handler the test installed: build_store did not take it over."""


@pytest.fixture
def guarded_signals():
    """SIGTERM and SIGINT handled by the test while it runs, so that a build_store that does not
    catch them fails the test instead of ending (SIGTERM) or aborting (SIGINT) the session."""

    def escaped(signum, frame):
        raise _SignalEscaped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, escaped) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield escaped
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _interrupted_build(source, store, weights, expected):
    with expected:
        build_store(source, None, store, "toy", weights, tiny_config(shard_rows=1000))


def test_sigint_mid_batch_finishes_the_batch_saves_every_row_and_raises(
    tmp_path, folder, weights, reference, guarded_signals
):
    store = tmp_path / "store"
    src = _SignalAt(folder, {"img_005": signal.SIGINT})  # in the second batch of four
    _interrupted_build(
        src,
        store,
        weights,
        pytest.raises(
            EmbedInterrupted,
            match=r"^interrupted by SIGINT: 8 rows saved to feature store '.*store' \(8 in all\); "
            r"rerun the same command to continue$",
        ),
    )
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is guarded_signals
    assert FeatureStore.open(store).ids == [f"img_{i:03d}" for i in range(8)]
    _resume_equals_reference(store, folder, weights, reference, 8)


def test_a_second_signal_stops_at_once_and_still_saves_the_finished_batches(
    tmp_path, folder, weights, guarded_signals
):
    store = tmp_path / "store"
    src = _SignalAt(folder, {"img_005": signal.SIGTERM, "img_006": signal.SIGINT})
    _interrupted_build(src, store, weights, pytest.raises(KeyboardInterrupt))
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is guarded_signals
    assert FeatureStore.open(store).ids == [f"img_{i:03d}" for i in range(4)]


def test_build_store_runs_outside_the_main_thread_without_signal_handlers(
    tmp_path, folder, weights
):
    before = signal.getsignal(signal.SIGINT)
    result = {}

    def run():
        try:
            result["summary"] = build_store(
                FolderSource(folder), ["img_000"], tmp_path / "s", "toy", weights, tiny_config()
            )
        except Exception as error:  # reported below, in the test's thread
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "error" not in result, result.get("error")
    assert result["summary"].embedded == 1 and signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- other processes


def _worker(folder: Path, store: Path, weights, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(folder), str(store), str(weights.path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker ended before the shard appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker too slow")
        time.sleep(0.01)


def _listed(store: Path) -> int:
    try:
        return json.loads((store / MANIFEST).read_text())["count"]
    except FileNotFoundError:
        return 0


def _shards(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("shard-*.npy")) if store.is_dir() else []


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path, folder, weights, reference):
    store = tmp_path / "store"
    counts = []
    # Kill once the moment the first shard file appears (before the manifest lists it), and
    # once a little after the manifest has listed some more rows.
    for round_ in range(2):
        proc = _worker(folder, store, weights, "--delay", "0.05")
        if round_ == 0:
            _wait_for(lambda: bool(_shards(store)), proc)
        else:
            _wait_for(lambda: _listed(store) > counts[0], proc)
            time.sleep(0.07)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        fs = FeatureStore.open(store)  # never corrupt: opens, verifies, reads
        assert fs.verify()["ok"]
        assert 0 <= fs.count < N_IMAGES
        fs.read(fs.ids)
        counts.append(fs.count)
    assert counts[1] > counts[0]
    summary = build_store(FolderSource(folder), None, store, "toy", weights, tiny_config())
    assert summary.skipped_existing == counts[1] and summary.embedded == N_IMAGES - counts[1]
    assert not [n for n in os.listdir(store) if n.startswith(".tmp")]
    assert_same_vectors(FeatureStore.open(store), reference)


class _Lines:
    """A worker's output, read by a thread line by line, so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no line with {text!r} from the worker:\n{self.text()}")
            time.sleep(0.01)

    def text(self) -> str:
        self.proc.wait(timeout=120)
        self._thread.join(timeout=30)
        return "".join(self.lines)


@pytest.mark.slow
def test_sigterm_mid_run_saves_the_rows_exits_non_zero_and_a_rerun_embeds_the_rest(
    tmp_path, folder, weights, reference
):
    store = tmp_path / "store"
    # Shards of 1000 rows and a minute: without the signal handling nothing would be on disk.
    proc = _worker(
        folder, store, weights, "--delay", "0.2", "--shard-rows", "1000", "--log-every", "1"
    )
    output = _Lines(proc)
    output.wait_for("batch 1/6")  # one batch of 4 embedded, more coming
    proc.send_signal(signal.SIGTERM)
    text = output.text()
    assert proc.returncode == 2, text
    found = re.search(
        r"error: interrupted by SIGTERM: (\d+) rows saved .*rerun the same command", text
    )
    assert found, text
    saved = int(found.group(1))
    assert 4 <= saved < N_IMAGES and saved % 4 == 0
    assert _listed(store) == saved
    fs = FeatureStore.open(store)
    assert fs.verify()["ok"] and fs.count == saved
    _resume_equals_reference(store, folder, weights, reference, saved)


@pytest.mark.slow
def test_kill_9_after_a_time_bounded_shard_keeps_its_rows(tmp_path, folder, weights, reference):
    store = tmp_path / "store"
    # 1000-row shards are never filled here: only the 0.2 s limit writes shards.
    proc = _worker(
        folder,
        store,
        weights,
        *("--delay", "0.1", "--shard-rows", "1000", "--max-shard-seconds", "0.2"),
    )
    _wait_for(lambda: _listed(store) > 0, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    fs = FeatureStore.open(store)
    assert fs.verify()["ok"]
    kept = fs.count
    assert 0 < kept < N_IMAGES
    fs.read(fs.ids)
    _resume_equals_reference(store, folder, weights, reference, kept)


@pytest.mark.slow
def test_two_processes_build_one_sharded_store(tmp_path, folder, weights, reference):
    store = tmp_path / "store"
    procs = [
        _worker(folder, store, weights, "--shard", f"{i}/2", "--shard-rows", "4") for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    embedded = [
        int(next(ln for ln in o.splitlines() if ln.startswith("SUMMARY")).split()[1])
        for o in outputs
    ]
    assert sum(embedded) == N_IMAGES and min(embedded) > 0
    names = sorted(os.listdir(store))
    assert any(n.startswith("shard-0-of-2-") for n in names) and any(
        n.startswith("shard-1-of-2-") for n in names
    )
    fs = FeatureStore.open(store)
    assert fs.verify()["ok"] and fs.count == N_IMAGES
    assert_same_vectors(fs, reference)
    # The last writer out merged: one manifest; a re-run of either part has nothing to do.
    assert [n for n in names if n.startswith("manifest")] in (
        [MANIFEST],
        [MANIFEST, "manifest.part-0-of-2.json"],
        [MANIFEST, "manifest.part-1-of-2.json"],
    )
    from embed.store_writer import merge_store

    assert merge_store(store)["count"] == N_IMAGES
    assert [n for n in os.listdir(store) if n.startswith("manifest")] == [MANIFEST]
    again = build_store(
        FolderSource(folder), None, store, "toy", weights, tiny_config(shard_index=1, shard_count=2)
    )
    assert again.embedded == 0 and again.skipped_existing == embedded[1]
    # A single-writer run over the merged store finds everything too.
    assert (
        build_store(FolderSource(folder), None, store, "toy", weights, tiny_config()).embedded == 0
    )
