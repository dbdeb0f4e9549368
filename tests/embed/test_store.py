"""Feature store: layout, reading, identity checks, crash leftovers, locks, sharded parts.

These tests write vectors directly with StoreWriter (no model); the embedding runs that fill a
store are tested in test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

from embed.errors import EmbedError, StoreMismatchError
from embed.store import (
    IDENTITY_FIELDS,
    MANIFEST,
    FeatureStore,
    StoreWriter,
    merge_store,
    store_name,
)

VIEWS, DIM = 2, 2048
IDENTITY = {
    "backbone": "resnet50-keras-imagenet",
    "weights_sha256": "ab" * 32,
    "preprocessing": {"resize": "whole image", "normalize_mean": [0.485, 0.456, 0.406]},
    "image_size": 64,
    "views": VIEWS,
    "dtype": "float16",
    "dim": DIM,
}


def vectors(ids) -> np.ndarray:
    """Deterministic distinct rows per id."""
    out = np.empty((len(ids), VIEWS, DIM), dtype=np.float16)
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        out[k] = rng.standard_normal((VIEWS, DIM)).astype(np.float16)
    return out


def fill(path, ids, *, shard_rows=8, index=0, count=1, failures=None, **kw):
    with StoreWriter(
        path,
        IDENTITY,
        shard_index=index,
        shard_count=count,
        shard_rows=shard_rows,
        info={"dataset": "toy"},
        **kw,
    ) as writer:
        for start in range(0, len(ids), 5):  # batches of 5 across shard boundaries of 8
            chunk = ids[start : start + 5]
            writer.append(chunk, vectors(chunk))
        if failures:
            writer.add_failures(failures)
    return writer


IDS = [f"id_{i:03d}" for i in range(20)]


def test_store_name():
    assert (
        store_name("ham10000-dev", "0123456789abcdef" * 4, 224, 1)
        == "ham10000-dev-0123456789ab-224px-1v"
    )


def test_round_trip_layout_and_order(tmp_path):
    store = tmp_path / "s"
    fill(store, IDS)
    names = sorted(os.listdir(store))
    assert [n for n in names if not n.startswith(".")] == [
        MANIFEST,
        "shard-00000.ids.json",
        "shard-00000.npy",
        "shard-00001.ids.json",
        "shard-00001.npy",
        "shard-00002.ids.json",
        "shard-00002.npy",
    ]
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["count"] == 20 and [s["rows"] for s in manifest["shards"]] == [8, 8, 4]
    for key in IDENTITY_FIELDS:
        assert manifest[key] == IDENTITY[key]
    assert manifest["created"] and manifest["lesionfuse_version"] and manifest["dataset"] == "toy"
    assert np.load(store / "shard-00000.npy").shape == (8, VIEWS, DIM)

    fs = FeatureStore.open(store)
    assert fs.ids == IDS and fs.count == 20 and fs.views == VIEWS and fs.dim == DIM
    asked = ["id_019", "id_000", "id_009", "id_000", "id_008"]  # across shards, repeated
    got = fs.read(asked)
    assert got.dtype == np.float16 and got.shape == (5, VIEWS, DIM)
    np.testing.assert_array_equal(got, vectors(asked))
    assert fs.read([]).shape == (0, VIEWS, DIM)
    assert isinstance(fs._map(0), np.memmap)
    assert fs.verify() == {"shards": 3, "rows": 20, "ok": True}


def test_missing_ids_message(tmp_path):
    fill(tmp_path, IDS[:5], failures={"broken": "image 'broken': empty file (0 bytes)"})
    fs = FeatureStore.open(tmp_path)
    assert fs.missing(["id_000", "x", "broken"]) == ["x", "broken"]
    with pytest.raises(
        EmbedError,
        match=r"2 of 3 requested ids have no vector in feature store .* \('x', 'broken'\).*"
        r"1 of them could not be embedded \('broken': image 'broken': empty file \(0 bytes\)\).*"
        r"--retry-failed.*invoke embed --spec <spec of data set 'toy'> --image-size 64 --views 2",
    ):
        fs.read(["id_000", "x", "broken"])
    assert fs.failures == {"broken": "image 'broken': empty file (0 bytes)"}


def test_open_refuses_a_folder_without_store(tmp_path):
    with pytest.raises(
        EmbedError,
        match=r"no feature store at .* \(no manifest.json\); build it with `invoke embed --spec SPEC`",
    ):
        FeatureStore.open(tmp_path)


CHANGED = {
    "backbone": "resnet18",
    "weights_sha256": "cd" * 32,
    "preprocessing": {"resize": "whole image", "normalize_mean": [0.5, 0.5, 0.5]},
    "image_size": 224,
    "views": 8,
    "dtype": "float32",
    "dim": 512,
}


@pytest.mark.parametrize("field", IDENTITY_FIELDS)
def test_check_compatible_names_the_field(tmp_path, field):
    fill(tmp_path, IDS[:3])
    fs = FeatureStore.open(tmp_path)
    fs.check_compatible(IDENTITY)
    expected = {**IDENTITY, field: CHANGED[field]}
    shown = "preprocessing.normalize_mean" if field == "preprocessing" else field
    have = IDENTITY[field]["normalize_mean"] if field == "preprocessing" else IDENTITY[field]
    want = CHANGED[field]["normalize_mean"] if field == "preprocessing" else CHANGED[field]
    with pytest.raises(StoreMismatchError) as info:
        fs.check_compatible(expected)
    assert f"built with {shown}={have!r} but expected {shown}={want!r}" in str(info.value)


def test_check_compatible_missing_subfield_and_unknown_field(tmp_path):
    fill(tmp_path, IDS[:3])
    fs = FeatureStore.open(tmp_path)
    pre = {**IDENTITY["preprocessing"], "crop": "center"}
    with pytest.raises(
        StoreMismatchError,
        match=r"preprocessing.crop='<absent>' but expected preprocessing.crop='center'",
    ):
        fs.check_compatible({"preprocessing": pre})
    with pytest.raises(EmbedError, match=r"unknown feature store field\(s\) \['colour'\]"):
        fs.check_compatible({"colour": "red"})


@pytest.mark.parametrize("field", ["weights_sha256", "image_size", "views"])
def test_appending_with_other_settings_is_refused(tmp_path, field):
    fill(tmp_path, IDS[:3])
    with pytest.raises(
        StoreMismatchError, match=rf"was built with {field}=.* but this run asks for {field}="
    ):
        StoreWriter(tmp_path, {**IDENTITY, field: CHANGED[field]}).open()
    # The refused writer left the store as it was and released its lock.
    fill(tmp_path, IDS[3:6])
    assert FeatureStore.open(tmp_path).count == 6


def test_append_checks_shape_and_duplicates(tmp_path):
    with StoreWriter(tmp_path, IDENTITY) as writer:
        writer.append(["a"], vectors(["a"]))
        with pytest.raises(
            EmbedError, match=r"vectors have shape \(1, 2, 10\), expected \(1, 2, 2048\)"
        ):
            writer.append(["b"], np.zeros((1, 2, 10)))
        with pytest.raises(EmbedError, match=r"1 ids are already in the store or repeated: 'a'"):
            writer.append(["a"], vectors(["a"]))
        with pytest.raises(
            EmbedError, match=r"2 ids are already in the store or repeated: 'c', 'c'"
        ):
            writer.append(["c", "c"], vectors(["c", "c"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shard_count": 0}, r"shard_count must be an integer >= 1, got 0"),
        (
            {"shard_index": 2, "shard_count": 2},
            r"shard_index must be in 0..1 for shard_count=2, got 2",
        ),
        ({"shard_rows": 0}, r"shard_rows must be an integer >= 1, got 0"),
    ],
)
def test_writer_arguments(tmp_path, kwargs, message):
    with pytest.raises(EmbedError, match=message):
        StoreWriter(tmp_path, IDENTITY, **kwargs)
    with pytest.raises(EmbedError, match=r"store identity lacks field\(s\) \['dim'\]"):
        StoreWriter(tmp_path, {k: v for k, v in IDENTITY.items() if k != "dim"})


def test_verify_detects_damage(tmp_path):
    fill(tmp_path, IDS)
    shard = tmp_path / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(
        EmbedError,
        match=r"failed verification: 1 damaged file\(s\): shard-00001.npy \(sha256 differs",
    ):
        FeatureStore.open(tmp_path).verify()


def test_missing_or_reshaped_shard(tmp_path):
    fill(tmp_path, IDS)
    np.save(tmp_path / "shard-00002.npy", np.zeros((4, 1, DIM), np.float16))
    with pytest.raises(
        EmbedError,
        match=r"shard-00002.npy.* has shape \(4, 1, 2048\) dtype float16, expected \(4, 2, 2048\)",
    ):
        FeatureStore.open(tmp_path).read(["id_019"])
    (tmp_path / "shard-00002.npy").unlink()
    with pytest.raises(
        EmbedError, match=r"lists 1 shard\(s\) whose files are missing \('shard-00002'\)"
    ):
        FeatureStore.open(tmp_path)


def test_leftovers_of_a_killed_writer_are_ignored_then_cleaned(tmp_path):
    fill(tmp_path, IDS[:8])
    # What kill -9 can leave: a temp file being written, and a complete shard not yet listed.
    (tmp_path / ".tmp-shard-00001.npy-999-abcd").write_bytes(b"partial")
    np.save(tmp_path / "shard-00001.npy", vectors(["z"]))
    (tmp_path / ".tmp-manifest.json-999-abcd").write_text("{")
    fs = FeatureStore.open(tmp_path)
    assert fs.count == 8 and fs.verify()["ok"]
    fill(tmp_path, IDS[8:12])
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith(".tmp"))
    assert left == []
    fs = FeatureStore.open(tmp_path)
    assert fs.ids == IDS[:12]
    np.testing.assert_array_equal(fs.read(IDS[8:12]), vectors(IDS[8:12]))


def test_one_writer_per_part(tmp_path):
    with StoreWriter(tmp_path, IDENTITY):
        with pytest.raises(EmbedError, match=r"feature store .* is locked by another process"):
            StoreWriter(tmp_path, IDENTITY, lock_timeout=0.1).open()
    with StoreWriter(tmp_path / "p", IDENTITY, shard_index=1, shard_count=2):
        with pytest.raises(
            EmbedError, match=r"part 1/2 of feature store .* is locked by another process"
        ):
            StoreWriter(
                tmp_path / "p", IDENTITY, shard_index=1, shard_count=2, lock_timeout=0.1
            ).open()
        with StoreWriter(
            tmp_path / "p", IDENTITY, shard_index=0, shard_count=2
        ):  # other part: fine
            pass


def test_sharded_parts_are_read_together_then_merged(tmp_path):
    store = tmp_path / "s"
    w0 = StoreWriter(store, IDENTITY, shard_index=0, shard_count=2, shard_rows=4)
    w1 = StoreWriter(store, IDENTITY, shard_index=1, shard_count=2, shard_rows=4)
    w0.open()
    w1.open()
    w0.append(IDS[:6], vectors(IDS[:6]))
    w1.append(IDS[6:15], vectors(IDS[6:15]))
    w1.add_failures({"bad": "image 'bad': empty file (0 bytes)"})
    # Both still writing: readers see every complete shard through the part manifests.
    fs = FeatureStore.open(store)
    assert sorted(fs.ids) == sorted(IDS[:4] + IDS[6:14])
    assert not (store / MANIFEST).exists()
    w0.close()
    names = os.listdir(store)
    assert "manifest.part-1-of-2.json" in names and "manifest.part-0-of-2.json" not in names
    w1.close()  # last one out folds everything into manifest.json
    names = sorted(n for n in os.listdir(store) if not n.startswith("."))
    assert [n for n in names if n.startswith("manifest")] == [MANIFEST]
    assert "shard-0-of-2-00000.npy" in names and "shard-1-of-2-00002.npy" in names
    fs = FeatureStore.open(store)
    assert sorted(fs.ids) == IDS[:15] and fs.failures == {
        "bad": "image 'bad': empty file (0 bytes)"
    }
    np.testing.assert_array_equal(fs.read(IDS[:15]), vectors(IDS[:15]))
    assert json.loads((store / MANIFEST).read_text())["count"] == 15
    assert merge_store(store)["count"] == 15  # idempotent


def test_merge_store_errors_and_running_parts(tmp_path):
    with pytest.raises(EmbedError, match=r"no feature store at .*nothing.* \(no such folder\)"):
        merge_store(tmp_path / "nothing")
    with pytest.raises(EmbedError, match=r"no feature store at .* \(no manifest.json\)"):
        merge_store(tmp_path)
    store = tmp_path / "s"
    fill(store, IDS[:3], index=0, count=2)
    with StoreWriter(store, IDENTITY, shard_index=1, shard_count=2) as running:
        running.append(IDS[3:5], vectors(IDS[3:5]))
        running.flush()
        merged = merge_store(store)
        assert merged["count"] == 3  # the running part is left for later
        assert (store / "manifest.part-1-of-2.json").exists()
        assert FeatureStore.open(store).count == 5
    assert (
        FeatureStore.open(store).count == 5 and not (store / "manifest.part-1-of-2.json").exists()
    )


def test_parts_built_with_other_settings_are_refused(tmp_path):
    fill(tmp_path, IDS[:3], index=0, count=2, lock_timeout=1)
    other = tmp_path / "manifest.part-1-of-2.json"
    part = json.loads((tmp_path / MANIFEST).read_text())
    part.update(image_size=32, shards=[], failures={})
    other.write_text(json.dumps(part))
    with pytest.raises(
        StoreMismatchError,
        match=r"manifest.part-1-of-2.json.* was built with image_size=32 but manifest.json of the same store has image_size=64",
    ):
        FeatureStore.open(tmp_path)


def test_a_manifest_of_another_format_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(
        EmbedError, match=r"is not a lesionfuse feature store manifest \(format 'something-else'"
    ):
        FeatureStore.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(EmbedError, match=r"feature store file .*manifest.json.* cannot be read"):
        FeatureStore.open(tmp_path)
