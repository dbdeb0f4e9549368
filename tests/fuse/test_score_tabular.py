"""A tabular-only run (a spec without images) stacked and scored from metadata rows alone, and the
marks every scoring output carries: `in_training`, `out_of_range`, reasons from present values
only, and CSV cells that a spreadsheet cannot run as formulas.

One module-scoped run: 300 synthetic metadata rows, one LightGBM seed (a few seconds).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
from tinyrun import train_tiny_tabular_run

from fuse.errors import RunError
from fuse.scoring.score import score
from fuse.stacking.stack import TABULAR_FINAL, GBDTFinal, load_final

FAST = {"device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """{"data": folder with spec.toml and metadata.csv, "run": a stacked tabular-only run}."""
    return train_tiny_tabular_run(tmp_path_factory.mktemp("tabular"))


def _new_rows(tabular, n: int = 8) -> pd.DataFrame:
    """`n` lesions no model saw: the training metadata's values under new ids, no target."""
    rows = tabular["frame"].head(n).drop(columns=["target"]).copy()
    rows["image_id"] = [f"NEW_{i:03d}" for i in range(n)]
    return rows.reset_index(drop=True)


def test_stack_makes_lightgbm_the_final_model_of_a_tabular_only_run(tabular):
    run = tabular["run"]
    final = json.loads((run / "stack" / "final.json").read_text())
    assert final["final"] == TABULAR_FINAL == "gbdt"
    assert 0 < final["threshold"] < 1 and final["calibration"]["method"] in ("platt", "isotonic")
    calibrated = pd.read_csv(run / "stack" / "final_oof.csv")
    assert len(calibrated) == 300 and calibrated["p"].between(0, 1).all()
    # 95% sensitivity at the recorded threshold, on the calibrated out-of-fold probabilities
    positives = calibrated[calibrated["target"] == 1]
    assert (positives["p"] >= final["threshold"] - 1e-12).mean() >= 0.95
    assert not (run / "blend").exists() and not (run / "fusion").exists()
    assert isinstance(load_final(run).model, GBDTFinal)
    assert tabular["report"].is_file()
    assert "gbdt" in (run / "report" / "report.md").read_text()


def test_a_tabular_only_run_scores_metadata_rows_without_images(tabular, tmp_path):
    rows = _new_rows(tabular)
    rows.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "preds.csv"
    result = score(
        tabular["run"], None, tmp_path / "new.csv", out, page=tmp_path / "preds.html", **FAST
    )

    assert list(result.columns) == [
        "image_id",
        "probability",
        "p_gbdt",
        "flagged",
        "reasons",
        "in_training",
        "out_of_range",
        "unlike_training",
        "novelty",
        "novelty_reason",
        "error",
    ]
    assert result["novelty"].between(0, 1).all() and result["unlike_training"].notna().all()
    assert result["image_id"].tolist() == rows["image_id"].tolist()
    assert result["probability"].between(0, 1).all() and result["p_gbdt"].between(0, 1).all()
    assert result["error"].eq("").all() and not result["in_training"].any()
    threshold = json.loads((tabular["run"] / "stack" / "final.json").read_text())["threshold"]
    assert (result["flagged"] == (result["probability"] >= threshold)).all()
    written = pd.read_csv(out, dtype={"image_id": str}, keep_default_na=False, na_values=[""])
    assert written["image_id"].tolist() == rows["image_id"].tolist()
    assert (tmp_path / "preds.html").is_file()


def test_a_tabular_only_run_needs_metadata_and_embeds_nothing(tabular, tmp_path):
    with pytest.raises(RunError, match=r"--metadata: run .* is tabular-only .*pass --metadata CSV"):
        score(tabular["run"], None, None, tmp_path / "p.csv", **FAST)
    _new_rows(tabular).to_csv(tmp_path / "new.csv", index=False)
    with pytest.raises(
        RunError, match=r"--store .*: run .* is tabular-only and embeds no image; omit --store"
    ):
        score(
            tabular["run"],
            None,
            tmp_path / "new.csv",
            tmp_path / "p.csv",
            store=tmp_path / "s",
            **FAST,
        )


