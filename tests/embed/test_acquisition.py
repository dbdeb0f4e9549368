"""Acquisition cues: measured the same from a folder and from HDF5, each cue moving the way its
definition says (dark corners, blur, size, EXIF rotation), unreadable images listed, not fatal."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from PIL import Image, ImageFilter

from embed.acquisition import (
    CUE_NAMES,
    CUES_VERSION,
    acquisition_cues,
    cues_of_bytes,
)
from embed.errors import EmbedError
from embed.sources import FolderSource, HDF5Source


def _skin(width: int, height: int, seed: int = 0) -> Image.Image:
    """A textured, skin-coloured image with a darker lesion in the middle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.array([200, 150, 130], dtype=float) + rng.normal(0, 12, size=(height, width, 3))
    lesion = ((xx - width / 2) ** 2 + (yy - height / 2) ** 2) < (min(width, height) / 5) ** 2
    base[lesion] = [110, 70, 50]
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _dermoscopy(width: int, height: int) -> Image.Image:
    """The same with the dark circular rim of a dermoscope."""
    arr = np.asarray(_skin(width, height)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot((xx + 0.5) / width * 2 - 1, (yy + 0.5) / height * 2 - 1)
    arr[r > 1.0] = 0
    return Image.fromarray(arr)


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def _cues(data: bytes) -> dict:
    return dict(zip(CUE_NAMES, cues_of_bytes(data, "x"), strict=True))


def test_size_aspect_and_bytes_per_pixel_come_from_the_file():
    data = _jpeg(_skin(200, 150))
    cues = _cues(data)
    assert (cues["width"], cues["height"]) == (200, 150)
    assert cues["log_pixels"] == pytest.approx(np.log(200 * 150))
    assert cues["log_aspect"] == pytest.approx(np.log(200 / 150))
    assert cues["bytes_per_pixel"] == pytest.approx(len(data) / (200 * 150))


def test_exif_rotation_swaps_the_sides_as_a_viewer_shows_them():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    cues = _cues(_jpeg(_skin(200, 150), exif=exif.tobytes()))
    assert (cues["width"], cues["height"]) == (150, 200)


def test_dark_dermoscope_corners_raise_vignetting_and_dark_corners():
    plain, scope = _cues(_jpeg(_skin(200, 150))), _cues(_jpeg(_dermoscopy(200, 150)))
    assert scope["dark_corners"] > 0.9 and plain["dark_corners"] < 0.05
    assert scope["vignetting"] > plain["vignetting"] + 0.3


def test_blur_lowers_sharpness_and_colour_is_measured_in_lab():
    sharp = _skin(160, 160)
    soft = sharp.filter(ImageFilter.GaussianBlur(3))
    assert _cues(_jpeg(soft))["sharpness"] < _cues(_jpeg(sharp))["sharpness"] - 1.0
    grey = _cues(_jpeg(Image.new("RGB", (64, 64), (128, 128, 128))))
    assert abs(grey["a_mean"]) < 1.0 and abs(grey["b_mean"]) < 1.0 and grey["saturation"] < 0.02
    assert grey["L_mean"] == pytest.approx(53.6, abs=1.0)  # CIELAB L* of sRGB 128 grey


def test_folder_and_hdf5_give_the_same_cues_and_unreadable_images_are_listed(tmp_path):
    images = {f"img{i}": _jpeg(_skin(120 + 10 * i, 100, seed=i)) for i in range(70)}
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, data in images.items():
        (folder / f"{image_id}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not an image")
    with h5py.File(tmp_path / "images.hdf5", "w") as f:
        for image_id, data in images.items():
            f[image_id] = np.void(data)
    ids = ["broken", *images]
    from_folder = acquisition_cues(FolderSource(folder), ids)
    source = HDF5Source(tmp_path / "images.hdf5")
    from_hdf5 = acquisition_cues(source, list(images), batch_size=16)
    source.close()
    assert from_folder.version == CUES_VERSION
    assert list(from_folder.frame.index) == ids and list(from_folder.frame.columns) == list(
        CUE_NAMES
    )
    assert set(from_folder.failures) == {"broken"}
    assert "broken" in from_folder.failures["broken"]
    assert from_folder.frame.loc["broken"].isna().all()
    np.testing.assert_allclose(
        from_folder.frame.loc[list(images)].to_numpy(), from_hdf5.frame.to_numpy()
    )
    assert from_hdf5.frame["width"].tolist() == [120 + 10 * i for i in range(70)]
    assert from_hdf5.images_per_s > 0


def test_errors_name_the_image_and_repeated_ids_are_refused(tmp_path):
    with pytest.raises(EmbedError, match="image 'x': empty file"):
        cues_of_bytes(b"", "x")
    with pytest.raises(EmbedError, match="image 'big'.*exceeds max_pixels=100"):
        cues_of_bytes(_jpeg(_skin(20, 20)), "big", max_pixels=100)
    (tmp_path / "a.jpg").write_bytes(_jpeg(_skin(20, 20)))
    with pytest.raises(EmbedError, match=r"ids repeat \['a'\]"):
        acquisition_cues(FolderSource(tmp_path), ["a", "a"])


def test_real_ham10000_and_isic2024_crops_differ_in_size_and_vignetting(shared_data):
    ham = acquisition_cues(
        FolderSource(shared_data / "ham10000" / "images"),
        FolderSource(shared_data / "ham10000" / "images").ids()[:40],
    )
    source = HDF5Source(shared_data / "isic2024-mini" / "train-image.hdf5")
    crops = acquisition_cues(source)
    source.close()
    assert not ham.failures and not crops.failures and len(crops.frame) == 51
    assert (ham.frame["width"] == 200).all() and (ham.frame["height"] == 150).all()
    assert (crops.frame["width"] == crops.frame["height"]).all()  # square crops
    assert (crops.frame["width"] < 200).all()
