"""Feature store: image embeddings on disk, in shards, with a manifest saying what made them.

Layout of a store directory::

    manifest.json                       combined manifest (written by a single writer or by merge)
    manifest.part-<i>-of-<n>.json       partial manifest of writer i of n (sharded build)
    shard-00000.npy                     float16, shape (rows, views, dim)
    shard-00000.ids.json                the ids of those rows, same order
    shard-00000.fingerprints.json       the fingerprint of each row's image when it was embedded
                                        (same order; null = unknown); absent in older stores
    shard-<i>-of-<n>-00000.npy / .ids.json / .fingerprints.json    shards of writer i of n
    .lock-*  .tmp-*                     lock files and files being written (never read)

A manifest holds the store's identity (`embed.identity.IDENTITY_FIELDS`: backbone,
weights_sha256, preprocessing, image_size, views, dtype, dim), a `store_uid` given once when the
store is created (stores made before it have none), the shards it lists ({name, rows, sha256,
ids_sha256, fingerprints_sha256}), the row count, the ids that could not be embedded
({id: reason}), the data set and image source, creation time and lesionfuse version.

An id may be stored more than once: when its image changed it is embedded again and the new row
is appended. Shards are listed oldest first, so readers take an id's row from the last shard
that holds it.

Crash safety: every file is written under a `.tmp-` name in the same directory, fsynced and then
renamed, so a shard appears only when complete; a manifest is rewritten the same way after each
shard. A writer killed at any moment leaves at most an unlisted shard or temp file, which readers
ignore and the next writer of that part deletes. One writer per part at a time is enforced with
an advisory lock (`fcntl.flock`, which also works on NFSv4 and most shared filesystems).

Sharded build: writers i = 0..n-1 each write their own shard files and their own partial
manifest; `FeatureStore.open` reads all manifests (no vectors are copied) and `merge_store`
folds finished parts into `manifest.json`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from embed.errors import EmbedError
from embed.identity import DTYPE, IDENTITY_FIELDS, as_json, check_identity

try:  # advisory locks; absent on Windows, where one writer per part is the user's care
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS
    fcntl = None

log = logging.getLogger(__name__)

FORMAT = "lesionfuse-feature-store/1"
MANIFEST = "manifest.json"
FINGERPRINTS_SUFFIX = ".fingerprints.json"
_PART_MANIFEST_RE = re.compile(r"^manifest\.part-(\d+)-of-(\d+)\.json$")
_LOCK_TIMEOUT_S = 30.0


def store_name(dataset: str, weights_sha256: str, image_size: int, views: int) -> str:
    """Directory name of a store: f"{dataset}-{sha[:12]}-{size}px-{views}v"."""
    return f"{dataset}-{weights_sha256[:12]}-{int(image_size)}px-{int(views)}v"


@functools.lru_cache(maxsize=1)
def lesionfuse_version() -> str:
    """The installed lesionfuse version, else the one in the checkout's pyproject, else "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("lesionfuse")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _first(items: Iterable, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (", ..." if len(items) > n else "")


def _part_label(index: int, count: int) -> str:
    return f"{index}-of-{count}"


def _part_manifest_name(index: int, count: int) -> str:
    return f"manifest.part-{_part_label(index, count)}.json"


def _shard_prefix(index: int, count: int) -> str:
    return "shard-" if count == 1 else f"shard-{_part_label(index, count)}-"


# ----------------------------------------------------------------------------- file helpers


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (np.save needs only write)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._f.write(data)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable across a power cut; a kill -9 needs only the rename.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(directory: Path, name: str, write: Callable[[_HashingWriter], None]) -> str:
    """Write `directory/name` through a temp file + fsync + rename; returns the sha256 hex."""
    tmp = directory / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return writer.sha256.hexdigest()


def _write_json(directory: Path, name: str, obj) -> str:
    data = (json.dumps(obj, indent=1) + "\n").encode()
    return _atomic_write(directory, name, lambda f: f.write(data))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EmbedError(f"feature store file {str(path)!r} cannot be read: {exc}") from exc