def test_training_ids_are_named_and_marked_in_training(tabular, tmp_path, caplog):
    rows = _new_rows(tabular, 4)
    seen = tabular["frame"].iloc[10:13].drop(columns=["target"])
    pd.concat([rows, seen]).to_csv(tmp_path / "mixed.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="fuse.scoring.score"):
        result = score(
            tabular["run"], None, tmp_path / "mixed.csv", tmp_path / "p.csv", page=None, **FAST
        )
    assert result["in_training"].tolist() == [False] * 4 + [True] * 3
    warned = [r.getMessage() for r in caplog.records if "training data" in r.getMessage()]
    assert len(warned) == 1 and "3 of the 7" in warned[0]
    assert all(i in warned[0] for i in seen["image_id"])
    written = pd.read_csv(tmp_path / "p.csv")
    assert written["in_training"].tolist() == [False] * 4 + [True] * 3


def test_values_far_outside_the_training_range_are_named_and_marked(tabular, tmp_path, caplog):
    rows = _new_rows(tabular, 6)
    rows.loc[1, "age"] = -5
    rows.loc[2, "age"] = 250
    rows.loc[3, "size"] = 1e6
    ages = tabular["frame"]["age"]
    rows.loc[4, "age"] = ages.max() + 0.2 * (ages.max() - ages.min())  # within the margin
    rows.to_csv(tmp_path / "odd.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="fuse.scoring.score"):
        result = score(
            tabular["run"], None, tmp_path / "odd.csv", tmp_path / "p.csv", page=None, **FAST
        )

    marks = result["out_of_range"].tolist()
    assert marks[0] == marks[4] == marks[5] == ""
    assert marks[1].startswith("age = -5 (training ") and marks[2].startswith(
        "age = 250 (training "
    )
    assert marks[3].startswith("size = 1000000 (training 0.23..")
    assert result["error"].eq("").all() and result["probability"].notna().all()  # still scored
    # one notion of "unlike training": a value far outside the range marks the row, said once
    assert result["unlike_training"].tolist()[1:4] == [True] * 3
    for n in (1, 2, 3):
        reason = result.loc[n, "novelty_reason"]
        assert reason.startswith("metadata (") and reason.count("metadata") == 1, reason
    assert "age = 250" in result.loc[2, "novelty_reason"]
    warnings = {
        r.getMessage().split("'")[1]: r.getMessage()
        for r in caplog.records
        if "far outside the training range" in r.getMessage()
    }
    assert set(warnings) == {"age", "size"}
    assert "2: NEW_001, NEW_002" in warnings["age"] and "1: NEW_003" in warnings["size"]


def test_reasons_name_only_values_present_and_above_the_floor(tabular, tmp_path):
    from tabular.gbdt_model import REASON_FLOOR

    rows = _new_rows(tabular, 40)
    rows.loc[:19, ["sex", "site", "age", "size"]] = np.nan  # no metadata at all for half the rows
    rows.to_csv(tmp_path / "partial.csv", index=False)
    result = score(
        tabular["run"], None, tmp_path / "partial.csv", tmp_path / "p.csv", page=None, **FAST
    )

    assert result.loc[:19, "reasons"].eq("").all(), result.loc[:19, "reasons"].tolist()
    named = [part for text in result.loc[20:, "reasons"] for part in text.split("; ") if part]
    assert named, "rows with metadata should have reasons"
    for part in named:
        assert "missing" not in part, part
        assert float(part.rsplit("(", 1)[1].rstrip(")")) >= REASON_FLOOR, part


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_that_a_spreadsheet_would_run_are_escaped_and_parquet_keeps_them(
    tabular, tmp_path, start
):
    rows = _new_rows(tabular, 3)
    evil = f'{start}HYPERLINK("http://x")'
    rows.loc[0, "image_id"] = evil
    rows.to_csv(tmp_path / "evil.csv", index=False)
    result = score(
        tabular["run"], None, tmp_path / "evil.csv", tmp_path / "p.csv", page=None, **FAST
    )
    assert result.loc[0, "image_id"] == evil  # the returned frame keeps the value

    written = pd.read_csv(tmp_path / "p.csv", dtype={"image_id": str}, keep_default_na=False)
    assert written.loc[0, "image_id"] == "'" + evil
    assert written.loc[1:, "image_id"].tolist() == rows.loc[1:, "image_id"].tolist()
    score(
        tabular["run"],
        None,
        tmp_path / "evil.csv",
        tmp_path / "k.csv",
        output_format="kaggle",
        **FAST,
    )
    kaggle = pd.read_csv(tmp_path / "k.csv", dtype={"isic_id": str}, keep_default_na=False)
    assert kaggle.loc[0, "isic_id"] == "'" + evil
    score(tabular["run"], None, tmp_path / "evil.csv", tmp_path / "p.parquet", page=None, **FAST)
    assert pd.read_parquet(tmp_path / "p.parquet").loc[0, "image_id"] == evil
