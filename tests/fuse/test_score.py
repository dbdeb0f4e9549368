"""Scoring new images with a tiny trained run: columns, missing metadata, unreadable images, Kaggle.

One module-scoped run on a synthetic ISIC 2024-layout data set, with a random-initialised
ResNet-50 at 32 px, one LightGBM seed, two fusion epochs and a small stack: about half a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tinyrun import train_tiny_run

from fuse.errors import RunError
from fuse.scoring import loop as loop_module
from fuse.scoring.score import NO_METADATA, patient_chunks, read_scoring_metadata, score
from tabular.spec import ISIC2024_TRAIN_ONLY

pytestmark = pytest.mark.slow

COLUMNS = [
    "isic_id",
    "probability",
    "p_gbdt",
    "p_fusion",
    "flagged",
    "reasons",
    "in_training",
    "out_of_range",
    "unlike_training",
    "novelty",
    "novelty_reason",
    "error",
]
FAST = {"device": "cpu", "num_workers": 0, "progress": False}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained, stacked run plus its data folder and the random weights it was embedded with."""
    return train_tiny_run(tmp_path_factory.mktemp("score"))


def _folder_of_test_images(tiny, folder):
    """The six test images as `<id>.jpg` files."""
    import h5py

    folder.mkdir()
    with h5py.File(tiny["data"] / "test-image.hdf5", "r") as h5:
        ids = sorted(h5.keys())
        for image_id in ids:
            (folder / f"{image_id}.jpg").write_bytes(np.asarray(h5[image_id]).tobytes())
    return ids


def test_every_column_every_row_with_broken_images_and_partial_metadata(tiny, tmp_path):
    folder = tmp_path / "images"
    ids = _folder_of_test_images(tiny, folder)
    (folder / "ISIC_zero.jpg").write_bytes(b"")
    (folder / "ISIC_text.jpg").write_text("this is not an image\n")
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv", dtype={"isic_id": str})
    no_row = metadata["isic_id"].iloc[0]
    metadata = metadata[metadata["isic_id"] != no_row]
    ghost = metadata.iloc[[0]].assign(isic_id="ISIC_ghost")  # a row whose image is missing
    pd.concat([metadata, ghost]).to_csv(tmp_path / "meta.csv", index=False)

    out = tmp_path / "out" / "predictions.csv"
    result = score(tiny["run"], folder, tmp_path / "meta.csv", out, weights=tiny["weights"], **FAST)

    written = pd.read_csv(out, dtype={"isic_id": str}, keep_default_na=False, na_values=[""])
    assert list(written.columns) == COLUMNS == list(result.columns)
    expected = [*metadata["isic_id"], "ISIC_ghost", *sorted({no_row, "ISIC_zero", "ISIC_text"})]
    assert sorted(written["isic_id"]) == sorted(expected) and written["isic_id"].is_unique
    by_id = result.set_index("isic_id")
    final = json.loads((tiny["run"] / "stack" / "final.json").read_text())

    scored = [i for i in ids if i != no_row]
    assert by_id.loc[scored, "error"].eq("").all()
    assert by_id.loc[scored, ["probability", "p_gbdt", "p_fusion"]].notna().all().all()
    assert (
        by_id.loc[scored, "flagged"] == (by_id.loc[scored, "probability"] >= final["threshold"])
    ).all()
    assert by_id.loc[scored, "probability"].between(0, 1).all()

    assert by_id.loc[no_row, "error"] == NO_METADATA  # scored with metadata treated as missing
    assert np.isfinite(by_id.loc[no_row, "probability"])

    for broken in ("ISIC_zero", "ISIC_text"):
        row = by_id.loc[broken]
        assert row["error"].startswith("image unreadable:"), row["error"]
        assert "not scored: the final model needs the image" in row["error"]
        assert (
            np.isnan(row["probability"]) and np.isnan(row["p_fusion"]) and pd.isna(row["flagged"])
        )
    assert "empty file" in by_id.loc["ISIC_zero", "error"]
    # every scored row says how unlike training it is; the rows not scored say nothing
    assert (
        by_id.loc[scored, "novelty"].between(0, 1).all()
        and by_id.loc[scored, "unlike_training"].notna().all()
    )
    for unscored in ("ISIC_zero", "ISIC_text", "ISIC_ghost"):
        assert np.isnan(by_id.loc[unscored, "novelty"]) and pd.isna(
            by_id.loc[unscored, "unlike_training"]
        )
        assert by_id.loc[unscored, "novelty_reason"] == ""

    ghost_row = by_id.loc["ISIC_ghost"]
    assert ghost_row["error"].startswith("no image for this id in")
    assert np.isnan(ghost_row["probability"])
    # this run's LightGBM uses image PCA features, so it cannot score a row without an image
    assert np.isnan(ghost_row["p_gbdt"]) and "p_gbdt needs the image too" in ghost_row["error"]
    assert written.loc[written["isic_id"] == "ISIC_ghost", "flagged"].isna().all()  # empty cell