class _Lock:
    """An exclusive advisory lock on a file; released by the kernel if the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float, what: str) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise EmbedError(
                        f"{what} is locked by another process (lock file {str(self.path)!r}); "
                        "wait for it to finish, or give each parallel writer its own --shard i/n"
                    ) from None
                time.sleep(0.05)

    def try_acquire(self) -> bool:
        if fcntl is None:  # pragma: no cover
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _manifest_lock(path: Path) -> _Lock:
    return _Lock(path / ".lock-manifest")


def _part_lock(path: Path, index: int, count: int) -> _Lock:
    return _Lock(path / f".lock-part-{_part_label(index, count)}")


# ----------------------------------------------------------------------------- reading


def _collect(path: Path) -> tuple[dict, list[tuple[str, dict]]]:
    """All manifests of a store: (combined view, [(file name, manifest)]).

    Raises EmbedError when there is none, StoreMismatchError when two disagree on identity.
    """
    manifests: list[tuple[str, dict]] = []
    main = path / MANIFEST
    if main.is_file():
        manifests.append((MANIFEST, _read_json(main)))
    parts = []
    if path.is_dir():
        for entry in os.listdir(path):
            m = _PART_MANIFEST_RE.match(entry)
            if m:
                parts.append((int(m.group(2)), int(m.group(1)), entry))
    for _, _, entry in sorted(parts):
        manifests.append((entry, _read_json(path / entry)))
    if not manifests:
        raise EmbedError(
            f"no feature store at {str(path)!r} (no {MANIFEST}); build it with "
            "`invoke embed --spec SPEC`"
        )
    first_name, first = manifests[0]
    for name, m in manifests:
        if m.get("format") != FORMAT:
            raise EmbedError(
                f"{str(path / name)!r} is not a lesionfuse feature store manifest "
                f"(format {m.get('format')!r}, expected {FORMAT!r})"
            )
        check_identity(
            m,
            {k: first[k] for k in IDENTITY_FIELDS if k in first},
            f"{str(path / name)!r}",
            f"{first_name} of the same store has",
        )
    combined = {k: v for k, v in first.items() if k not in ("shards", "failures", "count")}
    seen: set[str] = set()
    shards: list[dict] = []
    failures: dict[str, str] = {}
    for _, m in manifests:
        for shard in m.get("shards", []):
            if shard["name"] not in seen:
                seen.add(shard["name"])
                shards.append(shard)
        failures.update(m.get("failures", {}))
    combined["shards"] = shards
    combined["failures"] = failures
    combined["created"] = min(m.get("created", "") for _, m in manifests) or None
    combined["store_uid"] = next((m["store_uid"] for _, m in manifests if m.get("store_uid")), None)
    return combined, manifests


def _has_manifest(path: Path) -> bool:
    if (path / MANIFEST).exists():
        return True
    return path.is_dir() and any(_PART_MANIFEST_RE.match(e) for e in os.listdir(path))


def _shard_ids(path: Path, shard: dict) -> list[str]:
    """The ids of a listed shard; raises EmbedError when they do not match its row count."""
    ids_path = path / f"{shard['name']}.ids.json"
    ids = _read_json(ids_path)
    if not isinstance(ids, list) or len(ids) != int(shard["rows"]):
        raise EmbedError(
            f"feature store {str(path)!r}: {ids_path.name} holds "
            f"{len(ids) if isinstance(ids, list) else 'no list of'} ids but the manifest "
            f"says {shard['rows']} rows; the store is damaged, build it again"
        )
    return ids


def _shard_fingerprints(path: Path, shard: dict) -> list[str | None]:
    """The image fingerprints of a listed shard's rows; None where unknown (older stores)."""
    if "fingerprints_sha256" not in shard:
        return [None] * int(shard["rows"])
    fp_path = path / f"{shard['name']}{FINGERPRINTS_SUFFIX}"
    fingerprints = _read_json(fp_path)
    if not isinstance(fingerprints, list) or len(fingerprints) != int(shard["rows"]):
        raise EmbedError(
            f"feature store {str(path)!r}: {fp_path.name} does not hold one fingerprint per row "
            f"of the {shard['rows']} the manifest lists; the store is damaged, build it again"
        )
    return fingerprints


def image_changed(stored: str | None, now: str | None) -> bool:
    """Whether an image differs from the one a vector was embedded from.

    Only two known fingerprints can tell: an id stored without one (a store made before
    fingerprints) or no longer in the source is not called changed.
    """
    return stored is not None and now is not None and stored != now


