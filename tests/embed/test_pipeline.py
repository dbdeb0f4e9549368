"""The embedding loop and build_store: real data, bad images, resume, kill -9, sharded builds.

A random-initialised ResNet-50 at 32 px keeps these fast; what is checked is the plumbing
(which ids, which rows, which files), not the features themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from storetools import (
    DATA,
    HAM_IMAGES,
    ISIC_MINI,
    N_IMAGES,
    assert_same_vectors,
    random_weights,
    tiny_config,
    write_hdf5,
)

import embed.model_loop as model_loop
import embed.pipeline as pipeline
from embed.backbone import preprocess
from embed.config import (
    VIEWS,
    EmbedConfig,
    embedding_identity,
)
from embed.errors import EmbedError, StoreMismatchError
from embed.model_loop import embed_ids
from embed.pipeline import build_store
from embed.pooled import DEFAULT_BLOCKS, feature_dim
from embed.reader import collate_drop_failed, normalize_batch, resize_uint8
from embed.sources import FolderSource, HDF5Source, decode_image, open_source
from embed.store import MANIFEST, FeatureStore

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


def file_digests(path: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.iterdir())
        if p.name.startswith("shard-")
    }


# ----------------------------------------------------------------------------- reader


def test_collate_drops_failed_items():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    ids, batch, failures = collate_drop_failed([("a", a, None), ("b", None, "bad"), ("c", a, None)])
    assert ids == ["a", "c"] and batch.shape == (2, 4, 4, 3) and failures == {"b": "bad"}
    assert batch.dtype == torch.uint8
    ids, batch, failures = collate_drop_failed([("b", None, "bad")])
    assert ids == [] and batch is None and failures == {"b": "bad"}


def test_worker_resize_and_device_normalisation_equal_preprocess(folder):
    """uint8 through the loader + normalisation on the device == backbone.preprocess, exactly."""
    src = FolderSource(folder)
    images = [decode_image(src.read_bytes(i), i, 10**8) for i in src.ids()[:3]]
    images.append(images[0].convert("L"))  # preprocess converts other modes itself
    for size in (32, 57):
        expected = torch.stack([preprocess(im, size) for im in images])
        batch = torch.from_numpy(np.stack([resize_uint8(im, size) for im in images]))
        got = normalize_batch(batch, "cpu")
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- embed_ids


def folder_with_an_empty_file(tmp_path: Path, folder: Path, n_good: int) -> FolderSource:
    """The first `n_good` images of `folder` and a zero-byte `zero.jpg`."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(folder.iterdir())[:n_good]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "zero.jpg").write_bytes(b"")
    return FolderSource(bad)


def test_embed_ids_order_failures_and_views(tmp_path, folder, model):
    src = folder_with_an_empty_file(tmp_path, folder, 5)
    ids = ["img_004", "zero", "img_001", "absent", "img_000"]
    batches = list(embed_ids(src, ids, model, tiny_config(views=3, batch_size=2)))
    got_ids = [i for b in batches for i in b[0]]
    failures = {k: v for b in batches for k, v in b[2].items()}
    assert got_ids == ["img_004", "img_001", "img_000"]
    assert set(failures) == {"zero", "absent"}
    assert "empty file" in failures["zero"] and "not found" in failures["absent"]
    vecs = np.concatenate([b[1] for b in batches])
    assert (
        vecs.shape == (3, 3, feature_dim(DEFAULT_BLOCKS))
        and vecs.dtype == np.float16
        and np.isfinite(vecs).all()
    )
    assert [b[1].shape[0] for b in batches] == [1, 1, 1]  # each batch of 2 lost or kept one
    plain = np.concatenate([b[1] for b in embed_ids(src, ids, model, tiny_config(batch_size=2))])
    np.testing.assert_allclose(plain[:, 0], vecs[:, 0], rtol=1e-2, atol=2e-2)
    assert list(embed_ids(src, [], model, tiny_config())) == []


