"""The centre zoom view (`embed.zoom`, `invoke embed --zoom F`): what it crops, how a store
keeps it (one more view, its identity and name), and the errors a user can meet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from storetools import tiny_config

from embed.config import config_for_identity, embedding_identity
from embed.errors import EmbedError, StoreMismatchError
from embed.model_loop import embed_ids
from embed.pipeline import build_store
from embed.sources import FolderSource
from embed.store import FeatureStore
from embed.store_format import store_folders, store_name
from embed.zoom import check_zoom, stored_views, zoom_box, zoom_uint8


def _framed(width: int, height: int, border: int) -> Image.Image:
    """Noise inside a black frame `border` px wide (the dermoscope's dark corners)."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[border:-border, border:-border] = rng.integers(
        60, 255, (height - 2 * border, width - 2 * border, 3), dtype=np.uint8
    )
    return Image.fromarray(pixels)


def test_the_zoom_view_is_the_centre_without_the_frame():
    image = _framed(200, 150, border=12)
    whole = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR))
    zoomed = zoom_uint8(image, 64, 0.75)
    assert zoomed.shape == (64, 64, 3) and zoomed.dtype == np.uint8
    # The whole view's edge rows are the black frame; the zoom view's are inside it.
    assert whole[0].max() == 0 and whole[-1].max() == 0
    assert zoomed[0].min(axis=-1).mean() > 50 and zoomed[-1].min(axis=-1).mean() > 50
    assert zoom_box(200, 150, 0.75) == (25.0, 18.75, 175.0, 131.25)


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, 1.5, -0.5, 0.001, "0.75", True])
def test_a_zoom_outside_0_to_1_is_refused_naming_the_option(bad):
    with pytest.raises(EmbedError, match=r"--zoom \(EmbedConfig.zoom\): expected a fraction"):
        check_zoom(bad)
    with pytest.raises(EmbedError, match=r"--zoom"):
        tiny_config(zoom=bad)


def test_zoom_settings_round_to_the_name_they_give():
    assert check_zoom(None) is None
    assert check_zoom(0.75) == 0.75 and check_zoom(0.754) == 0.75
    assert stored_views(1, None) == 1 and stored_views(2, 0.75) == 3
    sha = "ab" * 32
    name = store_name("ham", sha, 224, 1, ["layer3"], "gem", "eager", 0.75)
    assert name == "ham-abababababab-224px-1v-z75-l3-gem"
    assert store_name("ham", sha, 224, 1, ["layer3"], "gem", "eager") == (
        "ham-abababababab-224px-1v-l3-gem"
    )


def test_a_zoomed_store_is_found_among_the_data_sets_stores(tmp_path):
    sha = "ab" * 32
    for zoom in (None, 0.75):
        (tmp_path / store_name("ham", sha, 224, 1, ["layer3"], "gem", "eager", zoom)).mkdir()
    names = [p.name for p in store_folders(tmp_path, "ham", sha)]
    assert names == ["ham-abababababab-224px-1v-l3-gem", "ham-abababababab-224px-1v-z75-l3-gem"]


def test_the_zoom_view_is_the_last_view_and_equals_embedding_the_crop(tmp_path, model):
    """View `views` of an image with --zoom equals view 0 of the same centre cropped and resized
    beforehand; the geometric views before it are unchanged by the zoom."""
    image = _framed(60, 45, border=4)
    root = tmp_path / "zoom"
    root.mkdir()
    image.save(root / "plain.png")
    Image.fromarray(zoom_uint8(image, 32, 0.75)).save(root / "zoomed.png")
    src = FolderSource(root)
    ((_, multi, _),) = embed_ids(src, ["plain"], model, tiny_config(views=2, zoom=0.75))
    ((_, plain, _),) = embed_ids(src, ["plain"], model, tiny_config(views=2))
    ((_, single, _),) = embed_ids(src, ["zoomed"], model, tiny_config())
    assert multi.shape == (1, 3, plain.shape[-1])
    np.testing.assert_array_equal(multi[:, :2], plain)
    np.testing.assert_allclose(multi[0, 2], single[0, 0], rtol=1e-2, atol=2e-2)
    assert not np.allclose(multi[0, 0], multi[0, 2], atol=1e-2)


def test_a_zoomed_store_records_its_zoom_and_refuses_other_settings(tmp_path, folder, weights):
    src = FolderSource(folder)
    store_dir = tmp_path / "store"
    config = tiny_config(zoom=0.75)
    summary = build_store(src, src.ids()[:3], store_dir, "toy", weights, config)
    assert summary.embedded == 3
    store = FeatureStore.open(store_dir)
    assert store.views == 2 and store.manifest["zoom"] == 0.75
    assert store.read(src.ids()[:3]).shape == (3, 2, store.dim)
    identity = embedding_identity(weights, config)
    assert identity["views"] == 2 and identity["zoom"] == 0.75
    again = config_for_identity(identity, device="cpu")
    assert (again.views, again.zoom) == (1, 0.75)
    with pytest.raises(
        StoreMismatchError, match=r"built with zoom=0.75 but this run asks for zoom=None"
    ):
        build_store(src, None, store_dir, "toy", weights, tiny_config())
    with pytest.raises(
        StoreMismatchError, match=r"built with zoom=0.75 but this run asks for zoom=0.5"
    ):
        build_store(src, None, store_dir, "toy", weights, tiny_config(zoom=0.5))


def test_a_store_made_before_the_zoom_existed_reads_as_no_zoom(tmp_path, folder, weights):
    """Older manifests lack the field; they mean no zoom view and stay usable."""
    import json

    src = FolderSource(folder)
    store_dir = tmp_path / "store"
    build_store(src, src.ids()[:2], store_dir, "toy", weights, tiny_config())
    manifest = store_dir / "manifest.json"
    record = json.loads(manifest.read_text())
    del record["zoom"]
    manifest.write_text(json.dumps(record))
    summary = build_store(src, src.ids()[:3], store_dir, "toy", weights, tiny_config())
    assert summary.embedded == 1 and FeatureStore.open(store_dir).count == 3
    with pytest.raises(
        StoreMismatchError, match=r"built with zoom=None but this run asks for zoom=0.75"
    ):
        build_store(src, None, store_dir, "toy", weights, tiny_config(zoom=0.75))