class FeatureStore:
    """A read-only view of a feature store directory (all its manifests, merged in memory).

    Attributes: `path`, `manifest` (combined dict), `ids` (row order, loaded on first use),
    `dim`, `views`, `image_size`, `failures` ({id: reason} for ids that have no vector),
    `count` (rows with a vector). Shards are memory-mapped on first read.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._ids: list[str] | None = None
        self._index = None
        self._kept: np.ndarray | None = None  # positions of indexed rows among all listed rows
        self._shard_of: np.ndarray | None = None
        self._row_of: np.ndarray | None = None
        self._fingerprints: np.ndarray | None = None
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: Path | str) -> FeatureStore:
        """Open a store; raises EmbedError if there is none at `path` or a listed shard is
        missing, StoreMismatchError if its manifests disagree (e.g. parts built with other weights).
        """
        path = Path(path)
        combined, _ = _collect(path)
        missing = [
            s["name"] for s in combined["shards"] if not (path / f"{s['name']}.npy").is_file()
        ]
        if missing:
            raise EmbedError(
                f"feature store {str(path)!r} lists {len(missing)} shard(s) whose files are "
                f"missing ({_first(missing)}); delete the store folder and build it again"
            )
        store = cls(path, combined)
        return store

    # -- properties
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def ids(self) -> list[str]:
        self._build_index()
        return list(self._ids)

    @property
    def count(self) -> int:
        self._build_index()
        return len(self._ids)

    def __len__(self) -> int:
        return self.count

    @property
    def failures(self) -> dict[str, str]:
        """Ids recorded as failed and still without a vector, with the reason."""
        recorded = self.manifest["failures"]
        if not recorded:
            return {}
        return {k: recorded[k] for k in self.missing(list(recorded))}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, shards={len(self.manifest['shards'])})"

    # -- index
    def _build_index(self) -> None:
        if self._ids is not None:
            return
        import pandas as pd

        all_ids: list[str] = []
        shard_of: list[np.ndarray] = []
        row_of: list[np.ndarray] = []
        for s, shard in enumerate(self.manifest["shards"]):
            ids = _shard_ids(self.path, shard)
            all_ids.extend(ids)
            shard_of.append(np.full(len(ids), s, dtype=np.int32))
            row_of.append(np.arange(len(ids), dtype=np.int64))
        index = pd.Index(all_ids, dtype=object)
        # Shards are listed oldest first; an id embedded again (its image changed) is read from
        # the newest shard holding it.
        kept = np.flatnonzero(~index.duplicated(keep="last"))
        if len(kept) < len(index):
            log.debug(
                "feature store %s: %d rows superseded by a newer row of the same id",
                self.path,
                len(index) - len(kept),
            )
        shard_arr = np.concatenate(shard_of) if shard_of else np.empty(0, np.int32)
        row_arr = np.concatenate(row_of) if row_of else np.empty(0, np.int64)
        self._index = index[kept]
        self._ids = list(self._index)
        self._kept = kept
        self._shard_of = shard_arr[kept]
        self._row_of = row_arr[kept]

    def _fingerprint_array(self) -> np.ndarray:
        """Each indexed id's stored image fingerprint (None where unknown), index order.

        Loaded on first use: reading vectors needs no fingerprints.
        """
        if self._fingerprints is None:
            self._build_index()
            every_row: list = []
            for shard in self.manifest["shards"]:
                every_row.extend(_shard_fingerprints(self.path, shard))
            values = np.empty(len(every_row), dtype=object)
            values[:] = every_row
            self._fingerprints = values[self._kept]
        return self._fingerprints

    def _map(self, s: int) -> np.ndarray:
        arr = self._maps.get(s)
        if arr is None:
            shard = self.manifest["shards"][s]
            path = self.path / f"{shard['name']}.npy"
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise EmbedError(
                    f"feature store shard {str(path)!r} cannot be read: {exc}"
                ) from exc
            expected = (int(shard["rows"]), self.views, self.dim)
            if arr.shape != expected or arr.dtype != np.dtype(self.manifest["dtype"]):
                raise EmbedError(
                    f"feature store shard {str(path)!r} has shape {arr.shape} dtype {arr.dtype}, "
                    f"expected {expected} {self.manifest['dtype']}; the store is damaged"
                )
            self._maps[s] = arr
        return arr

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids of `ids` that have no vector in the store, in the order given."""
        self._build_index()
        ids = list(ids)
        if not ids:
            return []
        pos = self._index.get_indexer(ids)
        return [ids[i] for i in np.flatnonzero(pos < 0)]

    def __contains__(self, image_id: str) -> bool:
        return not self.missing([image_id])

    def fingerprints(self, ids: Sequence[str]) -> dict[str, str]:
        """{id: fingerprint of the image its vector was embedded from} for the ids of `ids` that
        are stored with a known fingerprint (stores made before fingerprints have none)."""
        self._build_index()
        ids = list(ids)
        if not ids:
            return {}
        pos = self._index.get_indexer(ids)
        found = np.flatnonzero(pos >= 0)
        values = self._fingerprint_array()[pos[found]]
        return {
            ids[i]: v for i, v in zip(found.tolist(), values.tolist(), strict=True) if v is not None
        }

    def changed(self, source, ids: Sequence[str]) -> list[str]:
        """The ids of `ids` whose image in `source` (an `embed.sources.ImageSource`) differs
        from the one their stored vector was embedded from, in the order given.

        Compares cheap fingerprints (a folder: file size and modification time; HDF5: encoded
        length and CRC-32), not pixels. Ids without a vector, stored without a fingerprint, or
        absent from `source` are not listed: `missing` and the data set's own checks cover them.
        `build_store` embeds changed ids again.
        """
        stored = self.fingerprints(ids)
        if not stored:
            return []
        now = source.fingerprints(list(stored))
        return [i for i in ids if image_changed(stored.get(i), now.get(i))]

    def reference(self) -> dict:
        """What a stage that reads this store records as "the store I read".

        The identity fields (`IDENTITY_FIELDS`), plus "store" (the folder's absolute path),
        "store_uid" (given once when the store was created; None for stores made before) and
        "count" (ids with a vector).
        """
        return {
            **{key: self.manifest.get(key) for key in IDENTITY_FIELDS},
            "store": str(self.path.resolve()),
            "store_uid": self.manifest.get("store_uid"),
            "count": self.count,
        }

    def read(self, ids: Sequence[str]) -> np.ndarray:
        """Vectors of `ids`, shape (len(ids), views, dim), float16, rows in the order asked.

        Raises EmbedError naming how many ids are missing, the first few, the reasons recorded
        for those that failed to embed, and the command that fills them.
        """
        self._build_index()
        ids = list(ids)
        out = np.empty((len(ids), self.views, self.dim), dtype=np.dtype(self.manifest["dtype"]))
        if not ids:
            return out
        pos = self._index.get_indexer(ids)
        if (pos < 0).any():
            raise EmbedError(
                self._missing_message([ids[i] for i in np.flatnonzero(pos < 0)], len(ids))
            )
        shard = self._shard_of[pos]
        row = self._row_of[pos]
        # Group the requests by shard, rows ascending within a shard, so each memory-mapped
        # shard is read once and sequentially.
        order = np.lexsort((row, shard))
        shard_sorted = shard[order]
        bounds = np.flatnonzero(np.diff(shard_sorted)) + 1
        for chunk in np.split(order, bounds):
            s = int(shard[chunk[0]])
            out[chunk] = self._map(s)[row[chunk]]
        return out

    def _missing_message(self, missing: list[str], asked: int) -> str:
        failures = self.manifest.get("failures", {})
        failed = [i for i in missing if i in failures]
        msg = (
            f"{len(missing)} of {asked} requested ids have no vector in feature store "
            f"{str(self.path)!r} ({_first(missing)})"
        )
        if failed:
            detail = "; ".join(f"{i!r}: {failures[i]}" for i in failed[:3])
            msg += (
                f"; {len(failed)} of them could not be embedded ({detail}): fix or drop those "
                "images, then re-run with --retry-failed"
            )
        m = self.manifest
        msg += (
            f"; fill the store with `invoke embed --spec <spec of data set "
            f"{m.get('dataset', '?')!r}> --image-size {m.get('image_size')} --views {m.get('views')}`"
        )
        return msg

    # -- checks
    def check_compatible(self, expected: dict) -> None:
        """Raise StoreMismatchError naming the first field of `expected` (any of
        IDENTITY_FIELDS; for `preprocessing` the differing sub-field) whose value differs from
        the store's, with both values. Unknown fields raise EmbedError.
        """
        check_identity(self.manifest, expected, f"feature store {str(self.path)!r}", "expected")

    def verify(self) -> dict:
        """Recompute the sha256 of every shard's files (vectors, ids, fingerprints where listed)
        and compare with the manifest.

        Returns {"shards": n, "rows": n (rows in the shard files, superseded ones included),
        "ok": True}. Raises EmbedError naming each damaged or missing shard.
        """
        bad = []
        rows = 0
        sidecars = ((".npy", "sha256"), (".ids.json", "ids_sha256"))
        for shard in self.manifest["shards"]:
            rows += int(shard["rows"])
            listed = sidecars
            if "fingerprints_sha256" in shard:
                listed += ((FINGERPRINTS_SUFFIX, "fingerprints_sha256"),)
            for suffix, key in listed:
                p = self.path / f"{shard['name']}{suffix}"
                if not p.is_file():
                    bad.append(f"{p.name} (missing)")
                elif key in shard and _sha256_file(p) != shard[key]:
                    bad.append(f"{p.name} (sha256 differs from the manifest)")
        if bad:
            raise EmbedError(
                f"feature store {str(self.path)!r} failed verification: {len(bad)} damaged "
                f"file(s): {'; '.join(bad[:5])}; delete the store folder and build it again"
            )
        return {"shards": len(self.manifest["shards"]), "rows": rows, "ok": True}


