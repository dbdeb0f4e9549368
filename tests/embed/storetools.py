"""Helpers shared by the store and pipeline tests (not a test module).

Tiny random-initialised ResNet-50 weights, synthetic images, fast embedding settings.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "DATA",
    "HAM_IMAGES",
    "ISIC_MINI",
    "N_IMAGES",
    "assert_same_vectors",
    "jpeg_bytes",
    "random_weights",
    "tiny_config",
    "write_folder",
    "write_hdf5",
]

_REPO = Path(__file__).resolve().parents[2]
DATA = _REPO / ".." / "shared" / "data"
ISIC_MINI = DATA / "isic2024-mini" / "train-image.hdf5"
HAM_IMAGES = DATA / "ham10000" / "images"
N_IMAGES = 24  # images in the pipeline tests' folder (tests/embed/conftest.py)


def random_weights(path: Path, seed: int = 0):
    """A random-init torchvision ResNet-50 state dict saved to `path`, as a WeightsInfo."""
    import torch
    import torchvision

    from common.files import sha256_file
    from embed.weights import WeightsInfo

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    torch.save(model.state_dict(), path)
    return WeightsInfo(path=Path(path), sha256=sha256_file(path), source="random init (tests)")


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    """A smooth random colour image as JPEG bytes (ISIC-like blotch, deterministic)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    r = np.hypot(xx - cx, yy - cy) / max(w, h)
    skin = rng.uniform(150, 230, 3)
    lesion = rng.uniform(40, 120, 3)
    blend = np.clip((r - 0.15) * 6, 0, 1)[..., None]
    arr = lesion * (1 - blend) + skin * blend + rng.normal(0, 6, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_folder(folder: Path, n: int, prefix: str = "img", size=(48, 40)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}_{i:03d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        (folder / f"{image_id}.jpg").write_bytes(jpeg_bytes(i, size))
    return ids


def write_hdf5(path: Path, n: int, prefix: str = "img", size=(48, 40), extra: dict | None = None):
    """An HDF5 in the ISIC 2024 layout (scalar fixed-length bytes per key); returns the ids."""
    import h5py

    ids = [f"{prefix}_{i:03d}" for i in range(n)]
    with h5py.File(path, "w") as f:
        for i, image_id in enumerate(ids):
            f.create_dataset(image_id, data=np.bytes_(jpeg_bytes(i, size)))
        for key, data in (extra or {}).items():
            # A zero-length fixed string is not allowed in HDF5: store empty data as uint8[0].
            f.create_dataset(key, data=np.bytes_(data) if data else np.zeros(0, np.uint8))
    return ids


def tiny_config(**overrides):
    from embed.config import EmbedConfig

    settings = dict(
        image_size=32,
        views=1,
        batch_size=4,
        device="cpu",
        num_workers=0,
        shard_rows=8,
        progress=False,
        amp=False,
    )
    settings.update(overrides)
    return EmbedConfig(**settings)


def assert_same_vectors(a, b) -> None:
    """Two feature stores hold the same ids with the same vectors (up to fp16 rounding)."""
    assert sorted(a.ids) == sorted(b.ids)
    ids = sorted(a.ids)
    va, vb = a.read(ids).astype(np.float32), b.read(ids).astype(np.float32)
    # fp32 on CPU; batches may be composed differently, so allow fp16 rounding.
    np.testing.assert_allclose(va, vb, rtol=1e-2, atol=2e-2)
