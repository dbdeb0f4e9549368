"""train_fusion / FusionModel.predict on a tiny data set with a tiny feature store (real store
writer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from embed.errors import StoreMismatchError
from embed.store import IDENTITY_FIELDS, FeatureStore
from embed.store_writer import StoreWriter
from fuse.errors import RunError
from fuse.fusion import Embeddings, FusionModel, predict_rows, train_fusion
from fuse.fusion.model import FusionConfig
from tabular.errors import DataError
from tabular.spec import load_spec

SPEC = """[dataset]
name = "tiny-fusion"
metadata = "metadata.csv"
images = "images"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex"]
numeric = ["age"]
"""
N, VIEWS, DIM = 48, 2, 16
TINY = FusionConfig(
    image_hidden=16,
    meta_hidden=4,
    fused_hidden=8,
    batch_size=16,
    max_epochs=4,
    lr=0.01,
    dropout=0.1,
    input_dropout=0.0,
    patience=2,
    device="cpu",
)
QUICK = FusionConfig(**{**TINY.to_dict(), "max_epochs": 1})


def identity(sha: str = "a" * 64, image_size: int = 32, views: int = VIEWS) -> dict:
    return {
        "backbone": "test-backbone",
        "weights_sha256": sha,
        "preprocessing": {"resize": "whole image", "normalize_mean": [0.5, 0.5, 0.5]},
        "image_size": image_size,
        "views": views,
        "blocks": ["layer4"],
        "pooling": "avg",
        "dtype": "float16",
        "dim": DIM,
    }


def make_data(root: Path, extra_column: bool = False) -> tuple:
    """Metadata + spec for N images (2 per lesion, 1 in 3 lesions malignant) and their vectors."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lesion = np.arange(N) // 2
    target = (lesion % 3 == 0).astype(int)
    frame = pd.DataFrame(
        {
            "image_id": [f"IMG_{i:03d}" for i in range(N)],
            "lesion_id": [f"L{g:03d}" for g in lesion],
            "sex": rng.choice(["male", "female"], N),
            "age": np.where(rng.random(N) < 0.1, np.nan, rng.normal(55, 10, N).round()),
            "target": target,
        }
    )
    if extra_column:
        frame["site"] = "back"
    frame.to_csv(root / "metadata.csv", index=False)
    (root / "dataset.toml").write_text(SPEC)
    vectors = rng.normal(0, 1, (N, VIEWS, DIM)).astype(np.float32)
    vectors[target == 1, :, :4] += 2.0  # the images carry the label
    return load_spec(root / "dataset.toml"), frame, vectors


def write_store(path: Path, ids, vectors, **kwargs) -> Path:
    with StoreWriter(path, identity(**kwargs), shard_rows=20) as writer:
        writer.append(list(ids), vectors)
    return path


@pytest.fixture
def data(tmp_path):
    spec, frame, vectors = make_data(tmp_path / "data")
    store = write_store(tmp_path / "store", frame["image_id"], vectors)
    return spec, frame, vectors, store


def test_train_fusion_writes_the_stage_and_beats_chance(data, tmp_path):
    spec, frame, vectors, store = data
    metrics = train_fusion(spec, tmp_path / "run", store, TINY, n_folds=3)
    out = tmp_path / "run" / "fusion"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "store.json", "oof.csv", "metrics.json", "baselines_oof.csv"} <= names
    assert {f"fold{k}.pt" for k in range(3)} | {f"encoder_fold{k}.json" for k in range(3)} <= names
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "fold", "target", "p"]
    assert oof["id"].tolist() == frame["image_id"].tolist()  # the run's row order
    folds = pd.read_csv(tmp_path / "run" / "folds.csv", dtype={"id": str}).set_index("id")
    assert (oof["fold"].to_numpy() == folds.loc[oof["id"], "fold"].to_numpy()).all()
    assert oof["p"].between(0, 1).all()
    assert metrics["roc_auc"] > 0.7
    assert set(metrics["baselines"]) == {"logreg", "image_only"}
    assert json.loads((out / "metrics.json").read_text())["pauc80"] == metrics["pauc80"]
    recorded = json.loads((out / "store.json").read_text())
    assert recorded["weights_sha256"] == "a" * 64 and recorded["store"] == str(store.resolve())
    assert recorded["views"] == VIEWS and recorded["dim"] == DIM


def test_same_seed_gives_identical_out_of_fold_predictions(data, tmp_path):
    spec, _, _, store = data
    train_fusion(spec, tmp_path / "a", store, TINY, baselines=False, n_folds=3)
    train_fusion(spec, tmp_path / "b", store, TINY, baselines=False, n_folds=3)
    a = pd.read_csv(tmp_path / "a" / "fusion" / "oof.csv")
    b = pd.read_csv(tmp_path / "b" / "fusion" / "oof.csv")
    pd.testing.assert_frame_equal(a, b)


