"""How fast one fusion-MLP epoch runs on an ISIC 2024-sized feature store, and how much memory
it takes.

`bench_fusion_epoch` writes a synthetic store with the real store writer
(`embed.store_writer.StoreWriter`,
float16 shards, memory-mapped on reading) in a temporary folder, then, each in a fresh child
process so that its peak resident memory is its own (`benchmarks.common.run_child`):

- one training epoch of the fusion MLP over every row, through the same code `train_fusion` runs
  (`fuse.fusion.training.run_epoch`: row indices gathered one mini-batch at a time from the
  memory-mapped shards, one random view per image);
- the in-run baseline: one pass of a linear model with log loss
  (sklearn `SGDClassifier.partial_fit`)
  over the same mini-batches of the same store: the cheapest learner that reads every vector once.

Peak memory is the child's peak resident set (VmHWM, which counts the store's pages it touched
through the memory map) and is reported beside the store's size on disk; the target is under 2x.
Measured figures are in the README (`invoke bench` remakes them).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ISIC2024_ROWS, peak_rss_bytes, run_child
from embed.pooled import DEFAULT_BLOCKS, feature_dim
from fuse.errors import RunError

__all__ = ["TARGET_GROWTH_VS_STORE", "bench_fusion_epoch", "measure_pass"]

log = logging.getLogger(__name__)

# What training the MLP adds to its process's memory (peak minus the memory held before the
# epoch), as a multiple of the store's size on disk. The whole peak is reported too, but it also
# holds about 0.85 GB of Python, torch and the store reader that do not grow with the data: 1.0x
# the default 1,024-d store at 401,059 rows, 0.5x a 2,048-d one, so a target on it would judge the
# width of the store rather than the training.
TARGET_GROWTH_VS_STORE = 2.0


def bench_fusion_epoch(
    n_rows: int = ISIC2024_ROWS,
    dim: int = feature_dim(DEFAULT_BLOCKS),
    views: int = 1,
    n_meta: int = 64,
    batch_size: int = 256,
    prevalence: float = 0.001,
    seed: int = 0,
    device: str = "cpu",
    workdir: Path | str | None = None,
    shard_rows: int = 16_384,
) -> dict:
    """Time one fusion-MLP epoch and one linear-model pass over a synthetic store.

    Args:
        n_rows, dim, views: the store's shape (default: ISIC 2024's 401,059 rows, the default
            store's width, one view).
        n_meta: width of the synthetic metadata matrix.
        batch_size: rows per mini-batch, for both learners.
        prevalence: share of positive rows.
        device: where the MLP runs ("cpu", "cuda" or "auto").
        workdir: where the temporary store goes (default: the system temp folder); it is deleted.

    Returns:
        dict with `store` (rows, views, dim, bytes, write_seconds), `mlp` and `linear` (seconds,
        rows_per_s, peak_rss_bytes and peak_vs_store: the child's whole peak, interpreter and
        torch included; growth_bytes and growth_vs_store: what the pass added to the memory held
        before it began), `mlp_vs_linear_time` (ratio of pass times), and `memory_target_met`
        (what the MLP's pass added to its process under `TARGET_GROWTH_VS_STORE` x the store's
        size).

    Raises:
        RunError: a shape below n_rows 2, dim 1, views 1; a child process failed.
    """
    if n_rows < 2 or dim < 1 or views < 1:
        raise RunError(
            f"bench: expected n_rows >= 2, dim >= 1, views >= 1; got {n_rows}, {dim}, {views}"
        )
    folder = Path(tempfile.mkdtemp(prefix="fusion-bench-", dir=workdir))
    try:
        store_dir = folder / "store"
        started = time.perf_counter()
        labels = _write_store(store_dir, n_rows, dim, views, prevalence, seed, shard_rows)
        write_seconds = time.perf_counter() - started
        np.save(folder / "labels.npy", labels, allow_pickle=False)
        store_bytes = sum(p.stat().st_size for p in store_dir.glob("*.npy"))
        args = dict(
            store_dir=str(store_dir),
            labels=str(folder / "labels.npy"),
            n_meta=n_meta,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        mlp = run_child("benchmarks.fusion:measure_pass", {"kind": "mlp", **args}, label="mlp")
        linear = run_child(
            "benchmarks.fusion:measure_pass", {"kind": "linear", **args}, label="linear"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for result in (mlp, linear):
        result["peak_vs_store"] = round(result["peak_rss_bytes"] / store_bytes, 3)
        # What the pass itself added on top of the interpreter, torch and the inputs' set-up.
        result["growth_bytes"] = result["peak_rss_bytes"] - result["rss_before_bytes"]
        result["growth_vs_store"] = round(result["growth_bytes"] / store_bytes, 3)
    report = {
        "store": {
            "rows": n_rows,
            "views": views,
            "dim": dim,
            "bytes": store_bytes,
            "write_seconds": round(write_seconds, 2),
        },
        "batch_size": batch_size,
        "device": mlp.get("device", device),
        "mlp": mlp,
        "linear": linear,
        "mlp_vs_linear_time": round(mlp["seconds"] / max(linear["seconds"], 1e-9), 3),
        "memory_target_met": mlp["growth_bytes"] < TARGET_GROWTH_VS_STORE * store_bytes,
    }
    log.info(
        "fusion epoch: %d rows in %.1f s (%.0f rows/s, peak %.2f x store); linear pass %.1f s "
        "(%.0f rows/s); MLP/linear time %.2f",
        n_rows,
        mlp["seconds"],
        mlp["rows_per_s"],
        mlp["peak_vs_store"],
        linear["seconds"],
        linear["rows_per_s"],
        report["mlp_vs_linear_time"],
    )
    return report


def _write_store(
    path: Path, n_rows: int, dim: int, views: int, prevalence: float, seed: int, shard_rows: int
) -> np.ndarray:
    """A store of random float16 vectors (positives shifted a little); returns the labels."""
    from embed.store_writer import StoreWriter

    identity = {
        "backbone": "synthetic",
        "weights_sha256": "0" * 64,
        "preprocessing": {"synthetic": True},
        "image_size": 224,
        "views": views,
        "dtype": "float16",
        "dim": dim,
    }
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_rows) < prevalence).astype(np.int8)
    labels[:2] = (0, 1)  # both classes, whatever the size
    with StoreWriter(path, identity, shard_rows=shard_rows, info={"dataset": "bench"}) as writer:
        for start in range(0, n_rows, shard_rows):
            stop = min(start + shard_rows, n_rows)
            block = np.abs(rng.standard_normal((stop - start, views, dim), dtype=np.float32))
            block[labels[start:stop] == 1, :, : min(8, dim)] += 1.0
            writer.append([f"row{i:07d}" for i in range(start, stop)], block)
    return labels


def measure_pass(
    kind: str, store_dir: str, labels: str, n_meta: int, batch_size: int, seed: int, device: str
) -> dict:
    """One pass over the store, in a child process: kind "mlp" (one fusion-MLP epoch) or
    "linear" (one `SGDClassifier.partial_fit` pass over the same mini-batches)."""
    import torch

    from embed.config import resolve_device
    from embed.store import FeatureStore
    from fuse.fusion import Embeddings, minibatches
    from fuse.fusion.model import FusionConfig, FusionMLP
    from fuse.fusion.training import Recipe, run_epoch

    y = np.load(labels, allow_pickle=False).astype(np.int64)
    store = FeatureStore.open(store_dir)
    embeddings = Embeddings.from_store(store, store.ids)
    rng = np.random.default_rng(seed)
    meta = rng.standard_normal((len(y), n_meta), dtype=np.float32)
    order = rng.permutation(len(y))
    views = rng.integers(embeddings.views, size=len(y))
    rss_before = peak_rss_bytes()
    result = {
        "kind": kind,
        "rows": int(len(y)),
        "threads": torch.get_num_threads(),
        "rss_before_bytes": rss_before,
    }
    if kind == "mlp":
        torch.manual_seed(seed)
        # The loss weighs positives by negatives/positives of these rows (every row once per pass).
        config = FusionConfig(batch_size=batch_size, device=device, imbalance="pos_weight")
        target = resolve_device(device)
        model = FusionMLP(embeddings.dim, n_meta, config).to(target)
        recipe = Recipe.make(model, y, config, len(minibatches(len(order), batch_size)), target)
        meta_t = torch.from_numpy(meta)
        # One warm-up batch first (thread pools, optimizer state), so the figure is the steady rate.
        warm = order[: min(batch_size, len(order))]
        run_epoch(
            model, recipe, embeddings, meta_t, y, warm, views[: len(warm)], batch_size, target, rng
        )
        started = time.perf_counter()
        run_epoch(model, recipe, embeddings, meta_t, y, order, views, batch_size, target, rng)
        if target.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result["device"] = str(target)
    else:
        from sklearn.linear_model import SGDClassifier

        model = SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed)
        classes = np.array([0, 1])
        warm = order[: min(batch_size, len(order))]
        model.partial_fit(
            np.hstack([embeddings.pick(warm, views[: len(warm)]).astype(np.float32), meta[warm]]),
            y[warm],
            classes=classes,
        )
        started = time.perf_counter()
        for part in minibatches(len(order), batch_size):
            rows = order[part]
            x = np.hstack([embeddings.pick(rows, views[part]).astype(np.float32), meta[rows]])
            model.partial_fit(x, y[rows], classes=classes)
        seconds = time.perf_counter() - started
    result.update(
        seconds=round(seconds, 3),
        rows_per_s=round(len(y) / max(seconds, 1e-9), 1),
        peak_rss_bytes=peak_rss_bytes(),
        pid=os.getpid(),
    )
    return result
