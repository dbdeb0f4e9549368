"""Where scoring writes: the output path is checked before any work, and written atomically."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from fuse.errors import RunError
from fuse.scoring.predictions import check_out, escape_formulas, write_predictions


def inputs(tmp_path):
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("image_id,age\nA,50\n")
    images = tmp_path / "images.hdf5"
    images.write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    return {"--metadata": metadata, "--images": images, "--run": run, "--store": None}


def test_out_may_not_be_an_input(tmp_path):
    given = inputs(tmp_path)
    with pytest.raises(
        RunError, match=r"--out .*metadata.csv is the --metadata input; scoring would overwrite it"
    ):
        check_out(tmp_path / "metadata.csv", "csv", given)
    with pytest.raises(RunError, match=r"is the --images input"):
        check_out(tmp_path / "sub" / ".." / "images.hdf5", "kaggle", given)
    with pytest.raises(RunError, match=r"lies inside the --run folder"):
        check_out(tmp_path / "run" / "gbdt" / "oof.csv", "csv", given)


def test_out_may_not_be_a_folder_or_of_an_unknown_kind(tmp_path):
    given = inputs(tmp_path)
    with pytest.raises(RunError, match=r"--out .*run: is a folder; give a file path such as"):
        check_out(tmp_path / "run", "csv", given)
    with pytest.raises(RunError, match=r"expected a file ending in .csv or .parquet, got '.xlsx'"):
        check_out(tmp_path / "p.xlsx", "csv", given)
    with pytest.raises(RunError, match=r"the kaggle format is a CSV submission"):
        check_out(tmp_path / "p.parquet", "kaggle", given)
    with pytest.raises(RunError, match=r"format: expected one of \['csv', 'kaggle'\], got 'json'"):
        check_out(tmp_path / "p.csv", "json", given)


def test_replacing_an_older_file_is_said(tmp_path, caplog):
    old = tmp_path / "preds.csv"
    old.write_text("old")
    with caplog.at_level(logging.WARNING):
        assert check_out(old, "csv", inputs(tmp_path)) == old
    assert "exists (last written" in caplog.text and "will be replaced" in caplog.text


def test_csv_and_parquet_by_extension(tmp_path):
    result = pd.DataFrame(
        {
            "image_id": ["A", "B"],
            "probability": [0.2, np.nan],
            "flagged": pd.array([False, None], dtype="boolean"),
            "error": ["", "x"],
        }
    )
    write_predictions(result, tmp_path / "p.parquet", "csv", "image_id", 0.5)
    write_predictions(result, tmp_path / "p.csv", "csv", "image_id", 0.5)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), result)
    assert pd.read_csv(tmp_path / "p.csv", keep_default_na=False)["error"].tolist() == ["", "x"]
    write_predictions(result, tmp_path / "k.csv", "kaggle", "image_id", 0.5)
    assert pd.read_csv(tmp_path / "k.csv")["target"].tolist() == [
        0.2,
        0.5,
    ]  # unscored: the threshold
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "k.csv",
        "p.csv",
        "p.parquet",
    ]  # no temp file left


def test_escaping_leaves_numbers_booleans_and_missing_cells_alone():
    table = pd.DataFrame(
        {
            "id": ["-12", "a-b", None, "@x"],
            "p": [-0.5, 0.2, np.nan, 1.0],
            "flagged": pd.array([True, None, False, True], dtype="boolean"),
            "error": ["", "=bad", "ok", "+1"],
        }
    )
    escaped = escape_formulas(table)
    assert (
        escaped["id"].tolist()[:2] == ["'-12", "a-b"]
        and pd.isna(escaped["id"][2])
        and escaped["id"][3] == "'@x"
    )
    assert escaped["error"].tolist() == ["", "'=bad", "ok", "'+1"]
    pd.testing.assert_series_equal(escaped["p"], table["p"])
    pd.testing.assert_series_equal(escaped["flagged"], table["flagged"])
    assert "-0.5" in escaped.to_csv(index=False)


def test_write_predictions_escapes_csv_text_and_keeps_parquet_values(tmp_path):
    table = pd.DataFrame(
        {
            "isic_id": ["=cmd|' /C calc'!A0", "ISIC_1"],
            "probability": [-0.0, 0.5],
            "error": ["@SUM(1)", ""],
        }
    )
    write_predictions(table, tmp_path / "p.csv", "csv", "isic_id", 0.5)
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith("'=cmd|")
    assert "'@SUM(1)" in (tmp_path / "p.csv").read_text()
    write_predictions(table, tmp_path / "k.csv", "kaggle", "isic_id", 0.5)
    assert (tmp_path / "k.csv").read_text().splitlines()[1].startswith("'=cmd|")
    write_predictions(table, tmp_path / "p.parquet", "csv", "isic_id", 0.5)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "p.parquet"), table)
    assert table["isic_id"][0].startswith("=")  # the caller's frame is not changed