def test_saved_models_reproduce_the_out_of_fold_predictions(data, tmp_path):
    spec, frame, vectors, store = data
    train_fusion(spec, tmp_path / "run", store, TINY, baselines=False, n_folds=3)
    out = tmp_path / "run" / "fusion"
    oof = pd.read_csv(out / "oof.csv")
    models = FusionModel.load(out).folds  # state dicts read with weights_only=True
    source = Embeddings.from_array(FeatureStore.open(store).read(frame["image_id"].tolist()))
    for k, (model, encoder) in enumerate(models):
        rows = np.flatnonzero(oof["fold"].to_numpy() == k)
        meta = torch.from_numpy(encoder.mlp_matrix(encoder.transform(frame)).to_numpy(np.float32))
        p = predict_rows(model, source, meta, rows, batch_size=TINY.batch_size * 4)
        np.testing.assert_allclose(p, oof["p"].to_numpy()[rows], rtol=1e-6)
    p_all = FusionModel.load(out).predict(
        frame, vectors.astype(np.float16), spec=spec, identity=FeatureStore.open(store).reference()
    )
    assert p_all.shape == (N,) and np.isfinite(p_all).all()


def test_a_seed_ensemble_averages_its_members_and_its_first_member_is_the_single_model(
    data, tmp_path
):
    spec, frame, vectors, store = data
    train_fusion(spec, tmp_path / "one", store, TINY, baselines=False, n_folds=3)
    train_fusion(
        spec, tmp_path / "three", store, replace(TINY, members=3), baselines=False, n_folds=3
    )
    out = tmp_path / "three" / "fusion"
    assert {f"fold{k}_member{m}.pt" for k in range(3) for m in (1, 2)} <= {
        p.name for p in out.iterdir()
    }
    single = FusionModel.load(tmp_path / "one" / "fusion")
    ensemble = FusionModel.load(out)
    assert len(ensemble.folds) == 9 and len(single.folds) == 3
    for k in range(3):  # member 0 of each fold was drawn exactly as the single model was
        for a, b in zip(
            single.folds[k][0].state_dict().values(),
            ensemble.folds[3 * k][0].state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b)
    # The fold's out-of-fold probability is the mean of its members' probabilities.
    oof = pd.read_csv(out / "oof.csv")
    source = Embeddings.from_array(FeatureStore.open(store).read(frame["image_id"].tolist()))
    for k in range(3):
        rows = np.flatnonzero(oof["fold"].to_numpy() == k)
        members = ensemble.folds[3 * k : 3 * k + 3]
        meta = torch.from_numpy(
            members[0][1].mlp_matrix(members[0][1].transform(frame)).to_numpy(np.float32)
        )
        p = np.mean(
            [
                predict_rows(model, source, meta, rows, batch_size=TINY.batch_size * 4)
                for model, _ in members
            ],
            axis=0,
        )
        np.testing.assert_allclose(p, oof["p"].to_numpy()[rows], rtol=1e-6)
        assert not np.allclose(
            p, predict_rows(members[0][0], source, meta, rows)
        )  # the members differ
    # A missing member's file is named.
    (out / "fold1_member2.pt").unlink()
    with pytest.raises(
        RunError,
        match=r"fusion: .*fold1_member2\.pt is missing; retrain with `invoke train-fusion`",
    ):
        FusionModel.load(out)


def test_a_store_made_with_other_weights_is_refused(data, tmp_path):
    spec, frame, vectors, store = data
    train_fusion(spec, tmp_path / "run", store, QUICK, baselines=False, n_folds=3)
    other = write_store(tmp_path / "other", frame["image_id"], vectors, sha="b" * 64)
    with pytest.raises(
        StoreMismatchError,
        match=r"weights_sha256='b{64}' but stage 'fusion' of run .* was trained on "
        r"weights_sha256='a{64}'",
    ):
        train_fusion(spec, tmp_path / "run", other, QUICK, baselines=False)


def test_a_store_made_at_another_image_size_is_refused(data, tmp_path):
    spec, frame, vectors, store = data
    train_fusion(spec, tmp_path / "run", store, QUICK, baselines=False, n_folds=3)
    other = write_store(tmp_path / "other", frame["image_id"], vectors, image_size=64)
    with pytest.raises(
        StoreMismatchError,
        match="image_size=64 but stage 'fusion' of run .* was trained on image_size=32",
    ):
        train_fusion(spec, tmp_path / "run", other, QUICK, baselines=False)


