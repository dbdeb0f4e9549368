"""Feature store: layout, reading, identity checks, crash leftovers, locks, sharded parts.

These tests write vectors directly with StoreWriter (no model); the embedding runs that fill a
store are tested in test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import time
import zlib

import numpy as np
import pytest

from embed.errors import EmbedError, StoreMismatchError
from embed.store import (
    IDENTITY_FIELDS,
    MANIFEST,
    FeatureStore,
    store_name,
)
from embed.store_writer import StoreWriter, merge_store

VIEWS, DIM = 2, 2048
IDENTITY = {
    "backbone": "resnet50-keras-imagenet",
    "weights_sha256": "ab" * 32,
    "preprocessing": {"resize": "whole image", "normalize_mean": [0.485, 0.456, 0.406]},
    "image_size": 64,
    "zoom": None,
    "views": VIEWS,
    "blocks": ["layer4"],
    "pooling": "avg",
    "variant": "eager",
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
    # Other pooled features than the classic layer4 average are named; the classic keeps the old
    # name.
    assert (
        store_name("d", "ab" * 32, 224, 1, ("layer3", "layer4"), "avg")
        == "d-abababababab-224px-1v-l34-avg"
    )
    assert store_name("d", "ab" * 32, 96, 2, ("layer4",), "gem") == "d-abababababab-96px-2v-l4-gem"


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
        match=r"no feature store at .* \(no manifest.json\); build it with `invoke embed --spec "
        r"SPEC`",
    ):
        FeatureStore.open(tmp_path)


CHANGED = {
    "backbone": "resnet18",
    "weights_sha256": "cd" * 32,
    "preprocessing": {"resize": "whole image", "normalize_mean": [0.5, 0.5, 0.5]},
    "image_size": 224,
    "zoom": 0.75,
    "views": 8,
    "blocks": ["layer3", "layer4"],
    "pooling": "gem",
    "variant": "folded",
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
        ({"max_shard_seconds": 0}, r"max_shard_seconds must be a number > 0, got 0"),
        ({"max_shard_seconds": "60"}, r"max_shard_seconds must be a number > 0, got '60'"),
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
        match=r"manifest.part-1-of-2.json.* was built with image_size=32 but manifest.json of the "
        r"same store has image_size=64",
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


# ----------------------------------------------------------------------------- store reference


def _uid(path) -> str | None:
    return json.loads((path / MANIFEST).read_text()).get("store_uid")


def test_reference_names_identity_folder_uid_and_count(tmp_path):
    store = tmp_path / "s"
    fill(store, IDS[:5])
    uid = _uid(store)
    assert isinstance(uid, str) and len(uid) == 32 and int(uid, 16) >= 0
    reference = FeatureStore.open(store).reference()
    assert reference == {
        **IDENTITY,
        "store": str(store.resolve()),
        "store_uid": uid,
        "count": 5,
    }
    fill(store, IDS[5:9])  # a later writer keeps the uid
    assert FeatureStore.open(store).reference()["store_uid"] == uid
    assert FeatureStore.open(store).reference()["count"] == 9
    other = tmp_path / "t"
    fill(other, IDS[:5])
    assert _uid(other) != uid  # a store of the same content is another store


def test_parts_started_at_once_share_one_uid_kept_by_merge(tmp_path):
    store = tmp_path / "s"
    w0 = StoreWriter(store, IDENTITY, shard_index=0, shard_count=2)
    w1 = StoreWriter(store, IDENTITY, shard_index=1, shard_count=2)
    w0.open()
    w1.open()
    parts = [json.loads((store / f"manifest.part-{i}-of-2.json").read_text()) for i in (0, 1)]
    assert parts[0]["store_uid"] == parts[1]["store_uid"]
    w0.append(IDS[:3], vectors(IDS[:3]))
    w1.append(IDS[3:6], vectors(IDS[3:6]))
    w0.close()
    w1.close()
    assert _uid(store) == parts[0]["store_uid"]
    assert FeatureStore.open(store).reference()["store_uid"] == parts[0]["store_uid"]


def test_a_store_made_before_uids_has_none_and_keeps_none(tmp_path):
    fill(tmp_path, IDS[:3])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["store_uid"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert FeatureStore.open(tmp_path).reference()["store_uid"] is None
    fill(tmp_path, IDS[3:6])
    assert _uid(tmp_path) is None
    assert FeatureStore.open(tmp_path).reference()["count"] == 6


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprints_are_stored_beside_the_ids_and_verified(tmp_path):
    with StoreWriter(tmp_path, IDENTITY, shard_rows=4) as writer:
        writer.append(IDS[:3], vectors(IDS[:3]), ["fp0", "fp1", None])
        writer.append(IDS[3:5], vectors(IDS[3:5]))  # no fingerprints: unknown
    assert json.loads((tmp_path / "shard-00000.fingerprints.json").read_text()) == [
        "fp0",
        "fp1",
        None,
        None,
    ]
    assert not (tmp_path / "shard-00001.fingerprints.json").exists()
    fs = FeatureStore.open(tmp_path)
    assert fs.fingerprints(IDS[:5] + ["absent"]) == {"id_000": "fp0", "id_001": "fp1"}
    assert fs.verify()["ok"]
    (tmp_path / "shard-00000.fingerprints.json").write_text('["x", "fp1", null, null]')
    with pytest.raises(
        EmbedError,
        match=r"failed verification: 1 damaged file\(s\): shard-00000.fingerprints.json "
        r"\(sha256 differs",
    ):
        FeatureStore.open(tmp_path).verify()
    (tmp_path / "shard-00000.fingerprints.json").write_text('["x"]')
    with pytest.raises(
        EmbedError,
        match=r"shard-00000.fingerprints.json does not hold one fingerprint per row of the 4",
    ):
        FeatureStore.open(tmp_path).fingerprints(["id_000"])
    with StoreWriter(tmp_path / "other", IDENTITY) as writer:
        with pytest.raises(EmbedError, match=r"1 fingerprints given for 2 ids"):
            writer.append(["a", "b"], vectors(["a", "b"]), ["fp"])


class _Source:
    """An image source reduced to its fingerprints."""

    def __init__(self, fingerprints):
        self.now = fingerprints

    def fingerprints(self, ids):
        return {i: self.now[i] for i in ids if i in self.now}


def test_changed_names_ids_whose_image_fingerprint_differs(tmp_path):
    with StoreWriter(tmp_path, IDENTITY) as writer:
        writer.append(IDS[:4], vectors(IDS[:4]), ["a", "b", "c", None])
    fs = FeatureStore.open(tmp_path)
    now = _Source({"id_000": "a", "id_001": "B", "id_003": "d", "id_009": "z"})
    # id_002 is gone from the source, id_003 was stored without a fingerprint, id_009 has no
    # vector: none of them can be called changed.
    assert fs.changed(now, IDS[:10]) == ["id_001"]
    assert fs.changed(now, ["id_001", "id_000", "id_001"]) == ["id_001", "id_001"]
    assert fs.changed(now, []) == []


def _renewed(ids) -> np.ndarray:
    return -vectors(ids)


def test_an_id_embedded_again_is_read_from_its_newest_row(tmp_path):
    fill(tmp_path, IDS[:10])
    with StoreWriter(tmp_path, IDENTITY) as writer:
        with pytest.raises(EmbedError, match=r"1 ids are already in the store"):
            writer.append(["id_002"], _renewed(["id_002"]))
        writer.supersede(["id_002", "id_007", "not-stored"])
        writer.append(["id_002", "id_007", "id_010"], _renewed(["id_002", "id_007", "id_010"]))
        with pytest.raises(EmbedError, match=r"1 ids are already in the store"):
            writer.append(["id_002"], _renewed(["id_002"]))  # superseded once, not for ever
    fs = FeatureStore.open(tmp_path)
    assert fs.count == 11 and sorted(fs.ids) == IDS[:11]
    assert json.loads((tmp_path / MANIFEST).read_text())["count"] == 11
    assert fs.missing(IDS[:12]) == ["id_011"]
    np.testing.assert_array_equal(
        fs.read(["id_001", "id_002", "id_007", "id_010"]),
        np.concatenate([vectors(["id_001"]), _renewed(["id_002", "id_007", "id_010"])]),
    )
    # A later writer sees the newest rows too and counts each id once.
    fill(tmp_path, IDS[11:13])
    fs = FeatureStore.open(tmp_path)
    assert fs.count == 13 and json.loads((tmp_path / MANIFEST).read_text())["count"] == 13
    np.testing.assert_array_equal(fs.read(["id_002"]), _renewed(["id_002"]))


def test_an_id_embedded_again_by_a_part_wins_after_merge(tmp_path):
    store = tmp_path / "s"
    fill(store, IDS[:6], index=0, count=2)
    fill(store, IDS[6:12], index=1, count=2)
    assert [n for n in os.listdir(store) if n.startswith("manifest")] == [MANIFEST]
    with StoreWriter(store, IDENTITY, shard_index=0, shard_count=2) as writer:
        writer.supersede(["id_001"])
        writer.append(["id_001"], _renewed(["id_001"]))
        writer.flush()
        # Before the merge the part manifest lists the new row after manifest.json's.
        during = FeatureStore.open(store)
        assert during.count == 12
        np.testing.assert_array_equal(during.read(["id_001"]), _renewed(["id_001"]))
    merged = merge_store(store)
    assert merged["count"] == 12
    fs = FeatureStore.open(store)
    assert fs.count == 12 and sorted(fs.ids) == IDS[:12]
    np.testing.assert_array_equal(
        fs.read(["id_001", "id_002"]), np.concatenate([_renewed(["id_001"]), vectors(["id_002"])])
    )


# ----------------------------------------------------------------------------- time-bounded shards


def test_a_shard_is_written_once_its_oldest_row_has_waited_max_shard_seconds(tmp_path):
    with StoreWriter(tmp_path, IDENTITY, shard_rows=1000, max_shard_seconds=0.05) as writer:
        writer.append(IDS[:3], vectors(IDS[:3]))
        assert FeatureStore.open(tmp_path).count == 0  # young rows wait for more
        time.sleep(0.1)
        writer.append(IDS[3:4], vectors(IDS[3:4]))
        # The oldest row had waited past the limit: all four are on disk, listed, readable.
        assert writer.buffered == 0
        assert json.loads((tmp_path / MANIFEST).read_text())["count"] == 4
        assert FeatureStore.open(tmp_path).ids == IDS[:4]
        time.sleep(0.1)
        writer.append([], vectors([]))  # a batch whose images all failed: nothing to write
        assert writer.buffered == 0 and len(writer.shards_written) == 1
