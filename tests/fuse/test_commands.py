"""The command entry points: embedding a spec, finding its store, and the options they refuse."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from embed.errors import EmbedError, StoreMismatchError
from embed.pooled import DEFAULT_BLOCKS, DEFAULT_POOLING, feature_dim
from embed.store import store_name
from embed.weights import ensure_weights
from fuse.commands import embed_spec, stack_and_report, train_gbdt
from fuse.demo.synthetic import make_isic2024_like
from fuse.errors import RunError
from fuse.stores import locate_store, open_for_training
from tabular.spec import load_spec
from tabular.validate import read_metadata


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    data = root / "isic-tiny"
    make_isic2024_like(data, n_rows=60, n_patients=8, prevalence=0.2, seed=1)
    weights_path = root / "random-resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights_path)
    return {
        "root": root,
        "data": data,
        "weights_path": weights_path,
        "weights": ensure_weights(weights_path),
        "stores": root / "stores",
    }


def test_embed_spec_builds_the_store_and_a_rerun_does_no_model_work(tiny, tmp_path):
    stores = tmp_path / "stores"  # its own: other tests add stores to the shared folder
    first = embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=stores
    )
    assert first.embedded == 60 and not first.failed
    again = embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=stores
    )
    assert again.embedded == 0
    spec = load_spec(tiny["data"])
    store = locate_store(spec, tiny["weights"], stores=stores)
    assert store.name == store_name(
        spec.name, tiny["weights"].sha256, 32, 1, DEFAULT_BLOCKS, DEFAULT_POOLING
    )
    ids = read_metadata(spec)[spec.id].astype(str).tolist()
    vectors = open_for_training(spec, ids, store).mean_embeddings()
    assert vectors.shape == (60, feature_dim(DEFAULT_BLOCKS)) and vectors.std() > 0


def test_a_store_of_several_pooled_blocks_has_its_own_name_and_width(tiny, tmp_path):
    summary = embed_spec(
        tiny["data"],
        image_size=32,
        blocks="layer4,layer3",
        pooling="gem",
        weights_path=tiny["weights_path"],
        stores=tmp_path / "stores",
    )
    assert summary.store_dir.name.endswith("-32px-1v-l34-gem") and summary.embedded == 60
    spec = load_spec(tiny["data"])
    ids = read_metadata(spec)[spec.id].astype(str).tolist()
    opened = open_for_training(spec, ids, summary.store_dir)
    assert opened.mean_embeddings().shape == (60, 3072)
    assert (opened.store.reference()["blocks"], opened.store.reference()["pooling"]) == (
        ["layer3", "layer4"],
        "gem",
    )
    # LightGBM's image PCA reads the wider vectors as it reads the classic ones.
    train_gbdt(tiny["data"], tmp_path / "run", image_pca=4, store=summary.store_dir, seeds=(0,))
    assert '"blocks": [\n    "layer3",' in (tmp_path / "run" / "gbdt" / "store.json").read_text()


def test_locate_store_names_the_command_that_makes_one(tiny, tmp_path):
    spec = load_spec(tiny["data"])
    with pytest.raises(
        RunError, match=r"no feature store for data set 'isic-tiny-train' .* `invoke embed --spec "
    ):
        locate_store(spec, tiny["weights"], stores=tmp_path)


def test_locate_store_asks_to_choose_among_several(tiny):
    embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=tiny["stores"]
    )
    embed_spec(
        tiny["data"], image_size=40, weights_path=tiny["weights_path"], stores=tiny["stores"]
    )
    with pytest.raises(
        RunError,
        match="several feature stores for 'isic-tiny-train': .*32px-1v.*, .*40px-1v.*; choose one "
        "with --store",
    ):
        locate_store(load_spec(tiny["data"]), tiny["weights"], stores=tiny["stores"])


def test_embed_refuses_a_spec_without_images(shared_data):
    with pytest.raises(RunError, match="spec 'isic2020-dev' names no images"):
        embed_spec(shared_data / "isic2020" / "dataset.toml")


def test_embed_refuses_a_bad_shard(tiny):
    with pytest.raises(EmbedError, match=r"--shard: expected i/n with 0 <= i < n, got '3/2'"):
        embed_spec(
            tiny["data"], shard="3/2", weights_path=tiny["weights_path"], stores=tiny["stores"]
        )


def test_train_gbdt_refuses_bad_image_pca(shared_data, tmp_path):
    with pytest.raises(RunError, match="--image-pca must be >= 0, got: -1"):
        train_gbdt(shared_data / "isic2020" / "dataset.toml", tmp_path / "run", image_pca=-1)
    with pytest.raises(RunError, match="spec 'isic2020-dev' has no images; use --image-pca 0"):
        train_gbdt(shared_data / "isic2020" / "dataset.toml", tmp_path / "run", image_pca=8)


def test_train_gbdt_refuses_a_trial_patience_below_1(shared_data, tmp_path):
    with pytest.raises(RunError, match="--trial-patience must be >= 1, got: 0"):
        train_gbdt(shared_data / "isic2020" / "dataset.toml", tmp_path / "run", trial_patience=0)


def test_stack_refuses_a_sensitivity_outside_0_1(tmp_path):
    with pytest.raises(RunError, match=r"--sensitivity must be in \(0, 1\), got: 1.5"):
        stack_and_report(tmp_path, sensitivity=1.5)


def test_gbdt_uses_image_pca_from_the_store(tiny, tmp_path):
    # The 32 px store (made here, or kept from the first test: a rerun embeds nothing), so that
    # this test also runs alone.
    path = embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=tiny["stores"]
    ).store_dir
    metrics = train_gbdt(tiny["data"], tmp_path / "run", image_pca=4, store=path, seeds=(0,))
    features = (tmp_path / "run" / "gbdt" / "features.json").read_text()
    assert "pca" in features.lower()
    assert Path(tmp_path / "run" / "gbdt" / "oof.csv").exists() and "pauc80" in str(metrics)


def test_rerunning_embed_with_auto_keeps_the_variant_the_store_was_built_with(tiny, tmp_path):
    # A store built on another kind of CPU (whose default variant differs) still takes new
    # images with the default --variant auto; an explicit other variant is refused by name.
    stores = tmp_path / "stores"
    first = embed_spec(
        tiny["data"],
        image_size=32,
        variant="folded",
        weights_path=tiny["weights_path"],
        stores=stores,
    )
    again = embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=stores
    )
    assert first.embedded == 60 and again.embedded == 0
    assert json.loads((first.store_dir / "manifest.json").read_text())["variant"] == "folded"
    with pytest.raises(
        StoreMismatchError,
        match=r"was built with variant='folded' but this run asks for variant='jit-frozen'",
    ):
        embed_spec(
            tiny["data"],
            image_size=32,
            variant="jit-frozen",
            weights_path=tiny["weights_path"],
            stores=stores,
        )


def test_a_sharded_store_with_only_part_manifests_is_located_and_keeps_its_variant(tiny, tmp_path):
    # Part 1 of 2 is still being written with a variant this CPU would not choose for "auto": the
    # store has no manifest.json yet. Part 0, run with the default --variant auto, joins it.
    from embed.config import EmbedConfig, embedding_identity
    from embed.store_format import MANIFEST, part_manifest_name
    from embed.store_writer import StoreWriter
    from embed.variants import default_variant
    from fuse.stores import store_path

    spec = load_spec(tiny["data"])
    recorded = "folded" if default_variant("cpu") == "eager" else "eager"
    config = EmbedConfig(image_size=32, variant=recorded, device="cpu")
    stores = tmp_path / "stores"
    store_dir = store_path(spec, tiny["weights"], config, stores)
    identity = embedding_identity(tiny["weights"], config)
    with StoreWriter(
        store_dir, identity, shard_index=1, shard_count=2, info={"dataset": spec.name}
    ):
        assert (
            not (store_dir / MANIFEST).exists() and (store_dir / part_manifest_name(1, 2)).is_file()
        )
        assert locate_store(spec, tiny["weights"], stores=stores) == store_dir
        part = embed_spec(
            tiny["data"],
            image_size=32,
            shard="0/2",
            device="cpu",
            weights_path=tiny["weights_path"],
            stores=stores,
        )
    assert part.store_dir == store_dir and part.embedded > 0
    assert json.loads((store_dir / MANIFEST).read_text())["variant"] == recorded


def test_train_gbdt_reads_and_validates_the_metadata_once(tiny, tmp_path, monkeypatch):
    import tabular.validate

    summary = embed_spec(
        tiny["data"], image_size=32, weights_path=tiny["weights_path"], stores=tiny["stores"]
    )
    validations = []
    check = tabular.validate.check_metadata
    monkeypatch.setattr(
        tabular.validate,
        "check_metadata",
        lambda *args, **kwargs: validations.append(args[1].name) or check(*args, **kwargs),
    )
    train_gbdt(tiny["data"], tmp_path / "run", image_pca=4, store=summary.store_dir, seeds=(0,))
    assert validations == ["isic-tiny-train"]  # once for the store's ids and the fit together
    validations.clear()
    train_gbdt(tiny["data"], tmp_path / "run", image_pca=4, store=summary.store_dir, seeds=(0,))
    assert validations == ["isic-tiny-train"]  # a rerun reopens the run once too
