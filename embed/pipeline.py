"""The batch embedding loop and `build_store`, the image side's entry point.

Roles as in clip-retrieval: a reader (DataLoader worker processes read and decode images and
resize them to tensors), a mapper (the frozen backbone under `torch.inference_mode()`, AMP and
channels_last decided once before the loop, as timm's `inference.py` does) and a writer
(`embed.store.StoreWriter`). Unreadable images never stop a run: the collate drops them and
their ids travel on with the reason.

Test-time views are geometric transforms of the preprocessed batch tensor (flips, rotations,
transposes: the dihedral group of the square), applied on the device rather than decoding the
image again; view 0 is always the plain image.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from embed.backbone import (
    EMBED_DIM,
    autocast_context,
    load_backbone,
    prepare_model,
)
from embed.errors import EmbedError, EmbedInterrupted
from embed.identity import DTYPE, embedding_identity
from embed.sources import ALPHA_BACKGROUND, ImageSource, decode_image, safe_reason
from embed.store_writer import StoreWriter
from embed.weights import INPUT_MEAN, INPUT_STD, WeightsInfo

log = logging.getLogger(__name__)

# View k of an image; at most len(VIEWS) views. The order is part of a store's meaning.
VIEWS: tuple[str, ...] = (
    "identity",
    "hflip",
    "vflip",
    "rot90",
    "rot180",
    "rot270",
    "transpose",
    "transverse",
)

# How bytes become pixels, recorded in each store's manifest for the reader's information.
DECODE_INFO: dict = {
    "library": "PIL",
    "jpeg_draft": "JPEG decoded at the smallest 1/2^k scale keeping both sides >= image_size",
    "alpha": f"composited on {list(ALPHA_BACKGROUND)}",
    "sixteen_bit": "scaled by 1/257 to 8 bits",
    "exif_orientation": "applied",
    "views": list(VIEWS),
}


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run.

    image_size: side of the square model input, px (224).
    views: test-time views per image, 1..8 (`VIEWS` order; 1 = the plain image only).
    batch_size: images per model call; None = `default_batch_size(device)` (256 on CUDA, 32 on CPU).
    device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    num_workers: decoding processes; None = `default_num_workers(device)`.
    shard_index, shard_count: this writer is part shard_index (0-based) of shard_count parallel
        writers; each embeds the ids whose stable hash falls to it.
    shard_rows: rows per shard file (4096).
    max_shard_seconds: a shard is also written once its oldest row has waited this long (60 s),
        so a hard kill (kill -9, out of memory) loses at most about that much work.
    max_pixels: larger images are refused as possible decompression bombs (50 M).
    amp: mixed precision (fp16 on CUDA, bf16 on CPUs with native bf16); False = fp32.
    retry_failed: embed again ids recorded as failed by an earlier run (else they are listed).
    log_every: log a timing line every this many batches.
    progress: show a tqdm progress bar.
    """

    image_size: int = 224
    views: int = 1
    batch_size: int | None = None
    device: str = "auto"
    num_workers: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    shard_rows: int = 4096
    max_shard_seconds: float = 60.0
    max_pixels: int = 50_000_000
    amp: bool = True
    retry_failed: bool = False
    log_every: int = 50
    progress: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, value) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EmbedError(f"EmbedConfig.{name}: expected a positive integer, got {value!r}")

        if self.batch_size is not None:
            positive("batch_size", self.batch_size)
        for name in (
            "image_size",
            "shard_count",
            "shard_rows",
            "max_pixels",
            "log_every",
        ):
            positive(name, getattr(self, name))
        if not isinstance(self.views, int) or not 1 <= self.views <= len(VIEWS):
            raise EmbedError(f"EmbedConfig.views: expected 1..{len(VIEWS)}, got {self.views!r}")
        if not isinstance(self.shard_index, int) or not 0 <= self.shard_index < self.shard_count:
            raise EmbedError(
                f"EmbedConfig.shard_index: expected 0..{self.shard_count - 1} for "
                f"shard_count={self.shard_count}, got {self.shard_index!r}"
            )
        seconds = self.max_shard_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise EmbedError(
                f"EmbedConfig.max_shard_seconds: expected a number > 0, got {seconds!r}"
            )
        if self.num_workers is not None and (
            not isinstance(self.num_workers, int) or self.num_workers < 0
        ):
            raise EmbedError(
                f"EmbedConfig.num_workers: expected None or an integer >= 0, got {self.num_workers!r}"
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise EmbedError(
                f"EmbedConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )


@dataclass(frozen=True)
class EmbedSummary:
    """What a `build_store` run did.

    embedded: vectors written by this run; skipped_existing: ids already in the store (with an
    unchanged image); failed: {id: reason} that failed in this run; previously_failed:
    {id: reason} recorded by an earlier run and not retried; seconds: wall time; images_per_s:
    images processed per second of the embedding loop; stored: ids with a vector in the store
    after the run; changed: stored ids whose image had changed, embedded again by this run.
    """

    store_dir: Path
    embedded: int
    skipped_existing: int
    failed: dict[str, str] = field(default_factory=dict)
    previously_failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    stored: int = 0
    shard_index: int = 0
    shard_count: int = 1
    changed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["store_dir"] = str(self.store_dir)
        return d


# ----------------------------------------------------------------------------- helpers


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; raises EmbedError for cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbedError(
            f"device={device!r} but no CUDA GPU is available; use --device cpu or auto"
        )
    return dev


CGROUP_CPU_LIMITS = (
    Path("/sys/fs/cgroup/cpu.max"),  # cgroup v2: "<quota> <period>" or "max <period>"
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),  # cgroup v1: quota, -1 = none (period beside it)
)


def cgroup_cpu_limit(paths: Sequence[Path] = CGROUP_CPU_LIMITS) -> int | None:
    """CPUs a container's CPU quota allows (rounded up), or None without a quota.

    `docker run --cpus 4` and Kubernetes CPU limits set a quota but leave every host CPU in the
    affinity mask, so counting CPUs by affinity alone would start a worker per host core.
    """
    v2, v1 = paths
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        if v1.exists():
            quota = int(v1.read_text().strip())
            period = int((v1.parent / "cpu.cfs_period_us").read_text().strip())
            return None if quota <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None
    return None


def _cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a container's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def default_batch_size(device: torch.device | str) -> int:
    """Images per model call: 256 on CUDA, 32 on CPU.

    On an H100 (fp16, channels_last) ResNet-50 alone runs 5,823 images/s at batch 32 and
    13,274 at batch 256: small batches leave most of the GPU idle between kernel launches. On
    CPU larger batches gain nothing and only delay the first write.
    """
    return 256 if torch.device(device).type == "cuda" else 32


def default_num_workers(device: torch.device | str) -> int:
    """Decoding processes: cpus - 2 (1..16) beside a GPU; on CPU 0 up to 4 cores, else
    cpus // 16 (at least 1).

    Beside a GPU the model needs little CPU: one core drives it, one copies batches into pinned
    memory, and every other core decodes. One worker reads, decodes and resizes about 1,300 to
    1,900 ISIC-sized crops per second (measured on a 2-core EPYC, `bench_reader`), so the 14
    workers of a 16-core host feed the ~13,000 images/s an H100 reaches at batch 256.

    On CPU the model's threads already use every core, and reading, decoding and resizing a
    dermoscopy crop costs about 0.5 ms of one core against about 35 ms of model time per image
    per core (ResNet-50, 224 px, bf16): a worker process only takes time slices from the
    model's threads, which then wait for each other. Measured on 2 cores, 224 px, bf16, 128
    ISIC-like crops: model alone 57.4 images/s; 0 workers 57.6, 1 worker 54.3, 2 workers 51.4
    on a quiet machine; 20.7, 15.7 and 11.2 while other jobs ran. With 0 workers images are
    decoded in this process, between model calls.
    """
    cpus = _cpu_count()
    if torch.device(device).type == "cuda":
        return max(1, min(cpus - 2, 16))
    return 0 if cpus <= 4 else max(1, cpus // 16)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (as `invoke embed --shard i/n` takes it, i 0-based) -> (i, n).

    Raises EmbedError unless 0 <= i < n.
    """
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise EmbedError(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise EmbedError(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
    return index, count


def part_of(image_id: str, shard_count: int) -> int:
    """The part (0..shard_count-1) that embeds `image_id`: a stable hash, the same everywhere."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


# kept for fuse/ until it moves to embed.identity
store_identity = embedding_identity


def apply_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View `view` (index into VIEWS) of a batch x of shape (N, C, H, W)."""
    if view == 0:
        return x
    if view == 1:
        return torch.flip(x, dims=(-1,))
    if view == 2:
        return torch.flip(x, dims=(-2,))
    if view in (3, 4, 5):
        return torch.rot90(x, k=view - 2, dims=(-2, -1))
    if view == 6:
        return x.transpose(-2, -1)
    if view == 7:
        return torch.rot90(x, k=2, dims=(-2, -1)).transpose(-2, -1)
    raise EmbedError(f"view: expected 0..{len(VIEWS) - 1}, got {view!r}")


# ----------------------------------------------------------------------------- reader


def resize_uint8(image: Image.Image, image_size: int) -> np.ndarray:
    """The resize half of `embed.backbone.preprocess`: RGB uint8 array (S, S, 3).

    Workers ship uint8 (a quarter of float32's bytes through shared memory, pinned memory and
    PCIe) and `normalize_batch` finishes on the device; together they give exactly what
    `preprocess` gives (tested).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)


_MEAN255 = np.asarray(INPUT_MEAN, dtype=np.float32) * 255.0
_INV_STD255 = 1.0 / (np.asarray(INPUT_STD, dtype=np.float32) * 255.0)


def normalize_batch(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) on `device`, channels_last, normalised.

    The same float32 operations as `preprocess` ((x - 255 mean) * 1/(255 std)), so the values
    are identical; the NHWC batch permuted to NCHW is already channels_last in memory.
    """
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.from_numpy(_MEAN255).to(x.device).view(1, 3, 1, 1)
    inv_std = torch.from_numpy(_INV_STD255).to(x.device).view(1, 3, 1, 1)
    return ((x - mean) * inv_std).contiguous(memory_format=torch.channels_last)


class _DecodeDataset(Dataset):
    """Item i: (id, uint8 array (S, S, 3) or None, reason or None). Runs in the workers."""

    def __init__(self, source: ImageSource, ids: Sequence[str], image_size: int, max_pixels: int):
        self.source = source
        self.ids = list(ids)
        self.image_size = image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        try:
            data = self.source.read_bytes(image_id)
            image = decode_image(data, image_id, self.max_pixels, draft_size=self.image_size)
            return image_id, resize_uint8(image, self.image_size), None
        except EmbedError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a broken file must not end the run
            return image_id, None, f"image {image_id!r}: {type(exc).__name__}: {safe_reason(exc)}"


def collate_drop_failed(items):
    """Collate (id, array|None, reason) items into (ids, uint8 tensor (b, S, S, 3) or None,
    {id: reason} of the failed items)."""
    ids = [i for i, a, _ in items if a is not None]
    failures = {i: reason for i, a, reason in items if a is None}
    arrays = [a for _, a, _ in items if a is not None]
    batch = torch.from_numpy(np.stack(arrays)) if arrays else None
    return ids, batch, failures


def settle_config(config: EmbedConfig, device: torch.device) -> EmbedConfig:
    """`config` with batch_size and num_workers chosen for `device` where they are None."""
    return replace(
        config,
        batch_size=config.batch_size or default_batch_size(device),
        num_workers=default_num_workers(device) if config.num_workers is None else config.num_workers,
    )


def make_loader(
    source: ImageSource, ids: Sequence[str], config: EmbedConfig, device: torch.device
) -> DataLoader:
    """The reader: a DataLoader over `ids` yielding (ids, batch or None, failures) in order."""
    config = settle_config(config, device)
    workers = min(config.num_workers, max(1, -(-len(ids) // config.batch_size)))
    return DataLoader(
        _DecodeDataset(source, ids, config.image_size, config.max_pixels),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_drop_failed,
        pin_memory=device.type == "cuda",
        # Batches waiting in shared memory are workers x prefetch x batch bytes (38.5 MB per
        # 256 images at 224 px): 2 each keeps a GPU host's 14 workers near 1 GB, which the
        # small /dev/shm of many containers still holds; a few CPU workers may queue more.
        prefetch_factor=(2 if workers > 4 else 4) if workers else None,
    )


# ----------------------------------------------------------------------------- mapper

# Batches left running on a GPU while the caller writes the previous results: the store's
# writes (and a shard's fsync every `shard_rows` rows) then overlap the model instead of
# leaving the GPU idle. On CPU the model call returns finished results, so nothing is queued.
CUDA_BATCHES_IN_FLIGHT = 2


def batches_in_flight(device: torch.device) -> int:
    """Batches `embed_ids` leaves queued on `device` before handing back the oldest."""
    return CUDA_BATCHES_IN_FLIGHT if device.type == "cuda" else 0


class _Timer:
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

    def collect(self, views: int) -> np.ndarray:
        if self.vectors is None:
            return np.empty((0, views, EMBED_DIM), dtype=DTYPE)
        if self.done is not None:
            self.done.synchronize()
        return self.vectors.numpy()


def embed_ids(
    source: ImageSource,
    ids: Sequence[str],
    model: torch.nn.Module,
    config: EmbedConfig,
    *,
    timer: _Timer | None = None,
) -> Iterator[tuple[list[str], np.ndarray, dict[str, str]]]:
    """Embed `ids` from `source` with `model`, without a store (scoring uses this).

    Yields per batch, in the order of `ids`: (ids embedded, float16 array of shape
    (len(those ids), config.views, dim), {id: reason} for the batch's unreadable images).
    The model is moved to `config.device` in channels_last; runs under inference_mode with
    autocast when `config.amp`. On CUDA up to `CUDA_BATCHES_IN_FLIGHT` later batches are
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
    model = prepare_model(model, device)
    model.eval()
    amp = autocast_context(device) if config.amp else None
    loader = make_loader(source, ids, config, device)
    in_flight = batches_in_flight(device)
    timer = timer or _Timer()
    log.info(
        "embedding %d images on %s: %d px, %d view(s), batch %d, %d worker(s), amp=%s",
        len(ids),
        device,
        config.image_size,
        config.views,
        config.batch_size,
        loader.num_workers,
        _amp_label(amp),
    )
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), unit="img", desc="embed", dynamic_ncols=True, mininterval=1.0)

    def finish(launched: _Launched):
        t0 = time.perf_counter()
        vectors = launched.collect(config.views)
        timer.infer += time.perf_counter() - t0
        timer.batches += 1
        timer.images += len(launched.ids) + len(launched.failures)
        for image_id, reason in launched.failures.items():
            log.warning("skipped %s", reason if image_id in reason else f"{image_id}: {reason}")
        if bar is not None:
            bar.update(len(launched.ids) + len(launched.failures))
        if config.log_every and timer.batches % config.log_every == 0:
            elapsed = time.perf_counter() - timer.start
            log.info(
                "batch %d/%d: %.3f s/batch (read wait %.3f, infer %.3f, write %.3f), %.1f images/s",
                timer.batches,
                len(loader),
                elapsed / timer.batches,
                timer.read / timer.batches,
                timer.infer / timer.batches,
                timer.write / timer.batches,
                timer.images / elapsed,
            )
        return launched.ids, vectors, launched.failures

    pending: deque[_Launched] = deque()
    try:
        wait_start = time.perf_counter()
        for batch_ids, batch, failures in loader:
            t0 = time.perf_counter()
            timer.read += t0 - wait_start
            pending.append(_launch(model, batch, batch_ids, failures, device, config.views, amp))
            timer.infer += time.perf_counter() - t0
            while len(pending) > in_flight:
                yield finish(pending.popleft())
            wait_start = time.perf_counter()
        while pending:
            yield finish(pending.popleft())
    finally:
        if bar is not None:
            bar.close()


