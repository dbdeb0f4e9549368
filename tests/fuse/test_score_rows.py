"""The rows to score: a metadata file read with the checks training applies, in the same words."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fuse.errors import RunError
from fuse.scoring.rows import NO_METADATA, metadata_rows, read_scoring_metadata, scoring_rows
from tabular.errors import DataError
from tabular.spec import load_spec
from tabular.validate import read_metadata

SPEC = """
[dataset]
name = "tiny"
metadata = "metadata.csv"
images = "images"
id = "image_id"
target = "target"
group = "lesion_id"
patient = "patient_id"
categorical = ["sex"]
numeric = ["age"]
"""


def rows(n: int = 4) -> list[dict]:
    return [
        {
            "image_id": f"img{i}",
            "lesion_id": f"L{i}",
            "patient_id": f"P{i // 2}",
            "sex": "male" if i % 2 else None,
            "age": 40.0 + i,
            "target": i % 2,
            "diagnosis": "nevus",
        }
        for i in range(n)
    ]


def write(folder: Path, data: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(data).to_csv(folder / "metadata.csv", index=False)
    (folder / "dataset.toml").write_text(SPEC)
    return folder / "metadata.csv"


@pytest.fixture
def spec(tmp_path):
    write(tmp_path / "train", rows())
    return load_spec(tmp_path / "train" / "dataset.toml")


def test_only_the_columns_the_models_read_are_kept(spec, tmp_path):
    path = write(tmp_path / "new", rows())
    frame = read_scoring_metadata(path, spec)
    assert list(frame.columns) == ["image_id", "sex", "age", "patient_id"]
    assert frame["image_id"].tolist() == ["img0", "img1", "img2", "img3"]
    assert (
        frame["age"].dtype == np.float64
        and pd.isna(frame.loc[0, "sex"])
        and frame.loc[1, "sex"] == "male"
    )


def test_rows_without_an_image_and_images_without_a_row(spec, tmp_path):
    path = write(tmp_path / "new", rows(3))
    frame, errors = scoring_rows(path, spec, ["img1", "img2", "extra"], Path("imgs"))
    assert frame["image_id"].tolist() == ["img0", "img1", "img2", "extra"]
    assert errors == {"img0": "no image for this id in imgs", "extra": NO_METADATA}
    alone, errors = scoring_rows(None, spec, ["a", "b"], Path("imgs"))
    assert alone["image_id"].tolist() == ["a", "b"] and set(errors.values()) == {NO_METADATA}
    assert "age" in alone.columns and alone["age"].isna().all()
    assert metadata_rows(path, spec)["image_id"].tolist() == ["img0", "img1", "img2"]


def bad(kind: str) -> list[dict]:
    data = rows()
    if kind == "empty id":
        data[2]["image_id"] = ""
    elif kind == "duplicate id":
        data[3]["image_id"] = "img1"
    else:
        data[1]["age"] = "forty"
    return data


# The same refusal, in the same words, when the file is read for training and for scoring.
MESSAGES = {
    "empty id": r"column 'image_id' \(spec key 'id'\) is empty in rows 1: 4 \(file lines\)",
    "duplicate id": r"duplicate ids in column 'image_id', 1: img1",
    "text in a number": r"numeric column 'age' holds text, e.g. 'forty' \(ids 1: img1\)",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_scoring_and_training_refuse_bad_rows_in_one_wording(spec, tmp_path, kind):
    path = write(tmp_path / "new", bad(kind))
    with pytest.raises(RunError, match=rf"metadata {path}: {MESSAGES[kind]}"):
        read_scoring_metadata(path, spec)
    with pytest.raises(DataError, match=rf"metadata metadata.csv: {MESSAGES[kind]}"):
        read_metadata(load_spec(tmp_path / "new" / "dataset.toml"))


def test_missing_file_id_column_or_feature_column(spec, tmp_path):
    with pytest.raises(RunError, match=r"metadata: no such file .*absent.csv"):
        read_scoring_metadata(tmp_path / "absent.csv", spec)
    no_id = [{k: v for k, v in row.items() if k != "image_id"} for row in rows()]
    with pytest.raises(
        RunError, match=r"the id column 'image_id' \(the run's spec key 'id'\) is missing"
    ):
        read_scoring_metadata(write(tmp_path / "a", no_id), spec)
    no_age = [{k: v for k, v in row.items() if k != "age"} for row in rows()]
    with pytest.raises(RunError, match=r"the run's feature column\(s\) 1: age are missing"):
        read_scoring_metadata(write(tmp_path / "b", no_age), spec)
