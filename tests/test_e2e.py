"""Every command of the README's table, run as a user types it: `invoke ...` in a subprocess.

Small data: 80 real HAM10000 images (a lesion-grouped image spec) and 3,000 real ISIC 2020 rows
(a tabular-only spec), a random-initialised ResNet-50 saved as a state dict (`--weights`), 32 px
inputs and two fusion epochs; artifacts go to a temporary `LESIONFUSE_ARTIFACTS`. What is checked
is that each command works end to end and refuses what it must, with its message and exit code 2,
never that the models are good. `invoke demo` and `invoke bench` are run by CI's install step and
by `tests/benchmarks/` respectively.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embed.sources import open_source
from embed.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).parent / "invoke"

pytestmark = pytest.mark.slow

SPEC = """[dataset]
name = "ham-e2e"
metadata = "metadata.csv"
images = "{images}"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex", "localization"]
numeric = ["age"]
"""


def invoke(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`invoke <args>` from the repository root, as a user runs it."""
    done = subprocess.run(
        [str(INVOKE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"invoke {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def _embed(env: dict, spec: str, weights: str, image_size: int = 32) -> subprocess.CompletedProcess:
    """`invoke embed` of `spec` at `image_size` px on the CPU, decoding in the main process."""
    return invoke(
        env,
        "embed",
        *("--spec", spec, "--image-size", str(image_size), "--weights", weights),
        *("--device", "cpu", "--workers", "0"),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    """Data sets, weights and an artifacts folder of its own."""
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("e2e")
    ham = shared_data / "ham10000"
    meta = pd.read_csv(ham / "metadata.csv")
    lesions = meta.drop_duplicates("lesion_id")
    chosen = pd.concat(
        [lesions[lesions.target == 1].head(20), lesions[lesions.target == 0].head(60)]
    )
    train = meta[
        meta.image_id.isin(chosen.image_id)
    ]  # one image per lesion: 20 malignant, 60 benign
    images = root / "ham-images"
    images.mkdir()
    for image_id in train.image_id:
        shutil.copy2(ham / "images" / f"{image_id}.jpg", images)
    data = root / "ham"
    data.mkdir()
    train.to_csv(data / "metadata.csv", index=False)
    (data / "dataset.toml").write_text(SPEC.format(images=images))

    scored = meta[~meta.lesion_id.isin(chosen.lesion_id)].head(6)
    new_images = root / "new-images"
    new_images.mkdir()
    for image_id in scored.image_id:
        shutil.copy2(ham / "images" / f"{image_id}.jpg", new_images)
    scored.drop(columns=["target"]).to_csv(root / "new-metadata.csv", index=False)

    isic = root / "isic2020"
    isic.mkdir()
    rows = pd.read_csv(shared_data / "isic2020" / "metadata.csv")
    rows = pd.concat([rows[rows.target == 1].head(100), rows[rows.target == 0].head(2900)])
    rows.to_csv(isic / "metadata.csv", index=False)
    spec2020 = (shared_data / "isic2020" / "dataset.toml").read_text()
    (isic / "dataset.toml").write_text(spec2020)
    # New patients to score with the tabular-only run: rows of the full file no training row
    # shares a patient with.
    everyone = pd.read_csv(shared_data / "isic2020" / "metadata.csv")
    new_patients = (
        everyone[~everyone.patient_id.isin(rows.patient_id)].head(20).drop(columns=["target"])
    )
    new_patients.to_csv(root / "isic2020-new.csv", index=False)

    torch.manual_seed(0)
    weights = root / "random-resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    env = {**os.environ, "LESIONFUSE_ARTIFACTS": str(root / "artifacts"), "PYTHONUNBUFFERED": "1"}
    return {
        "root": root,
        "spec": data / "dataset.toml",
        "images": images,
        "new_images": new_images,
        "new_metadata": root / "new-metadata.csv",
        "isic2020": isic / "dataset.toml",
        "isic2020_new": root / "isic2020-new.csv",
        "weights": weights,
        "env": env,
    }


def _store(world, size: int) -> Path:
    stores = Path(world["env"]["LESIONFUSE_ARTIFACTS"]) / "stores"
    return next(stores.glob(f"ham-e2e-*-{size}px-1v*"))


@pytest.fixture(scope="module")
def trained(world):
    """embed -> train-gbdt -> train-fusion -> stack, through invoke."""
    env, spec, weights = world["env"], str(world["spec"]), str(world["weights"])
    invoke(env, "weights", "--weights", weights)
    out = _embed(env, spec, weights)
    assert "store:" in out.stdout
    store = str(_store(world, 32))
    invoke(env, "train-gbdt", "--spec", spec, "--run", "r", "--store", store, "--image-pca", "4")
    invoke(env, "train-fusion", "--spec", spec, "--run", "r", "--store", store, "--epochs", "2")
    out = invoke(env, "stack", "--run", "r")
    assert "report:" in out.stdout
    return Path(env["LESIONFUSE_ARTIFACTS"]) / "runs" / "r"


def test_the_image_pipeline_end_to_end(world, trained):
    run = trained
    for path in (
        "gbdt/oof.csv",
        "gbdt/store.json",
        "fusion/oof.csv",
        "fusion/store.json",
        "stack/final.json",
        "report/report.md",
        "report/index.html",
    ):
        assert (run / path).is_file(), path
    env, weights = world["env"], str(world["weights"])
    for name in ("preds.csv", "preds.parquet"):
        out = world["root"] / name
        invoke(
            env,
            "score",
            "--run",
            "r",
            "--images",
            str(world["new_images"]),
            "--metadata",
            str(world["new_metadata"]),
            "--out",
            str(out),
            "--weights",
            weights,
            "--device",
            "cpu",
        )
        table = pd.read_parquet(out) if name.endswith(".parquet") else pd.read_csv(out)
        assert len(table) == 6 and table["probability"].between(0, 1).all()
        assert list(table.columns[:5]) == [
            "image_id",
            "probability",
            "p_gbdt",
            "p_fusion",
            "flagged",
        ]
    refused = invoke(
        env,
        "score",
        "--run",
        "r",
        "--metadata",
        str(world["new_metadata"]),
        "--out",
        str(world["root"] / "no-images.csv"),
        check=False,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "error: --images: run " in refused.stderr and "reads images" in refused.stderr


def test_the_tabular_only_pipeline(world):
    """ISIC 2020 metadata alone: train-gbdt with no image PCA (the default, and 0 said outright)."""
    env, spec = world["env"], str(world["isic2020"])
    invoke(env, "train-gbdt", "--spec", spec, "--run", "tab")
    invoke(env, "train-gbdt", "--spec", spec, "--run", "tab0", "--image-pca", "0")
    for run in ("tab", "tab0"):
        oof = pd.read_csv(Path(env["LESIONFUSE_ARTIFACTS"]) / "runs" / run / "gbdt" / "oof.csv")
        assert len(oof) == 3000 and oof["p"].between(0, 1).all()
        assert not (
            Path(env["LESIONFUSE_ARTIFACTS"]) / "runs" / run / "gbdt" / "store.json"
        ).exists()


def test_score_refuses_to_overwrite_its_metadata_and_a_folder_as_out(world, trained):
    env, weights = world["env"], str(world["weights"])
    metadata = world["new_metadata"]
    before = metadata.read_bytes()
    done = invoke(
        env,
        "score",
        "--run",
        "r",
        "--images",
        str(world["new_images"]),
        "--metadata",
        str(metadata),
        "--out",
        str(metadata),
        "--weights",
        weights,
        check=False,
    )
    assert done.returncode == 2 and "is the --metadata input" in done.stderr
    assert "Traceback" not in done.stderr and metadata.read_bytes() == before
    folder = world["root"] / "a-folder"
    folder.mkdir()
    done = invoke(
        env,
        "score",
        "--run",
        "r",
        "--images",
        str(world["new_images"]),
        "--out",
        str(folder),
        "--weights",
        weights,
        check=False,
    )
    assert done.returncode == 2 and "is a folder" in done.stderr
    assert "embedded" not in done.stderr  # refused before any image was embedded
    assert not list(world["root"].glob("a-folder*.tmp")) and list(folder.iterdir()) == []


def test_stages_trained_on_stores_of_other_sizes_are_refused(world, trained):
    """The LightGBM stage read a 32 px store; a fusion stage on a 40 px store would need another
    embedding of every scored image: refused, naming the field and the stage."""
    env, spec, weights = world["env"], str(world["spec"]), str(world["weights"])
    _embed(env, spec, weights, image_size=40)
    invoke(
        env,
        "train-gbdt",
        "--spec",
        spec,
        "--run",
        "sizes",
        "--store",
        str(_store(world, 32)),
        "--image-pca",
        "4",
    )
    done = invoke(
        env,
        "train-fusion",
        "--spec",
        spec,
        "--run",
        "sizes",
        "--store",
        str(_store(world, 40)),
        "--epochs",
        "1",
        check=False,
    )
    assert done.returncode == 2
    assert "image_size=40 but stage 'gbdt'" in done.stderr and "image_size=32" in done.stderr


def test_changed_images_are_embedded_again(world, tmp_path):
    """A copy of the data set under the same name with rotated images: its vectors are made again,
    not reused from the store of the original images."""
    env, weights = world["env"], str(world["weights"])
    images = tmp_path / "rotated"
    shutil.copytree(world["images"], images)
    changed = sorted(images.iterdir())[:5]
    for path in changed:
        with Image.open(path) as image:
            image.rotate(90, expand=True).save(path)
    spec = tmp_path / "dataset.toml"
    spec.write_text(SPEC.format(images=images))
    shutil.copy(world["spec"].parent / "metadata.csv", tmp_path / "metadata.csv")
    store = world["env"]["LESIONFUSE_ARTIFACTS"]
    _embed(env, str(world["spec"]), weights)  # the original store, complete
    before = {p.name for p in Path(store).glob("stores/ham-e2e-*-32px-1v*/shard-*.npy")}
    done = _embed(env, str(spec), weights)
    assert "5 image(s) changed since they were embedded" in done.stderr
    after = {p.name for p in Path(store).glob("stores/ham-e2e-*-32px-1v*/shard-*.npy")}
    assert len(after - before) >= 1  # the new vectors went into a new shard
    stored = FeatureStore.open(_store(world, 32))
    ids = [p.stem for p in changed]
    assert not stored.changed(
        open_source(images), ids
    )  # the stored vectors are the rotated images' now
    assert np.isfinite(stored.read(ids).astype(np.float32)).all()


def test_the_tabular_only_run_is_stacked_and_scores_new_patients(world):
    """`invoke stack --run R` on a run with only gbdt/, then `invoke score --run R --metadata CSV
    --out P`."""
    env, spec = world["env"], str(world["isic2020"])
    invoke(env, "train-gbdt", "--spec", spec, "--run", "tab-final")
    out = invoke(env, "stack", "--run", "tab-final")
    run = Path(env["LESIONFUSE_ARTIFACTS"]) / "runs" / "tab-final"
    assert "report:" in out.stdout and (run / "report" / "index.html").is_file()
    final = pd.read_json(run / "stack" / "final.json", typ="series")
    assert final["final"] == "gbdt" and 0 < final["threshold"] < 1

    new = pd.read_csv(world["isic2020_new"])
    new.loc[0, "age_approx"] = 250  # far outside the training ages: scored, marked, warned
    new.to_csv(world["root"] / "isic2020-new-odd.csv", index=False)
    preds = world["root"] / "tab-preds.csv"
    done = invoke(
        env,
        "score",
        "--run",
        "tab-final",
        "--metadata",
        str(world["root"] / "isic2020-new-odd.csv"),
        "--out",
        str(preds),
    )
    table = pd.read_csv(
        preds, keep_default_na=False
    )  # every row is scored: empty cells are empty texts
    assert table["image_name"].tolist() == new["image_name"].tolist()
    assert table["probability"].between(0, 1).all() and "p_fusion" not in table.columns
    assert not table["in_training"].any() and table["error"].eq("").all()
    assert (
        table.loc[0, "out_of_range"].startswith("age_approx = 250")
        and table.loc[1:, "out_of_range"].eq("").all()
    )
    assert "column 'age_approx': 1 row(s) hold values far outside the training range" in done.stderr
    assert (world["root"] / "tab-preds.html").is_file()

    nothing = invoke(
        env, "score", "--run", "tab-final", "--out", str(world["root"] / "x.csv"), check=False
    )
    assert nothing.returncode == 2 and "error: invoke score needs --images" in nothing.stderr
