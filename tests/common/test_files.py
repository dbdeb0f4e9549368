"""Folders swapped in whole, and write failures reported as one error naming the path."""

from __future__ import annotations

import errno

import pytest

from common import files
from common.files import WriteError, replace_dir, reporting_write_errors, restore_dir


def make(folder, **contents):
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_dir_swaps_the_new_folder_in_and_removes_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = make(tmp_path / "stage", **{"a.txt": "old", "gone.txt": "old"})
    new = make(tmp_path / "stage.new-1", **{"a.txt": "new"})
    replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"


def test_replace_dir_without_an_old_folder_renames(tmp_path):
    new = make(tmp_path / "stage.new-1", **{"a.txt": "new"})
    replace_dir(new, tmp_path / "stage")
    assert (tmp_path / "stage" / "a.txt").read_text() == "new" and not new.exists()


def test_restore_dir_puts_back_a_folder_left_between_two_renames(tmp_path):
    make(tmp_path / "stage.old-123", **{"a.txt": "old"})
    restore_dir(tmp_path / "stage")
    assert (tmp_path / "stage" / "a.txt").read_text() == "old"
    assert not (tmp_path / "stage.old-123").exists()


@pytest.mark.parametrize(
    "code, advice",
    [
        (errno.ENOSPC, r"No space left on device \(ENOSPC\); free some space there"),
        (errno.EROFS, r"Read-only file system \(EROFS\); the file system is mounted read-only"),
        (errno.EACCES, r"Permission denied \(EACCES\); make the folder writable"),
    ],
)
def test_an_oserror_becomes_a_write_error_naming_the_path_and_the_fix(tmp_path, code, advice):
    import os

    target = tmp_path / "run" / "gbdt" / "oof.csv"
    with pytest.raises(WriteError, match=rf"train-gbdt: cannot write {target}: {advice}"):
        with reporting_write_errors("train-gbdt", tmp_path / "run"):
            raise OSError(code, os.strerror(code), str(target))


def test_a_write_error_without_a_file_names_the_folder_given(tmp_path):
    with pytest.raises(WriteError, match=rf"stack: cannot write {tmp_path}: disk on fire \(EIO\)"):
        with reporting_write_errors("stack", tmp_path):
            raise OSError(errno.EIO, "disk on fire")
