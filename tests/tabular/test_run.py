"""Run folders: written once, reopened only with the same data."""

import json

import pandas as pd
import pytest

from runfolder.errors import RunError
from tabular.errors import DataError
from tabular.run import load_run, open_run
from tabular.spec import load_spec

SPEC = """
[dataset]
name = "tiny"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex"]
numeric = ["age"]
"""


def make(tmp_path, n=40, extra_column=False, spec_text=SPEC):
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "lesion_id": [f"L{i // 2}" for i in range(n)],
            "sex": ["male", "female"] * (n // 2),
            "age": [30.0 + i for i in range(n)],
            "target": [1 if i % 4 == 0 else 0 for i in range(n)],
        }
    )
    if extra_column:
        frame["site"] = "back"
    frame.to_csv(tmp_path / "metadata.csv", index=False)
    (tmp_path / "dataset.toml").write_text(spec_text)
    return load_spec(tmp_path / "dataset.toml")


def test_run_writes_spec_copy_folds_and_record_once(tmp_path):
    spec = make(tmp_path)
    run = open_run(spec, tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"spec.toml", "folds.csv", "run.json"}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["rows"] == 40 and record["n_folds"] == 5
    again = load_run(tmp_path / "run")
    assert (again.fold == run.fold).all() and again.spec.identity() == spec.identity()


def test_changed_metadata_columns_are_refused(tmp_path):
    open_run(make(tmp_path), tmp_path / "run")
    with pytest.raises(
        DataError,
        match=r"metadata columns changed since the run began \(removed \[\], added \['site'\]\)",
    ):
        open_run(make(tmp_path, extra_column=True), tmp_path / "run")


def test_changed_spec_is_refused(tmp_path):
    open_run(make(tmp_path), tmp_path / "run")
    changed = make(tmp_path, spec_text=SPEC.replace('numeric = ["age"]', "numeric = []"))
    with pytest.raises(DataError, match="spec key 'numeric' changed since the run began"):
        open_run(changed, tmp_path / "run")


def test_changed_rows_are_refused(tmp_path):
    open_run(make(tmp_path), tmp_path / "run")
    with pytest.raises(
        DataError, match=r"metadata rows changed .* removed ids 4: img36, img37, img38, img39"
    ):
        open_run(make(tmp_path, n=36), tmp_path / "run")


def test_folder_without_a_run(tmp_path):
    with pytest.raises(RunError, match=r"not found \(no run.json\)"):
        load_run(tmp_path)