# ----------------------------------------------------------------------------- writing


def _merge_locked(path: Path) -> dict | None:
    """Fold finished part manifests into manifest.json; caller holds the manifest lock.

    Parts whose writer is still running (lock held) are left as they are. Returns the new
    combined manifest, or None when the store has no manifest at all.
    """
    try:
        combined, manifests = _collect(path)
    except EmbedError:
        if not (path / MANIFEST).exists() and not any(
            _PART_MANIFEST_RE.match(e) for e in os.listdir(path)
        ):
            return None
        raise
    main = dict(manifests[0][1]) if manifests[0][0] == MANIFEST else None
    folded: list[tuple[str, _Lock]] = []
    running: list[str] = []
    for name, _ in manifests:
        m = _PART_MANIFEST_RE.match(name)
        if not m:
            continue
        lock = _part_lock(path, int(m.group(1)), int(m.group(2)))
        if lock.try_acquire():
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
            updated=_now(),
            created=combined.get("created") or _now(),
        )
        base.pop("part", None)
        base.pop("store_uid", None)
        if combined.get("store_uid"):
            base["store_uid"] = combined["store_uid"]
        _write_json(path, MANIFEST, base)
        for name, _ in folded:
            with contextlib.suppress(FileNotFoundError):
                (path / name).unlink()
        _fsync_dir(path)
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
        stored.update(_read_json(path / f"{shard['name']}.ids.json"))
    return stored