def test_ids_missing_from_the_store_are_named_with_the_command_that_embeds_them(tmp_path):
    spec, frame, vectors = make_data(tmp_path / "data")
    keep = np.arange(N) >= 3
    store = write_store(tmp_path / "store", frame["image_id"][keep], vectors[keep])
    with pytest.raises(
        RunError,
        match=r"lacks 3 of the run's 48 ids \(3: IMG_000, IMG_001, IMG_002\); "
        r"embed them with `invoke embed --spec .*dataset.toml`",
    ):
        train_fusion(spec, tmp_path / "run", store, QUICK, n_folds=3)


def test_a_missing_store_names_the_command_that_makes_it(data, tmp_path):
    spec = data[0]
    with pytest.raises(
        RunError, match=r"no feature store at .*nowhere; make it with `invoke embed --spec"
    ):
        train_fusion(spec, tmp_path / "run", tmp_path / "nowhere", QUICK, n_folds=3)


def test_metadata_columns_changed_since_the_run_began_are_refused(data, tmp_path):
    spec, _, _, store = data
    train_fusion(spec, tmp_path / "run", store, QUICK, baselines=False, n_folds=3)
    changed, _, _ = make_data(tmp_path / "data", extra_column=True)
    with pytest.raises(
        DataError,
        match=r"metadata columns changed since the run began \(removed \[\], added \['site'\]\)",
    ):
        train_fusion(changed, tmp_path / "run", store, QUICK, baselines=False)


def test_prediction_refuses_embeddings_of_another_store(data, tmp_path):
    spec, frame, vectors, store = data
    train_fusion(spec, tmp_path / "run", store, QUICK, baselines=False, n_folds=3)
    out = tmp_path / "run" / "fusion"
    other = identity(image_size=448)
    with pytest.raises(
        StoreMismatchError,
        match="image_size=448 but the fusion models were trained on image_size=32",
    ):
        FusionModel.load(out).predict(frame, vectors, identity=other)
    other = identity()
    other["preprocessing"] = {**other["preprocessing"], "normalize_mean": [0.4, 0.4, 0.4]}
    with pytest.raises(
        StoreMismatchError, match=r"built with preprocessing.normalize_mean=\[0.4, 0.4, 0.4\]"
    ):
        FusionModel.load(out).predict(frame, vectors, identity=other)
    with pytest.raises(
        StoreMismatchError, match="field 'dim' differs: the model was trained on 16, got 8"
    ):
        FusionModel.load(out).predict(frame, vectors[:, :, :8])
    with pytest.raises(
        RunError,
        match=r"stage 'fusion' is missing \(.*config.json not found\); make it with "
        r"`invoke train-fusion --spec S --run R`",
    ):
        FusionModel.load(tmp_path / "fusion").predict(frame, vectors)
    assert set(IDENTITY_FIELDS) <= set(json.loads((out / "store.json").read_text()))


def test_an_interrupted_run_trains_only_the_folds_not_done(data, tmp_path, monkeypatch):
    """Killed during fold 2, a rerun keeps folds 0-1 and ends where an uninterrupted run ends."""
    from fuse.fusion import cross_validation as fusion

    spec, _, _, store = data
    train_fusion(spec, tmp_path / "whole", store, TINY, n_folds=3)

    class Killed(Exception):
        pass

    real = fusion._train_fold
    calls = []
    killed = []

    def dies_in_the_third_fold(*args, **kwargs):
        calls.append(args[5])  # k
        if len(calls) == 3 and not killed:  # the first run only
            killed.append(True)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(fusion, "_train_fold", dies_in_the_third_fold)
    with pytest.raises(Killed):
        train_fusion(spec, tmp_path / "resumed", store, TINY, n_folds=3)
    # The stage is not swapped in half done: the finished folds wait in fusion.new/ for the rerun.
    partial = tmp_path / "resumed" / "fusion.new"
    out = tmp_path / "resumed" / "fusion"
    assert not out.exists()
    assert sorted(p.name for p in partial.glob("*.done.json")) == [
        "fold0.done.json",
        "fold1.done.json",
    ]

    calls.clear()
    metrics = train_fusion(spec, tmp_path / "resumed", store, TINY, n_folds=3)
    assert calls == [2]
    assert not partial.exists()
    for name in ("oof.csv", "baselines_oof.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / name), pd.read_csv(tmp_path / "whole" / "fusion" / name)
        )
    whole = json.loads((tmp_path / "whole" / "fusion" / "metrics.json").read_text())

    def timeless(folds):
        return [{k: v for k, v in f.items() if k != "seconds"} for f in folds]

    assert timeless(metrics["folds"]) == timeless(whole["folds"])
    assert metrics["baselines"]["logreg"]["pauc80"] == whole["baselines"]["logreg"]["pauc80"]

    calls.clear()
    train_fusion(spec, tmp_path / "resumed", store, QUICK, n_folds=3)  # other settings: all again
    assert calls == [0, 1, 2]


