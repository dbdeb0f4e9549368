"""Image sources (a folder of files, or an HDF5 file of encoded images) and safe decoding.

A source maps an image id to the encoded bytes of that image; `decode_image` turns the bytes
into an RGB PIL image or raises `EmbedError` naming the id and the reason; `repeated_ids` lists
the ids a caller passed more than once. Sources are picklable
so that DataLoader worker processes can each hold their own copy: `HDF5Source` opens its file
lazily in the process that reads it, because an h5py handle must not cross a fork.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embed.errors import EmbedError

__all__ = [
    "ALPHA_BACKGROUND",
    "HDF5_SUFFIXES",
    "IMAGE_SUFFIXES",
    "FolderSource",
    "HDF5Source",
    "ImageSource",
    "decode_image",
    "open_source",
    "repeated_ids",
    "safe_reason",
]


log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".hdf")

# Letters, digits, "_", "-" and inner dots: a name that cannot be a path leaving a folder.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")

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

    def fingerprints(self, ids: Iterable[str]) -> dict[str, str]:
        """{id: a cheap fingerprint of its image now} for the ids the source holds; a changed
        image gets another fingerprint (see FINGERPRINT)."""
        ...


class FolderSource:
    """Images stored as `<root>/<id>.jpg|.jpeg|.png` (suffix case ignored).

    `read_bytes` refuses an id that would leave `root` (an absolute path, a drive, or a `..`
    part) with EmbedError naming it, and raises EmbedError when no file exists for the id.
    A symlink is read only when it resolves to a file inside `root`: a link to anything else
    (a system file, another data set) is an EmbedError, so the run lists that id as failed.
    """

    # What `fingerprints` looks at: the file's size and the CRC-32 of its bytes (the modification
    # time is kept too, for stores written before, which are compared by size and time; see
    # `embed.store.image_changed`). Size and time alone missed an image replaced by one of the
    # same size and time (`cp -p`, `rsync -t`, a restore). Reading every file costs more than
    # a stat: on the 8,034 HAM10000 images (43 MB, page cache warm, loaded 2-core EPYC) 0.44 s
    # against 0.11 s (4.2x; blake2b 0.69 s, 6.5x), small beside the seconds embedding them takes.
    # A copy that does not keep times (`cp` without -p) is no longer counted as a change.
    FINGERPRINT = "file size and CRC-32 of its bytes"

    def __init__(self, root: Path | str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EmbedError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        self._real_root = self.root.resolve()

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
        if isinstance(image_id, str) and _PLAIN_NAME.fullmatch(image_id):
            return  # a plain file name (most ids): nothing that could leave the folder
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

    def _find(self, image_id: str) -> tuple[Path, os.stat_result]:
        """The file holding `image_id` and its stat (symlinks followed)."""
        self._check_id(image_id)
        base = os.path.join(self.root, image_id)  # strings, not Paths: this runs once per id
        for suffix in IMAGE_SUFFIXES:
            for variant in (suffix, suffix.upper()):
                try:
                    info = os.stat(base + variant)
                except (OSError, ValueError):
                    continue
                if stat.S_ISREG(info.st_mode):
                    return Path(base + variant), info
        raise EmbedError(
            f"image {image_id!r} not found in {str(self.root)!r} "
            f"(looked for {image_id}.jpg, .jpeg, .png)"
        )

    def path_of(self, image_id: str) -> Path:
        """The file holding `image_id`; raises EmbedError if the id escapes root or is absent."""
        return self._find(image_id)[0]

    def _inside(self, path: Path, image_id: str) -> Path:
        """`path` with symlinks resolved; EmbedError unless that is inside the image folder."""
        real = path.resolve()
        if not real.is_relative_to(self._real_root):
            raise EmbedError(
                f"image {image_id!r}: symlink points outside the image folder "
                f"{str(self.root)!r} ({str(path)!r}); only links to files inside it are read"
            )
        return real

    def read_bytes(self, image_id: str) -> bytes:
        return self._read(image_id)[0]

    def _read(self, image_id: str) -> tuple[bytes, os.stat_result]:
        """The file's bytes and its stat, taken from the one open file (so they agree)."""
        path = self.path_of(image_id)
        real = self._inside(path, image_id)
        try:
            # O_NOFOLLOW: the checked file itself, not a link swapped in after the check.
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                return f.read(), os.fstat(f.fileno())
        except OSError as exc:
            raise EmbedError(f"image {image_id!r}: cannot read {str(path)!r}: {exc}") from exc

    def fingerprints(self, ids: Iterable[str]) -> dict[str, str]:
        """{id: "file:<size>:<mtime_ns>:<crc32>"} for the ids that have a readable file (others
        are left out); the CRC-32 is of the bytes `read_bytes` returns."""
        out = {}
        for image_id in ids:
            try:
                data, info = self._read(image_id)
            except EmbedError:
                continue
            out[image_id] = f"file:{len(data)}:{info.st_mtime_ns}:{zlib.crc32(data):08x}"
        return out