def merge_store(path: Path | str, *, lock_timeout: float = _LOCK_TIMEOUT_S) -> dict:
    """Finalise a sharded build: fold every finished `manifest.part-*.json` into `manifest.json`.

    No vectors are copied: the combined manifest lists the parts' shard files. Parts still being
    written (their writer holds its lock) are left for a later merge; readers see them anyway.
    Returns the combined manifest. Raises EmbedError when there is no store at `path` or another
    process holds the manifest lock for longer than `lock_timeout` seconds.
    """
    path = Path(path)
    lock = _manifest_lock(path)
    if not path.is_dir():
        raise EmbedError(f"no feature store at {str(path)!r} (no such folder)")
    lock.acquire(lock_timeout, f"feature store {str(path)!r}")
    try:
        merged = _merge_locked(path)
    finally:
        lock.release()
    if merged is None:
        raise EmbedError(f"no feature store at {str(path)!r} (no {MANIFEST})")
    return merged


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
        lock_timeout: float = _LOCK_TIMEOUT_S,
    ):
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
        self._lock: _Lock | None = None
        self._own: dict | None = None  # the manifest this writer rewrites
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
        return _part_manifest_name(self.shard_index, self.shard_count) if self.sharded else MANIFEST

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
            self._lock = _part_lock(self.path, self.shard_index, self.shard_count)
            self._lock.acquire(
                self.lock_timeout,
                f"part {self.shard_index}/{self.shard_count} of {what}",
            )
        else:
            self._lock = _manifest_lock(self.path)
            self._lock.acquire(self.lock_timeout, what)
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
        manifest.update(count=0, shards=[], failures={}, created=_now())
        return manifest

    def _create_if_new(self) -> None:
        """Write the first manifest of a new store, with its store_uid.

        Parts of a sharded build may start at once on an empty folder: the manifest lock lets
        one of them create the store, and the others find its manifest and share its store_uid.
        """
        if _has_manifest(self.path):
            return
        lock = _manifest_lock(self.path) if self.sharded else None
        if lock is not None:
            lock.acquire(self.lock_timeout, f"feature store {str(self.path)!r}")
        try:
            if not _has_manifest(self.path):
                self._own = self._new_manifest(uuid.uuid4().hex)
                if self.sharded:
                    self._own["part"] = _part_label(self.shard_index, self.shard_count)
                self._write_manifest()
        finally:
            if lock is not None:
                lock.release()

    def _load(self) -> None:
        if not self.sharded:
            # Fold finished parts of an earlier sharded build first, so this writer owns one
            # manifest listing everything.
            _merge_locked(self.path)
        combined, manifests = _collect(self.path)
        check_identity(
            combined, self.identity, f"feature store {str(self.path)!r}", "this run asks for"
        )
        self.recorded = combined
        own = dict(manifests)
        fresh = self.manifest_name not in own
        self._own = own.get(self.manifest_name) or self._new_manifest(combined.get("store_uid"))
        if self.sharded:
            self._own["part"] = _part_label(self.shard_index, self.shard_count)
        self._own.update(self.info)
        listed = set()
        for _, m in manifests:
            listed.update(s["name"] for s in m.get("shards", []))
        self._cleanup(listed)
        self._load_stored(combined["shards"])
        self.failures = {k: v for k, v in combined["failures"].items() if k not in self.stored}
        # Next shard number after every file of this part, listed or not, ever seen.
        prefix = _shard_prefix(self.shard_index, self.shard_count)
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.npy$")
        numbers = [int(m.group(1)) for n in listed if (m := pattern.match(n + ".npy"))]
        self._next = max(numbers, default=-1) + 1
        if fresh:
            # The store exists (empty) from the start, so a run killed before its first shard
            # leaves a store that opens, not a folder that is not one.
            self._write_manifest()

    def _load_stored(self, shards: list[dict]) -> None:
        """Every stored id with the fingerprint of its newest row; the ids this part lists."""
        own_names = {s["name"] for s in self._own["shards"]}
        for shard in shards:  # oldest first: a later row of an id replaces an earlier one
            ids = _shard_ids(self.path, shard)
            self._stored_fingerprints.update(
                zip(ids, _shard_fingerprints(self.path, shard), strict=True)
            )
            if shard["name"] in own_names:
                self._own_ids.update(ids)
        self.stored = set(self._stored_fingerprints)

    def _cleanup(self, listed: set[str]) -> None:
        """Delete this part's temp files and shard files no manifest lists (a killed run's)."""
        prefix = _shard_prefix(self.shard_index, self.shard_count)
        files = r"(\.npy|\.ids\.json|\.fingerprints\.json)"
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
                _first(sorted(removed)),
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
            lock = _manifest_lock(self.path)
            if lock.try_acquire():
                try:
                    _merge_locked(self.path)
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
            raise EmbedError(f"{len(dup)} ids are already in the store or repeated: {_first(dup)}")
        if ids:
            self._buffer(ids, vectors, fingerprints)
        while self._buf_rows >= self.shard_rows:
            self._write_shard(self.shard_rows)
        if self._buf_rows and time.monotonic() - self._buf_since >= self.max_shard_seconds:
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
        name = f"{_shard_prefix(self.shard_index, self.shard_count)}{self._next:05d}"
        self._next += 1
        vecs = np.ascontiguousarray(vecs)
        entry = {"name": name, "rows": rows}
        entry["sha256"] = _atomic_write(
            self.path, f"{name}.npy", lambda f: np.save(f, vecs, allow_pickle=False)
        )
        entry["ids_sha256"] = _write_json(self.path, f"{name}.ids.json", ids)
        if any(fp is not None for fp in fingerprints):
            entry["fingerprints_sha256"] = _write_json(
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
        own["updated"] = _now()
        own["lesionfuse_version"] = lesionfuse_version()
        _write_json(self.path, self.manifest_name, own)


def _positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
