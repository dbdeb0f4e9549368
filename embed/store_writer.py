"""Feature store writing: `StoreWriter` appends shards; `merge_store` (`embed.store_merge`,
re-exported here) folds a sharded build.

The layout is spelt in `embed.store_format`, the reader is `embed.store`. Every file is written
through `common.files.atomic_write(..., durable=True)` and hashed as it is written, so the
manifest's per-shard sha256 values are those of the bytes on disk. One writer per part at a time:
each holds a `filelock` lock (`.lock-part-<i>-of-<n>`, or `.lock-manifest` for the whole store),
which the kernel releases if its process dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock

from common.files import atomic_write
from common.version import lesionfuse_version
from embed.errors import EmbedError
from embed.identity import (
    DTYPE,
    IDENTITY_FIELDS,
    as_json,
    check_identity,
    identity_of,
    with_legacy_values,
)
from embed.store import image_changed
from embed.store_format import (
    FINGERPRINTS_SUFFIX,
    FORMAT,
    IDS_SUFFIX,
    MANIFEST,
    VECTORS_SUFFIX,
    is_store,
    part_label,
    part_manifest_name,
    quote_first,
    read_manifests,
    shard_fingerprints,
    shard_ids,
    shard_prefix,
)
from embed.store_merge import (
    LOCK_TIMEOUT_S,
    acquire_lock,
    manifest_lock,
    merge_locked,
    merge_store,
    part_lock,
    try_acquire_lock,
    utc_now,
    write_store_json,
)

__all__ = [
    "StoreWriter",
    # re-exported from embed.store_merge, where it is defined
    "merge_store",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- files


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (np.save needs only write)."""

    def __init__(self, f, digest):
        self._f = f
        self._digest = digest

    def write(self, data) -> int:
        self._digest.update(data)
        return self._f.write(data)


def _write_hashed(directory: Path, name: str, write: Callable[[_HashingWriter], None]) -> str:
    """Write `directory/name` crash-safely (temp file, fsync, rename); returns the sha256 hex of
    the bytes written."""
    digest = hashlib.sha256()
    atomic_write(directory / name, lambda f: write(_HashingWriter(f, digest)), durable=True)
    return digest.hexdigest()


