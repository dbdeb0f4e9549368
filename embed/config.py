"""Settings of an embedding run and the resources it takes.

`EmbedConfig` (what a run is asked to do) and `EmbedSummary` (what it did); the identity of the
vectors a config makes (`embedding_identity`) and the config an identity asks for
(`config_for_identity`); the device, batch size and decoding workers chosen for the machine
(`resolve_device`, `default_batch_size`, `default_num_workers` (which counts CPUs by affinity
capped by a container's CPU quota), `settle_config` and `settled_sizes`), and how a sharded build
splits the ids between its writers (`parse_shard`, `part_of`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from embed.backbone import BACKBONE_NAME, preprocessing_for
from embed.errors import EmbedError
from embed.identity import DTYPE, with_legacy_values
from embed.pooled import (
    DEFAULT_BLOCKS,
    DEFAULT_POOLING,
    SMALL_IMAGE_SIZE,
    TRAINED_IMAGE_SIZE,
    check_features,
    feature_dim,
    min_image_size,
)
from embed.variants import resolve_variant
from embed.weights import WeightsInfo
from embed.zoom import check_zoom, stored_views

__all__ = [
    "VIEWS",
    "EmbedConfig",
    "EmbedSummary",
    "cgroup_cpu_limit",
    "config_for_identity",
    "default_batch_size",
    "default_num_workers",
    "embedding_identity",
    "parse_shard",
    "part_of",
    "resolve_device",
    "settle_config",
    "settled_sizes",
    "warn_if_small",
]

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


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of one embedding run.

    image_size: side of the square model input, px (224).
    views: test-time views per image, 1..8 (`VIEWS` order; 1 = the plain image only).
    zoom: None (default) or the fraction of each side kept by the centre zoom view
        (`embed.zoom`), embedded as one more view after the `views` geometric ones.
    blocks: the ResNet-50 stages whose output is pooled, concatenated in forward order
        (`embed.backbone.BLOCKS`; a comma-separated string is accepted).
    pooling: "avg" (global average) or "gem" (generalised mean, p=3) for every pooled block.
    variant: how the backbone is computed (`embed.variants.VARIANTS`: eager, folded, jit-frozen,
        compiled, int8-mixed, int8), or "auto" (`embed.variants.default_variant` for the device
        and, in `embed.pipeline.build_store`, the number of images); the resolved name is part of
        the store's identity.
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
    zoom: float | None = None
    blocks: tuple[str, ...] = DEFAULT_BLOCKS
    pooling: str = DEFAULT_POOLING
    variant: str = "auto"
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
        # Normalised (forward order, a tuple) so equal settings give equal configs and identities.
        object.__setattr__(self, "blocks", check_features(self.blocks, self.pooling))
        from embed.variants import check_variant

        check_variant(self.variant)

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
        minimum = min_image_size(self.blocks)
        if self.image_size < minimum:
            raise EmbedError(
                f"--image-size (EmbedConfig.image_size) {self.image_size}: the backbone needs at "
                f"least {minimum} px for blocks {','.join(self.blocks)} (below it "
                f"{self.blocks[-1]}'s map is no longer computed from image, only from padding); "
                f"use --image-size {minimum} or more ({TRAINED_IMAGE_SIZE}, what the weights were "
                "trained at, is the default)"
            )
        if not isinstance(self.views, int) or not 1 <= self.views <= len(VIEWS):
            raise EmbedError(f"EmbedConfig.views: expected 1..{len(VIEWS)}, got {self.views!r}")
        object.__setattr__(self, "zoom", check_zoom(self.zoom))
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
                "EmbedConfig.num_workers: expected None or an integer >= 0, got "
                f"{self.num_workers!r}"
            )
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise EmbedError(
                "EmbedConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                f"{self.device!r}"
            )


def warn_if_small(config: EmbedConfig) -> None:
    """Log a warning when `config.image_size` is far below the size the weights were trained at
    (< SMALL_IMAGE_SIZE): allowed (tests and throughput runs use 32 px), but the vectors then
    describe the image much less well than at 224 px."""
    if config.image_size < SMALL_IMAGE_SIZE:
        log.warning(
            "--image-size %d: far below the %d px the ImageNet weights were trained at (under %d "
            "px their features lose most of what they describe); the vectors will be of little "
            "use for lesions. Use --image-size %d unless this is a test or a throughput run",
            config.image_size,
            TRAINED_IMAGE_SIZE,
            SMALL_IMAGE_SIZE,
            TRAINED_IMAGE_SIZE,
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


def embedding_identity(weights: WeightsInfo, config: EmbedConfig) -> dict:
    """The identity (`embed.identity.IDENTITY_FIELDS`) of vectors embedded with `weights` and
    `config` (image size, views (vectors per image: the geometric views and the zoom view), the
    zoom, the pooled blocks and their pooling, the inference variant as resolved on this
    machine). Raises EmbedError for a device or variant this machine lacks."""
    return {
        "backbone": BACKBONE_NAME,
        "weights_sha256": weights.sha256,
        "preprocessing": preprocessing_for(weights),
        "image_size": config.image_size,
        "zoom": config.zoom,
        # Vectors per image as stored: the geometric views, then the zoom view when there is one.
        "views": stored_views(config.views, config.zoom),
        "blocks": list(config.blocks),
        "pooling": config.pooling,
        # The inference variant as resolved on this machine ("auto" is not an identity).
        "variant": resolve_variant(config.variant, resolve_device(config.device), config.amp),
        "dtype": DTYPE,
        "dim": feature_dim(config.blocks),
    }


def config_for_identity(identity: dict, **settings) -> EmbedConfig:
    """An EmbedConfig that embeds as `identity` says (image size, views, blocks, pooling,
    variant, zoom; an older identity without blocks/pooling means layer4 average, without a
    variant eager, without a zoom none), plus `settings` (device, batch size, ...): the inverse
    of `embedding_identity`."""
    identity = with_legacy_values(identity)
    settings.setdefault("variant", str(identity.get("variant", "eager")))
    zoom = identity.get("zoom")
    return EmbedConfig(
        image_size=int(identity["image_size"]),
        views=int(identity["views"]) - stored_views(0, zoom),
        zoom=zoom,
        blocks=tuple(identity["blocks"]),
        pooling=str(identity["pooling"]),
        **settings,
    )


# ----------------------------------------------------------------------------- resources


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


_CGROUP_CPU_LIMITS = (
    Path("/sys/fs/cgroup/cpu.max"),  # cgroup v2: "<quota> <period>" or "max <period>"
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),  # cgroup v1: quota, -1 = none (period beside it)
)


def cgroup_cpu_limit(paths: Sequence[Path] = _CGROUP_CPU_LIMITS) -> int | None:
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
            quota_us = int(v1.read_text().strip())
            period_us = int((v1.parent / "cpu.cfs_period_us").read_text().strip())
            return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
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


def settle_config(config: EmbedConfig, device: torch.device) -> EmbedConfig:
    """`config` with batch_size and num_workers chosen for `device` where they are None."""
    batch_size, num_workers = settled_sizes(config, device)
    return replace(config, batch_size=batch_size, num_workers=num_workers)


def settled_sizes(config: EmbedConfig, device: torch.device) -> tuple[int, int]:
    """(batch_size, num_workers) of `config`, each chosen for `device` where it is None."""
    batch_size = config.batch_size or default_batch_size(device)
    num_workers = default_num_workers(device) if config.num_workers is None else config.num_workers
    return batch_size, num_workers


# ----------------------------------------------------------------------------- parts


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