def test_batches_left_in_flight_come_back_in_order_and_unchanged(
    tmp_path, folder, model, monkeypatch
):
    """The GPU's queue of launched batches (run here on CPU) yields what the plain loop yields:
    the same batches, ids, failures and vectors, in order, the last ones drained at the end."""
    src = folder_with_an_empty_file(tmp_path, folder, 7)
    ids = ["zero", "absent", *src.ids()[:7]]  # the first batch holds only failures
    config = tiny_config(batch_size=2)
    plain = list(embed_ids(src, ids, model, config))
    monkeypatch.setattr(model_loop, "batches_in_flight", lambda device: 2)
    queued = []
    for item in embed_ids(src, ids, model, config):
        queued.append(item)
    assert [(b[0], b[2]) for b in queued] == [(b[0], b[2]) for b in plain]
    assert queued[0][0] == [] and queued[0][1].shape == (0, 1, feature_dim(DEFAULT_BLOCKS))
    for (_, a, _), (_, b, _) in zip(queued, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_launched_batch_waits_for_its_copy_before_it_is_read():
    class Event:
        waited = False

        def synchronize(self):
            self.waited = True

    event = Event()
    vectors = torch.ones(2, 1, 2048, dtype=torch.float16)
    launched = model_loop._Launched(["a", "b"], {}, vectors, event)
    assert launched.collect(1, 2048).shape == (2, 1, 2048) and event.waited


def test_views_embed_the_transformed_image(tmp_path, model):
    """View k of an image equals view 0 of that image transformed by PIL beforehand."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    variants = {
        "plain": base,
        "hflip": base.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "rot90": base.transpose(Image.Transpose.ROTATE_90),  # counter-clockwise, as torch.rot90
        "transpose": base.transpose(Image.Transpose.TRANSPOSE),
    }
    root = tmp_path / "views"
    root.mkdir()
    for name, im in variants.items():
        im.save(root / f"{name}.png")
    src = FolderSource(root)
    ((_, multi, _),) = embed_ids(src, ["plain"], model, tiny_config(views=8))
    ((_, single, _),) = embed_ids(src, ["hflip", "rot90", "transpose"], model, tiny_config())
    for k, name in enumerate(["hflip", "rot90", "transpose"]):
        np.testing.assert_allclose(multi[0, VIEWS.index(name)], single[k, 0], rtol=1e-2, atol=2e-2)
    assert not np.allclose(multi[0, 0], multi[0, 1], atol=1e-2)


def test_amp_on_cpu_stays_close_to_fp32(folder, model):
    src = FolderSource(folder)
    ids = src.ids()[:4]
    ((_, fp32, _),) = embed_ids(src, ids, model, tiny_config(amp=False))
    ((_, mixed, _),) = embed_ids(src, ids, model, tiny_config(amp=True))
    a, b = fp32[:, 0].astype(np.float32), mixed[:, 0].astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


# ----------------------------------------------------------------------------- build_store


@needs_data
def test_build_store_from_isic2024_hdf5_with_a_worker_process(tmp_path, weights, model):
    src = open_source(ISIC_MINI)
    src.ids()  # the parent opens the file before the fork: the worker must reopen it
    store = tmp_path / "isic"
    summary = build_store(
        src,
        None,
        store,
        "isic2024-mini",
        weights,
        tiny_config(num_workers=1, shard_rows=16, batch_size=8),
    )
    assert (summary.embedded, summary.skipped_existing, summary.failed) == (51, 0, {})
    fs = FeatureStore.open(store)
    assert fs.count == 51 and len(fs.manifest["shards"]) == 4
    fs.check_compatible(embedding_identity(weights, tiny_config()))
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["dataset"] == "isic2024-mini" and manifest["source"].endswith(
        "train-image.hdf5"
    )
    # The scoring path (embed_ids without a store) gives the stored vectors.
    few = fs.ids[::20]
    ((_, direct, _),) = embed_ids(src, few, model, tiny_config())
    np.testing.assert_allclose(
        direct.astype(np.float32), fs.read(few).astype(np.float32), rtol=1e-2, atol=2e-2
    )


@needs_data
def test_build_store_from_ham10000_folder_subset(tmp_path, weights):
    ids = sorted(p.stem for p in HAM_IMAGES.iterdir())[:10]
    summary = build_store(
        FolderSource(HAM_IMAGES), ids, tmp_path / "ham", "ham", weights, tiny_config()
    )
    assert summary.embedded == 10 and summary.failed == {}
    assert FeatureStore.open(tmp_path / "ham").ids == ids


def test_resume_does_no_model_work_and_changes_no_shard(
    tmp_path, folder, weights, reference, monkeypatch
):
    store = tmp_path / "store"
    src = FolderSource(folder)
    first = build_store(src, src.ids()[:10], store, "toy", weights, tiny_config())
    assert first.embedded == 10 and first.images_per_s > 0
    before = file_digests(store)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a run with nothing to do")

    monkeypatch.setattr(pipeline, "load_backbone", no_model)
    again = build_store(src, src.ids()[:10], store, "toy", weights, tiny_config())
    assert (again.embedded, again.skipped_existing, again.failed) == (0, 10, {})
    assert file_digests(store) == before
    monkeypatch.undo()
    rest = build_store(src, None, store, "toy", weights, tiny_config())
    assert (rest.embedded, rest.skipped_existing, rest.stored) == (N_IMAGES - 10, 10, N_IMAGES)
    assert all(file_digests(store)[name] == digest for name, digest in before.items())
    assert_same_vectors(FeatureStore.open(store), reference)


def test_failures_are_recorded_listed_and_retried_on_request(tmp_path, folder, weights):
    root = tmp_path / "images"
    root.mkdir()
    for p in sorted(folder.iterdir())[:6]:
        (root / p.name).write_bytes(p.read_bytes())
    good = (root / "img_000.jpg").read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_bytes(b"lesion,target\n")
    (root / "cut.jpg").write_bytes(good[: len(good) // 2])
    src = FolderSource(root)
    store = tmp_path / "store"
    first = build_store(src, None, store, "toy", weights, tiny_config())
    assert first.embedded == 6 and set(first.failed) == {"zero", "text", "cut"}
    assert "empty file" in first.failed["zero"] and "truncated" in first.failed["cut"]
    assert "lesion" not in first.failed["text"]  # the file's content is never quoted
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["failures"] == first.failed
    second = build_store(src, None, store, "toy", weights, tiny_config())
    assert second.embedded == 0 and second.failed == {} and second.previously_failed == first.failed
    (root / "cut.jpg").write_bytes(good)  # repaired
    third = build_store(src, None, store, "toy", weights, tiny_config(retry_failed=True))
    assert third.embedded == 1 and set(third.failed) == {"zero", "text"}
    fs = FeatureStore.open(store)
    assert "cut" in fs.ids and set(fs.failures) == {"zero", "text"}
    with pytest.raises(
        EmbedError, match=r"1 of 2 requested ids have no vector .*'zero'.*could not be embedded"
    ):
        fs.read(["cut", "zero"])


def test_store_of_other_settings_is_refused(tmp_path, folder, weights, tmp_path_factory):
    src = FolderSource(folder)
    store = tmp_path / "store"
    build_store(src, src.ids()[:2], store, "toy", weights, tiny_config())
    with pytest.raises(
        StoreMismatchError, match=r"built with image_size=32 but this run asks for image_size=48"
    ):
        build_store(src, None, store, "toy", weights, tiny_config(image_size=48))
    with pytest.raises(
        StoreMismatchError, match=r"built with views=1 but this run asks for views=2"
    ):
        build_store(src, None, store, "toy", weights, tiny_config(views=2))
    other = random_weights(tmp_path_factory.mktemp("w2") / "other.pth", seed=1)
    with pytest.raises(
        StoreMismatchError,
        match=r"built with weights_sha256='[0-9a-f]{64}' but this run asks for weights_sha256=",
    ):
        build_store(src, None, store, "toy", other, tiny_config())
    assert FeatureStore.open(store).count == 2


def test_repeated_ids_are_refused(tmp_path, folder, weights):
    with pytest.raises(
        EmbedError, match=r"ids: 1 repeated id\(s\) \('img_001'\); each image must appear once"
    ):
        build_store(
            FolderSource(folder),
            ["img_001", "img_002", "img_001"],
            tmp_path,
            "toy",
            weights,
            tiny_config(),
        )


# ----------------------------------------------------------------------------- changed images


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in sorted(src.iterdir()):
        shutil.copy2(p, dst / p.name)  # keeps the modification time, as `cp -p` and rsync -a do
    return dst


def _rotated_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        rotated = im.rotate(90)
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rotate(path: Path) -> None:
    """Replace an image by itself turned a quarter, as an edited copy of a data set would."""
    info = path.stat()
    path.write_bytes(_rotated_jpeg(path.read_bytes()))
    # A rewrite gets a new modification time; set one explicitly so that a filesystem with
    # coarse timestamps cannot give the old one back when the size happens to be the same.
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded for a run with nothing to do")


def test_changed_images_are_embedded_again_and_read_back_new(
    tmp_path, folder, weights, reference, monkeypatch, caplog
):
    root = _copy_folder(folder, tmp_path / "images")
    src = FolderSource(root)
    store = tmp_path / "store"
    build_store(src, None, store, "toy", weights, tiny_config())
    rotated = ["img_003", "img_010", "img_017"]
    for image_id in rotated:
        _rotate(root / f"{image_id}.jpg")
    assert FeatureStore.open(store).changed(src, src.ids()) == rotated
    with caplog.at_level(logging.INFO, logger="embed.pipeline"):
        again = build_store(src, None, store, "toy", weights, tiny_config())
    assert (again.changed, again.embedded, again.skipped_existing, again.stored) == (
        rotated,
        3,
        N_IMAGES - 3,
        N_IMAGES,
    )
    assert (
        "3 image(s) changed since they were embedded (file size and CRC-32 of its bytes): "
        "embedding them again: ids img_003, img_010, img_017" in caplog.text
    )
    fs = FeatureStore.open(store)
    assert fs.count == N_IMAGES and fs.changed(src, src.ids()) == []
    assert json.loads((store / MANIFEST).read_text())["count"] == N_IMAGES
    build_store(src, None, tmp_path / "fresh", "toy", weights, tiny_config())
    assert_same_vectors(fs, FeatureStore.open(tmp_path / "fresh"))
    old, new = reference.read(rotated), fs.read(rotated)
    assert np.abs(old.astype(np.float32) - new.astype(np.float32)).max() > 0.1
    monkeypatch.setattr(pipeline, "load_backbone", _no_model)
    third = build_store(src, None, store, "toy", weights, tiny_config())
    assert (third.embedded, third.changed, third.skipped_existing) == (0, [], N_IMAGES)


def test_a_store_fingerprinted_before_the_crc_says_why_a_copied_folder_embeds_again(
    tmp_path, folder, weights, monkeypatch, caplog
):
    """Stores made before the CRC hold "file:<size>:<mtime_ns>" and are compared by size and
    time: a copy of the folder that moves the times re-embeds every image, and the warning says
    that this is why (not that the bytes differ)."""
    root = _copy_folder(folder, tmp_path / "images")
    src = FolderSource(root)

    with_crc = FolderSource.fingerprints

    def size_and_time(self, ids):  # the fingerprint as stores before the CRC recorded it
        return {i: ":".join(fp.split(":")[:3]) for i, fp in with_crc(self, ids).items()}

    with monkeypatch.context() as patched:
        patched.setattr(FolderSource, "fingerprints", size_and_time, raising=True)
        build_store(src, None, tmp_path / "store", "toy", weights, tiny_config())
    for path in root.iterdir():  # the copy: same bytes, later times
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.WARNING, logger="embed.pipeline"):
        again = build_store(src, None, tmp_path / "store", "toy", weights, tiny_config())
    assert again.embedded == N_IMAGES
    assert (
        f"{N_IMAGES} image(s) changed since they were embedded (file size and CRC-32 of its "
        f"bytes; {N_IMAGES} of them stored before the CRC was recorded, compared by size and "
        "modification time, which a copy of the folder moves)" in caplog.text
    )
    # embedded again, they carry the content fingerprint: the next copy is not a change
    for path in root.iterdir():
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    third = build_store(src, None, tmp_path / "store", "toy", weights, tiny_config())
    assert (third.embedded, third.changed) == (0, [])


def test_changed_images_of_an_hdf5_file_are_embedded_again(tmp_path, weights, monkeypatch):
    import h5py

    path = tmp_path / "images.hdf5"
    ids = write_hdf5(path, 12, size=(40, 40))
    store = tmp_path / "store"
    source = HDF5Source(path)
    first = build_store(source, None, store, "toy", weights, tiny_config())
    assert first.embedded == 12
    rotated = ["img_002", "img_009"]
    source.close()  # HDF5 refuses to open a file for writing while a read handle is open
    with h5py.File(path, "a") as f:
        for key in rotated:
            data = _rotated_jpeg(f[key][()])
            del f[key]
            f.create_dataset(key, data=np.bytes_(data))
    src = HDF5Source(path)
    assert FeatureStore.open(store).changed(src, ids) == rotated
    again = build_store(src, None, store, "toy", weights, tiny_config())
    assert (again.changed, again.embedded, again.stored) == (rotated, 2, 12)
    build_store(src, None, tmp_path / "fresh", "toy", weights, tiny_config())
    assert_same_vectors(FeatureStore.open(store), FeatureStore.open(tmp_path / "fresh"))
    # The whole file was rewritten in place, but only two images changed: nothing more to do.
    monkeypatch.setattr(pipeline, "load_backbone", _no_model)
    assert build_store(src, None, store, "toy", weights, tiny_config()).embedded == 0


def test_a_store_records_its_source_and_a_moved_copy_is_matched_by_fingerprint(
    tmp_path, folder, weights, monkeypatch, caplog
):
    first = _copy_folder(folder, tmp_path / "first")
    store = tmp_path / "store"
    build_store(FolderSource(first), None, store, "toy", weights, tiny_config())
    assert json.loads((store / MANIFEST).read_text())["source"] == str(first.resolve())
    moved = _copy_folder(first, tmp_path / "moved")  # same files, same times
    monkeypatch.setattr(pipeline, "load_backbone", _no_model)
    with caplog.at_level(logging.INFO, logger="embed.pipeline"):
        again = build_store(FolderSource(moved), None, store, "toy", weights, tiny_config())
    assert again.embedded == 0 and again.skipped_existing == N_IMAGES
    assert f"was embedded from {first.resolve()}; this run reads {moved.resolve()}" in caplog.text
    assert json.loads((store / MANIFEST).read_text())["source"] == str(moved.resolve())


def test_a_symlink_out_of_the_image_folder_is_a_failure_and_the_run_goes_on(
    tmp_path, folder, weights
):
    root = tmp_path / "images"
    root.mkdir()
    for p in sorted(folder.iterdir())[:3]:
        shutil.copy2(p, root / p.name)
    private = tmp_path / "private.jpg"  # a readable image, so only the link check refuses it
    private.write_bytes((folder / "img_005.jpg").read_bytes())
    (root / "escape.jpg").symlink_to(private)
    (root / "alias.jpg").symlink_to(root / "img_000.jpg")
    store = tmp_path / "store"
    summary = build_store(FolderSource(root), None, store, "toy", weights, tiny_config())
    assert summary.embedded == 4 and list(summary.failed) == ["escape"]
    assert re.fullmatch(
        r"image 'escape': symlink points outside the image folder .* only links to files "
        r"inside it are read",
        summary.failed["escape"],
    )
    fs = FeatureStore.open(store)
    assert sorted(fs.ids) == ["alias", "img_000", "img_001", "img_002"]
    assert fs.failures == summary.failed


def test_the_smallest_usable_size_keeps_a_map_of_one_cell_at_the_deepest_block():
    """The minimum is exact: at it the deepest block's map is 1 x 1 and no earlier stage has
    collapsed to 1 x 1 before its last downsampling (that is what the size is refused for below
    it)."""
    import torchvision

    from embed.pooled import min_image_size

    net = torchvision.models.resnet50(weights=None).eval()
    for blocks in (("layer3",), ("layer4",), ("layer3", "layer4")):
        size = min_image_size(blocks)
        EmbedConfig(image_size=size, blocks=blocks)  # accepted
        x = torch.zeros(1, 3, size, size)
        sides = []
        with torch.inference_mode():
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            for name in ("layer1", "layer2", "layer3", "layer4"):
                x = getattr(net, name)(x)
                sides.append(x.shape[-1])
                if name == blocks[-1]:
                    break
        assert sides[-1] == 1 and all(s >= 2 for s in sides[:-1]), (blocks, sides)


def test_a_size_far_below_training_is_embedded_with_a_warning(tmp_path, caplog):
    weights = tmp_path / "w.pth"
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    from embed.weights import ensure_weights

    info = ensure_weights(weights)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 120, 90)).save(images / "a.png")
    source = open_source(images)
    for size, warned in ((32, True), (112, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="embed.config"):
            build_store(
                source,
                ["a"],
                tmp_path / f"store{size}",
                "t",
                info,
                EmbedConfig(image_size=size, device="cpu", num_workers=0, progress=False),
            )
        said = [r.getMessage() for r in caplog.records if "--image-size" in r.getMessage()]
        assert said == (
            [
                f"--image-size {size}: far below the 224 px the ImageNet weights were trained at "
                "(under 112 px their features lose most of what they describe); the vectors will "
                "be of little use for lesions. Use --image-size 224 unless this is a test or a "
                "throughput run"
            ]
            if warned
            else []
        ), size


def test_an_image_replaced_with_the_same_size_and_time_is_embedded_again(tmp_path, folder, weights):
    """`cp -p` of another image over one, same size and modification time: the content tells."""
    root = _copy_folder(folder, tmp_path / "images")
    src = FolderSource(root)
    store = tmp_path / "store"
    build_store(src, None, store, "toy", weights, tiny_config())
    path = root / "img_003.jpg"
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the picture's data: another image, the same length
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns
    assert FeatureStore.open(store).changed(src, src.ids()) == ["img_003"]
    again = build_store(src, None, store, "toy", weights, tiny_config())
    assert again.changed == ["img_003"]
    assert FeatureStore.open(store).changed(src, src.ids()) == []
