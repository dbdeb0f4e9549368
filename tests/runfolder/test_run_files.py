"""The run's shared files: paths, the one "stage missing" message, atomic writes, out-of-fold
files."""

import json

import numpy as np
import pytest

from runfolder.errors import RunError
from runfolder.layout import MADE_BY, RunLayout, require_stage_file, run_layout


def test_paths_of_a_run():
    layout = run_layout("/runs/r")
    assert layout.record.as_posix() == "/runs/r/run.json"
    assert layout.spec_copy.as_posix() == "/runs/r/spec.toml"
    assert layout.folds.as_posix() == "/runs/r/folds.csv"
    assert layout.final.as_posix() == "/runs/r/stack/final.json"
    assert layout.report.as_posix() == "/runs/r/report"
    assert layout.unembedded_ids.as_posix() == "/runs/r/unembedded-ids.csv"
    assert layout.oof("gbdt").as_posix() == "/runs/r/gbdt/oof.csv"
    assert layout.metrics("fusion").as_posix() == "/runs/r/fusion/metrics.json"
    assert layout.params("gbdt").as_posix() == "/runs/r/gbdt/params.json"
    assert layout.store_record("fusion").as_posix() == "/runs/r/fusion/store.json"
    assert not layout.exists()


def test_a_folder_without_a_run_names_the_commands_that_start_one(tmp_path):
    with pytest.raises(
        RunError,
        match=r"run .*: not found \(no run.json\); start one with `invoke train-gbdt "
        r"--spec S --run R` or `invoke train-fusion --spec S --run R`",
    ):
        RunLayout(tmp_path).require()
    with pytest.raises(RunError, match="not found"):
        RunLayout(tmp_path).read_record()


@pytest.mark.parametrize("stage", sorted(MADE_BY))
def test_a_missing_stage_is_reported_in_one_wording_naming_its_command(tmp_path, stage):
    layout = RunLayout(tmp_path)
    with pytest.raises(
        RunError,
        match=rf"run .*: stage '{stage}' is missing \(.*{stage}/oof.csv not found\); "
        rf"make it with `{MADE_BY[stage]}`",
    ):
        layout.require_file(stage)
    # A stage's own loader, given `<run>/<stage>/`, says the same.
    with pytest.raises(
        RunError,
        match=rf"stage '{stage}' is missing \(.*{stage}/x.json not found\); "
        rf"make it with `{MADE_BY[stage]}`",
    ):
        require_stage_file(tmp_path / stage, "x.json")
    with pytest.raises(RunError, match=rf"stage '{stage}' is missing .*x.json"):
        layout.read_json(stage, "x.json")


def test_final_json_missing_names_invoke_stack(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(
        RunError,
        match=r"stage 'stack' is missing \(.*final.json not found\); make it with "
        r"`invoke stack --run R`",
    ):
        RunLayout(tmp_path).read_final()


def test_shared_files_are_written_atomically_and_read_back(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.write_metrics("gbdt", {"pauc80": 0.1}) == layout.metrics("gbdt")
    assert layout.write_params("gbdt", {"params": {"num_leaves": 31}}) == layout.params("gbdt")
    assert json.loads(layout.metrics("gbdt").read_text()) == {"pauc80": 0.1}
    assert layout.read_json("gbdt", "params.json") == {"params": {"num_leaves": 31}}
    # The old file stays whole when a write fails half way: no temporary file is left either.
    with pytest.raises(TypeError):
        layout.write_metrics("gbdt", {"bad": object()})
    assert json.loads(layout.metrics("gbdt").read_text()) == {"pauc80": 0.1}
    assert sorted(p.name for p in layout.stage("gbdt").iterdir()) == ["metrics.json", "params.json"]


def test_out_of_fold_files_round_trip_and_refuse_other_folds(tmp_path):
    layout = RunLayout(tmp_path)
    ids, folds, target = np.array(["a", "b", "c"]), np.array([0, 1, 0]), np.array([1, 0, 0])
    layout.write_oof("gbdt", ids, folds, target, [0.9, 0.2, 0.1])
    np.testing.assert_array_equal(
        layout.read_oof("gbdt", ids[::-1], folds[::-1], target[::-1]), [0.1, 0.2, 0.9]
    )
    with pytest.raises(
        RunError,
        match=r"folds differ from the run's folds.csv for ids 1: b; .*retrain the stage: "
        r"`invoke train-gbdt --spec S --run R`",
    ):
        layout.read_oof("gbdt", ids, np.array([0, 0, 0]))
    with pytest.raises(
        RunError, match=r"ids differ from the run's folds.csv \(missing 1: d; not in the run 1: c\)"
    ):
        layout.read_oof("gbdt", np.array(["a", "b", "d"]), folds)