def _amp_label(amp) -> str:
    if isinstance(amp, torch.autocast):
        return str(amp.fast_dtype).replace("torch.", "")
    return "off"


def _launch(
    model, batch: torch.Tensor | None, ids, failures, device: torch.device, views: int, amp
) -> _Launched:
    """Start the model on `batch` (every view); on CUDA the copy back to the host is queued
    too, so this returns before the GPU has finished."""
    if batch is None:
        return _Launched(ids, failures, None, None)
    outs = []
    with torch.inference_mode():
        x = normalize_batch(batch, device)
        for v in range(views):
            xv = apply_view(x, v)
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


# ----------------------------------------------------------------------------- entry point


def _describe(source: ImageSource) -> str:
    """The source's folder or file as an absolute path: what a store records as `source`."""
    for attr in ("root", "path"):
        value = getattr(source, attr, None)
        if value is not None:
            return os.path.abspath(value)
    return repr(source)


def _fingerprints(source: ImageSource, ids: list[str]) -> dict[str, str]:
    """The source's fingerprints of `ids` now; {} (every image unknown) for a source without
    them."""
    method = getattr(source, "fingerprints", None)
    if method is None or not ids:
        return {}
    t0 = time.perf_counter()
    found = method(ids)
    log.info("image fingerprints of %d ids read in %.1f s", len(ids), time.perf_counter() - t0)
    return found


