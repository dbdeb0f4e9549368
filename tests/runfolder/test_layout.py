"""A stage is written beside the old one and swapped in whole (`RunLayout.rewriting`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runfolder.layout import RunLayout
from runfolder.records import store_records


class Failed(Exception):
    pass


def old_stage(layout: RunLayout, name: str = "gbdt"):
    folder = layout.make_stage(name)
    (folder / "model.txt").write_text("old model")
    (folder / "oof.csv").write_text("old oof")
    return folder


def test_a_completed_rewrite_replaces_the_whole_stage(tmp_path):
    layout = RunLayout(tmp_path)
    old_stage(layout)
    with layout.rewriting("gbdt") as new:
        assert new.name.startswith("gbdt.new-") and not any(new.iterdir())
        (new / "model.txt").write_text("new model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gbdt"]
    assert sorted(p.name for p in layout.stage("gbdt").iterdir()) == ["model.txt"]
    assert (layout.stage("gbdt") / "model.txt").read_text() == "new model"


def test_a_failed_rewrite_leaves_the_old_stage_whole_and_no_new_folder(tmp_path):
    layout = RunLayout(tmp_path)
    old_stage(layout)
    with pytest.raises(Failed):
        with layout.rewriting("gbdt") as new:
            (new / "model.txt").write_text("half")
            raise Failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gbdt"]
    assert (layout.stage("gbdt") / "model.txt").read_text() == "old model"


def test_a_resumable_rewrite_keeps_its_folder_for_the_next_run(tmp_path):
    layout = RunLayout(tmp_path)
    old_stage(layout, "fusion")
    with pytest.raises(Failed):
        with layout.rewriting("fusion", resumable=True) as new:
            (new / "fold0.done.json").write_text("{}")
            raise Failed
    assert (tmp_path / "fusion.new" / "fold0.done.json").exists()
    assert (layout.stage("fusion") / "model.txt").read_text() == "old model"
    with layout.rewriting("fusion", resumable=True) as new:
        assert (new / "fold0.done.json").exists()  # where resuming reads from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fusion"]
    assert (layout.stage("fusion") / "fold0.done.json").exists()


def test_carried_files_move_into_the_new_stage(tmp_path):
    layout = RunLayout(tmp_path)
    (old_stage(layout) / "optuna.db").write_text("study")
    with layout.rewriting("gbdt", carry=("optuna.db*",)) as new:
        (new / "model.txt").write_text("new model")
    assert (layout.stage("gbdt") / "optuna.db").read_text() == "study"


def test_a_folder_left_by_a_killed_rewrite_is_removed_by_the_next(tmp_path):
    layout = RunLayout(tmp_path)
    old_stage(layout)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    left = tmp_path / f"gbdt.new-{dead}"
    left.mkdir()
    (left / "store.json").write_text(json.dumps({"dim": 1}))
    assert store_records(layout) == {}  # a stage being written is not a stage yet
    with layout.rewriting("gbdt"):
        pass
    assert not left.exists()


def test_a_stage_left_between_two_renames_is_found_again(tmp_path):
    layout = RunLayout(tmp_path)
    folder = old_stage(layout)
    folder.rename(tmp_path / "gbdt.old-99")
    assert layout.require_file("gbdt", "oof.csv").read_text() == "old oof"