def test_ids_that_failed_to_embed_name_retry_failed_and_the_file_listing_them(tmp_path):
    spec, frame, vectors = make_data(tmp_path / "data")
    keep = np.arange(N) >= 2
    store = tmp_path / "store"
    with StoreWriter(store, identity(), shard_rows=20) as writer:
        writer.append(list(frame["image_id"][keep]), vectors[keep])
        writer.add_failures(
            {"IMG_000": "image unreadable: truncated JPEG", "IMG_001": "empty file"}
        )
    with pytest.raises(
        RunError,
        match=r"2 of them could not be embedded, e.g. IMG_000: image unreadable: truncated JPEG "
        r"\(all 2 are listed in .*unembedded-ids.csv\); try them again with "
        r"`invoke embed --spec .*dataset.toml --retry-failed`; to train without them, "
        r"remove their rows",
    ):
        train_fusion(spec, tmp_path / "run", store, QUICK, n_folds=3)
    listed = pd.read_csv(tmp_path / "run" / "unembedded-ids.csv")
    assert listed.to_dict("list") == {
        "image_id": ["IMG_000", "IMG_001"],
        "reason": ["image unreadable: truncated JPEG", "empty file"],
    }


def test_folds_are_trained_again_when_a_vector_of_the_run_changed(data, tmp_path, monkeypatch):
    """A re-embedded image changes what the folds read: none is kept, and the result is a fresh
    run's."""
    from fuse.fusion import cross_validation as fusion

    spec, frame, vectors, store = data
    run = tmp_path / "run"
    first = train_fusion(spec, run, store, QUICK, n_folds=3)
    before = pd.read_csv(run / "fusion" / "oof.csv")
    recorded = json.loads((run / "fusion" / "store.json").read_text())["read"]
    assert recorded["rows"] == N and len(recorded["vectors_sha256"]) == 64

    changed = vectors.copy()
    changed[5] = -changed[5]  # one image replaced and embedded again: same ids, same identity
    store2 = write_store(tmp_path / "store2", frame["image_id"], changed)
    real = fusion._train_fold
    calls = []
    monkeypatch.setattr(fusion, "_train_fold", lambda *a, **k: calls.append(a[5]) or real(*a, **k))

    train_fusion(spec, run, store, QUICK, n_folds=3)  # same vectors: every fold kept
    assert calls == []
    second = train_fusion(spec, run, store2, QUICK, n_folds=3)
    assert calls == [0, 1, 2]
    after = pd.read_csv(run / "fusion" / "oof.csv")
    assert not np.allclose(after["p"], before["p"])
    assert json.loads((run / "fusion" / "store.json").read_text())["read"] != recorded
    fresh = train_fusion(spec, tmp_path / "fresh", store2, QUICK, n_folds=3)
    pd.testing.assert_frame_equal(after, pd.read_csv(tmp_path / "fresh" / "fusion" / "oof.csv"))
    assert second["pauc80"] == fresh["pauc80"] and first["store"]["read"] != second["store"]["read"]


def test_the_commands_recipe_options_reach_the_saved_config_and_bad_ones_are_refused(
    data, tmp_path
):
    from fuse import commands

    spec, _, _, store = data
    config = replace(QUICK, max_epochs=2)
    commands.train_fusion(
        tmp_path / "data" / "dataset.toml",
        tmp_path / "run",
        store=store,
        config=config,
        mixup_alpha=0.3,
        ema_epochs=2.0,
        schedule="cosine",
    )
    saved = json.loads((tmp_path / "run" / "fusion" / "config.json").read_text())
    assert (saved["mixup_alpha"], saved["ema_epochs"], saved["schedule"]) == (0.3, 2.0, "cosine")
    with pytest.raises(RunError, match=r"ema_epochs: expected a number of epochs >= 0"):
        commands.train_fusion(
            tmp_path / "data" / "dataset.toml",
            tmp_path / "run",
            store=store,
            config=config,
            ema_epochs=-1.0,
        )
    with pytest.raises(RunError, match=r"mixup_alpha: expected a number >= 0"):
        commands.train_fusion(
            tmp_path / "data" / "dataset.toml",
            tmp_path / "run",
            store=store,
            config=config,
            mixup_alpha=-1.0,
        )