class _StopSignals:
    """SIGTERM (what SLURM and `kill` send) and SIGINT (Ctrl-C) ask the run to stop after the
    current batch instead of ending the process at once, so the writer can save what it holds.

    Handlers are installed only in the main thread (Python delivers signals there, and
    `signal.signal` refuses other threads) and the previous ones are restored on exit. A second
    signal raises KeyboardInterrupt at once; the writer still saves its buffered rows.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back; default it.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


@dataclass
class _Plan:
    """What a run does with each id of its part."""

    todo: list[str]  # to embed: not stored yet, or stored from an image that has changed
    skipped: list[str]  # stored, image unchanged (or not known to have changed)
    changed: list[str]
    previously_failed: dict[str, str]


def _plan(
    writer: StoreWriter, mine: list[str], now: dict[str, str], source, config: EmbedConfig
) -> _Plan:
    """Sort `mine` by what the store holds; changed images are marked to be embedded again."""
    changed = writer.changed({i: now[i] for i in mine if i in now})
    if changed:
        log.warning(
            "%d image(s) changed since they were embedded (%s): embedding them again: ids %s",
            len(changed),
            getattr(source, "FINGERPRINT", "fingerprint"),
            ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""),
        )
        writer.supersede(changed)
    unknown = sum(1 for i in mine if i in writer.stored and writer.stored_fingerprint(i) is None)
    if unknown:
        log.info(
            "%d stored id(s) have no image fingerprint (embedded before fingerprints were "
            "recorded): whether their images changed cannot be told",
            unknown,
        )
    renew = set(changed)
    previously_failed = {
        i: writer.failures[i]
        for i in mine
        if i not in writer.stored and i in writer.failures and not config.retry_failed
    }
    return _Plan(
        todo=[
            i for i in mine if (i not in writer.stored or i in renew) and i not in previously_failed
        ],
        skipped=[i for i in mine if i in writer.stored and i not in renew],
        changed=changed,
        previously_failed=previously_failed,
    )


def _note_source(writer: StoreWriter, source_path: str) -> None:
    recorded = writer.recorded.get("source")
    if recorded and recorded != source_path:
        log.info(
            "store %s was embedded from %s; this run reads %s: stored ids are kept unless their "
            "image fingerprint differs",
            writer.path,
            recorded,
            source_path,
        )


def build_store(
    source: ImageSource,
    ids: Sequence[str] | None,
    store_dir: Path | str,
    dataset: str,
    weights: WeightsInfo,
    config: EmbedConfig,
) -> EmbedSummary:
    """Embed the ids of `ids` (None = all of `source.ids()`) that `store_dir` does not hold yet,
    and those whose image changed since it was embedded (by the source's fingerprints).

    With config.shard_count > 1 only the ids of part config.shard_index are embedded (see
    `part_of`); several such runs may write one store at once. Ids recorded as failed earlier
    are skipped unless config.retry_failed. Unreadable images are recorded in the manifest's
    failures and returned in the summary; they never stop the run.

    SIGTERM or SIGINT (main thread only) stop the run after the current batch: every row
    embedded so far is written, then EmbedInterrupted is raised (rerunning continues).

    Raises EmbedError for repeated ids, a bad config, or a store locked by another writer of the
    same part; StoreMismatchError when the store was made with other weights, preprocessing,
    image size or views; EmbedInterrupted as above.
    """
    started = time.perf_counter()
    store_dir = Path(store_dir)
    ids = source.ids() if ids is None else [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        raise EmbedError(
            f"ids: {len(dup)} repeated id(s) ({', '.join(repr(i) for i in dup[:5])}); "
            "each image must appear once"
        )
    device = resolve_device(config.device)
    identity = embedding_identity(weights, config)
    info = {"dataset": dataset, "source": _describe(source), "decode": DECODE_INFO}
    mine = sorted(
        i
        for i in ids
        if config.shard_count == 1 or part_of(i, config.shard_count) == config.shard_index
    )
    timer = _Timer()
    failed: dict[str, str] = {}
    embedded = 0
    loop_start = None
    with (
        _StopSignals() as stop,
        StoreWriter(
            store_dir,
            identity,
            shard_index=config.shard_index,
            shard_count=config.shard_count,
            shard_rows=config.shard_rows,
            max_shard_seconds=config.max_shard_seconds,
            info=info,
        ) as writer,
    ):
        _note_source(writer, info["source"])
        now = _fingerprints(source, mine)
        plan = _plan(writer, mine, now, source, config)
        log.info(
            "store %s: %d ids for this part, %d already stored, %d changed, %d failed before%s, "
            "%d to embed",
            store_dir,
            len(mine),
            len(plan.skipped),
            len(plan.changed),
            len(plan.previously_failed),
            " (not retried; set retry_failed to retry)" if plan.previously_failed else "",
            len(plan.todo),
        )
        if plan.todo and stop.received is None:
            model = load_backbone(weights, device)
            loop_start = time.perf_counter()  # the rate excludes loading the model
            batches = embed_ids(source, plan.todo, model, config, timer=timer)
            with contextlib.closing(batches):
                for batch_ids, vectors, failures in batches:
                    t0 = time.perf_counter()
                    writer.append(batch_ids, vectors, [now.get(i) for i in batch_ids])
                    if failures:
                        writer.add_failures(failures)
                        failed.update(failures)
                    embedded += len(batch_ids)
                    timer.write += time.perf_counter() - t0
                    if stop.received is not None:
                        break
    # After the writer closed: the last shard and manifest are part of the run's cost.
    loop_seconds = time.perf_counter() - loop_start if loop_start is not None else 0.0
    stored = len(writer.stored)
    seconds = time.perf_counter() - started
    rate = (embedded + len(failed)) / loop_seconds if plan.todo and loop_seconds > 0 else 0.0
    summary = EmbedSummary(
        store_dir=store_dir,
        embedded=embedded,
        skipped_existing=len(plan.skipped),
        failed=failed,
        previously_failed=plan.previously_failed,
        seconds=seconds,
        images_per_s=rate,
        stored=stored,
        shard_index=config.shard_index,
        shard_count=config.shard_count,
        changed=plan.changed,
    )
    _log_summary(summary, timer)
    if stop.received is not None:
        message = (
            f"interrupted by {stop.name}: {embedded} rows saved to feature store "
            f"{str(store_dir)!r} ({stored} in all); rerun the same command to continue"
        )
        log.warning("%s", message)
        raise EmbedInterrupted(message)
    return summary


def _log_summary(summary: EmbedSummary, timer: _Timer) -> None:
    previously_failed = summary.previously_failed
    log.info(
        "store %s: embedded %d, skipped %d already stored, %d failed%s, in %.1f s (%.1f images/s)",
        summary.store_dir,
        summary.embedded,
        summary.skipped_existing,
        len(summary.failed),
        f" (+{len(previously_failed)} failed earlier, not retried)" if previously_failed else "",
        summary.seconds,
        summary.images_per_s,
    )
    if timer.batches:
        log.info(
            "per batch: read wait %.3f s, infer %.3f s, write %.3f s (%d batches)",
            timer.read / timer.batches,
            timer.infer / timer.batches,
            timer.write / timer.batches,
            timer.batches,
        )
