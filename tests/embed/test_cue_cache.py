"""The acquisition cue cache beside a feature store: measured once, reused while the image's
fingerprint holds, measured again when it changes, never trusted across cue versions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embed import cue_cache
from embed.acquisition import CUE_NAMES
from embed.cue_cache import CUE_CACHE, cached_cues
from embed.errors import EmbedError
from embed.sources import FolderSource


def _folder(tmp_path, n: int = 4):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(40 + 8 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.jpg")
    return folder


def _counting(monkeypatch) -> list[list[str]]:
    """Record which ids `acquisition_cues` is asked to measure."""
    asked: list[list[str]] = []
    measure = cue_cache.acquisition_cues

    def spy(source, ids, **kwargs):
        asked.append(list(ids))
        return measure(source, ids, **kwargs)

    monkeypatch.setattr(cue_cache, "acquisition_cues", spy)
    return asked


def test_cues_are_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    source = FolderSource(_folder(tmp_path))
    ids = ["img0", "img1", "img2", "img3"]
    prints = {i: f"fp-{i}" for i in ids}
    asked = _counting(monkeypatch)
    first = cached_cues(tmp_path, source, ids, prints)
    assert (tmp_path / CUE_CACHE).is_file() and asked == [ids]
    again = cached_cues(tmp_path, source, list(reversed(ids)), prints)
    assert asked == [ids] and again.seconds == 0  # nothing measured the second time
    np.testing.assert_array_equal(again.frame.loc[ids].to_numpy(), first.frame.loc[ids].to_numpy())
    assert list(again.frame.columns) == list(CUE_NAMES)


def test_a_changed_fingerprint_or_a_new_id_is_measured_again(tmp_path, monkeypatch):
    source = FolderSource(_folder(tmp_path))
    prints = {"img0": "a", "img1": "b"}
    cached_cues(tmp_path, source, ["img0", "img1"], prints)
    asked = _counting(monkeypatch)
    cached_cues(tmp_path, source, ["img0", "img1", "img2"], {**prints, "img1": "b2"})
    assert asked == [["img1", "img2"]]


def test_unreadable_images_are_not_cached_and_a_missing_source_gives_nan(tmp_path, monkeypatch):
    folder = _folder(tmp_path, 2)
    (folder / "broken.jpg").write_bytes(b"not an image")
    source = FolderSource(folder)
    table = cached_cues(tmp_path, source, ["img0", "broken"], {})
    assert "broken" in table.failures and np.isnan(table.frame.loc["broken"]).all()
    asked = _counting(monkeypatch)
    cached_cues(tmp_path, source, ["img0", "broken"], {})
    assert asked == [["broken"]]  # tried again, the readable one reused
    without = cached_cues(tmp_path, None, ["img0", "img1"], {})
    assert (
        np.isfinite(without.frame.loc["img0"]).all() and np.isnan(without.frame.loc["img1"]).all()
    )
    assert "not cached" in without.failures["img1"]


def test_cues_of_another_version_are_not_reused(tmp_path, monkeypatch):
    source = FolderSource(_folder(tmp_path))
    cached_cues(tmp_path, source, ["img0"], {})
    monkeypatch.setattr(cue_cache, "CUES_VERSION", "acquisition-cues/0-older")
    asked = _counting(monkeypatch)
    cached_cues(tmp_path, source, ["img0"], {})
    assert asked == [["img0"]]


def test_repeated_ids_are_refused(tmp_path):
    source = FolderSource(_folder(tmp_path))
    with pytest.raises(EmbedError, match=r"ids repeat \['img0'\]"):
        cached_cues(tmp_path, source, ["img0", "img0"], {})
    cached_cues(tmp_path, source, ["img0"], {})
    with pytest.raises(EmbedError, match=r"ids repeat \['img0'\]"):  # cached ones too
        cached_cues(tmp_path, source, ["img0", "img0"], {})
