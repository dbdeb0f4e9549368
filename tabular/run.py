"""A run folder: the spec it was made from, its folds, and one sub-folder per stage.

The first stage to open a run writes `spec.toml` (a copy), `run.json` (what the run was made from)
and `folds.csv`; every later stage checks that it is given the same spec and the same metadata
columns and rows, so that all out-of-fold predictions of a run line up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.files import atomic_write_json, atomic_write_text
from runfolder.layout import RunLayout
from tabular.errors import DataError, preview
from tabular.folds import make_folds, read_folds, write_folds
from tabular.spec import DatasetSpec, spec_from_identity, spec_to_toml
from tabular.validate import read_metadata

__all__ = ["Run", "load_run", "open_run"]

log = logging.getLogger(__name__)

_RUN_FORMAT = 1


@dataclass(frozen=True)
class Run:
    """An opened run: its folder, spec, validated metadata and folds (aligned row for row)."""

    dir: Path
    spec: DatasetSpec
    frame: pd.DataFrame
    folds: pd.DataFrame
    record: dict

    @property
    def n_folds(self) -> int:
        return int(self.record["n_folds"])

    @property
    def target(self):
        """The 0/1 target as a numpy int array, in row order."""
        return self.frame[self.spec.target].to_numpy().astype("int64")

    @property
    def fold(self):
        """Each row's fold as a numpy int array, in row order."""
        return self.folds["fold"].to_numpy()

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.dir)

    def stage_dir(self, name: str) -> Path:
        """`<run>/<name>/`, created if absent."""
        return self.layout.make_stage(name)


def open_run(spec: DatasetSpec, run_dir: Path | str, n_folds: int = 5, seed: int = 42) -> Run:
    """Create a run folder, or reopen one after checking it was made from the same data.

    Raises:
        DataError: the metadata is invalid (see `read_metadata`); or the run exists and the spec's
            columns, the metadata file's columns or its ids differ from those it began with.
    """
    layout = RunLayout(Path(run_dir))
    run_dir = layout.dir
    frame = read_metadata(spec, require_target=True)
    if layout.exists():
        record = layout.read_record()
        _check_same_data(record, spec, frame, run_dir)
        folds = read_folds(layout.folds)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        folds = make_folds(frame, spec, n_folds=n_folds, seed=seed)
        record = {
            "format": _RUN_FORMAT,
            "spec": spec.identity(),
            "metadata_columns": list(frame.columns),
            "rows": len(frame),
            "positives": int(frame[spec.target].sum()),
            "n_folds": n_folds,
            "fold_seed": seed,
        }
        atomic_write_text(layout.spec_copy, spec_to_toml(spec))
        write_folds(folds, layout.folds)
        # run.json last: its presence means the run's folds and spec copy are complete.
        atomic_write_json(layout.record, record)
        log.info("run %s: %d rows, %d folds", run_dir, len(frame), n_folds)
    folds = _align(folds, frame, spec, run_dir)
    return Run(dir=run_dir, spec=spec, frame=frame, folds=folds, record=record)


def load_run(run_dir: Path | str) -> Run:
    """Reopen an existing run from its own record (for stacking, reports and scoring).

    Raises:
        RunError: the folder holds no run (no `run.json`).
    """
    record = RunLayout(Path(run_dir)).read_record()
    spec = spec_from_identity(record["spec"])
    return open_run(spec, run_dir, n_folds=record["n_folds"], seed=record["fold_seed"])


def _check_same_data(record: dict, spec: DatasetSpec, frame: pd.DataFrame, run_dir: Path) -> None:
    began = record["spec"]
    now = spec.identity()
    for key in ("id", "target", "group", "patient", "categorical", "numeric", "exclude", "builtin"):
        if began.get(key) != now.get(key):
            raise DataError(
                f"run {run_dir}: spec key '{key}' changed since the run began "
                f"(was {began.get(key)!r}, now {now.get(key)!r}); start a new run with another "
                "--run"
            )
    before, after = record["metadata_columns"], list(frame.columns)
    if before != after:
        gone = [c for c in before if c not in after]
        new = [c for c in after if c not in before]
        raise DataError(
            f"run {run_dir}: the metadata columns changed since the run began "
            f"(removed {gone}, added {new}); start a new run with another --run"
        )


def _align(
    folds: pd.DataFrame, frame: pd.DataFrame, spec: DatasetSpec, run_dir: Path
) -> pd.DataFrame:
    """Folds in the frame's row order; refuses rows that are in one but not the other."""
    ids = frame[spec.id].astype(str)
    by_id = folds.set_index("id")
    unknown = ids[~ids.isin(by_id.index)].tolist()
    gone = sorted(set(by_id.index) - set(ids))
    if unknown or gone:
        raise DataError(
            f"run {run_dir}: the metadata rows changed since the run began "
            f"(new ids {preview(unknown)}; removed ids {preview(gone)}); start a new run"
        )
    return by_id.loc[ids.to_numpy()].reset_index()
