"""Image sources and decoding: real ISIC 2024 / HAM10000 files, and every kind of bad image."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from storetools import DATA, HAM_IMAGES, ISIC_MINI, jpeg_bytes, write_hdf5

from embed.errors import EmbedError
from embed.sources import (
    FolderSource,
    HDF5Source,
    ImageSource,
    decode_image,
    open_source,
    safe_reason,
)
from embed.store import fingerprinted_by_time, image_changed

MAX = 50_000_000


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


# ----------------------------------------------------------------------------- real data


@needs_data
def test_hdf5_source_reads_isic2024_mini():
    src = open_source(ISIC_MINI)
    assert isinstance(src, HDF5Source) and isinstance(src, ImageSource)
    ids = src.ids()
    assert len(ids) == 51 and ids == sorted(ids) and ids[0].startswith("ISIC_")
    for image_id in ids[:3]:
        im = decode_image(src.read_bytes(image_id), image_id, MAX)
        assert im.mode == "RGB"
        assert 89 <= im.size[0] <= 171 and im.size[0] == im.size[1]
    # A pickled copy (what a DataLoader worker gets) reopens the file lazily.
    clone = pickle.loads(pickle.dumps(src))
    assert clone._file is None
    assert clone.read_bytes(ids[0]) == src.read_bytes(ids[0])
    src.close()


@needs_data
def test_folder_source_reads_ham10000_subset():
    src = open_source(HAM_IMAGES)
    assert isinstance(src, FolderSource)
    wanted = ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308"]
    for image_id in wanted:
        im = decode_image(src.read_bytes(image_id), image_id, MAX)
        assert im.mode == "RGB" and im.size == (200, 150)
    assert pickle.loads(pickle.dumps(src)).read_bytes(wanted[0]) == src.read_bytes(wanted[0])


# ----------------------------------------------------------------------------- folder source


def test_folder_ids_and_suffixes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "b.JPEG").write_bytes(jpeg_bytes(1))
    (tmp_path / "c.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    src = FolderSource(tmp_path)
    assert src.ids() == ["a", "b", "c"]
    assert src.read_bytes("b") == (tmp_path / "b.JPEG").read_bytes()


def test_folder_refuses_ambiguous_ids(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "a.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    with pytest.raises(
        EmbedError, match=r"1 image ids .* more than one file \(a: \['a.jpg', 'a.png'\]\)"
    ):
        FolderSource(tmp_path).ids()


@pytest.mark.parametrize(
    "bad_id", ["../x", "a/../../x", "/etc/passwd", "..", "C:\\x", "\\\\server\\x"]
)
def test_folder_refuses_ids_escaping_the_folder(tmp_path, bad_id):
    (tmp_path / "img").mkdir()
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(0))
    src = FolderSource(tmp_path / "img")
    with pytest.raises(EmbedError, match=r"image id .* would read outside the image folder"):
        src.read_bytes(bad_id)


def test_folder_missing_id_and_folder(tmp_path):
    with pytest.raises(
        EmbedError, match=r"image 'nope' not found in .* \(looked for nope.jpg, .jpeg, .png\)"
    ):
        FolderSource(tmp_path).read_bytes("nope")
    with pytest.raises(EmbedError, match=r"image id '' is not a usable file name"):
        FolderSource(tmp_path).read_bytes("")
    with pytest.raises(
        EmbedError, match=r"image folder .*absent.* does not exist or is not a folder"
    ):
        FolderSource(tmp_path / "absent")


def test_folder_fingerprints_follow_the_content_not_the_time(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "b.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    src = FolderSource(tmp_path)
    first = src.fingerprints(["a", "b", "gone", "../x"])
    assert set(first) == {"a", "b"}  # ids without a file (or outside the folder) are left out
    info = os.stat(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    assert first["a"] == f"file:{info.st_size}:{info.st_mtime_ns}:{zlib.crc32(data):08x}"
    assert src.fingerprints(["a", "b"]) == first
    # Replaced by another image of the same size, with the old time put back (`cp -p`, a restore).
    (tmp_path / "a.jpg").write_bytes(data[::-1])
    os.utime(tmp_path / "a.jpg", ns=(info.st_atime_ns, info.st_mtime_ns))
    assert image_changed(first["a"], src.fingerprints(["a"])["a"])
    # The same bytes with a new time (a copy without -p): the same image.
    (tmp_path / "a.jpg").write_bytes(data)
    os.utime(tmp_path / "a.jpg", ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))
    assert not image_changed(first["a"], src.fingerprints(["a"])["a"])
    assert src.fingerprints(["b"]) == {"b": first["b"]}


def test_fingerprints_stored_before_the_content_was_recorded_compare_as_they_did(tmp_path):
    """A store written before: "file:<size>:<mtime_ns>", compared by size and time."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    info = os.stat(tmp_path / "a.jpg")
    older = f"file:{info.st_size}:{info.st_mtime_ns}"
    now = FolderSource(tmp_path).fingerprints(["a"])["a"]
    assert not image_changed(older, now)
    assert image_changed(f"file:{info.st_size}:{info.st_mtime_ns + 1}", now)
    assert image_changed(f"file:{info.st_size + 1}:{info.st_mtime_ns}", now)
    assert not image_changed(None, now) and not image_changed(older, None)
    assert fingerprinted_by_time(older) and not fingerprinted_by_time(now)
    assert not fingerprinted_by_time(None) and not fingerprinted_by_time("h5:10:0000abcd")
    assert image_changed("h5:10:0000abcd", "h5:10:0000abce") and not image_changed(
        "h5:1:ff", "h5:1:ff"
    )


