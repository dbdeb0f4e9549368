"""Where artifacts, runs and stores go."""

from pathlib import Path

from runfolder.paths import REPO, artifacts_root, run_dir, stores_root


def test_artifacts_default_to_the_repository_and_move_with_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LESIONFUSE_ARTIFACTS", raising=False)
    assert artifacts_root() == REPO / "artifacts"
    assert (REPO / "runfolder" / "paths.py").is_file()
    monkeypatch.setenv("LESIONFUSE_ARTIFACTS", str(tmp_path / "big"))
    assert artifacts_root() == tmp_path / "big"
    assert stores_root() == tmp_path / "big" / "stores"
    assert run_dir("r1") == tmp_path / "big" / "runs" / "r1"


def test_a_run_given_as_a_path_is_taken_as_it_is(monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONFUSE_ARTIFACTS", str(tmp_path))
    assert run_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert run_dir("some/run") == Path("some/run")
    assert run_dir(Path("plain")) == tmp_path / "runs" / "plain"