class StoreWriter:
    """Appends vectors to a store as part `shard_index` of `shard_count` writers.

    Use as a context manager. On entry it takes the part's lock (the whole store's manifest lock
    when shard_count == 1), refuses a store of another identity (StoreMismatchError), deletes the
    temp files and unlisted shards a killed writer of this part left, and loads what the store
    already holds. `append` buffers rows and writes a shard whenever `shard_rows` are buffered or
    the oldest buffered row has waited `max_shard_seconds` (so a hard kill loses at most about
    that much work); leaving the context writes the rest and the manifest. A sharded writer then
    tries to merge.
    """

    def __init__(
        self,
        path: Path | str,
        identity: dict,
        *,
        shard_index: int = 0,
        shard_count: int = 1,
        shard_rows: int = 4096,
        max_shard_seconds: float = 60.0,
        info: dict | None = None,
        lock_timeout: float = LOCK_TIMEOUT_S,
    ):
        # An identity of the fields every store had before blocks became a setting means the
        # layer4 average, as such a store is read.
        identity = with_legacy_values(identity)
        missing = [k for k in IDENTITY_FIELDS if k not in identity]
        if missing:
            raise EmbedError(f"store identity lacks field(s) {missing}")
        if not (isinstance(shard_count, int) and shard_count >= 1):
            raise EmbedError(f"shard_count must be an integer >= 1, got {shard_count!r}")
        if not (isinstance(shard_index, int) and 0 <= shard_index < shard_count):
            raise EmbedError(
                f"shard_index must be in 0..{shard_count - 1} for shard_count={shard_count}, "
                f"got {shard_index!r}"
            )
        if not (isinstance(shard_rows, int) and shard_rows >= 1):
            raise EmbedError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
        if not _positive_number(max_shard_seconds):
            raise EmbedError(f"max_shard_seconds must be a number > 0, got {max_shard_seconds!r}")
        self.path = Path(path)
        self.identity = as_json({k: identity[k] for k in IDENTITY_FIELDS})
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.shard_rows = shard_rows
        self.max_shard_seconds = float(max_shard_seconds)
        self.info = dict(info or {})
        self.lock_timeout = lock_timeout
        self._version = lesionfuse_version()  # recorded in every manifest this writer writes
        self._lock: FileLock | None = None
        self._own: dict = {}  # the manifest this writer rewrites (read by `open`)
        self._own_ids: set[str] = set()  # ids listed in that manifest's shards
        self.recorded: dict = {}  # the store's manifest as found on entry ({} for a new store)
        self.stored: set[str] = set()  # ids with a vector anywhere in the store
        self._stored_fingerprints: dict[str, str | None] = {}  # id -> fingerprint, newest row
        self._replacing: set[str] = set()  # stored ids whose next append supersedes their row
        self.failures: dict[str, str] = {}  # known failures anywhere in the store, not stored
        self._buf_ids: list[str] = []
        self._buf_fingerprints: list[str | None] = []
        self._buf_vecs: list[np.ndarray] = []
        self._buf_rows = 0
        self._buf_since: float | None = None  # time.monotonic() of the oldest buffered row
        self._next = 0
        self.shards_written: list[str] = []

    @property
    def sharded(self) -> bool:
        return self.shard_count > 1

    @property
    def manifest_name(self) -> str:
        return part_manifest_name(self.shard_index, self.shard_count) if self.sharded else MANIFEST

    @property
    def buffered(self) -> int:
        """Rows appended but not yet in a shard file."""
        return self._buf_rows

    # -- lifecycle
    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Interrupted (Ctrl-C, a failing batch): the buffered rows are complete vectors, so
        # keep them; if even that fails the store still holds every shard written before.
        try:
            self.flush()
            self._write_manifest()
        except Exception as err:  # the original exception is the one to report
            log.warning("feature store %s: could not save buffered rows: %s", self.path, err)
        finally:
            self._release()

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        what = f"feature store {str(self.path)!r}"
        if self.sharded:
            self._lock = part_lock(self.path, self.shard_index, self.shard_count)
            acquire_lock(
                self._lock,
                self.lock_timeout,
                f"part {self.shard_index}/{self.shard_count} of {what}",
            )
        else:
            self._lock = manifest_lock(self.path)
            acquire_lock(self._lock, self.lock_timeout, what)
        try:
            self._create_if_new()
            self._load()
        except BaseException:
            self._release()
            raise

    def _new_manifest(self, store_uid: str | None) -> dict:
        manifest = {"format": FORMAT, **self.identity, **self.info}
        if store_uid:
            manifest["store_uid"] = store_uid
        manifest.update(count=0, shards=[], failures={}, created=utc_now())
        return manifest

    def _create_if_new(self) -> None:
        """Write the first manifest of a new store, with its store_uid.

        Parts of a sharded build may start at once on an empty folder: the manifest lock lets
        one of them create the store, and the others find its manifest and share its store_uid.
        """
        if is_store(self.path):
            return
        lock = manifest_lock(self.path) if self.sharded else None
        if lock is not None:
            acquire_lock(lock, self.lock_timeout, f"feature store {str(self.path)!r}")
        try:
            if not is_store(self.path):
                self._own = self._new_manifest(uuid.uuid4().hex)
                if self.sharded:
                    self._own["part"] = part_label(self.shard_index, self.shard_count)
                self._write_manifest()
        finally:
            if lock is not None:
                lock.release()

    def _clash_hint(self, recorded: dict) -> str:
        """What to do when this store was built with other settings than this run's: never
        "build it with `invoke embed`", the command that was just run and refused."""
        have = identity_of(recorded).get("variant")
        want = self.identity.get("variant")
        if want is not None and have != want:
            return (
                f"the store keeps the variant it was built with: rerun with --variant {have} (or "
                f"--variant auto, which keeps it), or move the store {str(self.path)!r} away to "
                f"rebuild it with {want}"
            )
        return (
            f"rerun with the settings it was built with, or move the store {str(self.path)!r} away "
            "to rebuild it with these"
        )

    def _load(self) -> None:
        if not self.sharded:
            # Fold finished parts of an earlier sharded build first, so this writer owns one
            # manifest listing everything.
            merge_locked(self.path)
        combined, manifests = read_manifests(self.path)
        check_identity(
            combined,
            self.identity,
            f"feature store {str(self.path)!r}",
            "this run asks for",
            hint=self._clash_hint(combined),
        )
        self.recorded = combined
        own = dict(manifests)
        fresh = self.manifest_name not in own
        self._own = own.get(self.manifest_name) or self._new_manifest(combined.get("store_uid"))
        if self.sharded:
            self._own["part"] = part_label(self.shard_index, self.shard_count)
        self._own.update(self.info)
        listed: set[str] = set()
        for _, m in manifests:
            listed.update(s["name"] for s in m.get("shards", []))
        self._cleanup(listed)
        self._load_stored(combined["shards"])
        self.failures = {k: v for k, v in combined["failures"].items() if k not in self.stored}
        # Next shard number after every file of this part, listed or not, ever seen.
        prefix = shard_prefix(self.shard_index, self.shard_count)
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
        numbers = [int(match.group(1)) for n in listed if (match := pattern.match(n))]
        self._next = max(numbers, default=-1) + 1
        if fresh:
            # The store exists (empty) from the start, so a run killed before its first shard
            # leaves a store that opens, not a folder that is not one.
            self._write_manifest()

    def _load_stored(self, shards: list[dict]) -> None:
        """Every stored id with the fingerprint of its newest row; the ids this part lists."""
        own_names = {s["name"] for s in self._own["shards"]}
        for shard in shards:  # oldest first: a later row of an id replaces an earlier one
            ids = shard_ids(self.path, shard)
            self._stored_fingerprints.update(
                zip(ids, shard_fingerprints(self.path, shard), strict=True)
            )
            if shard["name"] in own_names:
                self._own_ids.update(ids)
        self.stored = set(self._stored_fingerprints)

    def _cleanup(self, listed: set[str]) -> None:
        """Delete this part's temp files and shard files no manifest lists (a killed run's)."""
        prefix = shard_prefix(self.shard_index, self.shard_count)
        suffixes = (VECTORS_SUFFIX, IDS_SUFFIX, FINGERPRINTS_SUFFIX)
        files = "(" + "|".join(re.escape(suffix) for suffix in suffixes) + ")"
        own_shard = re.compile(rf"^{re.escape(prefix)}(\d+){files}$")
        own_tmp = re.compile(
            rf"^\.tmp-({re.escape(prefix)}\d+{files}|{re.escape(self.manifest_name)})-"
        )
        removed = []
        for entry in os.listdir(self.path):
            m = own_shard.match(entry)
            stale_shard = m is not None and entry[: -len(m.group(2))] not in listed
            if stale_shard or own_tmp.match(entry):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / entry).unlink()
                removed.append(entry)
        if removed:
            log.warning(
                "feature store %s: removed %d file(s) left by an interrupted run: %s",
                self.path,
                len(removed),
                quote_first(sorted(removed)),
            )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Write buffered rows and the manifest, release the lock, and (sharded) try to merge."""
        if self._lock is None:
            return
        try:
            self.flush()
            self._write_manifest()
        finally:
            self._release()
        if self.sharded:
            lock = manifest_lock(self.path)
            if try_acquire_lock(lock):
                try:
                    merge_locked(self.path)
                finally:
                    lock.release()

    # -- what the store holds
    def stored_fingerprint(self, image_id: str) -> str | None:
        """The fingerprint of the image `image_id`'s stored row was made from; None if unknown."""
        return self._stored_fingerprints.get(image_id)

    def changed(self, fingerprints: dict[str, str]) -> list[str]:
        """The stored ids of `fingerprints` ({id: fingerprint now}) whose stored fingerprint is
        known and differs (see `image_changed`), in the order given."""
        stored = self._stored_fingerprints
        return [i for i, now in fingerprints.items() if image_changed(stored.get(i), now)]

    def supersede(self, ids: Sequence[str]) -> None:
        """Let the next `append` of these stored ids add a row that replaces their current one
        for every reader (their image changed). Until then readers keep the current row."""
        self._replacing.update(i for i in ids if i in self.stored)

    # -- writing
    def add_failures(self, failures: dict[str, str]) -> None:
        """Record ids that could not be embedded (written with the next manifest)."""
        self._own.setdefault("failures", {}).update(failures)
        self.failures.update(failures)

    def append(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        fingerprints: Sequence[str | None] | None = None,
    ) -> None:
        """Buffer rows: `vectors` shape (len(ids), views, dim), cast to float16; `fingerprints`
        (one per id, None = unknown) say which image each vector was made from.

        Raises EmbedError on a shape mismatch or on ids already in the store (unless passed to
        `supersede`) or buffer.
        """
        ids = list(ids)
        vectors = np.asarray(vectors)
        expected = (len(ids), self.identity["views"], self.identity["dim"])
        if vectors.shape != expected:
            raise EmbedError(f"vectors have shape {vectors.shape}, expected {expected}")
        fingerprints = [None] * len(ids) if fingerprints is None else list(fingerprints)
        if len(fingerprints) != len(ids):
            raise EmbedError(f"{len(fingerprints)} fingerprints given for {len(ids)} ids")
        dup = [i for i in ids if i in self.stored and i not in self._replacing]
        if dup or len(set(ids)) != len(ids):
            dup = dup or [i for i in ids if ids.count(i) > 1]
            raise EmbedError(
                f"{len(dup)} ids are already in the store or repeated: {quote_first(dup)}"
            )
        if ids:
            self._buffer(ids, vectors, fingerprints)
        while self._buf_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)
        since = self._buf_since  # set whenever rows are buffered
        if (
            self._buf_rows
            and since is not None
            and time.monotonic() - since >= self.max_shard_seconds
        ):
            self.flush()

    def _buffer(self, ids: list[str], vectors: np.ndarray, fingerprints: list) -> None:
        if not self._buf_rows:
            self._buf_since = time.monotonic()
        self._buf_ids.extend(ids)
        self._buf_fingerprints.extend(fingerprints)
        self._buf_vecs.append(vectors.astype(DTYPE, copy=False))
        self._buf_rows += len(ids)
        self.stored.update(ids)
        self._replacing.difference_update(ids)
        self._stored_fingerprints.update(zip(ids, fingerprints, strict=True))
        for i in ids:
            self.failures.pop(i, None)
            self._own.get("failures", {}).pop(i, None)

    def flush(self) -> None:
        """Write all buffered rows as one (possibly short) shard."""
        if self._buf_rows:
            self._write_shard(self._buf_rows)

    def _write_shard(self, rows: int) -> None:
        allv = np.concatenate(self._buf_vecs) if len(self._buf_vecs) > 1 else self._buf_vecs[0]
        vecs, rest = allv[:rows], allv[rows:]
        ids, self._buf_ids = self._buf_ids[:rows], self._buf_ids[rows:]
        fingerprints = self._buf_fingerprints[:rows]
        self._buf_fingerprints = self._buf_fingerprints[rows:]
        self._buf_vecs = [rest] if len(rest) else []
        self._buf_rows = len(rest)
        # The rows left over came with the latest append.
        self._buf_since = time.monotonic() if len(rest) else None
        name = f"{shard_prefix(self.shard_index, self.shard_count)}{self._next:05d}"
        self._next += 1
        vecs = np.ascontiguousarray(vecs)
        entry = {"name": name, "rows": rows}
        entry["sha256"] = _write_hashed(
            self.path, f"{name}{VECTORS_SUFFIX}", lambda f: np.save(f, vecs, allow_pickle=False)
        )
        entry["ids_sha256"] = write_store_json(self.path, f"{name}{IDS_SUFFIX}", ids)
        if any(fp is not None for fp in fingerprints):
            entry["fingerprints_sha256"] = write_store_json(
                self.path, f"{name}{FINGERPRINTS_SUFFIX}", fingerprints
            )
        # Listing the shard in the manifest comes last: until then readers ignore its files.
        self._own["shards"].append(entry)
        self._own_ids.update(ids)
        self._write_manifest()
        self.shards_written.append(name)
        log.debug("feature store %s: wrote %s (%d rows)", self.path, name, rows)

    def _write_manifest(self) -> None:
        own = self._own
        own["count"] = len(self._own_ids)  # an id embedded again is counted once
        own["updated"] = utc_now()
        own["lesionfuse_version"] = self._version
        write_store_json(self.path, self.manifest_name, own)


def _positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
