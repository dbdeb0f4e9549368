"""Image sources (a folder of files, or an HDF5 file of encoded images) and safe decoding.

A source maps an image id to the encoded bytes of that image; `decode_image` turns the bytes
into an RGB PIL image or raises `EmbedError` naming the id and the reason. Sources are picklable
so that DataLoader worker processes can each hold their own copy: `HDF5Source` opens its file
lazily in the process that reads it, because an h5py handle must not cross a fork.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embed.errors import EmbedError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".hdf")

# Transparent pixels are composited on black: in dermoscopy and 3D-TBP crops the area outside
# the field of view is black (the dermoscope's vignette, the crop's padding), so a masked image
# composited on black looks like the unmasked images the embeddings are otherwise made from.
ALPHA_BACKGROUND: tuple[int, int, int] = (0, 0, 0)


@runtime_checkable
class ImageSource(Protocol):
    """Where encoded images come from, by id. Implementations must be picklable."""

    def ids(self) -> list[str]:
        """All image ids the source holds, sorted."""
        ...

    def read_bytes(self, image_id: str) -> bytes:
        """The encoded bytes of one image; raises EmbedError if it is missing or unreadable."""
        ...


class FolderSource:
    """Images stored as `<root>/<id>.jpg|.jpeg|.png` (suffix case ignored).

    `read_bytes` refuses an id that would leave `root` (an absolute path, a drive, or a `..`
    part) with EmbedError naming it, and raises EmbedError when no file exists for the id.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EmbedError(f"image folder {str(self.root)!r} does not exist or is not a folder")

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"

    def ids(self) -> list[str]:
        """Sorted stems of the image files directly in `root`.

        Raises EmbedError when one id has several files (`a.jpg` and `a.png`): which one is
        meant is ambiguous.
        """
        found: dict[str, list[str]] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.setdefault(stem, []).append(entry.name)
        clashes = {k: v for k, v in found.items() if len(v) > 1}
        if clashes:
            first = sorted(clashes)[:3]
            detail = "; ".join(f"{k}: {sorted(clashes[k])}" for k in first)
            raise EmbedError(
                f"{len(clashes)} image ids in {str(self.root)!r} have more than one file "
                f"({detail}); keep one file per id"
            )
        return sorted(found)

    def _check_id(self, image_id: str) -> None:
        if not isinstance(image_id, str) or not image_id or "\x00" in image_id:
            raise EmbedError(f"image id {image_id!r} is not a usable file name")
        posix, windows = PurePosixPath(image_id), PureWindowsPath(image_id)
        if (
            posix.is_absolute()
            or windows.is_absolute()
            or windows.drive
            or image_id.startswith(("/", "\\"))
            or ".." in posix.parts
            or ".." in windows.parts
        ):
            raise EmbedError(
                f"image id {image_id!r} would read outside the image folder "
                f"{str(self.root)!r}; ids must be file names inside it"
            )

    def path_of(self, image_id: str) -> Path:
        """The file holding `image_id`; raises EmbedError if the id escapes root or is absent."""
        self._check_id(image_id)
        for suffix in IMAGE_SUFFIXES:
            for variant in (suffix, suffix.upper()):
                candidate = self.root / f"{image_id}{variant}"
                if candidate.is_file():
                    return candidate
        raise EmbedError(
            f"image {image_id!r} not found in {str(self.root)!r} "
            f"(looked for {image_id}.jpg, .jpeg, .png)"
        )

    def read_bytes(self, image_id: str) -> bytes:
        path = self.path_of(image_id)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise EmbedError(f"image {image_id!r}: cannot read {str(path)!r}: {exc}") from exc