def test_hdf5_with_train_only_columns_and_without_metadata(tiny, tmp_path):
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv", dtype={"isic_id": str})
    truth = pd.read_csv(tiny["data"] / "test-truth.csv", dtype={"isic_id": str})
    leaky = metadata.merge(truth, on="isic_id").assign(
        iddx_1=np.where(truth["target"] == 1, "Malignant", "Benign"),
        mel_thick_mm=9.9,
        lesion_id="IL_x",
    )
    leaky.to_csv(tmp_path / "leaky.csv", index=False)
    images = tiny["data"] / "test-image.hdf5"
    plain = score(
        tiny["run"],
        images,
        tiny["data"] / "test-metadata.csv",
        tmp_path / "a.csv",
        weights=tiny["weights"],
        **FAST,
    )
    with_answers = score(
        tiny["run"],
        images,
        tmp_path / "leaky.csv",
        tmp_path / "b.csv",
        weights=tiny["weights"],
        **FAST,
    )
    # the answers never reached a model: the same predictions, byte for byte
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert with_answers["probability"].tolist() == plain["probability"].tolist()
    assert plain["error"].eq("").all() and len(plain) == 6

    alone = score(tiny["run"], images, None, tmp_path / "c.csv", weights=tiny["weights"], **FAST)
    assert sorted(alone["isic_id"]) == sorted(plain["isic_id"])
    assert alone["error"].eq(NO_METADATA).all()
    assert alone[["probability", "p_gbdt", "p_fusion"]].notna().all().all()


def test_chunked_streaming_equals_the_stages_own_predictions(tiny, tmp_path, monkeypatch):
    # Scoring predicts chunk by chunk (whole patients each) while embedding; the figures must be
    # those of each stage's own predict function on the whole frame.
    from fuse.fusion import FusionModel
    from fuse.stacking.stack import BlendModel, StackModel, load_final
    from tabular.gbdt_model import GBDTModel

    images, metadata = tiny["data"] / "test-image.hdf5", tiny["data"] / "test-metadata.csv"
    whole = score(
        tiny["run"], images, metadata, tmp_path / "a.csv", weights=tiny["weights"], **FAST
    )
    monkeypatch.setattr(loop_module, "chunk_rows", lambda n: 1)
    chunked = score(
        tiny["run"], images, metadata, tmp_path / "b.csv", weights=tiny["weights"], **FAST
    )
    for column in ("probability", "p_gbdt", "p_fusion"):
        np.testing.assert_allclose(chunked[column], whole[column], rtol=1e-6)

    spec = tiny["spec"]
    frame = read_scoring_metadata(metadata, spec)
    assert frame[spec.id].tolist() == whole[spec.id].tolist()
    vectors = _embed_directly(tiny, images, frame[spec.id].tolist())
    p_fusion = FusionModel.load(tiny["run"] / "fusion").predict(frame, vectors, spec=spec)
    p_gbdt = GBDTModel.load(tiny["run"] / "gbdt").predict(
        frame, vectors.astype(np.float32).mean(axis=1), spec=spec
    )
    np.testing.assert_allclose(whole["p_fusion"], p_fusion, rtol=1e-5)
    np.testing.assert_allclose(whole["p_gbdt"], p_gbdt, rtol=1e-5)
    final = load_final(tiny["run"])  # the final model's score, through its calibrator
    model = (
        StackModel.load(tiny["run"] / "stack")
        if final.name == "stack"
        else BlendModel.load(tiny["run"] / "blend")
    )
    expected = final.calibrator(model.predict(frame, p_gbdt, p_fusion))
    np.testing.assert_allclose(whole["probability"], expected, rtol=1e-5)


