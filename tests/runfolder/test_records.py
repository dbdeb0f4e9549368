"""Each stage's record of the feature store it read: written with the stage, listed, compared."""

import csv
import os

import pytest

from common.files import WriteError
from runfolder.layout import RunLayout
from runfolder.records import different_rows, record_store, store_records, write_unembedded


def record(vectors: str, ids: str = "i" * 64, rows: int = 10) -> dict:
    return {
        "dim": 16,
        "store": "/s",
        "read": {"rows": rows, "ids_sha256": ids, "vectors_sha256": vectors},
    }


def test_record_store_writes_lists_and_removes(tmp_path):
    layout = RunLayout(tmp_path)
    record_store(layout, "fusion", record("a" * 64))
    record_store(layout, "gbdt.new-123", record("b" * 64))  # a stage being rewritten
    assert store_records(layout) == {"fusion": record("a" * 64)}
    assert [p.name for p in layout.stage("fusion").iterdir()] == [
        "store.json"
    ]  # no temporary file left
    record_store(layout, "fusion", None)  # the stage read no store this time
    assert store_records(layout) == {}


def test_record_store_on_a_folder_that_cannot_be_written_names_it(tmp_path):
    (tmp_path / "gbdt").write_text("a file where the stage folder should be")
    with pytest.raises(WriteError, match=r"stage 'gbdt': cannot write .*gbdt"):
        record_store(RunLayout(tmp_path), "gbdt", record("a" * 64))


def test_same_rows_pass_and_older_records_are_not_compared(tmp_path):
    layout = RunLayout(tmp_path)
    same = {"gbdt": record("a" * 64), "fusion": record("a" * 64)}
    assert different_rows(layout, same) is None
    assert different_rows(layout, {"gbdt": record("a" * 64), "fusion": {"dim": 16}}) is None


def test_different_vectors_name_both_stages_and_the_older_one_to_retrain(tmp_path):
    layout = RunLayout(tmp_path)
    record_store(layout, "gbdt", record("1" * 64))
    record_store(layout, "fusion", record("2" * 64))
    os.utime(layout.store_record("gbdt"), (1_000_000, 1_000_000))
    message = different_rows(layout, store_records(layout))
    assert message is not None
    assert (
        "stages 'fusion' and 'gbdt' were trained on different data from the same feature store"
        in message
    )
    assert "the vectors of the run's 10 rows differ" in message
    assert message.endswith(
        "retrain the older one, 'gbdt', on the store as it is now: "
        "`invoke train-gbdt --spec S --run R`"
    )
    record_store(layout, "gbdt", record("2" * 64, ids="j" * 64))
    assert "their rows differ (ids or their order)" in different_rows(layout, store_records(layout))


def test_unembedded_ids_are_listed_with_their_reason(tmp_path):
    layout = RunLayout(tmp_path / "run")
    write_unembedded(layout, "isic_id", [("a", "not embedded yet"), ("b,1", "cannot decode")])
    with open(layout.unembedded_ids, newline="") as f:
        assert list(csv.reader(f)) == [
            ["isic_id", "reason"],
            ["a", "not embedded yet"],
            ["b,1", "cannot decode"],
        ]
