"""The feature store's write, open and read rates at scale (the embedding part of `invoke bench`
reports them beside its throughput figures): random float16 rows written through the real
writer, then read back memory-mapped in a random order."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from embed.errors import EmbedError
from embed.store import FeatureStore
from embed.store_writer import StoreWriter

__all__ = ["bench_store"]


def bench_store(
    rows: int, work: Path, views: int = 1, dim: int = 2048, shard_rows: int = 4096
) -> dict:
    """Write `rows` random float16 rows to a store, then read them back memory-mapped.

    Returns rows/s for writing (with fsync and checksums), for opening the store and
    building its id index, and for reading all rows in a random order (warm page cache).
    """
    identity = {
        "backbone": "bench",
        "weights_sha256": "0" * 64,
        "preprocessing": {},
        "image_size": 0,
        "views": views,
        "dtype": "float16",
        "dim": dim,
    }
    rng = np.random.default_rng(0)
    block = rng.standard_normal((shard_rows, views, dim)).astype(np.float16)
    ids = [f"ISIC_{i:07d}" for i in range(rows)]
    path = work / "scale-store"
    start = time.perf_counter()
    with StoreWriter(path, identity, shard_rows=shard_rows) as writer:
        for k in range(0, rows, shard_rows):
            chunk = ids[k : k + shard_rows]
            writer.append(chunk, block[: len(chunk)])
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    store = FeatureStore.open(path)
    if store.count != rows:
        raise EmbedError(f"bench: store holds {store.count} rows, wrote {rows}")
    open_s = time.perf_counter() - start
    order = [ids[i] for i in rng.permutation(rows)]
    start = time.perf_counter()
    out = store.read(order)
    read_s = time.perf_counter() - start
    nbytes = out.nbytes
    return {
        "store_rows": rows,
        "store_mb": round(nbytes / 2**20, 1),
        "store_write_rows_per_s": round(rows / write_s),
        "store_write_mb_per_s": round(nbytes / 2**20 / write_s, 1),
        "store_open_index_s": round(open_s, 3),
        "store_read_rows_per_s": round(rows / read_s),
        "store_read_mb_per_s": round(nbytes / 2**20 / read_s, 1),
    }