def _embed_directly(tiny, images, ids):
    from embed.backbone import load_backbone
    from embed.config import EmbedConfig
    from embed.model_loop import embed_ids
    from embed.sources import open_source
    from embed.weights import ensure_weights

    config = EmbedConfig(image_size=32, device="cpu", num_workers=0, progress=False)
    model = load_backbone(ensure_weights(tiny["weights"]))
    got = {}
    for batch_ids, batch, _ in embed_ids(open_source(images), ids, model, config):
        got.update(zip(batch_ids, batch, strict=True))
    return np.stack([got[i] for i in ids])


@pytest.mark.parametrize("size", [1, 3, 50])
def test_patient_chunks_keep_patients_whole(tiny, size):
    spec = tiny["spec"]
    frame = read_scoring_metadata(tiny["data"] / "train-metadata.csv", spec)
    frame.loc[frame.index[:3], spec.patient] = np.nan  # rows without a patient
    chunks = patient_chunks(frame, spec, size)
    rows = np.concatenate(chunks)
    assert sorted(rows.tolist()) == list(range(len(frame)))
    assert all(len(chunk) >= size for chunk in chunks[:-1])
    owner = {}
    for k, chunk in enumerate(chunks):
        for patient in frame[spec.patient].iloc[chunk].dropna().unique():
            assert owner.setdefault(patient, k) == k


def test_train_only_columns_are_dropped_on_reading(tiny, tmp_path):
    spec = tiny["spec"]
    frame = pd.read_csv(tiny["data"] / "train-metadata.csv")
    frame.to_csv(tmp_path / "m.csv", index=False)
    read = read_scoring_metadata(tmp_path / "m.csv", spec)
    assert not set(read.columns) & set(ISIC2024_TRAIN_ONLY)
    assert set(read.columns) == {spec.id, spec.patient, *spec.feature_columns}


def test_kaggle_format_on_the_isic2024_demo(tiny, shared_data, tmp_path):
    demo = shared_data / "isic2024-demo"
    out = tmp_path / "submission.csv"
    result = score(
        tiny["run"],
        demo / "test-image.hdf5",
        demo / "test-metadata.csv",
        out,
        output_format="kaggle",
        weights=tiny["weights"],
        **FAST,
    )
    submission = pd.read_csv(out)
    sample = pd.read_csv(demo / "sample_submission.csv")
    assert list(submission.columns) == list(sample.columns) == ["isic_id", "target"]
    assert submission["isic_id"].tolist() == sample["isic_id"].tolist()
    assert submission["target"].between(0, 1).all()
    np.testing.assert_allclose(submission["target"], result["probability"])
    assert result["error"].eq("").all()


# ------------------------------------------------------------------------------ errors


def test_unknown_format(tiny, tmp_path):
    with pytest.raises(RunError, match=r"format: expected one of \['csv', 'kaggle'\], got 'xlsx'"):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            None,
            tmp_path / "o.csv",
            output_format="xlsx",
        )


def test_run_not_found(tmp_path):
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        score(tmp_path / "nowhere", tmp_path, None, tmp_path / "o.csv")


def test_missing_stack_stage(tabular_run, tmp_path):
    with pytest.raises(RunError, match=r"stage 'stack' is missing .*invoke stack --run R"):
        score(tabular_run.dir, tmp_path, None, tmp_path / "o.csv")


def test_images_path_missing(tiny, tmp_path):
    with pytest.raises(RunError, match=r"images: .*nothing-here does not exist"):
        score(tiny["run"], tmp_path / "nothing-here", None, tmp_path / "o.csv")


def test_images_path_not_a_folder_or_hdf5(tiny, tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(RunError, match=r"images: .*is a file but not HDF5"):
        score(tiny["run"], tmp_path / "x.txt", None, tmp_path / "o.csv")


def test_metadata_without_the_id_column(tiny, tmp_path):
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv").drop(columns=["isic_id"])
    metadata.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(
        RunError, match=r"the id column 'isic_id' \(the run's spec key 'id'\) is missing"
    ):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "m.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def test_metadata_without_a_feature_column(tiny, tmp_path):
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv").drop(columns=["age_approx"])
    metadata.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RunError, match=r"feature column\(s\) 1: age_approx are missing"):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "m.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def test_metadata_with_repeated_ids_or_text_in_numbers(tiny, tmp_path):
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv")
    pd.concat([metadata, metadata.iloc[[1]]]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RunError, match=r"duplicate ids in column 'isic_id', 1: ISIC_"):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "m.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )
    metadata.assign(age_approx="forty").to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(RunError, match=r"numeric column 'age_approx' holds text, e.g. 'forty'"):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "m.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def test_metadata_file_missing(tiny, tmp_path):
    with pytest.raises(RunError, match=r"metadata: no such file .*absent.csv"):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "absent.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def test_other_weights_are_refused(tiny, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(1)
    other = tmp_path / "other-resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    with pytest.raises(
        RunError,
        match=r"scoring was built with weights_sha256='[0-9a-f]{64}' but the run's models were "
        r"trained on weights_sha256=.*pass --weights",
    ):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            None,
            tmp_path / "o.csv",
            weights=other,
            **FAST,
        )


