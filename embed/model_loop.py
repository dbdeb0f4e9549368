"""The model loop: the frozen backbone over the reader's batches, without a store.

As timm's `inference.py` does, the model runs under `torch.inference_mode()` with AMP and
channels_last decided once before the loop, and the backbone computed as the run's inference variant
(`embed.variants`: eager, BatchNorm folded, TorchScript-frozen, compiled, int8). On CUDA up to
`_CUDA_BATCHES_IN_FLIGHT` batches stay queued on the GPU (their copy back to the host included)
while the caller handles an earlier one, so the store's writes overlap the model. `embed_ids` yields
the vectors batch by batch; `embed.pipeline.build_store` writes them to a store,
`fuse.scoring.score` uses them directly.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from embed.config import EmbedConfig, resolve_device, settle_config, settled_sizes
from embed.identity import DTYPE
from embed.pooled import feature_dim
from embed.reader import apply_view, make_loader, normalize_batch
from embed.sources import ImageSource
from embed.variants import calibration_ids, make_variant, resolve_variant
from embed.zoom import stored_views

__all__ = [
    "BatchTimer",
    "batches_in_flight",
    "embed_ids",
]


log = logging.getLogger(__name__)


# Batches left running on a GPU while the caller writes the previous results: the store's
# writes (and a shard's fsync every `shard_rows` rows) then overlap the model instead of
# leaving the GPU idle. On CPU the model call returns finished results, so nothing is queued.
_CUDA_BATCHES_IN_FLIGHT = 2


def batches_in_flight(device: torch.device) -> int:
    """Batches `embed_ids` leaves queued on `device` before handing back the oldest."""
    return _CUDA_BATCHES_IN_FLIGHT if device.type == "cuda" else 0


class BatchTimer:
    """Seconds an embedding loop spent per role, summed over its batches: `read` (waiting for
    decoded images), `infer` (the model), `write` (the caller's handling of a yielded batch,
    e.g. the store); `batches` and `images` (failures included) counted; `start` is
    `time.perf_counter()` when the loop began. One is shared by `embed_ids` and its caller."""

    def __init__(self):
        self.read = self.infer = self.write = 0.0
        self.batches = 0
        self.images = 0
        self.start = time.perf_counter()


@dataclass
class _Launched:
    """One batch handed to the model: its ids, failures and (not yet finished) vectors."""

    ids: list[str]
    failures: dict[str, str]
    vectors: torch.Tensor | None  # float16 (n, views, dim) on the CPU, valid once `done` is
    done: torch.cuda.Event | None  # None: `vectors` is ready (CPU, or an empty batch)

    def collect(self, views: int, dim: int) -> np.ndarray:
        if self.vectors is None:
            return np.empty((0, views, dim), dtype=DTYPE)
        if self.done is not None:
            self.done.synchronize()
        return self.vectors.numpy()


def embed_ids(
    source: ImageSource,
    ids: Sequence[str],
    model: torch.nn.Module,
    config: EmbedConfig,
    *,
    timer: BatchTimer | None = None,
    calibrate_on: Sequence[str] | None = None,
) -> Generator[tuple[list[str], np.ndarray, dict[str, str]], None, None]:
    """Embed `ids` from `source` with `model`, without a store (scoring uses this).

    calibrate_on: the int8 variant only: the ids of `source` it calibrates its activation
    ranges on (default `embed.variants.calibration_ids(ids)`); `embed.pipeline` passes those of
    the whole data set, so that every run over it computes the same function.

    Yields per batch, in the order of `ids`: (ids embedded, float16 array of shape
    (len(those ids), config.views (+ 1 with config.zoom), dim), {id: reason} for the batch's
    unreadable images).
    The model is moved to `config.device` in channels_last; runs under inference_mode with
    autocast when `config.amp`. On CUDA up to `_CUDA_BATCHES_IN_FLIGHT` later batches are
    already queued on the GPU while the caller handles a yielded one.
    Raises EmbedError for an unusable config or device.
    """
    device = resolve_device(config.device)
    config = settle_config(config, device)
    ids = list(ids)
    if not ids:
        return
    if device.type == "cuda":
        # Every batch but the last has one shape: let cuDNN time its convolution algorithms
        # once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    # The variant (embed.variants) brings its own precision: autocast where `config.amp` asks
    # and the device has it natively, as `autocast_context` says.
    model = _variant(model, config, device, source, calibrate_on or ids)
    amp = None
    loader = make_loader(source, ids, config, device)
    in_flight = batches_in_flight(device)
    timer = timer or BatchTimer()
    log.info(
        "embedding %d images on %s: %d px, %d view(s)%s, batch %d, %d worker(s), variant %s (%s)",
        len(ids),
        device,
        config.image_size,
        config.views,
        "" if config.zoom is None else f" + a centre zoom view ({config.zoom:g} of each side)",
        config.batch_size,
        loader.num_workers,
        model.name,
        model.precision,
    )
    progress = _Progress(config, timer, len(ids), loader)
    pending: deque[_Launched] = deque()
    try:
        wait_start = time.perf_counter()
        for batch_ids, batch, failures in loader:
            t0 = time.perf_counter()
            timer.read += t0 - wait_start
            pending.append(_launch(model, batch, batch_ids, failures, device, config.views, amp))
            timer.infer += time.perf_counter() - t0
            while len(pending) > in_flight:
                yield progress.finish(pending.popleft())
            wait_start = time.perf_counter()
        while pending:
            yield progress.finish(pending.popleft())
    finally:
        progress.close()


class _Progress:
    """Hands finished batches back: waits for their vectors, counts them in `timer`, moves the
    progress bar (`config.progress`) and logs a timing line every `config.log_every` batches."""

    def __init__(self, config: EmbedConfig, timer: BatchTimer, total: int, loader):
        self.config = config
        self.timer = timer
        self.loader = loader
        self.bar = None
        if config.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, unit="img", desc="embed", dynamic_ncols=True, mininterval=1.0
            )

    def finish(self, launched: _Launched) -> tuple[list[str], np.ndarray, dict[str, str]]:
        config, timer = self.config, self.timer
        t0 = time.perf_counter()
        vectors = launched.collect(
            stored_views(config.views, config.zoom), feature_dim(config.blocks)
        )
        timer.infer += time.perf_counter() - t0
        timer.batches += 1
        timer.images += len(launched.ids) + len(launched.failures)
        for image_id, reason in launched.failures.items():
            log.warning("skipped %s", reason if image_id in reason else f"{image_id}: {reason}")
        if self.bar is not None:
            self.bar.update(len(launched.ids) + len(launched.failures))
        if config.log_every and timer.batches % config.log_every == 0:
            elapsed = time.perf_counter() - timer.start
            log.info(
                "batch %d/%d: %.3f s/batch (read wait %.3f, infer %.3f, write %.3f), %.1f images/s",
                timer.batches,
                len(self.loader),
                elapsed / timer.batches,
                timer.read / timer.batches,
                timer.infer / timer.batches,
                timer.write / timer.batches,
                timer.images / elapsed,
            )
        return launched.ids, vectors, launched.failures

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _variant(model, config: EmbedConfig, device: torch.device, source: ImageSource, ids):
    """`model` as the variant `config.variant` names on `device`. int8 calibrates on
    `calibration_ids(ids)` (`CALIBRATION_IMAGES` of them), read as the loop reads them."""
    name = resolve_variant(config.variant, device, config.amp)
    calibration = None
    if name.startswith("int8"):
        calib = calibration_ids(ids)
        # The whole image only: the calibration batches are plain (b, S, S, 3).
        calib_config = replace(config, num_workers=0, progress=False, zoom=None)
        loader = make_loader(source, calib, calib_config, device)
        calibration = [normalize_batch(b, device) for _, b, _ in loader if b is not None]
    batch_size, _ = settled_sizes(config, device)
    example = torch.zeros(batch_size, 3, config.image_size, config.image_size)
    return make_variant(
        model, name, device, amp=config.amp, example=example, calibration=calibration
    )


def _launch(
    model, batch: torch.Tensor | None, ids, failures, device: torch.device, views: int, amp
) -> _Launched:
    """Start the model on `batch` (every view: the `views` geometric ones of the whole image, then
    the zoom view when the batch carries one, shape (b, 2, S, S, 3)); on CUDA the copy back to
    the host is queued too, so this returns before the GPU has finished."""
    if batch is None:
        return _Launched(ids, failures, None, None)
    zoomed = batch[:, 1] if batch.ndim == 5 else None
    whole = batch[:, 0] if batch.ndim == 5 else batch
    outs = []
    with torch.inference_mode():
        x = normalize_batch(whole, device)
        inputs = [apply_view(x, v) for v in range(views)]
        if zoomed is not None:
            inputs.append(normalize_batch(zoomed.contiguous(), device))
        for v, xv in enumerate(inputs):
            if v:
                xv = xv.contiguous(memory_format=torch.channels_last)
            if amp is None:
                y = model(xv)
            else:
                with amp:
                    y = model(xv)
            outs.append(y.float())
        out = torch.stack(outs, dim=1).to(torch.float16)
        if device.type != "cuda":
            return _Launched(ids, failures, out, None)
        # non_blocking to the CPU lands in pinned memory; the event says when it is there.
        host = out.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    return _Launched(ids, failures, host, done)
