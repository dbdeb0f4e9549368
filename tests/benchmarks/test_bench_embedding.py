"""The embedding part: every rate beside its baseline, and the pipeline's vectors checked."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import embed.model_loop as model_loop
from benchmarks.embedding import bench_embedding, random_weights
from embed.errors import EmbedError

N_IMAGES = 24


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return random_weights(tmp_path_factory.mktemp("weights") / "random-resnet50.pth")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N_IMAGES smooth random 40 x 40 JPEGs, `img_000.jpg` ..."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    for i in range(N_IMAGES):
        cx, cy = rng.uniform(12, 28, 2)
        blend = np.clip((np.hypot(xx - cx, yy - cy) / 40 - 0.15) * 6, 0, 1)[..., None]
        arr = rng.uniform(40, 120, 3) * (1 - blend) + rng.uniform(150, 230, 3) * blend
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)).save(
            buf, "JPEG"
        )
        (root / f"img_{i:03d}.jpg").write_bytes(buf.getvalue())
    return root


def test_bench_embedding_smoke(tmp_path, weights, folder):
    result = bench_embedding(
        weights,
        n_images=8,
        image_size=32,
        batch_size=4,
        device="cpu",
        num_workers=0,
        rounds=1,
        store_rows=300,
        work_dir=tmp_path,
    )
    for key in (
        "naive_images_per_s",
        "pipeline_images_per_s",
        "ceiling_images_per_s",
        "reader_images_per_s",
    ):
        assert result[key] > 0
    assert result["bound_by"] == (
        "reader (decoding)"
        if result["reader_images_per_s"] < result["ceiling_images_per_s"]
        else "model"
    )
    assert result["batch_size"] == 4 and result["num_workers"] == 0
    assert result["pipeline_over_naive"] == pytest.approx(
        result["pipeline_images_per_s"] / result["naive_images_per_s"], rel=1e-2
    )
    assert result["store_rows"] == 300 and result["store_read_rows_per_s"] > 0
    assert not list(tmp_path.iterdir())  # the temporary work folder is gone
    with pytest.raises(EmbedError, match=r"bench: .* holds 24 images, n_images=30"):
        bench_embedding(weights, n_images=30, images=folder, store_rows=0)


def test_bench_checks_the_pipelines_vectors_against_the_naive_loop(
    tmp_path, weights, folder, monkeypatch
):
    """The speed figures count only with the right vectors: here (on CPU, batches queued as on
    a GPU) they agree; with vectors handed to the wrong ids the bench says so."""
    settings = dict(
        n_images=9, image_size=32, batch_size=4, device="cpu", num_workers=0, rounds=1,
        store_rows=0, images=folder, work_dir=tmp_path,
    )  # fmt: skip
    monkeypatch.setattr(model_loop, "batches_in_flight", lambda device: 2)
    good = bench_embedding(weights, **settings)
    assert good["images_checked"] == 9 and good["min_cosine_to_naive"] > 0.95

    launch = model_loop._launch

    def shifted(model, batch, ids, failures, device, views, amp):
        launched = launch(model, batch, ids, failures, device, views, amp)
        launched.vectors = torch.roll(launched.vectors, 1, dims=0)  # each id gets its neighbour's
        return launched

    monkeypatch.setattr(model_loop, "_launch", shifted)
    bad = bench_embedding(weights, **settings)
    assert bad["min_cosine_to_naive"] < 0.95 and not bad["meets_targets"]


def test_variants_fidelity_is_checked_on_images_int8_did_not_calibrate_on(
    tmp_path, weights, folder, monkeypatch
):
    """From a real source, int8 calibrates as `invoke embed` would (spread over the whole
    source) and every variant is checked on `fidelity_images` other images, beyond the timed
    ones, with the median reported beside the min and the 1st percentile."""
    import benchmarks.embedding as bench
    from embed.variants import calibration_ids, cosine_bar

    calibrated: list[str] = []

    def few(ids):
        calibrated[:] = calibration_ids(ids, 6)
        return list(calibrated)

    checked: list[str] = []
    fidelity = bench._fidelity

    def spy(b, prepared, ids):
        checked[:] = ids
        return fidelity(b, prepared, ids)

    monkeypatch.setattr(bench, "calibration_ids", few)
    monkeypatch.setattr(bench, "_fidelity", spy)
    result = bench_embedding(
        weights, n_images=4, image_size=32, batch_size=4, device="cpu", num_workers=0,
        rounds=1, store_rows=0, images=folder, work_dir=tmp_path,
        variants=("eager", "int8-mixed"), fidelity_images=10,
    )  # fmt: skip
    assert len(calibrated) == 6
    for name in ("eager", "int8-mixed"):
        figures = result["variants"][name]
        assert figures["images_checked"] == 10  # more than the 4 timed images
        assert figures["centred_cosine_min"] <= figures["centred_cosine_p1"]
        assert figures["centred_cosine_p1"] <= figures["centred_cosine_median"] <= 1.0
        # Faithful: at or above the bar of that variant (int8-mixed's is what HAM10000 tolerated).
        assert figures["cosine_bar"] == cosine_bar(name)
        assert figures["faithful"] == (figures["centred_cosine_min"] >= cosine_bar(name))
    assert result["variants"]["int8-mixed"]["precision"] == "int8"
    # 24 images, 6 calibrated on: the first 10 of the 18 others are the ones checked.
    others = [i for i in sorted(f.stem for f in folder.iterdir()) if i not in calibrated]
    assert checked == others[:10] and not set(checked) & set(calibrated)
