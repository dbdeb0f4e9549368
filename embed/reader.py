"""The reader: image ids in, uint8 batches out, and what the model sees of them.

DataLoader worker processes read and decode each image (`embed.sources.decode_image`) and
resize it (`resize_uint8`), and crop and resize its centre zoom view when asked
(`embed.zoom`); the collate drops unreadable images and passes their ids on with
the reason, so they never stop a run. On the device `normalize_batch` finishes the
preprocessing and `apply_view` makes the test-time views: geometric transforms of the batch
tensor (flips, rotations, transposes: the dihedral group of the square), applied there rather
than decoding the image again; view 0 is always the plain image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from embed.config import VIEWS, EmbedConfig, settle_config, settled_sizes
from embed.errors import EmbedError
from embed.resnet50 import INPUT_MEAN, INPUT_STD
from embed.sources import ALPHA_BACKGROUND, ImageSource, decode_image, safe_reason
from embed.zoom import zoom_uint8

__all__ = [
    "DECODE_INFO",
    "apply_view",
    "collate_drop_failed",
    "make_loader",
    "normalize_batch",
    "resize_uint8",
]


# How bytes become pixels, recorded in each store's manifest for the reader's information.
DECODE_INFO: dict = {
    "library": "PIL",
    "jpeg_draft": "JPEG decoded at the smallest 1/2^k scale keeping both sides >= image_size",
    "alpha": f"composited on {list(ALPHA_BACKGROUND)}",
    "sixteen_bit": "scaled by 1/257 to 8 bits",
    "exif_orientation": "applied",
    "views": list(VIEWS),
}


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
    """Item i: (id, uint8 array (S, S, 3) or None, reason or None). Runs in the workers.

    With `zoom` the array is (2, S, S, 3): the whole image, then its centre zoom view
    (`embed.zoom.zoom_uint8`), both from the one decoded image.
    """

    def __init__(
        self,
        source: ImageSource,
        ids: Sequence[str],
        image_size: int,
        max_pixels: int,
        zoom: float | None = None,
    ):
        self.source = source
        self.ids = list(ids)
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.zoom = zoom

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image_id = self.ids[i]
        try:
            data = self.source.read_bytes(image_id)
            image = decode_image(data, image_id, self.max_pixels, draft_size=self.image_size)
            whole = resize_uint8(image, self.image_size)
            if self.zoom is None:
                return image_id, whole, None
            return image_id, np.stack([whole, zoom_uint8(image, self.image_size, self.zoom)]), None
        except EmbedError as exc:
            return image_id, None, str(exc)
        except Exception as exc:  # a broken file must not end the run
            return image_id, None, f"image {image_id!r}: {type(exc).__name__}: {safe_reason(exc)}"


def collate_drop_failed(items):
    """Collate (id, array|None, reason) items into (ids, uint8 tensor (b, S, S, 3) or None,
    {id: reason} of the failed items); (b, 2, S, S, 3) when the items carry a zoom view."""
    ids = [i for i, a, _ in items if a is not None]
    failures = {i: reason for i, a, reason in items if a is None}
    arrays = [a for _, a, _ in items if a is not None]
    batch = torch.from_numpy(np.stack(arrays)) if arrays else None
    return ids, batch, failures


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


def make_loader(
    source: ImageSource, ids: Sequence[str], config: EmbedConfig, device: torch.device
) -> DataLoader:
    """The reader: a DataLoader over `ids` yielding (ids, batch or None, failures) in order;
    a batch is uint8 (b, S, S, 3), or (b, 2, S, S, 3) with `config.zoom` (whole, zoom view)."""
    config = settle_config(config, device)
    batch_size, num_workers = settled_sizes(config, device)
    workers = min(num_workers, max(1, -(-len(ids) // batch_size)))
    return DataLoader(
        _DecodeDataset(source, ids, config.image_size, config.max_pixels, config.zoom),
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
