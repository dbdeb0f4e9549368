"""How fast one fusion-MLP epoch runs on an ISIC 2024-sized feature store, and how much memory it takes.

`bench_fusion_epoch` writes a synthetic store with the real store writer (`embed.store.StoreWriter`,
float16 shards, memory-mapped on reading) in a temporary folder, then, each in a fresh child
process so that its peak resident memory is its own:

- one training epoch of the fusion MLP over every row, through the same code `train_fusion` runs
  (`fuse.fusion.run_epoch`: row indices gathered one mini-batch at a time from the memory-mapped
  shards, one random view per image);
- the in-run baseline: one pass of a linear model with log loss (sklearn `SGDClassifier.partial_fit`)
  over the same mini-batches of the same store: the cheapest learner that reads every vector once.

Peak memory is the child's peak resident set (VmHWM, which counts the store's pages it touched
through the memory map) and is reported beside the store's size on disk; the target is under 2x.

Measured (`bench_fusion_epoch()` defaults: 401,059 rows x 1 view x 2048, float16 store of
1.64 GB; this project's 2-core CPU machine, torch on 2 threads, shared with other work): one
fusion-MLP epoch 32.6 s (12,300 rows/s) beside 4.3 s (92,300 rows/s) for the SGD log-loss pass,
i.e. 7.5x the cheapest learner's pass; the MLP child's peak 2.72 GB = 1.65x the store (0.84 GB of
it interpreter, torch and inputs before the epoch; the epoch itself added 1.14x the store, the
pages of the memory map).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tabular.bench import peak_rss_bytes

log = logging.getLogger(__name__)

ISIC2024_ROWS = 401_059
REPO = Path(__file__).resolve().parents[1]


def bench_fusion_epoch(
    n_rows: int = ISIC2024_ROWS,
    dim: int = 2048,
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
        n_rows, dim, views: the store's shape (default: ISIC 2024's 401,059 rows, ResNet-50's 2048
            dimensions, one view).
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
        (the MLP child's whole peak under 2x the store's size; only meaningful for stores of a
        few GB, as torch alone takes about 0.6 GB).
    """
    from fuse.errors import RunError

    if n_rows < 2 or dim < 1 or views < 1:
        raise RunError(f"bench: expected n_rows >= 2, dim >= 1, views >= 1; got {n_rows}, {dim}, {views}")
    folder = Path(tempfile.mkdtemp(prefix="fusion-bench-", dir=workdir))
    try:
        store_dir = folder / "store"
        started = time.perf_counter()
        labels = _write_store(store_dir, n_rows, dim, views, prevalence, seed, shard_rows)
        write_seconds = time.perf_counter() - started
        np.save(folder / "labels.npy", labels, allow_pickle=False)
        store_bytes = sum(p.stat().st_size for p in store_dir.glob("*.npy"))
        args = dict(store_dir=str(store_dir), labels=str(folder / "labels.npy"), n_meta=n_meta,
                    batch_size=batch_size, seed=seed, device=device)
        mlp = _in_child("mlp", args)
        linear = _in_child("linear", args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for result in (mlp, linear):
        result["peak_vs_store"] = round(result["peak_rss_bytes"] / store_bytes, 3)
        # What the pass itself added on top of the interpreter, torch and the inputs' set-up.
        result["growth_bytes"] = result["peak_rss_bytes"] - result["rss_before_bytes"]
        result["growth_vs_store"] = round(result["growth_bytes"] / store_bytes, 3)
    report = {
        "store": {"rows": n_rows, "views": views, "dim": dim, "bytes": store_bytes,
                  "write_seconds": round(write_seconds, 2)},
        "batch_size": batch_size,
        "device": mlp.get("device", device),
        "mlp": mlp,
        "linear": linear,
        "mlp_vs_linear_time": round(mlp["seconds"] / max(linear["seconds"], 1e-9), 3),
        "memory_target_met": mlp["peak_rss_bytes"] < 2 * store_bytes,
    }
    log.info(
        "fusion epoch: %d rows in %.1f s (%.0f rows/s, peak %.2f x store); linear pass %.1f s "
        "(%.0f rows/s); MLP/linear time %.2f",
        n_rows, mlp["seconds"], mlp["rows_per_s"], mlp["peak_vs_store"], linear["seconds"],
        linear["rows_per_s"], report["mlp_vs_linear_time"],
    )
    return report


def _write_store(path: Path, n_rows: int, dim: int, views: int, prevalence: float, seed: int,
                 shard_rows: int) -> np.ndarray:
    """A store of random float16 vectors (positives shifted a little); returns the labels."""
    from embed.store import StoreWriter

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


def _in_child(kind: str, args: dict) -> dict:
    """Run `_measure` in a fresh Python process and return what it measured.

    A plain subprocess (not multiprocessing) so that it works whatever the parent's `__main__`
    is (invoke, pytest, `python -`), and its peak memory is its own.
    """
    from fuse.errors import RunError

    code = (
        "import json, sys; from fuse.fusion_bench import _measure; "
        "print('RESULT ' + json.dumps(_measure(sys.argv[1], **json.loads(sys.argv[2]))))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # stderr passes through: the epoch's progress bar, and the child's traceback if it fails.
    done = subprocess.run([sys.executable, "-c", code, kind, json.dumps(args)], env=env,
                          stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RunError(f"bench child '{kind}' failed (exit {done.returncode}); its error is printed above")
    return json.loads(lines[-1][len("RESULT "):])


def _measure(kind: str, store_dir: str, labels: str, n_meta: int, batch_size: int, seed: int,
             device: str) -> dict:
    import torch
    from torch import nn

    from embed.store import FeatureStore
    from fuse.fusion import Embeddings, _batches, run_epoch
    from fuse.model import FusionConfig, FusionMLP, resolve_device

    y = np.load(labels, allow_pickle=False).astype(np.int64)
    store = FeatureStore.open(store_dir)
    embeddings = Embeddings.from_store(store, store.ids)
    rng = np.random.default_rng(seed)
    meta = rng.standard_normal((len(y), n_meta), dtype=np.float32)
    order = rng.permutation(len(y))
    views = rng.integers(embeddings.views, size=len(y))
    rss_before = peak_rss_bytes()
    result = {"kind": kind, "rows": int(len(y)), "threads": torch.get_num_threads(),
              "rss_before_bytes": rss_before}
    if kind == "mlp":
        torch.manual_seed(seed)
        config = FusionConfig(batch_size=batch_size, device=device)
        target = resolve_device(device)
        model = FusionMLP(embeddings.dim, n_meta, config).to(target)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        positives = max(int(y.sum()), 1)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - positives) / positives, device=target))
        meta_t = torch.from_numpy(meta)
        # One warm-up batch first (thread pools, optimizer state), so the figure is the steady rate.
        warm = order[: min(batch_size, len(order))]
        run_epoch(model, optimizer, loss_fn, embeddings, meta_t, y, warm, views[: len(warm)], batch_size, target)
        started = time.perf_counter()
        run_epoch(model, optimizer, loss_fn, embeddings, meta_t, y, order, views, batch_size, target)
        if target.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result["device"] = str(target)
    else:
        from sklearn.linear_model import SGDClassifier

        model = SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed)
        classes = np.array([0, 1])
        warm = order[: min(batch_size, len(order))]
        model.partial_fit(np.hstack([embeddings.pick(warm, views[: len(warm)]).astype(np.float32), meta[warm]]),
                          y[warm], classes=classes)
        started = time.perf_counter()
        for part in _batches(len(order), batch_size):
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
