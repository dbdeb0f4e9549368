"""Folding a sharded build into one store (`merge_store`), and what its writers share with it:
the locks (`manifest_lock`, `part_lock`, taken with `acquire_lock` / `try_acquire_lock`) and
durable JSON writes (`write_store_json`).

The writer is `embed.store_writer.StoreWriter`, which merges finished parts when a run ends;
the layout both use is spelt in `embed.store_format`. A lock is a `filelock` lock
(`.lock-part-<i>-of-<n>`, or `.lock-manifest` for the whole store), which the kernel releases if
its process dies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

from filelock import FileLock, Timeout

from common.files import atomic_write, fsync_dir
from embed.errors import EmbedError
from embed.store_format import (
    IDS_SUFFIX,
    MANIFEST,
    PART_MANIFEST_RE,
    is_store,
    part_label,
    read_manifests,
    read_store_json,
)

__all__ = [
    "LOCK_TIMEOUT_S",
    "acquire_lock",
    "manifest_lock",
    "merge_locked",
    "merge_store",
    "part_lock",
    "try_acquire_lock",
    "utc_now",
    "write_store_json",
]

log = logging.getLogger(__name__)

# How long a writer or a merge waits for a lock another process holds.
LOCK_TIMEOUT_S = 30.0


def utc_now() -> str:
    """Now, in UTC, to the second (ISO 8601): the times a manifest records."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_store_json(directory: Path, name: str, obj) -> str:
    """`obj` as JSON to `directory/name`, durably and atomically; returns the bytes' sha256."""
    data = (json.dumps(obj, indent=1) + "\n").encode()
    atomic_write(directory / name, lambda f: f.write(data), durable=True)
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- locks


def _lock(path: Path) -> FileLock:
    # thread_local=False: the lock belongs to the writer, whichever thread closes it.
    return FileLock(path, mode=0o644, thread_local=False)


def manifest_lock(path: Path) -> FileLock:
    """The lock of the store's `manifest.json` (held to create or merge it)."""
    return _lock(path / ".lock-manifest")


def part_lock(path: Path, index: int, count: int) -> FileLock:
    """The lock of part `index` of `count` (held by that part's writer while it runs)."""
    return _lock(path / f".lock-part-{part_label(index, count)}")


def acquire_lock(lock: FileLock, timeout: float, what: str) -> None:
    """Take `lock` within `timeout` seconds; raises EmbedError naming `what` and the lock file."""
    try:
        lock.acquire(timeout=timeout, poll_interval=0.05)
    except Timeout:
        raise EmbedError(
            f"{what} is locked by another process (lock file {str(lock.lock_file)!r}); "
            "wait for it to finish, or give each parallel writer its own --shard i/n"
        ) from None


def try_acquire_lock(lock: FileLock) -> bool:
    """Take `lock` if no other process holds it, without waiting."""
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    return True


# ----------------------------------------------------------------------------- merging


def merge_locked(path: Path) -> dict | None:
    """Fold finished part manifests into manifest.json; caller holds the manifest lock.

    Parts whose writer is still running (lock held) are left as they are. Returns the new
    combined manifest, or None when the store has no manifest at all.
    """
    try:
        combined, manifests = read_manifests(path)
    except EmbedError:
        if not is_store(path):
            return None
        raise
    main = dict(manifests[0][1]) if manifests[0][0] == MANIFEST else None
    folded: list[tuple[str, FileLock]] = []
    running: list[str] = []
    for name, _ in manifests:
        m = PART_MANIFEST_RE.match(name)
        if not m:
            continue
        lock = part_lock(path, int(m.group(1)), int(m.group(2)))
        if try_acquire_lock(lock):
            folded.append((name, lock))
        else:
            running.append(name)
    try:
        if not folded and main is not None:
            return main
        base = main or {k: v for k, v in combined.items() if k not in ("shards", "failures")}
        shards = list(base.get("shards", []))
        names = {s["name"] for s in shards}
        failures = dict(base.get("failures", {}))
        parts = dict(manifests)
        for name, _ in folded:
            for shard in parts[name].get("shards", []):
                if shard["name"] not in names:
                    names.add(shard["name"])
                    shards.append(shard)
            failures.update(parts[name].get("failures", {}))
        stored = _stored_ids(path, shards)
        base.update(
            shards=shards,
            failures={k: v for k, v in failures.items() if k not in stored},
            count=len(stored),
            updated=utc_now(),
            created=combined.get("created") or utc_now(),
        )
        base.pop("part", None)
        base.pop("store_uid", None)
        if combined.get("store_uid"):
            base["store_uid"] = combined["store_uid"]
        write_store_json(path, MANIFEST, base)
        for name, _ in folded:
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
        fsync_dir(path)
        if running:
            log.info(
                "feature store %s: parts still being written, left as they are: %s",
                path,
                ", ".join(running),
            )
        return base
    finally:
        for _, lock in folded:
            lock.release()


def _stored_ids(path: Path, shards: list[dict]) -> set[str]:
    stored: set[str] = set()
    for shard in shards:
        stored.update(read_store_json(path / f"{shard['name']}{IDS_SUFFIX}"))
    return stored


def merge_store(path: Path | str, *, lock_timeout: float = LOCK_TIMEOUT_S) -> dict:
    """Finalise a sharded build: fold every finished `manifest.part-*.json` into `manifest.json`.

    No vectors are copied: the combined manifest lists the parts' shard files. Parts still being
    written (their writer holds its lock) are left for a later merge; readers see them anyway.
    Returns the combined manifest. Raises EmbedError when there is no store at `path` or another
    process holds the manifest lock for longer than `lock_timeout` seconds.
    """
    path = Path(path)
    lock = manifest_lock(path)
    if not path.is_dir():
        raise EmbedError(f"no feature store at {str(path)!r} (no such folder)")
    acquire_lock(lock, lock_timeout, f"feature store {str(path)!r}")
    try:
        merged = merge_locked(path)
    finally:
        lock.release()
    if merged is None:
        raise EmbedError(f"no feature store at {str(path)!r} (no {MANIFEST})")
    return merged
