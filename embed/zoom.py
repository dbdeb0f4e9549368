"""The centre zoom view: the middle of the image, enlarged to the model's input size.

Dermoscopy centres the lesion, and the corners of the frame are often the dark vignette of the
dermoscope's round field. The zoom view crops the central `zoom` fraction of each side of the
decoded image and resizes that crop (bilinear, as the whole-image view) to `image_size`; it is
embedded as one more view after the geometric ones (`embed.config.VIEWS`), so a store with
`--views 1 --zoom 0.75` keeps two vectors per image: the whole image and its zoomed centre.
Training draws one view per image per epoch and prediction averages the views' probabilities,
as for the geometric views.

Torch-free, so that the command line's help and a store's name can use it cheaply.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from embed.errors import EmbedError

__all__ = [
    "check_zoom",
    "stored_views",
    "zoom_box",
    "zoom_name",
    "zoom_uint8",
]


def check_zoom(zoom) -> float | None:
    """`zoom` checked: None (no zoom view) or a fraction strictly between 0 and 1.

    A fraction is rounded to 2 decimals (it names the store: 0.75 -> "z75").
    Raises EmbedError naming --zoom and the value for anything else (0, 1, negative, not a number).
    """
    if zoom is None:
        return None
    valid = isinstance(zoom, int | float) and not isinstance(zoom, bool)
    if not valid or not 0.0 < float(zoom) < 1.0 or round(float(zoom), 2) in (0.0, 1.0):
        raise EmbedError(
            f"--zoom (EmbedConfig.zoom): expected a fraction of each side between 0.01 and 0.99 "
            f"(e.g. 0.75: the central three quarters), or none for no zoom view; got {zoom!r}"
        )
    return round(float(zoom), 2)


def stored_views(views: int, zoom: float | None) -> int:
    """Vectors a store keeps per image: the `views` geometric ones, plus one for the zoom."""
    return int(views) + (0 if zoom is None else 1)


def zoom_name(zoom: float | None) -> str:
    """The store-name part of a zoom: "" without one, "-z75" for 0.75."""
    return "" if zoom is None else f"-z{round(zoom * 100):d}"


def zoom_box(width: int, height: int, zoom: float) -> tuple[float, float, float, float]:
    """(left, upper, right, lower) of the central `zoom` fraction of each side, in pixels
    (fractional: PIL resamples the box exactly, without rounding it to whole pixels)."""
    crop_w, crop_h = width * zoom, height * zoom
    return (
        (width - crop_w) / 2,
        (height - crop_h) / 2,
        (width + crop_w) / 2,
        (height + crop_h) / 2,
    )


def zoom_uint8(image: Image.Image, image_size: int, zoom: float) -> np.ndarray:
    """The zoom view of an RGB PIL image: uint8 array (image_size, image_size, 3), the central
    `zoom` fraction of each side resized (bilinear) to the square input."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = zoom_box(image.width, image.height, zoom)
    zoomed = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    return np.array(zoomed, dtype=np.uint8)
