"""Grad-CAM saliency overlays of the fusion MLP through the frozen backbone.

One module-scoped run on a synthetic ISIC 2024-layout data set with a random-initialised ResNet-50
at 64 px (layer3 is then a 4 x 4 grid, layer4 a 2 x 2 one: 32 px would leave layer4 a single
cell), one LightGBM seed, two fusion epochs and a small stack: about half a minute.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tinyrun import train_tiny_run

from fuse.scoring import saliency as saliency_module
from fuse.scoring.saliency import grad_cam, saliency_overlays
from fuse.scoring.score import read_scoring_metadata, score

pytestmark = pytest.mark.slow

FAST = {"device": "cpu", "num_workers": 0, "progress": False}
PNG = b"\x89PNG\r\n\x1a\n"
SIZE = 64
# Pixels per cell of each block's output grid.
STRIDE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained, stacked run at 64 px, its loaded models, backbone and scoring rows."""
    from embed.backbone import load_backbone
    from embed.sources import open_source
    from embed.weights import ensure_weights
    from fuse.scoring.run_models import RunModels

    made = train_tiny_run(tmp_path_factory.mktemp("saliency"), image_size=SIZE)
    data, spec = made["data"], made["spec"]
    info = ensure_weights(made["weights"])
    return {
        "data": data,
        "run": made["run"],
        "weights": made["weights"],
        "spec": spec,
        "info": info,
        "models": RunModels.load(made["run"]),
        "backbone": load_backbone(info, "cpu"),
        "frame": read_scoring_metadata(data / "test-metadata.csv", spec),
        "source": open_source(data / "test-image.hdf5"),
    }


def _png(data: bytes) -> Image.Image:
    assert data.startswith(PNG)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _expected_size(data: bytes, px: int) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.thumbnail((px, px))
    return image.size


class _Source:
    """An image source of in-memory encoded images."""

    def __init__(self, images: dict[str, bytes]):
        self.images = images

    def ids(self) -> list[str]:
        return list(self.images)

    def read_bytes(self, image_id: str) -> bytes:
        return self.images[image_id]


def _encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_overlays_are_pngs_of_the_thumbnail_size_for_the_ids_asked_only(tiny):
    ids = tiny["frame"]["isic_id"].tolist()
    asked = ids[1:3]
    got = saliency_overlays(
        tiny["models"],
        tiny["frame"],
        asked,
        tiny["source"],
        tiny["info"],
        "cpu",
        backbone=tiny["backbone"],
    )
    assert sorted(got) == sorted(asked)
    for image_id, data in got.items():
        # the synthetic crops are 24-40 px: never enlarged, the longest side is at most 192
        assert _png(data).size == _expected_size(tiny["source"].read_bytes(image_id), 192)

    # a larger image is brought down to the overlay size, keeping its aspect
    big = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    frame = tiny["frame"].iloc[[0]]
    one = saliency_overlays(
        tiny["models"],
        frame,
        frame["isic_id"].tolist(),
        _Source({frame["isic_id"].iloc[0]: _encoded(big, "JPEG")}),
        tiny["info"],
        "cpu",
        backbone=tiny["backbone"],
    )
    assert _png(one[frame["isic_id"].iloc[0]]).size == (192, 144)
    assert saliency_overlays(tiny["models"], tiny["frame"], [], tiny["source"], tiny["info"]) == {}


def _quadrant_batch() -> torch.Tensor:
    """Grey images at the model's size, one with a bright textured top-left quadrant."""
    rng = np.random.default_rng(1)
    plain = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    patch = plain.copy()
    half = SIZE // 2
    patch[:half, :half] = rng.integers(150, 256, (half, half, 3), dtype=np.uint8)
    return torch.from_numpy(np.stack([plain, patch]))


def _meta(tiny, n: int) -> list[np.ndarray | None]:
    from fuse.fusion.model import encode_meta

    rows = tiny["frame"].iloc[[0] * n].reset_index(drop=True)
    return [
        None if model.image_only else encode_meta(encoder, rows)
        for model, encoder in tiny["models"].fusion.folds
    ]


def _textbook_cam(kept: torch.Tensor) -> np.ndarray:
    """Grad-CAM from a hooked activation whose .grad the backward pass filled: channels weighted
    by their mean gradient, ReLU, scaled to 0..1 (all zeros where no position raises the logit)."""
    activation, gradient = kept.detach(), kept.grad
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak, torch.zeros_like(cam)).numpy()


