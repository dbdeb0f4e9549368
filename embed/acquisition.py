"""Acquisition cues of an image: how it was taken, measured from the file itself.

A model trained on dermoscopy (a lens pressed on the skin, dark circular corners, even light)
can be handed crops of 3D total-body photographs (small, square, flat-lit, soft). The embedding
may or may not say so; these cues say it plainly and cheaply, and name what differs in words a
user understands ("size 140x140 vs training 200x150"). The image side knows nothing of labels
or metadata, so the cues are plain measurements; `fuse.applicability.acquisition_part` compares them
with the training images'.

Every cue is computed from the encoded bytes (size, bytes per pixel) or from one fixed-size
RGB thumbnail (`THUMB` px square, so that a cue does not depend on the image's resolution):

- width, height: the original size in pixels (after EXIF orientation); log_pixels = log(w*h);
  log_aspect = log(w/h).
- bytes_per_pixel: encoded bytes / pixels (JPEG quality and chroma subsampling, PNG vs JPEG).
- L_mean, L_std, a_mean, a_std, b_mean, b_std: CIELAB (D65) statistics of the thumbnail
  (every other pixel; vignetting and dark_corners too).
- saturation: mean HSV saturation.
- sharpness: log(1 + variance of the 4-neighbour Laplacian of the greyscale thumbnail, 0..255).
- vignetting: (mean L of the centre disc - mean L of the corners) / 100; dermoscopy's dark
  circular rim makes it large, a crop of a photograph has it near 0.
- dark_corners: share of corner pixels darker than L = 15.

Reading goes through `embed.sources` (folder or HDF5), so training and scoring share the code.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from embed.errors import EmbedError
from embed.sources import ImageSource, decode_image, repeated_ids, safe_reason

__all__ = [
    "CUES_VERSION",
    "CUE_NAMES",
    "THUMB",
    "CueTable",
    "acquisition_cues",
    "cues_of_bytes",
    "thumbnail",
]

log = logging.getLogger(__name__)

# Bumped whenever a cue's definition changes: a detector fitted on cues of another version
# refuses new ones (`fuse.applicability.acquisition_part` checks it).
CUES_VERSION = "acquisition-cues/1"
THUMB = 128
CUE_NAMES: tuple[str, ...] = (
    "width",
    "height",
    "log_pixels",
    "log_aspect",
    "bytes_per_pixel",
    "L_mean",
    "L_std",
    "a_mean",
    "a_std",
    "b_mean",
    "b_std",
    "saturation",
    "sharpness",
    "vignetting",
    "dark_corners",
)
_DARK_L = 15.0
_DEFAULT_MAX_PIXELS = 50_000_000


def _regions(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (size, size) of the centre disc (radius < 0.5 of the half side) and the
    corners (outside the inscribed circle), in normalised coordinates."""
    axis = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    radius = np.hypot(axis[None, :], axis[:, None])
    return radius < 0.5, radius > 1.0