def test_folder_reads_symlinks_inside_the_folder_only(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "real.jpg").write_bytes(jpeg_bytes(0))
    (root / "sub").mkdir()
    (root / "sub" / "deep.jpg").write_bytes(jpeg_bytes(1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(jpeg_bytes(2))
    (root / "alias.jpg").symlink_to(root / "real.jpg")
    (root / "relative.jpg").symlink_to("sub/deep.jpg")
    (root / "escape.jpg").symlink_to(outside / "private.jpg")
    (root / "climb.jpg").symlink_to("../outside/private.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    src = FolderSource(root)
    assert src.read_bytes("alias") == jpeg_bytes(0)
    assert src.read_bytes("relative") == jpeg_bytes(1)
    for image_id in ("escape", "climb", "linked/private"):
        with pytest.raises(
            EmbedError,
            match=rf"image '{image_id}': symlink points outside the image folder .*images.* "
            rf"\(.*{image_id}.jpg'\); only links to files inside it are read",
        ):
            src.read_bytes(image_id)
    # A folder reached through a link is fine: what counts is where the files really are.
    (tmp_path / "via").symlink_to(root, target_is_directory=True)
    assert FolderSource(tmp_path / "via").read_bytes("alias") == jpeg_bytes(0)


# ----------------------------------------------------------------------------- HDF5 source


def test_hdf5_missing_and_bad_keys(tmp_path):
    path = tmp_path / "images.hdf5"
    write_hdf5(path, 2)
    src = HDF5Source(path)
    assert src.ids() == ["img_000", "img_001"]
    with pytest.raises(EmbedError, match=r"image 'nope' not found in .*images.hdf5"):
        src.read_bytes("nope")
    with pytest.raises(EmbedError, match=r"image id 'a/b' is not a valid HDF5 key"):
        src.read_bytes("a/b")
    with pytest.raises(EmbedError, match=r"HDF5 image file .*absent.h5.* does not exist"):
        HDF5Source(tmp_path / "absent.h5")


def test_hdf5_keeps_trailing_zero_bytes_and_uint8_arrays(tmp_path):
    import h5py

    path = tmp_path / "x.h5"
    payload = b"\x01\x02\x00\x00"
    with h5py.File(path, "w") as f:
        f.create_dataset("fixed", data=np.bytes_(payload))
        f.create_dataset("array", data=np.frombuffer(payload, dtype=np.uint8))
    src = HDF5Source(path)
    assert src.read_bytes("fixed") == payload
    assert src.read_bytes("array") == payload


def test_hdf5_fingerprints_are_length_and_crc_of_what_read_bytes_returns(tmp_path):
    import h5py

    path = tmp_path / "images.hdf5"
    ids = write_hdf5(path, 3, extra={"empty": b""})
    with h5py.File(path, "a") as f:
        # Layouts whose bytes are not at one file offset: read through h5py instead.
        f.create_dataset("chunked", data=np.frombuffer(jpeg_bytes(7), np.uint8), chunks=(64,))
        f.create_dataset(
            "compressed", data=np.frombuffer(jpeg_bytes(8), np.uint8), compression="gzip"
        )
        f.create_group("group")
    src = HDF5Source(path)
    keys = [*ids, "empty", "chunked", "compressed"]
    found = src.fingerprints([*keys, "group", "absent", "a/b", ""])
    assert list(found) == keys
    for key in keys:
        data = src.read_bytes(key)
        assert found[key] == f"h5:{len(data)}:{zlib.crc32(data):08x}"
    # The same length with other bytes (a flipped EXIF orientation tag, say) is a change.
    data = bytearray(src.read_bytes("img_001"))
    src.close()
    data[-3] ^= 0xFF
    with h5py.File(path, "a") as f:
        del f["img_001"]
        f.create_dataset("img_001", data=np.bytes_(bytes(data)))
    again = HDF5Source(path).fingerprints(keys)
    assert [k for k in keys if again[k] != found[k]] == ["img_001"]


def test_open_source_refuses_other_paths(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(EmbedError, match=r"images path .*table.csv.* is a file but not HDF5"):
        open_source(tmp_path / "table.csv")
    with pytest.raises(EmbedError, match=r"images path .*nowhere.* does not exist"):
        open_source(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- bad images


def test_zero_byte_image():
    with pytest.raises(EmbedError, match=r"image 'z': empty file \(0 bytes\)"):
        decode_image(b"", "z", MAX)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.05])  # cut in the scan data, or in the header
def test_truncated_jpeg(keep):
    data = jpeg_bytes(3, (64, 64))
    with pytest.raises(
        EmbedError, match=r"image 't': (cannot decode: |not a readable image \()truncated file"
    ):
        decode_image(data[: int(len(data) * keep)], "t", MAX)


def test_text_file_is_not_an_image():
    with pytest.raises(
        EmbedError, match=r"image 'txt': not a readable image \(format not recognised, 19 bytes\)$"
    ):
        decode_image(b"id,target\nISIC_1,0\n", "txt", MAX)


def test_error_messages_never_quote_the_file_content():
    secret = b"root:x:0:0:SECRET-TOKEN:/root:/bin/bash\n"
    with pytest.raises(EmbedError) as info:
        decode_image(secret, "passwd", MAX)
    assert "root:x" not in str(info.value) and "SECRET" not in str(info.value)
    # What decoders may put in their own messages: bytes literals are masked, length capped.
    reason = safe_reason(SyntaxError("broken PNG file (chunk b'SECR')" + " x" * 300))
    assert reason.startswith("broken PNG file (chunk <bytes>) x x") and "SECR" not in reason
    assert len(reason) == 203 and reason.endswith("...")
    assert safe_reason(OSError("image file is truncated")) == (
        "truncated file (image file is truncated)"
    )
    assert safe_reason(ValueError()) == "ValueError"


def test_too_many_pixels_is_refused_before_decoding():
    data = _png(Image.new("RGB", (100, 80)))
    with pytest.raises(
        EmbedError,
        match=r"image 'big': 100x80 = 8000 pixels exceeds max_pixels=5000; refused as a possible "
        r"decompression bomb",
    ):
        decode_image(data, "big", 5000)
    assert decode_image(data, "big", 8000).size == (100, 80)


def test_pil_own_bomb_limit_becomes_our_error_not_a_warning(monkeypatch):
    data = _png(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL errors above 2x this
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            EmbedError, match=r"image 'b': refused as a possible decompression bomb"
        ):
            decode_image(data, "b", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # PIL would only warn here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, "w", 10**9).size == (100, 100)


# ----------------------------------------------------------------------------- modes -> RGB


def test_greyscale_to_rgb():
    grey = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8), mode="L")
    im = decode_image(_png(grey), "g", MAX)
    arr = np.asarray(im)
    assert (
        im.mode == "RGB"
        and (arr[..., 0] == arr[..., 1]).all()
        and (arr[..., 0] == arr[..., 2]).all()
    )
    assert arr[1, 0, 0] == 200


def test_rgba_composited_on_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red -> background
    rgba[0, 1] = (200, 100, 50, 255)  # opaque -> unchanged
    rgba[1, 0] = (200, 200, 200, 128)  # half -> about half
    rgba[1, 1] = (10, 20, 30, 255)
    arr = np.asarray(decode_image(_png(Image.fromarray(rgba, mode="RGBA")), "a", MAX))
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[0, 1]) == (200, 100, 50)
    assert all(abs(int(v) - 100) <= 1 for v in arr[1, 0])


def test_greyscale_with_alpha():
    la = Image.fromarray(np.array([[[255, 0], [255, 255]]], dtype=np.uint8), mode="LA")
    arr = np.asarray(decode_image(_png(la), "la", MAX))
    assert tuple(arr[0, 0]) == (0, 0, 0) and tuple(arr[0, 1]) == (255, 255, 255)


def test_palette_and_palette_with_transparency():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    arr = np.asarray(decode_image(_png(pal), "p", MAX))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 1]) == (0, 0, 255)
    arr = np.asarray(decode_image(_png(pal, transparency=0), "pt", MAX))
    assert tuple(arr[0, 0]) == (0, 0, 0) and tuple(arr[0, 1]) == (0, 0, 255)