def test_the_map_follows_the_image_and_equals_a_hook_based_grad_cam(tiny):
    batch = _quadrant_batch()
    folds = tiny["models"].fusion.folds
    meta = _meta(tiny, len(batch))
    maps = grad_cam(tiny["backbone"], folds, batch, meta, "cpu")
    grid = SIZE // STRIDE[tiny["backbone"].blocks[0]]
    assert maps.shape == (2, grid, grid) and maps.dtype == np.float32
    assert (maps >= 0).all() and (maps <= 1).all()
    # the quadrant changes the map: not the plain image's, and not uniform
    patched = maps[1]
    assert patched.max() == pytest.approx(1.0) and patched.min() == 0.0
    assert np.abs(maps[1] - maps[0]).max() > 0.05

    # The textbook recipe with hooks on copies: the block's output kept by a forward hook, the
    # backbone's own forward (its average pool) to the embedding, backward() to the activation.
    from embed.reader import normalize_batch

    backbone = copy.deepcopy(tiny["backbone"])
    kept = {}

    def hook(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    backbone.requires_grad_(True)  # so that the graph reaches the block's output
    handle = getattr(backbone, backbone.blocks[0]).register_forward_hook(hook)
    embedding = backbone(normalize_batch(batch, "cpu"))
    handle.remove()
    logits = [
        copy.deepcopy(m)(embedding, None if r is None else torch.from_numpy(r))
        for (m, _), r in zip(folds, meta, strict=True)
    ]
    torch.stack(logits).mean(dim=0).sum().backward()
    np.testing.assert_allclose(maps, _textbook_cam(kept["a"]), atol=1e-4)


class _Readout(torch.nn.Module):
    """A fusion model whose logit is `sign` x the sum of the embedding (image only)."""

    image_only = True

    def __init__(self, sign: float):
        super().__init__()
        self.sign = torch.nn.Parameter(torch.tensor(sign))

    def forward(self, image, meta=None):
        return self.sign * image.sum(dim=1)


def test_known_readouts(tiny):
    # logit = sum of the embedding (one block, average pooled): every channel's gradient is
    # +1/(h w), so the map is the activation summed over channels (a block ends in a ReLU, so
    # all >= 0), scaled to 0..1.
    # logit = minus that: every weight is negative, the ReLU leaves nothing, the map is zeros.
    from embed.backbone import load_backbone
    from embed.reader import normalize_batch

    batch = _quadrant_batch()
    with torch.no_grad():
        x = normalize_batch(batch, "cpu")
        b = load_backbone(tiny["info"], "cpu", blocks=("layer3",), pooling="avg")
        a = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        for name in b.stages:
            a = getattr(b, name)(a)
    total = a.sum(dim=1)
    total = total - total.amin(dim=(1, 2), keepdim=True)
    total = (total / total.amax(dim=(1, 2), keepdim=True)).numpy()
    up = grad_cam(b, [(_Readout(1.0), None)], batch, [None], "cpu")
    np.testing.assert_allclose(up, total, atol=1e-5)
    down = grad_cam(b, [(_Readout(-1.0), None)], batch, [None], "cpu")
    assert (down == 0).all()
    # two folds pulling opposite ways at equal strength: the mean logit has no gradient
    both = grad_cam(b, [(_Readout(1.0), None), (_Readout(-1.0), None)], batch, [None, None], "cpu")
    assert (both == 0).all()


def test_with_amp_the_forward_runs_in_the_precision_embedding_used(tiny):
    # The same known readout (logit = sum of the embedding): with amp the map is the activation
    # the backbone gives under `autocast_context` (bf16 on CPUs with native bf16), summed over
    # channels and scaled; on a CPU without native bf16 that context is float32.
    from embed.backbone import autocast_context, cpu_bf16_supported, load_backbone
    from embed.reader import normalize_batch

    batch = _quadrant_batch()
    b = load_backbone(tiny["info"], "cpu", blocks=("layer3",), pooling="avg")
    with torch.no_grad():
        x = normalize_batch(batch, "cpu")
        with autocast_context("cpu"):
            a = b.forward_to(x, "layer3")
        total = a.float().sum(dim=1)
    total = total - total.amin(dim=(1, 2), keepdim=True)
    total = (total / total.amax(dim=(1, 2), keepdim=True)).numpy()
    mixed = grad_cam(b, [(_Readout(1.0), None)], batch, [None], "cpu", amp=True)
    np.testing.assert_allclose(mixed, total, atol=1e-5)
    full = grad_cam(b, [(_Readout(1.0), None)], batch, [None], "cpu")
    if cpu_bf16_supported():
        assert not np.array_equal(mixed, full)  # bf16 did run
        np.testing.assert_allclose(mixed, full, atol=0.1)  # and the map is the same picture
    else:
        np.testing.assert_array_equal(mixed, full)


def test_with_several_pooled_blocks_the_map_is_taken_at_the_shallowest(tiny):
    # layer3 + layer4 pooled: the map lies on layer3's grid (twice layer4's) and equals the hook
    # recipe there, whose gradient flows both through layer3's own pooled features and layer4.
    from embed.backbone import load_backbone
    from embed.reader import normalize_batch

    backbone = load_backbone(tiny["info"], "cpu", blocks=("layer3", "layer4"), pooling="gem")
    batch = _quadrant_batch()
    maps = grad_cam(backbone, [(_Readout(1.0), None)], batch, [None], "cpu")
    assert maps.shape == (2, SIZE // 16, SIZE // 16)
    copied = copy.deepcopy(backbone).requires_grad_(True)
    kept = {}

    def hook(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    handle = copied.layer3.register_forward_hook(hook)
    _Readout(1.0)(copied(normalize_batch(batch, "cpu"))).sum().backward()
    handle.remove()
    np.testing.assert_allclose(maps, _textbook_cam(kept["a"]), atol=1e-4)


def test_the_models_are_left_as_they_were(tiny):
    from fuse.fusion import FusionModel

    backbone, models = tiny["backbone"], tiny["models"]
    x = torch.from_numpy(
        np.random.default_rng(2).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    )
    frame = tiny["frame"]
    block = np.random.default_rng(3).normal(size=(len(frame), 1, backbone.dim)).astype(np.float16)
    with torch.no_grad():
        before = backbone(x).clone()
    p_before = models.fusion.predict(frame, block)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}

    saliency_overlays(
        models,
        frame,
        frame["isic_id"].tolist(),
        tiny["source"],
        tiny["info"],
        "cpu",
        backbone=backbone,
    )

    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is None for model, _ in models.fusion.folds for p in model.parameters())
    assert all(not model.training for model, _ in models.fusion.folds)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(backbone(x), before)
    np.testing.assert_array_equal(models.fusion.predict(frame, block), p_before)
    fresh = FusionModel.load(tiny["run"] / "fusion")
    np.testing.assert_allclose(fresh.predict(frame, block), p_before, rtol=1e-6)


def test_unreadable_images_and_ids_without_a_row_get_no_overlay(tiny, caplog):
    ids = tiny["frame"]["isic_id"].tolist()
    good = tiny["source"].read_bytes(ids[0])
    source = _Source(
        {ids[0]: good, ids[1]: b"", ids[2]: b"this is not an image", "ISIC_norow": good}
    )

    class Failing(_Source):
        def read_bytes(self, image_id):
            if image_id == ids[3]:
                raise OSError("disk gone")
            return super().read_bytes(image_id)

    with caplog.at_level("WARNING", logger="fuse.scoring.saliency"):
        got = saliency_overlays(
            tiny["models"],
            tiny["frame"],
            [ids[0], ids[1], ids[2], ids[3], "ISIC_norow"],
            Failing(source.images),
            tiny["info"],
            "cpu",
            backbone=tiny["backbone"],
        )
    assert list(got) == [ids[0]]
    text = caplog.text
    for missing in (ids[1], ids[2], ids[3], "ISIC_norow"):
        assert missing in text
    assert "empty file" in text and "disk gone" in text
    # nothing readable at all: an empty dict
    assert (
        saliency_overlays(
            tiny["models"],
            tiny["frame"],
            [ids[1]],
            source,
            tiny["info"],
            "cpu",
            backbone=tiny["backbone"],
        )
        == {}
    )


def test_score_computes_overlays_only_for_the_top_flagged_and_none_when_off(
    tiny, tmp_path, monkeypatch
):
    calls = []
    precisions = []
    real = saliency_module.saliency_overlays

    def counting(models, frame, ids, *args, **kwargs):
        calls.append(list(ids))
        precisions.append(kwargs.get("amp"))
        return real(models, frame, ids, *args, **kwargs)

    monkeypatch.setattr(saliency_module, "saliency_overlays", counting)
    images, metadata = tiny["data"] / "test-image.hdf5", tiny["data"] / "test-metadata.csv"
    common = {"weights": tiny["weights"], **FAST}

    off = score(
        tiny["run"],
        images,
        metadata,
        tmp_path / "a.csv",
        page=tmp_path / "a.html",
        overlays=0,
        **common,
    )
    no_page = score(tiny["run"], images, metadata, tmp_path / "b.csv", overlays=5, **common)
    assert calls == []
    assert "saliency of" not in (tmp_path / "a.html").read_text()

    on = score(
        tiny["run"],
        images,
        metadata,
        tmp_path / "c.csv",
        page=tmp_path / "c.html",
        overlays=2,
        **common,
    )
    flagged = on[on["flagged"].fillna(False).astype(bool)].sort_values(
        "probability", ascending=False
    )
    assert len(flagged) >= 1, "the tiny run flags none of the test lesions"
    assert calls == [flagged["isic_id"].head(2).tolist()]
    assert precisions == [True]  # the run embeds with mixed precision: the map's forward too
    page = (tmp_path / "c.html").read_text()
    for image_id in calls[0]:
        assert f'alt="saliency of {image_id}"' in page
    assert page.count('alt="saliency of ') == len(calls[0])
    pd.testing.assert_frame_equal(on, off)  # overlays change the page, never the predictions
    pd.testing.assert_frame_equal(on, no_page)

    from fuse.errors import RunError

    with pytest.raises(RunError, match=r"overlays: expected an integer >= 0, got -1"):
        score(
            tiny["run"],
            images,
            metadata,
            tmp_path / "d.csv",
            page=tmp_path / "d.html",
            overlays=-1,
            **common,
        )
