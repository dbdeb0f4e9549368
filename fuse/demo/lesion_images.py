"""The synthetic lesion images: one square crop per metadata row, drawn from that row's
measurements so that image and table agree, encoded as baseline JPEG and written into an HDF5
file in the ISIC 2024 layout (key = `isic_id`, value = the JPEG bytes as a scalar fixed-length
bytes dataset).

A crop covers a fixed 15 mm field of view (real 3D-TBP tiles are fixed-size crops) of the
patient's skin colour and texture, with the lesion drawn as a blob whose size, axes, orientation,
border roughness (radial harmonics), Lab colour and colour variegation are taken from the row.
Each image has its own random stream (seed, split, row), so drawing images does not change the
table and any single image can be redrawn alone.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fuse.demo.lesion_table import ellipse_perimeter

__all__ = ["FIELD_OF_VIEW_MM", "JPEG_QUALITY", "draw_lesion", "encode_jpeg", "write_image_hdf5"]

log = logging.getLogger(__name__)

FIELD_OF_VIEW_MM = 15.0
JPEG_QUALITY = 90


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) -> sRGB in [0, 1], for (..., 3) float32 arrays."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f**3, 3 * delta**2 * (f - 4.0 / 29.0))
    xyz *= np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    m = np.array(
        [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]],
        dtype=np.float32,
    )
    rgb = np.clip(xyz @ m.T, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise, about unit variance, with blobs about size/cells wide."""
    cells = int(min(max(cells, 2), size // 2))
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    std = float(field.std())
    return field / std if std > 0 else field


def draw_lesion(row: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one lesion crop as a (size, size, 3) uint8 RGB array from its metadata `row`.

    `row` needs the training columns clin_size_long_diam_mm, tbp_lv_minorAxisMM,
    tbp_lv_symm_2axis(_angle), tbp_lv_area_perim_ratio, tbp_lv_L/A/B, tbp_lv_Lext/Aext/Bext,
    tbp_lv_stdL, tbp_lv_stdLExt, tbp_lv_color_std_mean and tbp_lv_radial_color_std_max.
    The crop covers FIELD_OF_VIEW_MM, so large lesions run off its edges as in real tiles.
    """
    px_per_mm = size / FIELD_OF_VIEW_MM
    a = max(row["clin_size_long_diam_mm"] * px_per_mm / 2.0, 1.5)
    b = max(row["tbp_lv_minorAxisMM"] * px_per_mm / 2.0, 1.2)
    angle = np.radians(row["tbp_lv_symm_2axis_angle"] + rng.normal(0, 10))
    centre = size / 2.0 + rng.normal(0, size * 0.03, 2)
    coords = np.arange(size, dtype=np.float32) + 0.5
    dy = coords[:, None] - np.float32(centre[0])
    dx = coords[None, :] - np.float32(centre[1])
    u = dx * np.float32(np.cos(angle)) + dy * np.float32(np.sin(angle))
    v = dy * np.float32(np.cos(angle)) - dx * np.float32(np.sin(angle))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = np.arctan2(v / b, u / a)

    # Border: asymmetry as a first harmonic, roughness (how far area_perim_ratio exceeds the
    # ellipse's) as higher harmonics.
    e = math.sqrt(max(1.0 - (b / a) ** 2, 0.0))
    ideal = float(ellipse_perimeter(np.array([1.0]), np.array([b / a]))[0] ** 2 / (np.pi * b / a))
    rough = max(math.sqrt(row["tbp_lv_area_perim_ratio"] / ideal) - 1.0, 0.0)
    radius = np.ones_like(theta)
    asym = max(row["tbp_lv_symm_2axis"] - 0.15, 0.0) * 0.8
    radius += np.float32(asym) * np.cos(theta - np.float32(rng.uniform(0, 2 * np.pi)))
    for j in range(2, 8):
        amp = rough * 0.45 * rng.standard_normal() / j**0.7
        radius += np.float32(amp) * np.cos(j * theta + np.float32(rng.uniform(0, 2 * np.pi)))
    radius = np.maximum(radius, 0.3)
    edge = 0.08 + 0.1 * rng.random() + 0.05 * e
    alpha = np.clip((radius - rho) / np.float32(edge) + 0.5, 0.0, 1.0)[..., None]

    # Colour: the lesion's Lab mean, variegated blotches (stdL, color_std_mean) and a radial
    # gradient (radial_color_std_max); the skin's Lab with its own texture (stdLExt).
    cells = size / max(a / 1.5, 2.0)
    blot_l = _smooth_field(rng, size, round(cells))
    blot_ab = _smooth_field(rng, size, round(cells))
    centre_weight = np.clip(1.0 - rho / np.maximum(radius, 1e-3), 0.0, 1.0) - 0.5
    lesion = np.empty((size, size, 3), dtype=np.float32)
    lesion[..., 0] = row["tbp_lv_L"] + 1.3 * row["tbp_lv_stdL"] * blot_l
    lesion[..., 0] -= 3.0 * row["tbp_lv_radial_color_std_max"] * centre_weight
    # Chroma varies along red-brown, never into green, which no lesion shows.
    lesion[..., 1] = np.maximum(row["tbp_lv_A"] + 1.4 * row["tbp_lv_color_std_mean"] * blot_ab, 3.0)
    lesion[..., 2] = row["tbp_lv_B"] + 0.5 * row["tbp_lv_color_std_mean"] * blot_ab
    skin = np.empty_like(lesion)
    grain = _smooth_field(rng, size, size // 6) * 0.6 + _smooth_field(rng, size, 5) * 0.8
    skin[..., 0] = row["tbp_lv_Lext"] + row["tbp_lv_stdLExt"] * grain
    skin[..., 1] = row["tbp_lv_Aext"] + 0.6 * grain
    skin[..., 2] = row["tbp_lv_Bext"] - 0.4 * grain
    lab = skin + alpha * (lesion - skin)
    rgb = _lab_to_srgb(lab) * 255.0
    rgb += rng.normal(0.0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JFIF JPEG bytes of an (h, w, 3) uint8 array, as the real HDF5 files hold."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_hdf5(
    frame: pd.DataFrame, path: Path, seed: int, split: int, size_range: tuple[int, int]
) -> None:
    """One JPEG per row into `path`: key = isic_id, value = a scalar `|S<n>` bytes dataset."""
    needed = [
        "isic_id", "clin_size_long_diam_mm", "tbp_lv_minorAxisMM", "tbp_lv_symm_2axis",
        "tbp_lv_symm_2axis_angle", "tbp_lv_area_perim_ratio", "tbp_lv_L", "tbp_lv_A", "tbp_lv_B",
        "tbp_lv_Lext", "tbp_lv_Aext", "tbp_lv_Bext", "tbp_lv_stdL", "tbp_lv_stdLExt",
        "tbp_lv_color_std_mean", "tbp_lv_radial_color_std_max",
    ]  # fmt: skip
    records = frame.loc[:, needed].to_dict("records")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        for i, row in enumerate(tqdm(records, desc=path.name, unit="img", leave=False)):
            # Per-row stream: any image can be redrawn alone, and the table never depends on it.
            rng = np.random.default_rng([seed, split, i])
            size = int(rng.integers(size_range[0], size_range[1] + 1))
            data = encode_jpeg(draw_lesion(row, size, rng))
            h5.create_dataset(
                row["isic_id"], data=np.bytes_(data)
            )  # scalar |S<n>, as the real file
    os.replace(tmp, path)
