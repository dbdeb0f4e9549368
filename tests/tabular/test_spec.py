"""The dataset spec: TOML files, the built-in ISIC 2024 layout, and every refusal."""

import json
from pathlib import Path

import pytest

from tabular.errors import DataError
from tabular.spec import (
    ISIC2024_TRAIN_ONLY,
    isic2024_spec,
    load_spec,
    spec_from_identity,
    spec_to_toml,
)


def write_spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(body)
    return path


BASIC = """
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


def test_ham10000_spec_paths_are_relative_to_the_file(shared_data):
    spec = load_spec(shared_data / "ham10000" / "dataset.toml")
    assert spec.metadata == (shared_data / "ham10000" / "metadata.csv").resolve()
    assert spec.images == (shared_data / "ham10000" / "images").resolve()
    assert spec.feature_columns == ("sex", "localization", "age")
    assert spec.patient is None  # lesion_id groups images of one lesion; it is not a patient


def test_isic2024_directory_gets_the_builtin_spec(shared_data):
    spec = load_spec(shared_data / "isic2024-mini")
    assert spec.builtin == "isic2024"
    assert spec.id == "isic_id" and spec.group == spec.patient == "patient_id"
    assert spec.images.name == "train-image.hdf5"
    for column in (*ISIC2024_TRAIN_ONLY, "attribution", "copyright_license"):
        assert column not in spec.feature_columns
        assert column in spec.never_features


def test_isic2024_test_layout_has_no_target(shared_data):
    spec = isic2024_spec(shared_data / "isic2024-demo")
    assert spec.target is None and spec.images.name == "test-image.hdf5"


def test_spec_round_trips_through_its_toml_copy_and_identity(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASIC))
    copy = load_spec(_copy(tmp_path, spec))
    assert copy.identity() == spec.identity()
    assert spec_from_identity(spec.identity()).identity() == spec.identity()


def _copy(tmp_path: Path, spec) -> Path:
    other = tmp_path / "elsewhere"
    other.mkdir()
    return write_spec(other, spec_to_toml(spec))


def test_unknown_key_is_refused_by_name(tmp_path):
    with pytest.raises(DataError, match=r"unknown key\(s\) \['imgaes'\]"):
        load_spec(write_spec(tmp_path, BASIC + 'imgaes = "x"\n'))


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"unknown section\(s\) \['model'\]"):
        load_spec(write_spec(tmp_path, BASIC + "[model]\nx = 1\n"))


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(DataError, match="missing required key 'group'"):
        load_spec(write_spec(tmp_path, BASIC.replace('group = "lesion_id"\n', "")))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(DataError, match="key 'numeric' must be a list of strings, got 'age'"):
        load_spec(write_spec(tmp_path, BASIC.replace('numeric = ["age"]', 'numeric = "age"')))


def test_bad_toml_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="not valid TOML"):
        load_spec(write_spec(tmp_path, "[dataset\n"))
    with pytest.raises(DataError, match="no such file or directory"):
        load_spec(tmp_path / "nope.toml")


def test_directory_not_in_kaggle_layout(tmp_path):
    with pytest.raises(DataError, match="not in the ISIC 2024 Kaggle layout"):
        load_spec(tmp_path)


@pytest.mark.parametrize(
    "name", ["../../escaped", "<i>ham</i>", "a/b", ".hidden", "", "ham 10000", "x" * 101]
)
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path, name):
    body = BASIC.replace('name = "tiny"', f"name = {json.dumps(name)}")
    with pytest.raises(
        DataError, match=r"key 'name' must be a plain file name \(.*letters A-Z a-z, digits 0-9"
    ):
        load_spec(write_spec(tmp_path, body))


@pytest.mark.parametrize("name", ["ham10000-dev", "isic_2024.v2", "A"])
def test_plain_names_are_accepted(tmp_path, name):
    assert (
        load_spec(write_spec(tmp_path, BASIC.replace('name = "tiny"', f'name = "{name}"'))).name
        == name
    )


def test_an_isic_folder_with_a_space_gets_a_plain_name(tmp_path):
    folder = tmp_path / "my data"
    folder.mkdir()
    (folder / "train-metadata.csv").write_text("isic_id,patient_id,target\n")
    assert load_spec(folder).name == "my-data-train"