def test_cmyk_jpeg():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    im = decode_image(buf.getvalue(), "cmyk", MAX)
    r, g, b = np.asarray(im)[4, 4]
    assert im.mode == "RGB" and r > 230 and g < 25 and b < 25  # cyan-free, magenta+yellow = red


def test_sixteen_bit_png_is_scaled_not_clipped():
    arr16 = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    data = _png(Image.fromarray(arr16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(decode_image(data, "16", MAX))[..., 0]
    assert out.tolist() == [[0, 100], [255, 200]]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0, 100], [200, 255]], [[0, 100], [200, 255]]),
        ([[0, 25700], [65535, 51400]], [[0, 100], [255, 200]]),
    ],
)
def test_32_bit_integer_images(values, expected):
    buf = io.BytesIO()
    Image.fromarray(np.array(values, dtype=np.int32), mode="I").save(buf, format="TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    out = np.asarray(decode_image(buf.getvalue(), "i32", MAX))[..., 0]
    assert out.tolist() == expected


def test_exif_orientation_is_applied():
    im = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), "exif", MAX).size == (10, 20)


def test_jpeg_draft_decodes_large_photos_smaller_but_not_below_target():
    data = jpeg_bytes(1, (800, 600))
    assert decode_image(data, "full", MAX).size == (800, 600)
    w, h = decode_image(data, "draft", MAX, draft_size=64).size
    assert (w, h) == (100, 75) and min(w, h) >= 64
    small = jpeg_bytes(1, (120, 100))
    assert decode_image(small, "small", MAX, draft_size=224).size == (120, 100)