def test_other_preprocessing_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    record = json.loads((run / "fusion" / "store.json").read_text())
    record["preprocessing"]["resize"] = "centre crop"
    (run / "fusion" / "store.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"preprocessing.resize='centre crop'"):
        score(
            run,
            tiny["data"] / "test-image.hdf5",
            None,
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def _record_variant(run: Path, variant: str) -> None:
    """Make every record of `run` say its store was built by `variant` (the stages' store.json
    and the applicability detector's identity), as a run trained on such a store would."""
    recorded = json.loads((run / "fusion" / "store.json").read_text())["variant"]
    for path in run.rglob("*.json"):
        text = path.read_text()
        path.write_text(text.replace(f'"variant": "{recorded}"', f'"variant": "{variant}"'))


def test_a_run_on_a_faithful_variants_store_scores_with_the_default_and_int8_keeps_its_own(
    tiny, tmp_path, monkeypatch
):
    # A run whose store was built by int8-mixed (faithful: one function with eager) scores with
    # this machine's default, so nothing is calibrated on the few images being scored; the
    # predictions are those of the run as trained. A run on an every-layer int8 store
    # (unfaithful) must score with int8: it quantizes.
    import embed.variants

    class Quantized(Exception):
        pass

    def quantize(*args, **kwargs):
        raise Quantized

    monkeypatch.setattr(embed.variants, "_quantize_int8", quantize)
    images = tiny["data"] / "test-image.hdf5"
    plain = score(
        tiny["run"], images, None, tmp_path / "plain.csv", weights=tiny["weights"], **FAST
    )
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    _record_variant(run, "int8-mixed")
    assert json.loads((run / "fusion" / "store.json").read_text())["variant"] == "int8-mixed"
    mixed = score(run, images, None, tmp_path / "mixed.csv", weights=tiny["weights"], **FAST)
    pd.testing.assert_frame_equal(mixed, plain)
    _record_variant(run, "int8")
    with pytest.raises(Quantized):
        score(run, images, None, tmp_path / "int8.csv", weights=tiny["weights"], **FAST)


def test_scoring_through_a_store_resumes_and_reuses_the_embeddings(tiny, tmp_path, monkeypatch):
    """With a store, a rerun after an interruption embeds only what is missing, a second scoring
    embeds nothing, unreadable images keep their reasons, and the predictions are the in-memory
    ones."""
    import embed.pipeline as pipeline

    folder = tmp_path / "images"
    ids = _folder_of_test_images(tiny, folder)
    (folder / "ISIC_zero.jpg").write_bytes(b"")
    metadata = tiny["data"] / "test-metadata.csv"
    in_memory = score(
        tiny["run"], folder, metadata, tmp_path / "a.csv", weights=tiny["weights"], **FAST
    )

    summaries = []
    build = pipeline.build_store

    def recorded(*args, **kwargs):
        summaries.append(build(*args, **kwargs))
        return summaries[-1]

    monkeypatch.setattr(pipeline, "build_store", recorded)
    store = tmp_path / "store"
    # An interrupted first run: the store holds three of the images.
    part = tmp_path / "part"
    part.mkdir()
    for image_id in ids[:3]:  # the same files (size and modification time) as in `folder`
        shutil.copy2(folder / f"{image_id}.jpg", part)
    score(
        tiny["run"], part, None, tmp_path / "part.csv", weights=tiny["weights"], store=store, **FAST
    )

    resumed = score(
        tiny["run"],
        folder,
        metadata,
        tmp_path / "b.csv",
        weights=tiny["weights"],
        store=store,
        **FAST,
    )
    again = score(
        tiny["run"],
        folder,
        metadata,
        tmp_path / "c.csv",
        weights=tiny["weights"],
        store=store,
        **FAST,
    )

    assert [(s.embedded, s.skipped_existing) for s in summaries] == [
        (3, 0),
        (len(ids) - 3, 3),
        (0, len(ids)),
    ]
    assert list(summaries[1].failed) == ["ISIC_zero"] and list(summaries[2].previously_failed) == [
        "ISIC_zero"
    ]
    for result in (resumed, again):
        pd.testing.assert_frame_equal(result, in_memory, check_exact=False, rtol=1e-6)
        assert "empty file" in result.set_index("isic_id").loc["ISIC_zero", "error"]


def test_a_scoring_store_made_with_other_weights_is_refused(tiny, tmp_path):
    import torch
    import torchvision

    from common.files import sha256_file
    from embed.config import EmbedConfig
    from embed.pipeline import build_store
    from embed.sources import open_source
    from embed.weights import WeightsInfo

    torch.manual_seed(1)
    other = tmp_path / "other-resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), other)
    images = tiny["data"] / "test-image.hdf5"
    build_store(
        open_source(images),
        None,
        tmp_path / "store",
        f"scored images: {images}",
        WeightsInfo(other, sha256_file(other), "test"),
        EmbedConfig(image_size=32, device="cpu", num_workers=0, progress=False),
    )
    with pytest.raises(
        RunError, match=r"--store .*store: .*weights_sha256.*pass a new --store folder"
    ):
        score(
            tiny["run"],
            images,
            None,
            tmp_path / "o.csv",
            weights=tiny["weights"],
            store=tmp_path / "store",
            **FAST,
        )


def test_prevalence_moves_probability_and_keeps_the_flagged_lesions(tiny, tmp_path):
    images, metadata = tiny["data"] / "test-image.hdf5", tiny["data"] / "test-metadata.csv"
    plain = score(
        tiny["run"], images, metadata, tmp_path / "a.csv", weights=tiny["weights"], **FAST
    )
    moved = score(
        tiny["run"],
        images,
        metadata,
        tmp_path / "b.csv",
        weights=tiny["weights"],
        prevalence=0.001,
        **FAST,
    )
    assert "prevalence" not in plain.columns and (moved["prevalence"] == 0.001).all()
    scored = plain["probability"].notna()
    assert (moved.loc[scored, "probability"] < plain.loc[scored, "probability"]).all()
    pd.testing.assert_series_equal(moved["flagged"], plain["flagged"])
    with pytest.raises(
        RunError, match=r"--prevalence: expected a share strictly between 0 and 1, got 0.0"
    ):
        score(
            tiny["run"],
            images,
            metadata,
            tmp_path / "c.csv",
            weights=tiny["weights"],
            prevalence=0.0,
            **FAST,
        )


def test_reasons_and_the_triage_page(tiny, tmp_path):
    images, metadata = tiny["data"] / "test-image.hdf5", tiny["data"] / "test-metadata.csv"
    result = score(
        tiny["run"],
        images,
        metadata,
        tmp_path / "p.csv",
        weights=tiny["weights"],
        page=tmp_path / "p.html",
        **FAST,
    )
    # "feature = value (+0.12)" or "column != category (+0.12)"; only contributions that raise
    # the score, largest first.
    pattern = r"^$|^([^;]+ !?= [^;]+ \(\+\d+\.\d\d\))(; [^;]+ !?= [^;]+ \(\+\d+\.\d\d\)){0,2}$"
    assert result["reasons"].str.match(pattern).all()  # GBDTModel.reasons is tested on real signal
    page = (tmp_path / "p.html").read_text()
    assert result["isic_id"].iloc[0] in page and "p.csv" in page
    with pytest.raises(RunError, match=r"--html .*: expected a file ending in .html, got '.csv'"):
        score(
            tiny["run"],
            images,
            metadata,
            tmp_path / "q.csv",
            weights=tiny["weights"],
            page=tmp_path / "q2.csv",
            **FAST,
        )
    with pytest.raises(RunError, match=r"--html .* is, or lies inside, the --run input"):
        score(
            tiny["run"],
            images,
            metadata,
            tmp_path / "q.csv",
            weights=tiny["weights"],
            page=tiny["run"] / "report" / "triage.html",
            **FAST,
        )


def test_a_run_that_reads_images_refuses_metadata_alone(tiny, tmp_path):
    with pytest.raises(
        RunError, match=r"--images: run .* reads images .*pass --images DIR\|FILE.hdf5"
    ):
        score(
            tiny["run"],
            None,
            tiny["data"] / "test-metadata.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )


def test_metadata_and_images_without_a_common_id_are_refused(tiny, tmp_path):
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv")
    metadata.assign(isic_id="OTHER_" + metadata["isic_id"]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(
        RunError,
        match=r"--metadata .*m.csv and --images .*test-image.hdf5 have no id in common "
        r"\(6 metadata row\(s\), e.g. 6: OTHER_.*no row could be scored",
    ):
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "m.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )
    assert not (tmp_path / "o.csv").exists()


def test_most_rows_without_an_image_are_said_early_and_cost_only_their_patients(
    tiny, tmp_path, monkeypatch, caplog
):
    """2,000 metadata rows beside 6 images: a warning before any image is embedded, and the models
    see only the patients of the 6 (the other rows could get no score: both models need the
    image)."""
    import logging

    from fuse.scoring.run_models import RunModels

    test = pd.read_csv(
        tiny["data"] / "test-metadata.csv", dtype={"isic_id": str, "patient_id": str}
    )
    n = 2000
    rows = test.iloc[np.arange(n) % len(test)].reset_index(drop=True)
    rows["isic_id"] = [*test["isic_id"], *(f"ISIC_X{i:06d}" for i in range(n - len(test)))]
    rows["patient_id"] = [*test["patient_id"], *(f"PX{i // 10:05d}" for i in range(n - len(test)))]
    rows.to_csv(tmp_path / "many.csv", index=False)
    seen = []
    predict = RunModels.predict

    def counted(self, frame, block, embedded):
        seen.append(len(frame))
        return predict(self, frame, block, embedded)

    monkeypatch.setattr(RunModels, "predict", counted)
    order = []
    import embed.model_loop as model_loop

    embed_ids = model_loop.embed_ids

    def noted(*args, **kwargs):
        order.append("embedding")
        yield from embed_ids(*args, **kwargs)

    monkeypatch.setattr(model_loop, "embed_ids", noted)
    with caplog.at_level(logging.WARNING):
        caplog.handler.addFilter(lambda record: order.append(record.getMessage()) or True)
        result = score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "many.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            page=None,
            **FAST,
        )

    hint = [i for i, m in enumerate(order) if "is --images the folder of these lesions" in m]
    assert hint and hint[0] < order.index("embedding"), order
    assert "1994 of the 2000 metadata rows (100%) have no image" in order[hint[0]]
    patients = set(test["patient_id"])
    assert sum(seen) == int(rows["patient_id"].isin(patients).sum()) < 50
    assert len(result) == n and result["probability"].notna().sum() == 6
    no_image = result.iloc[6:]
    assert no_image["error"].str.startswith("no image for this id").all()
    assert no_image["p_gbdt"].isna().all() and (no_image["reasons"] == "").all()


def test_a_training_store_keeps_its_provenance(tiny, tmp_path):
    """`score --store <the store invoke embed made for training>` is refused, store untouched."""
    store = tiny["store"]
    before = {p.name: p.read_bytes() for p in store.glob("*.json")}
    folder = tmp_path / "images"
    _folder_of_test_images(tiny, folder)
    with pytest.raises(
        RunError,
        match=r"--store .* is the feature store of data set 'data-train' \(from .*\), "
        r"made by `invoke embed`; .*Pass a new --store folder for scored images",
    ):
        score(
            tiny["run"],
            folder,
            None,
            tmp_path / "o.csv",
            weights=tiny["weights"],
            store=store,
            **FAST,
        )
    assert {p.name: p.read_bytes() for p in store.glob("*.json")} == before


def test_training_images_are_marked_in_training(tiny, tmp_path):
    train = pd.read_csv(tiny["data"] / "train-metadata.csv", dtype={"isic_id": str}).head(5)
    train.to_csv(tmp_path / "train5.csv", index=False)
    result = score(
        tiny["run"],
        tiny["data"] / "train-image.hdf5",
        tmp_path / "train5.csv",
        tmp_path / "o.csv",
        weights=tiny["weights"],
        page=None,
        **FAST,
    )
    assert (
        len(result) == 60 and result["in_training"].all()
    )  # every training image, with a row or not
    new = score(
        tiny["run"],
        tiny["data"] / "test-image.hdf5",
        tiny["data"] / "test-metadata.csv",
        tmp_path / "n.csv",
        weights=tiny["weights"],
        page=None,
        **FAST,
    )
    assert not new["in_training"].any()


def test_scoring_without_metadata_gives_no_reason_from_absent_values(tiny, tmp_path):
    result = score(
        tiny["run"],
        tiny["data"] / "test-image.hdf5",
        None,
        tmp_path / "o.csv",
        weights=tiny["weights"],
        page=None,
        **FAST,
    )
    for text in result["reasons"]:
        assert "!=" not in text and "missing" not in text and "(+0.00)" not in text, text


def _planted_images(tiny, folder, n_like: int = 4):
    """`n_like` training-like test images plus one planted image of another kind (a flat grey
    square four times the training images' size), with metadata; returns (metadata, planted id)."""
    from PIL import Image

    ids = _folder_of_test_images(tiny, folder)[:n_like]
    for extra in folder.glob("*.jpg"):
        if extra.stem not in ids:
            extra.unlink()
    Image.new("RGB", (160, 160), (128, 128, 128)).save(folder / "ISIC_planted.jpg", quality=95)
    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv", dtype={"isic_id": str})
    metadata = metadata[metadata["isic_id"].isin(ids)]
    planted = metadata.iloc[[0]].assign(isic_id="ISIC_planted")
    return pd.concat([metadata, planted], ignore_index=True), "ISIC_planted"


def test_a_planted_image_of_another_kind_is_marked_through_invoke_score(tiny, tmp_path):
    """End to end through the invoke task: the planted image is unlike training (acquisition
    named in its reason), the count is warned, and the triage page carries the banner."""
    import subprocess
    import sys
    from pathlib import Path

    metadata, planted = _planted_images(tiny, tmp_path / "images")
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "preds.csv"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "invoke",
            "score",
            "--run",
            str(tiny["run"]),
            "--images",
            str(tmp_path / "images"),
            "--metadata",
            str(tmp_path / "meta.csv"),
            "--out",
            str(out),
            "--weights",
            str(tiny["weights"]),
            "--device",
            "cpu",
            "--overlays",
            "0",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(
        out, dtype={"isic_id": str}, keep_default_na=False, na_values=[""]
    ).set_index("isic_id")
    row = table.loc[planted]
    assert bool(row["unlike_training"]) and row["novelty"] >= 0.97, row
    assert (
        "acquisition (" in row["novelty_reason"]
        and "saturation 0 vs training" in row["novelty_reason"]
    ), row
    assert (
        row["novelty_reason"].count("metadata") <= 1
    )  # one notion of "unlike training", said once
    marked = int(table["unlike_training"].astype(str).eq("True").sum())
    assert (
        f"{marked} of {len(table)} images look unlike the images this run was trained on"
        in done.stderr
    )
    page = " ".join(out.with_suffix(".html").read_text().split())
    assert f"{marked} of {len(table)} images look unlike the images this run was trained on" in page


def test_a_run_without_the_applicability_stage_still_scores(tiny, tmp_path, caplog):
    run = tmp_path / "old-run"
    shutil.copytree(tiny["run"], run)
    shutil.rmtree(run / "applicability")
    with caplog.at_level("INFO"):
        result = score(
            run,
            tiny["data"] / "test-image.hdf5",
            tiny["data"] / "test-metadata.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            page=None,
            **FAST,
        )
    assert result["probability"].notna().all()
    assert result["unlike_training"].isna().all() and result["novelty"].isna().all()
    assert result["novelty_reason"].eq("").all()
    said = [r.getMessage() for r in caplog.records if "no applicability stage" in r.getMessage()]
    assert len(said) == 1 and "invoke stack --run" in said[0]


def test_stack_writes_the_applicability_stage(tiny):
    from fuse.applicability.detector import load

    stage = tiny["run"] / "applicability"
    detector = load(stage)
    assert detector.record["parts"] == ["image", "acquisition", "metadata"]
    assert detector.record["rows"] == 60 and not (tiny["run"] / "applicability.new").exists()
    assert (
        detector.identity["dim"]
        == json.loads((tiny["run"] / "fusion" / "store.json").read_text())["dim"]
    )
    # the training images' cues are cached beside the store, keyed by id and fingerprint
    from embed.cue_cache import CUE_CACHE

    with np.load(tiny["store"] / CUE_CACHE, allow_pickle=False) as cache:
        assert len(cache["ids"]) == 60 and np.isfinite(cache["values"]).all()


def test_stack_names_a_missing_store_and_leaves_the_old_detector(tiny, tmp_path):
    from fuse.stacking.stack import StackConfig, stack

    run = tmp_path / "moved-store-run"
    shutil.copytree(tiny["run"], run)
    for stage in ("gbdt", "fusion"):
        record = json.loads((run / stage / "store.json").read_text())
        record["store"] = str(tmp_path / "gone")
        (run / stage / "store.json").write_text(json.dumps(record))
    before = (run / "applicability" / "applicability.json").read_bytes()
    with pytest.raises(
        RunError,
        match=r"cannot read the feature store the run was trained on \(.*gone.*invoke embed",
    ):
        stack(run, config=StackConfig(num_boost_round=30))
    assert (run / "applicability" / "applicability.json").read_bytes() == before


def test_categories_not_seen_at_fit_are_said_once_though_chunks_are_predicted_in_a_worker(
    tiny, tmp_path, caplog
):
    """Scoring predicts each chunk in a worker thread: what its encoders meet still reaches the one
    collection of the command, so every fold model's unseen site is one warning, not one each."""
    from tabular.features import unknown_categories_said_once

    metadata = pd.read_csv(tiny["data"] / "test-metadata.csv", dtype={"isic_id": str})
    metadata["anatom_site_general"] = "elbow"
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    with caplog.at_level("WARNING", logger="tabular.features"), unknown_categories_said_once():
        score(
            tiny["run"],
            tiny["data"] / "test-image.hdf5",
            tmp_path / "meta.csv",
            tmp_path / "o.csv",
            weights=tiny["weights"],
            **FAST,
        )
    said = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("categorical column 'anatom_site_general':")
    ]
    assert len(said) == 1 and "elbow" in said[0] and "by 5 of 5 encoder calls" in said[0]


def test_the_triage_page_states_the_operating_points_lower_bound_from_the_report(tiny, tmp_path):
    from fuse.pages.report import read_operating_point, write_report

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    images, metadata = tiny["data"] / "test-image.hdf5", tiny["data"] / "test-metadata.csv"
    score(
        run,
        images,
        metadata,
        tmp_path / "a.csv",
        weights=tiny["weights"],
        page=tmp_path / "a.html",
        **FAST,
    )
    assert (
        "lower 95% bound" not in (tmp_path / "a.html").read_text()
    )  # no report yet: nothing to repeat
    write_report(run)
    point = read_operating_point(run)
    score(
        run,
        images,
        metadata,
        tmp_path / "b.csv",
        weights=tiny["weights"],
        page=tmp_path / "b.html",
        **FAST,
    )
    page = " ".join((tmp_path / "b.html").read_text().split())
    assert f"lower 95% bound {point['sensitivity_low']:.1%}" in page


def test_a_later_scoring_skips_torchvision_and_gives_the_same_scores_and_page(tiny, tmp_path):
    """The first scoring saves the backbone's stages as TorchScript (`embed.backbone_cache`); a
    scoring in a fresh process then loads them: torchvision (and the torch._dynamo its ops pull
    in) is never imported, and the predictions and the page with its overlays are the same."""
    folder = tmp_path / "images"
    _folder_of_test_images(tiny, folder)
    first = tmp_path / "first" / "predictions.csv"
    score(
        tiny["run"],
        folder,
        None,
        first,
        weights=tiny["weights"],
        page=first.with_suffix(".html"),
        **FAST,
    )
    later = tmp_path / "later" / "predictions.csv"
    code = (
        "import sys; from fuse.scoring.score import score; "
        f"score({str(tiny['run'])!r}, {str(folder)!r}, None, {str(later)!r}, "
        f"weights={str(tiny['weights'])!r}, page={str(later.with_suffix('.html'))!r}, "
        "device='cpu', num_workers=0, progress=False); "
        "print('torchvision' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "False"]
    assert later.read_bytes() == first.read_bytes()
    page = later.with_suffix(".html").read_text()
    assert page == first.with_suffix(".html").read_text()
    assert 'alt="saliency of ' in page
