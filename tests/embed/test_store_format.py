"""The store format's public names: finding a data set's stores and reading the identity a store
records, also while a sharded build has written only part manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embed.errors import EmbedError, StoreMismatchError
from embed.identity import IDENTITY_FIELDS, LEGACY_VALUES
from embed.store_format import (
    MANIFEST,
    MANIFEST_FIELDS,
    is_store,
    part_manifest_name,
    read_manifests,
    recorded_identity,
    store_candidates,
    store_folders,
    store_name,
)
from embed.store_writer import StoreWriter

SHA = "0123456789abcdef" * 4
IDENTITY = {
    "backbone": "resnet50-keras-imagenet",
    "weights_sha256": SHA,
    "preprocessing": {"resize": "whole image", "normalize_mean": [0.485, 0.456, 0.406]},
    "image_size": 64,
    "zoom": None,
    "views": 1,
    "blocks": ["layer3"],
    "pooling": "gem",
    "variant": "folded",
    "dtype": "float16",
    "dim": 4,
}


def _name(dataset: str, sha: str = SHA, **kw) -> str:
    settings = {"image_size": 64, "views": 1, "blocks": ("layer3",), "pooling": "gem"} | kw
    return store_name(
        dataset,
        sha,
        settings["image_size"],
        settings["views"],
        settings["blocks"],
        settings["pooling"],
        settings.get("variant", "auto"),
    )


def _write(path, identity=IDENTITY, ids=("a", "b"), **kw) -> None:
    with StoreWriter(path, identity, info={"dataset": "toy"}, **kw) as writer:
        writer.append(list(ids), np.ones((len(ids), identity["views"], identity["dim"])))


def test_every_identity_field_is_a_manifest_field():
    assert set(IDENTITY_FIELDS) <= set(MANIFEST_FIELDS)


def test_a_store_with_only_part_manifests_is_found_and_its_identity_read(tmp_path):
    path = tmp_path / _name("ham")
    # Part 1 of 2 still running: its own manifest is the only one the store has so far.
    with StoreWriter(
        path, IDENTITY, shard_index=1, shard_count=2, info={"dataset": "ham"}
    ) as writer:
        writer.append(["x"], np.ones((1, 1, 4)))
        writer.flush()
        assert not (path / MANIFEST).exists() and (path / part_manifest_name(1, 2)).is_file()
        assert is_store(path)
        assert recorded_identity(path) == IDENTITY
        assert store_candidates(tmp_path, "ham", SHA) == [path]
        assert store_candidates(tmp_path, "ham") == [path]
    # Once merged, the combined manifest says the same.
    assert (path / MANIFEST).is_file() and recorded_identity(path) == IDENTITY


def test_parts_that_disagree_are_refused_by_name(tmp_path):
    path = tmp_path / "s"
    _write(path)
    manifest = json.loads((path / MANIFEST).read_text())
    (path / part_manifest_name(1, 2)).write_text(json.dumps({**manifest, "image_size": 96}))
    with pytest.raises(
        StoreMismatchError,
        match=r"manifest\.part-1-of-2\.json' was built with image_size=96 but "
        r"manifest\.json of the same store has image_size=64",
    ):
        recorded_identity(path)


def test_store_candidates_keeps_this_data_set_and_weights_only(tmp_path):
    mine = [
        tmp_path / _name("ham"),
        tmp_path / _name("ham", image_size=224, blocks=("layer4",), pooling="avg"),
        tmp_path / _name("ham", variant="int8"),
    ]
    other_weights = tmp_path / _name("ham", sha="fe" * 32)
    longer_name = tmp_path / _name("ham-big")  # another data set whose name starts with "ham-"
    for path in [*mine, other_weights, longer_name]:
        _write(path, {**IDENTITY, "weights_sha256": SHA if path != other_weights else "fe" * 32})
    not_a_store = tmp_path / _name("ham", image_size=32)
    not_a_store.mkdir()
    (not_a_store / "shard-00000.npy").write_bytes(b"")
    assert store_candidates(tmp_path, "ham", SHA) == sorted(mine)
    assert store_folders(tmp_path, "ham", SHA) == sorted([*mine, not_a_store])
    assert store_candidates(tmp_path, "ham") == sorted([*mine, other_weights])
    assert store_candidates(tmp_path, "ham-big", SHA) == [longer_name]
    assert store_candidates(tmp_path / "absent", "ham", SHA) == []


def test_recorded_identity_of_an_older_store_takes_the_legacy_values(tmp_path):
    path = tmp_path / "old"
    _write(path)
    manifest = json.loads((path / MANIFEST).read_text())
    for field in LEGACY_VALUES:
        del manifest[field]
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert recorded_identity(path) == {**IDENTITY, **LEGACY_VALUES}


def test_recorded_identity_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(EmbedError, match=r"no feature store at '.*nothing' \(no manifest\.json\)"):
        recorded_identity(tmp_path / "nothing")
    assert not is_store(tmp_path / "nothing")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / MANIFEST).write_text("[1, 2]")
    with pytest.raises(
        EmbedError,
        match=r"manifest\.json' is not a lesionfuse feature store manifest \(format 'list'",
    ):
        read_manifests(tmp_path / "list")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_text("{")
    with pytest.raises(
        EmbedError, match=r"feature store file '.*broken/manifest\.json' cannot be read"
    ):
        recorded_identity(tmp_path / "broken")