class HDF5Source:
    """Images stored in an HDF5 file as datasets keyed by id holding the encoded bytes.

    This is the ISIC 2024 Kaggle `train-image.hdf5` layout (each key a scalar fixed-length
    byte string); 1-D uint8 datasets are accepted as well. The file is opened read-only on first
    use in each process (a handle opened before a fork is reopened in the child).
    """

    # What `fingerprints` looks at. Opening each key's dataset costs most, and length alone
    # needs it too; reading the bytes at the dataset's file offset and a CRC-32 add about 70%
    # (401,059 ISIC-sized crops, 1.1 GB: 11.7 s of CPU against 7.0 s for length alone, one
    # core), seconds beside the ~2 h of embedding them on a CPU, and they catch same-length
    # changes such as a flipped EXIF orientation tag (a rotation that keeps every byte count).
    FINGERPRINT = "encoded size and CRC-32 of the encoded bytes"

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

    def fingerprints(self, ids: Iterable[str]) -> dict[str, str]:
        """{id: "h5:<length>:<crc32>"} of the encoded bytes `read_bytes` returns, for the ids
        the file holds (others are left out)."""
        f = self._handle()
        out = {}
        direct: bool | None = None  # whether file offsets give what h5py reads; checked once
        with open(self.path, "rb", buffering=0) as raw:
            for image_id in ids:
                dsid = _dataset_id(f, image_id)
                if dsid is None:
                    continue
                data = _raw_bytes(dsid, raw) if direct is not False else None
                if data is not None and direct is None:
                    direct = data == self._read_or_none(image_id)
                if data is None or not direct:
                    data = self._read_or_none(image_id)
                if data is not None:
                    out[image_id] = f"h5:{len(data)}:{zlib.crc32(data):08x}"
        return out

    def _read_or_none(self, image_id: str) -> bytes | None:
        try:
            return self.read_bytes(image_id)
        except EmbedError:
            return None


def _dataset_id(f, image_id):
    """The low-level dataset id of key `image_id`, or None when there is no such dataset."""
    import h5py

    if not isinstance(image_id, str) or not image_id or "/" in image_id:
        return None
    try:
        return h5py.h5d.open(f.id, image_id.encode())
    except (KeyError, ValueError, TypeError, OSError):
        return None


def _raw_bytes(dsid, raw) -> bytes | None:
    """A contiguous dataset's stored bytes read at its file offset, skipping h5py's read path
    (the per-key cost of fingerprinting); None when they are not where the offset says."""
    import h5py

    offset = dsid.get_offset()  # None for chunked (so compressed) and compact datasets
    if offset is None:
        return None
    tid = dsid.get_type()
    kind = tid.get_class()
    # Fixed-length strings and single bytes are stored as they read; a variable-length string
    # is stored as a reference to a heap, wider integers perhaps in another byte order.
    one_byte = kind == h5py.h5t.INTEGER and tid.get_size() == 1
    if not (one_byte or (kind == h5py.h5t.STRING and not tid.is_variable_str())):
        return None
    size = dsid.get_storage_size()
    data = os.pread(raw.fileno(), size, offset)
    return data if len(data) == size else None


def repeated_ids(ids: Iterable[str]) -> list[str]:
    """Each id of `ids` that was seen before, in the order given (an id there three times is
    listed twice); [] when every id is there once."""
    seen: set[str] = set()
    repeats = []
    for image_id in ids:
        if image_id in seen:
            repeats.append(image_id)
        seen.add(image_id)
    return repeats


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


# A bytes literal as Python prints it (b'...' or b"..."): how decoders quote file content.
_BYTES_LITERAL = re.compile(r"""(?<!\w)b(['"])(?:\\.|(?!\1).)*\1""")
_MAX_REASON = 200


def safe_reason(exc: BaseException) -> str:
    """An exception's message fit for a failure report: the bytes literals a decoder may quote
    from the file are replaced by <bytes>, and the text is cut at 200 characters, so a file's
    content (a system file behind a link, say) never reaches logs, manifests or outputs."""
    reason = _BYTES_LITERAL.sub("<bytes>", str(exc)) or type(exc).__name__
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
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
            im: Image.Image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise EmbedError(
                f"image {image_id!r}: refused as a possible decompression bomb ({exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            # The size only: quoting the first bytes would copy file content into the message.
            raise EmbedError(
                f"image {image_id!r}: not a readable image (format not recognised, "
                f"{len(data)} bytes)"
            ) from exc
        except Exception as exc:  # PIL raises many types for bad data
            raise EmbedError(
                f"image {image_id!r}: not a readable image ({safe_reason(exc)})"
            ) from exc
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
            raise EmbedError(f"image {image_id!r}: cannot decode: {safe_reason(exc)}") from exc
