"""Metadata validation: each refusal names the column and the offending ids."""

from pathlib import Path

import pandas as pd
import pytest

from tabular.errors import DataError
from tabular.spec import load_spec
from tabular.validate import check_images, check_metadata, read_metadata

SPEC = """
[dataset]
name = "tiny"
metadata = "metadata.csv"
images = "images"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex"]
numeric = ["age"]
"""


def make(tmp_path: Path, rows: list[dict], spec_text: str = SPEC):
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    path = tmp_path / "dataset.toml"
    path.write_text(spec_text)
    return load_spec(path)


def rows(n: int = 6) -> list[dict]:
    return [
        {
            "image_id": f"img{i}",
            "lesion_id": f"L{i // 2}",
            "sex": "male" if i % 2 else "female",
            "age": 40.0 + i,
            "target": i % 2,
        }
        for i in range(n)
    ]


def test_reads_real_ham10000(shared_data):
    frame = read_metadata(load_spec(shared_data / "ham10000" / "dataset.toml"))
    assert len(frame) == 8034 and frame["target"].sum() == 1552
    assert frame["image_id"].is_unique


def test_reads_real_isic2024_mini_with_train_only_columns_kept(shared_data):
    frame = read_metadata(load_spec(shared_data / "isic2024-mini"))
    assert len(frame) == 51 and int(frame["target"].sum()) == 21
    assert "iddx_full" in frame.columns  # kept in the table, never a feature (see test_features)


def test_missing_column_is_named(tmp_path):
    data = rows()
    for row in data:
        del row["age"]
    with pytest.raises(DataError, match=r"column 'age' \(spec key 'numeric'\) is missing"):
        read_metadata(make(tmp_path, data))


def test_duplicate_ids_are_listed(tmp_path):
    data = rows()
    data[3]["image_id"] = "img1"
    with pytest.raises(DataError, match="duplicate ids in column 'image_id', 1: img1"):
        read_metadata(make(tmp_path, data))


def test_target_other_than_0_1_is_refused(tmp_path):
    data = rows()
    data[2]["target"] = 2
    with pytest.raises(DataError, match=r"must be 0 or 1; got \[2\] in ids 1: img2"):
        read_metadata(make(tmp_path, data))


def test_one_class_target_is_refused(tmp_path):
    data = rows()
    for row in data:
        row["target"] = 0
    with pytest.raises(DataError, match="has one class only"):
        read_metadata(make(tmp_path, data))


def test_target_is_not_needed_for_scoring(tmp_path):
    data = rows()
    for row in data:
        del row["target"]
    frame = read_metadata(make(tmp_path, data), require_target=False)
    assert len(frame) == 6
    with pytest.raises(DataError, match=r"column 'target' \(spec key 'target'\) is missing"):
        read_metadata(make(tmp_path, data))


def test_group_with_missing_values_is_refused(tmp_path):
    data = rows()
    data[4]["lesion_id"] = None
    with pytest.raises(
        DataError, match=r"column 'lesion_id' \(spec key 'group'\) has missing values, ids 1: img4"
    ):
        read_metadata(make(tmp_path, data))


def test_numeric_column_holding_text_is_refused_with_an_example(tmp_path):
    data = rows()
    data[1]["age"] = "forty"
    with pytest.raises(
        DataError, match=r"numeric column 'age' holds text, e.g. 'forty' \(ids 1: img1\)"
    ):
        read_metadata(make(tmp_path, data))


def test_empty_id_is_refused(tmp_path):
    data = rows()
    data[0]["image_id"] = None
    with pytest.raises(DataError, match="column 'image_id' .* is empty in rows"):
        read_metadata(make(tmp_path, data))


def test_metadata_file_missing(tmp_path):
    (tmp_path / "dataset.toml").write_text(SPEC)
    with pytest.raises(DataError, match="metadata file not found"):
        read_metadata(load_spec(tmp_path / "dataset.toml"))


def test_empty_metadata_file_is_named(tmp_path):
    (tmp_path / "dataset.toml").write_text(SPEC)
    (tmp_path / "metadata.csv").write_bytes(b"")
    spec = load_spec(tmp_path / "dataset.toml")
    with pytest.raises(
        DataError, match=r"spec 'tiny': metadata file .*metadata\.csv is empty \(0 bytes\)"
    ):
        read_metadata(spec)
    with pytest.raises(DataError, match=r"metadata\.csv is empty \(0 bytes\)"):
        read_metadata(spec, require_target=False)


def test_metadata_file_of_blank_lines_is_refused(tmp_path):
    (tmp_path / "dataset.toml").write_text(SPEC)
    (tmp_path / "metadata.csv").write_text("\n\n  \n")
    with pytest.raises(
        DataError, match=r"metadata\.csv has no header line \(only blank lines, 5 bytes\)"
    ):
        read_metadata(load_spec(tmp_path / "dataset.toml"))


@pytest.mark.parametrize("require_target", [True, False])
def test_header_only_metadata_file_is_named(tmp_path, require_target):
    (tmp_path / "dataset.toml").write_text(SPEC)
    (tmp_path / "metadata.csv").write_text("image_id,lesion_id,sex,age,target\n\n")
    with pytest.raises(
        DataError,
        match=r"spec 'tiny': metadata file .*metadata\.csv has a header but no rows "
        r"\(columns: image_id, lesion_id, sex, age, target\)",
    ):
        read_metadata(load_spec(tmp_path / "dataset.toml"), require_target=require_target)


def test_long_header_without_rows_shows_the_first_columns(tmp_path):
    (tmp_path / "dataset.toml").write_text(SPEC)
    (tmp_path / "metadata.csv").write_text(",".join(f"c{i}" for i in range(12)) + "\n")
    with pytest.raises(
        DataError, match=r"has a header but no rows \(columns: c0, c1, .*, c9, \.\.\. \(2 more\)\)"
    ):
        read_metadata(load_spec(tmp_path / "dataset.toml"))


def test_check_metadata_refuses_a_frame_without_rows(tmp_path):
    spec = make(tmp_path, rows())
    frame = pd.DataFrame(columns=["image_id", "lesion_id", "sex", "age", "target"])
    with pytest.raises(DataError, match="metadata metadata.csv: has no rows"):
        check_metadata(frame, spec)


def test_rows_without_image_are_refused_and_images_without_rows_listed(tmp_path, caplog):
    spec = make(tmp_path, rows())
    frame = read_metadata(spec)
    extra = check_images(frame, spec, [f"img{i}" for i in range(6)] + ["stray"])
    assert extra == ["stray"]
    assert "no metadata row" in caplog.text
    with pytest.raises(DataError, match=r"rows without an image .* ids 2: img4, img5"):
        check_images(frame, spec, [f"img{i}" for i in range(4)])
