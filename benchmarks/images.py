"""The embedding benchmark's inputs: synthetic ISIC 2024-like crops in HDF5 or the first images
of a real source (`open_images`), and random ResNet-50 weights for throughput figures on machines
the real weights cannot reach (`random_weights`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from embed.errors import EmbedError
from embed.sources import HDF5Source, ImageSource, open_source
from embed.weights import WeightsInfo

__all__ = ["open_images", "random_weights", "write_synthetic_hdf5"]


def write_synthetic_hdf5(path: Path, n_images: int, seed: int = 0) -> list[str]:
    """ISIC 2024-like crops: n JPEGs of 96-160 px squares (skin with a darker blotch) in HDF5."""
    import h5py
    from PIL import Image

    rng = np.random.default_rng(seed)
    ids = [f"ISIC_{i:07d}" for i in range(n_images)]
    with h5py.File(path, "w") as f:
        for image_id in ids:
            side = int(rng.integers(96, 161))
            yy, xx = np.mgrid[0:side, 0:side]
            cx, cy = rng.uniform(0.35, 0.65, 2) * side
            r = np.hypot(xx - cx, yy - cy) / side
            blend = np.clip((r - rng.uniform(0.1, 0.25)) * 8, 0, 1)[..., None]
            arr = rng.uniform(40, 120, 3) * (1 - blend) + rng.uniform(150, 230, 3) * blend
            arr = arr + rng.normal(0, 5, (side, side, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            f.create_dataset(image_id, data=np.bytes_(buf.getvalue()))
    return ids


def random_weights(path: Path) -> WeightsInfo:
    """A random-init ResNet-50 state dict in the Keras v1 stride layout (throughput figures only):
    the same work per image as the real weights, on machines the real weights file cannot reach."""
    import torchvision

    from common.files import sha256_file
    from embed.weights import STRIDE_KERAS_V1

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return WeightsInfo(
        path=Path(path),
        sha256=sha256_file(path),
        source="random init (throughput only)",
        stride_layout=STRIDE_KERAS_V1,
    )


def open_images(
    images: Path | None, n_images: int, work: Path
) -> tuple[ImageSource, list[str], str]:
    """The bench's images: the first `n_images` of `images`, or synthetic crops in `work`."""
    if images is None:
        src_path = work / "images.hdf5"
        ids = write_synthetic_hdf5(src_path, n_images)
        return (
            HDF5Source(src_path),
            ids,
            f"synthetic ISIC-like JPEG crops, 96-160 px, {n_images} in HDF5",
        )
    source = open_source(images)
    ids = source.ids()[:n_images]
    if len(ids) < n_images:
        raise EmbedError(f"bench: {images} holds {len(ids)} images, n_images={n_images}")
    return source, ids, str(images)