_CENTRE, _CORNERS = _regions(THUMB // 2)  # on the every-other-pixel grid of the thumbnail


# sRGB -> linear light for each 8-bit value: a table lookup instead of a power per pixel.
_code = np.arange(256, dtype=np.float64) / 255.0
_LINEAR = np.where(_code <= 0.04045, _code / 12.92, ((_code + 0.055) / 1.055) ** 2.4).astype(
    np.float32
)
# sRGB primaries to XYZ, each row divided by the D65 white's coordinate.
_TO_XYZ = (
    np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    / np.array([0.95047, 1.0, 1.08883])[:, None]
).T.astype(np.float32)
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _srgb_to_lab(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB (..., 3) -> CIELAB L, a, b, each (...), D65 white, float32."""
    xyz = _LINEAR[rgb] @ _TO_XYZ
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The image as the cues see it: uint8 RGB (THUMB, THUMB, 3), bilinear."""
    return np.asarray(
        image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8
    )


def _cues_of_thumbnails(thumbs: np.ndarray, sizes: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
    """The cues of a batch of images at once (`CUE_NAMES` order), float64 (B, len(CUE_NAMES)).

    thumbs: uint8 (B, THUMB, THUMB, 3) from `thumbnail`; sizes: (B, 2) original width and
    height; n_bytes: (B,) encoded sizes.
    """
    b = len(thumbs)
    # Colour statistics from every other pixel of the thumbnail: the same figures to a fraction
    # of a Lab unit, at a quarter of the cost (sharpness below keeps every pixel).
    sub = np.ascontiguousarray(thumbs[:, ::2, ::2]).reshape(b, -1, 3)
    L, A, B = _srgb_to_lab(sub)
    red, green, blue = (sub[..., c].astype(np.float32) for c in range(3))
    high = np.maximum(np.maximum(red, green), blue)
    low = np.minimum(np.minimum(red, green), blue)
    saturation = ((high - low) / np.maximum(high, 1.0)).mean(axis=1)
    grey = thumbs.astype(np.float32) @ _GREY
    laplacian = (
        grey[:, :-2, 1:-1]
        + grey[:, 2:, 1:-1]
        + grey[:, 1:-1, :-2]
        + grey[:, 1:-1, 2:]
        - 4 * grey[:, 1:-1, 1:-1]
    ).reshape(b, -1)
    corners = L[:, _CORNERS.ravel()]
    width = sizes[:, 0].astype(np.float64)
    height = sizes[:, 1].astype(np.float64)
    pixels = width * height
    return np.column_stack(
        [
            width,
            height,
            np.log(pixels),
            np.log(width / height),
            n_bytes / pixels,
            L.mean(axis=1),
            L.std(axis=1),
            A.mean(axis=1),
            A.std(axis=1),
            B.mean(axis=1),
            B.std(axis=1),
            saturation,
            np.log1p(laplacian.var(axis=1)),
            (L[:, _CENTRE.ravel()].mean(axis=1) - corners.mean(axis=1)) / 100.0,
            (corners < _DARK_L).mean(axis=1),
        ]
    ).astype(np.float64)


def _cues_of_image(image: Image.Image, width: int, height: int, n_bytes: int) -> np.ndarray:
    """The cues (`CUE_NAMES` order, float64, shape (len(CUE_NAMES),)) of a decoded RGB image
    whose original size is `width` x `height` and encoded size `n_bytes`.

    `image` may be a reduced decode (JPEG draft) of the original: only its thumbnail is used.
    """
    return _cues_of_thumbnails(
        thumbnail(image)[None], np.array([[width, height]]), np.array([n_bytes], dtype=np.float64)
    )[0]


def _original_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header, as a viewer shows it (EXIF rotations swap the sides)."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def cues_of_bytes(
    data: bytes, image_id: str, *, max_pixels: int = _DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The cues (`CUE_NAMES` order) of one encoded image.

    The JPEG is decoded at a reduced scale (both sides still >= `THUMB`), which is all the
    thumbnail needs. Raises EmbedError naming `image_id` for unreadable data or an image of
    more than `max_pixels` pixels (`embed.sources.decode_image`).
    """
    thumb, size = _decode(data, image_id, max_pixels)
    return _cues_of_thumbnails(thumb[None], np.array([size]), np.array([len(data)], dtype=float))[0]


def _decode(data: bytes, image_id: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(thumbnail, (width, height)) of encoded bytes; EmbedError naming the id otherwise."""
    image = decode_image(data, image_id, max_pixels, draft_size=THUMB)
    try:
        size = _original_size(data)
    except Exception as exc:  # decoded above, so this is a header PIL reads differently
        raise EmbedError(f"image {image_id!r}: cannot read its size ({safe_reason(exc)})") from exc
    return thumbnail(image), size


@dataclass(frozen=True)
class CueTable:
    """Cues of many images.

    frame: DataFrame indexed by id (the ids asked for, in that order), columns `CUE_NAMES`,
        float64; rows of images that could not be read are NaN.
    failures: {id: reason} of those images.
    seconds: wall time of the measurement.
    version: `CUES_VERSION`.
    """

    frame: pd.DataFrame
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    version: str = CUES_VERSION

    @property
    def images_per_s(self) -> float:
        return len(self.frame) / self.seconds if self.seconds > 0 else float("nan")


def acquisition_cues(
    source: ImageSource,
    ids: Sequence[str] | None = None,
    *,
    max_pixels: int = _DEFAULT_MAX_PIXELS,
    batch_size: int = 64,
    progress: bool = False,
) -> CueTable:
    """Measure the acquisition cues of `ids` (None = every id of `source`), in that order.

    An image that cannot be read or decoded never stops the run: its row is NaN and its reason
    is in `failures` (the same reasons `embed` records). Images are decoded one by one and
    measured `batch_size` (64) at a time as arrays. Raises EmbedError when `ids` repeats an id
    (its rows would be ambiguous).
    """
    ids = list(source.ids() if ids is None else ids)
    if len(set(ids)) != len(ids):
        repeated = repeated_ids(ids)
        raise EmbedError(
            f"acquisition_cues: ids repeat {repeated[:3]} ({len(repeated)} repeats); pass each id "
            "once"
        )
    values = np.full((len(ids), len(CUE_NAMES)), np.nan, dtype=np.float64)
    failures: dict[str, str] = {}
    started = time.perf_counter()
    iterator = enumerate(ids)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(ids), desc="acquisition cues", unit="img")
    rows: list[int] = []
    thumbs: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    n_bytes: list[int] = []

    def flush() -> None:
        if rows:
            values[rows] = _cues_of_thumbnails(
                np.stack(thumbs), np.array(sizes), np.array(n_bytes, dtype=np.float64)
            )
            for batch in (rows, thumbs, sizes, n_bytes):
                batch.clear()

    for row, image_id in iterator:
        try:
            data = source.read_bytes(image_id)
            thumb, size = _decode(data, image_id, max_pixels)
        except EmbedError as exc:
            failures[image_id] = str(exc)
            continue
        rows.append(row)
        thumbs.append(thumb)
        sizes.append(size)
        n_bytes.append(len(data))
        if len(rows) == batch_size:
            flush()
    flush()
    seconds = time.perf_counter() - started
    if failures:
        log.warning(
            "acquisition cues: %d of %d images unreadable (first: %s)",
            len(failures),
            len(ids),
            next(iter(failures.values())),
        )
    log.info(
        "acquisition cues of %d images in %.1f s (%.0f images/s)",
        len(ids),
        seconds,
        len(ids) / seconds if seconds else float("nan"),
    )
    frame = pd.DataFrame(values, index=pd.Index(ids, name="id"), columns=list(CUE_NAMES))
    return CueTable(frame=frame, failures=failures, seconds=seconds)