class HDF5Source:
    """Images stored in an HDF5 file as datasets keyed by id holding the encoded bytes.

    This is the ISIC 2024 Kaggle `train-image.hdf5` layout (each key a scalar fixed-length
    byte string); 1-D uint8 datasets are accepted as well. The file is opened read-only on first
    use in each process (a handle opened before a fork is reopened in the child).
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise EmbedError(f"HDF5 image file {str(self.path)!r} does not exist")
        self._file = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"HDF5Source({str(self.path)!r})"

    def __getstate__(self) -> dict:
        # An open h5py handle cannot be pickled nor shared across processes.
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def _handle(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise EmbedError(f"cannot open HDF5 image file {str(self.path)!r}: {exc}") from exc
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None

    def ids(self) -> list[str]:
        """Sorted keys of the file's top-level datasets."""
        import h5py

        f = self._handle()
        return sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset))

    def read_bytes(self, image_id: str) -> bytes:
        import h5py

        if not isinstance(image_id, str) or not image_id or "/" in image_id:
            raise EmbedError(f"image id {image_id!r} is not a valid HDF5 key in {str(self.path)!r}")
        f = self._handle()
        node = f.get(image_id)
        if not isinstance(node, h5py.Dataset):
            raise EmbedError(f"image {image_id!r} not found in {str(self.path)!r}")
        try:
            if node.shape == () and node.dtype.kind == "S":
                # Read the raw fixed-length string: node[()] would strip trailing NUL bytes.
                buf = np.empty((), dtype=node.dtype)
                node.read_direct(buf)
                return buf.tobytes()
            value = node[()]
            if isinstance(value, bytes):
                return bytes(value)
            return np.asarray(value).tobytes()
        except (OSError, TypeError, ValueError) as exc:
            raise EmbedError(
                f"image {image_id!r}: cannot read from {str(self.path)!r}: {exc}"
            ) from exc


def open_source(path: Path | str) -> ImageSource:
    """A FolderSource for a folder, an HDF5Source for a `.h5/.hdf5/.hdf` file.

    Raises EmbedError when the path does not exist or is a file of another kind.
    """
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        if path.suffix.lower() in HDF5_SUFFIXES:
            return HDF5Source(path)
        raise EmbedError(
            f"images path {str(path)!r} is a file but not HDF5 (expected a folder of "
            f"<id>.jpg|.jpeg|.png or a file ending in {', '.join(HDF5_SUFFIXES)})"
        )
    raise EmbedError(f"images path {str(path)!r} does not exist")


def _to_rgb(im: Image.Image, image_id: str) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        # Palette images may carry transparency in their info; go through RGBA to honour it.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("L", "RGB") and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit modes span 0..65535. Wide integer or float images whose values all fit 0..255
        # hold 8-bit data; otherwise they are taken as 16-bit data.
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise EmbedError(f"image {image_id!r}: cannot convert mode {mode!r} to RGB: {exc}") from exc


def _reason(exc: Exception) -> str:
    reason = str(exc) or type(exc).__name__
    if "truncated" in reason.lower():
        return f"truncated file ({reason})"
    return reason


def decode_image(
    data: bytes, image_id: str, max_pixels: int, *, draft_size: int | None = None
) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image.

    Greyscale, palette, CMYK and 16-bit images are converted to 8-bit RGB (16-bit values are
    scaled by 1/257); transparency is composited on black (`ALPHA_BACKGROUND`); EXIF orientation
    is applied. `draft_size` lets JPEG decoding scale down by a power of two while keeping both
    sides at least `draft_size` (much faster for large photos; no effect on small ones).

    Raises EmbedError naming `image_id` and the reason for zero-byte, truncated or non-image
    data, and for images of more than `max_pixels` pixels (refused before decoding, as a
    possible decompression bomb).
    """
    if not data:
        raise EmbedError(f"image {image_id!r}: empty file (0 bytes)")
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces PIL's global limit; its warning would only
        # be noise and its error is turned into ours.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise EmbedError(
                f"image {image_id!r}: refused as a possible decompression bomb ({exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise EmbedError(
                f"image {image_id!r}: not a readable image (format not recognised, "
                f"{len(data)} bytes starting {data[:8]!r})"
            ) from exc
        except Exception as exc:  # PIL raises many types for bad data
            raise EmbedError(f"image {image_id!r}: not a readable image ({_reason(exc)})") from exc
        width, height = im.size
        if width * height > max_pixels:
            raise EmbedError(
                f"image {image_id!r}: {width}x{height} = {width * height} pixels exceeds "
                f"max_pixels={max_pixels}; refused as a possible decompression bomb"
            )
        if width == 0 or height == 0:
            raise EmbedError(f"image {image_id!r}: has zero size {width}x{height}")
        try:
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: show it as viewers do
                im = ImageOps.exif_transpose(im)
            return _to_rgb(im, image_id)
        except EmbedError:
            raise
        except Exception as exc:
            raise EmbedError(f"image {image_id!r}: cannot decode: {_reason(exc)}") from exc
