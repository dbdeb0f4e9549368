"""Feature store: image embeddings on disk, in shards, with a manifest saying what made them.

This module reads stores (`FeatureStore`); `embed.store_writer` writes them (`StoreWriter`,
`merge_store`), and `embed.store_format` spells the layout both use: the file names, the
manifest's fields, the folder name (`store_name`, `store_candidates`) and the identity a store
records (`recorded_identity`), re-exported here.

A manifest holds the store's identity (`embed.identity.IDENTITY_FIELDS`: backbone,
weights_sha256, preprocessing, image_size, views, blocks (the pooled ResNet-50 stages), pooling
("avg" or "gem"), variant (how the backbone was computed), dtype, dim), a `store_uid` given once
when the store is created (stores made before it have none), the shards it lists ({name, rows,
sha256, ids_sha256, fingerprints_sha256}), the row count, the ids that could not be embedded
({id: reason}), the data set and image source, creation time and lesionfuse version
(`embed.store_format.MANIFEST_FIELDS`).

An id may be stored more than once: when its image changed it is embedded again and the new row
is appended. Shards are listed oldest first, so readers take an id's row from the last shard
that holds it.

Crash safety: every file is written under a `.tmp-` name in the same directory, fsynced and then
renamed (`common.files.atomic_write`), so a shard appears only when complete; a manifest is
rewritten the same way after each shard. A writer killed at any moment leaves at most an
unlisted shard or temp file, which readers ignore and the next writer of that part deletes. One
writer per part at a time is enforced with an advisory lock (`filelock`, which takes an `flock`
on Linux and macOS; that also works on NFSv4 and most shared filesystems).

Sharded build: writers i = 0..n-1 each write their own shard files and their own partial
manifest; `FeatureStore.open` reads all manifests (no vectors are copied) and
`embed.store_writer.merge_store` folds finished parts into `manifest.json`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.files import sha256_file
from embed.errors import EmbedError
from embed.identity import IDENTITY_FIELDS, check_identity, identity_of
from embed.store_format import (
    FINGERPRINTS_SUFFIX,
    FORMAT,
    IDS_SUFFIX,
    MANIFEST,
    VECTORS_SUFFIX,
    quote_first,
    read_manifests,
    recorded_identity,
    shard_fingerprints,
    shard_ids,
    store_candidates,
    store_name,
)

__all__ = [
    # re-exported from embed.store_format, where they are defined
    "FINGERPRINTS_SUFFIX",
    "FORMAT",
    "IDENTITY_FIELDS",
    "MANIFEST",
    "FeatureStore",
    "fingerprinted_by_time",
    "image_changed",
    "recorded_identity",
    "store_candidates",
    "store_name",
]

log = logging.getLogger(__name__)


def fingerprinted_by_time(stored: str | None) -> bool:
    """Whether a stored folder fingerprint predates the CRC ("file:<size>:<mtime_ns>"): such an
    image is compared by size and modification time, so a copy that moved only its time counts
    as changed."""
    return stored is not None and stored.startswith("file:") and stored.count(":") == 2


def image_changed(stored: str | None, now: str | None) -> bool:
    """Whether an image differs from the one a vector was embedded from.

    Only two known fingerprints can tell: an id stored without one (a store made before
    fingerprints) or no longer in the source is not called changed. A folder image's
    fingerprint is "file:<size>:<mtime_ns>:<crc32>" and is compared by size and CRC (a copy
    that changes only the time is the same image); one stored before the CRC was recorded,
    "file:<size>:<mtime_ns>", is compared by size and time as it was then, so older stores keep
    working unchanged (their ids get the content fingerprint when they are embedded again).
    """
    if stored is None or now is None:
        return False
    if stored.startswith("file:") and now.startswith("file:"):
        old, new = stored.split(":"), now.split(":")
        if fingerprinted_by_time(stored) and len(new) == 4:  # as stores before the CRC compared
            return old[1:] != new[1:3]
        if len(old) == 4 and len(new) == 4:
            return (old[1], old[3]) != (new[1], new[3])
    return stored != now


@dataclass(frozen=True)
class _RowIndex:
    """Where each stored id's row lies: built once per store from the shards' id lists.

    `index` (a pandas Index of the ids, newest row of each), `kept` (positions of those rows
    among all listed rows), `shard_of` / `row_of` (the shard and the row within it, per id).
    """

    index: Any  # pandas.Index; pandas ships no type stubs here
    kept: np.ndarray
    shard_of: np.ndarray
    row_of: np.ndarray


class FeatureStore:
    """A read-only view of a feature store directory (all its manifests, merged in memory).

    Attributes: `path`, `manifest` (combined dict), `ids` (row order, loaded on first use),
    `dim`, `views`, `image_size`, `failures` ({id: reason} for ids that have no vector),
    `count` (rows with a vector). Shards are memory-mapped on first read.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._rows: _RowIndex | None = None
        self._fingerprints: np.ndarray | None = None
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, path: Path | str) -> FeatureStore:
        """Open a store; raises EmbedError if there is none at `path` or a listed shard is
        missing, StoreMismatchError if its manifests disagree (e.g. parts built with other weights).
        """
        path = Path(path)
        combined, _ = read_manifests(path)
        missing = [
            s["name"]
            for s in combined["shards"]
            if not (path / f"{s['name']}{VECTORS_SUFFIX}").is_file()
        ]
        if missing:
            raise EmbedError(
                f"feature store {str(path)!r} lists {len(missing)} shard(s) whose files are "
                f"missing ({quote_first(missing)}); delete the store folder and build it again"
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
        return list(self._row_index().index)

    @property
    def count(self) -> int:
        return len(self._row_index().index)

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
    def _row_index(self) -> _RowIndex:
        if self._rows is None:
            self._rows = self._build_index()
        return self._rows

    def _build_index(self) -> _RowIndex:
        import pandas as pd

        all_ids: list[str] = []
        shard_of: list[np.ndarray] = []
        row_of: list[np.ndarray] = []
        for s, shard in enumerate(self.manifest["shards"]):
            ids = shard_ids(self.path, shard)
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
        return _RowIndex(
            index=index[kept], kept=kept, shard_of=shard_arr[kept], row_of=row_arr[kept]
        )

    def _fingerprint_array(self) -> np.ndarray:
        """Each indexed id's stored image fingerprint (None where unknown), index order.

        Loaded on first use: reading vectors needs no fingerprints.
        """
        if self._fingerprints is None:
            kept = self._row_index().kept
            every_row: list = []
            for shard in self.manifest["shards"]:
                every_row.extend(shard_fingerprints(self.path, shard))
            values = np.empty(len(every_row), dtype=object)
            values[:] = every_row
            self._fingerprints = values[kept]
        return self._fingerprints

    def _map(self, s: int) -> np.ndarray:
        arr = self._maps.get(s)
        if arr is None:
            shard = self.manifest["shards"][s]
            path = self.path / f"{shard['name']}{VECTORS_SUFFIX}"
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
        rows = self._row_index()
        ids = list(ids)
        if not ids:
            return []
        pos = rows.index.get_indexer(ids)
        return [ids[i] for i in np.flatnonzero(pos < 0)]

    def __contains__(self, image_id: str) -> bool:
        return not self.missing([image_id])

    def fingerprints(self, ids: Sequence[str]) -> dict[str, str]:
        """{id: fingerprint of the image its vector was embedded from} for the ids of `ids` that
        are stored with a known fingerprint (stores made before fingerprints have none)."""
        rows = self._row_index()
        ids = list(ids)
        if not ids:
            return {}
        pos = rows.index.get_indexer(ids)
        found = np.flatnonzero(pos >= 0)
        values = self._fingerprint_array()[pos[found]]
        return {
            ids[i]: v for i, v in zip(found.tolist(), values.tolist(), strict=True) if v is not None
        }

    def changed(self, source, ids: Sequence[str]) -> list[str]:
        """The ids of `ids` whose image in `source` (an `embed.sources.ImageSource`) differs
        from the one their stored vector was embedded from, in the order given.

        Compares cheap fingerprints (a folder: file size and CRC-32 of the bytes; HDF5: encoded
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
            **identity_of(self.manifest),
            "store": str(self.path.resolve()),
            "store_uid": self.manifest.get("store_uid"),
            "count": self.count,
        }

    def read(self, ids: Sequence[str]) -> np.ndarray:
        """Vectors of `ids`, shape (len(ids), views, dim), float16, rows in the order asked.

        Raises EmbedError naming how many ids are missing, the first few, the reasons recorded
        for those that failed to embed, and the command that fills them.
        """
        rows = self._row_index()
        ids = list(ids)
        out = np.empty((len(ids), self.views, self.dim), dtype=np.dtype(self.manifest["dtype"]))
        if not ids:
            return out
        pos = rows.index.get_indexer(ids)
        if (pos < 0).any():
            raise EmbedError(
                self._missing_message([ids[i] for i in np.flatnonzero(pos < 0)], len(ids))
            )
        shard = rows.shard_of[pos]
        row = rows.row_of[pos]
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
            f"{str(self.path)!r} ({quote_first(missing)})"
        )
        if failed:
            detail = "; ".join(f"{i!r}: {failures[i]}" for i in failed[:3])
            msg += (
                f"; {len(failed)} of them could not be embedded ({detail}): fix or drop those "
                "images, then re-run with --retry-failed"
            )
        m = self.manifest
        msg += (
            "; fill the store with `invoke embed --spec <spec of data set "
            f"{m.get('dataset', '?')!r}> --image-size {m.get('image_size')} --views "
            f"{m.get('views')}`"
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
        sidecars = [(VECTORS_SUFFIX, "sha256"), (IDS_SUFFIX, "ids_sha256")]
        for shard in self.manifest["shards"]:
            rows += int(shard["rows"])
            listed = list(sidecars)
            if "fingerprints_sha256" in shard:
                listed.append((FINGERPRINTS_SUFFIX, "fingerprints_sha256"))
            for suffix, key in listed:
                p = self.path / f"{shard['name']}{suffix}"
                if not p.is_file():
                    bad.append(f"{p.name} (missing)")
                elif key in shard and sha256_file(p) != shard[key]:
                    bad.append(f"{p.name} (sha256 differs from the manifest)")
        if bad:
            raise EmbedError(
                f"feature store {str(self.path)!r} failed verification: {len(bad)} damaged "
                f"file(s): {'; '.join(bad[:5])}; delete the store folder and build it again"
            )
        return {"shards": len(self.manifest["shards"]), "rows": rows, "ok": True}
