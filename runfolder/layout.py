"""The run folder's layout: the one module that knows where a run keeps what.

    <run>/run.json               what the run was made from (spec, metadata columns, folds' seed)
    <run>/spec.toml              a copy of the spec
    <run>/folds.csv              id, group, fold: read by every stage
    <run>/<stage>/               one folder per stage: gbdt, fusion, stack, blend
    <run>/<stage>/oof.csv        its out-of-fold predictions (id, fold, target, p)
    <run>/<stage>/metrics.json   their figures
    <run>/<stage>/params.json    the parameters it was trained with
    <run>/<stage>/store.json     the feature store a stage that reads embeddings was trained on
                                 (written and compared by `runfolder.records`)
    <run>/stack/final.json       the final model's name and operating threshold
    <run>/report/                report.md, index.html, metrics.json and the plots
    <run>/<stage>.new-<pid>/     a stage being rewritten (swapped in whole when complete)
    <run>/fusion.new/            the fusion stage being trained: its finished folds, kept for a
                                 rerun
    <run>/unembedded-ids.csv     ids a stage wanted but the feature store lacks, with the reason

Stages ask this module for paths and for "is it there" checks, which name the command that
makes what is missing (`require_file`, `require_stage_file`: the one wording of "stage missing");
the other files inside a stage's folder belong to that stage alone.

A stage is never rewritten in place: `RunLayout.rewriting(stage)` gives a new folder beside the
old one, and only once everything is written there is it swapped in (`common.files.replace_dir`).
A failed or killed retrain leaves the previous stage whole; a killed one also leaves its
`<stage>.new-<pid>` folder, removed by the next rewrite of that stage. A resumable stage (the
fusion MLP, hours at ISIC 2024 scale) is written into `<stage>.new/` instead, which a rerun finds
and resumes from, and which is kept when training fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import preview
from common.files import atomic_write, atomic_write_json, replace_dir, restore_dir
from runfolder.errors import RunError

__all__ = [
    "FINAL",
    "FOLDS",
    "MADE_BY",
    "METRICS",
    "OOF",
    "PARAMS",
    "REPORT",
    "RUN_RECORD",
    "RunLayout",
    "SPEC_COPY",
    "STORE_RECORD",
    "UNEMBEDDED",
    "require_stage_file",
    "run_layout",
]

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
SPEC_COPY = "spec.toml"
FOLDS = "folds.csv"
OOF = "oof.csv"
METRICS = "metrics.json"
STORE_RECORD = "store.json"
FINAL = "final.json"
PARAMS = "params.json"
UNEMBEDDED = "unembedded-ids.csv"
REPORT = "report"

# The command that makes each stage's folder, for messages about a missing one.
MADE_BY = {
    "gbdt": "invoke train-gbdt --spec S --run R",
    "fusion": "invoke train-fusion --spec S --run R",
    "stack": "invoke stack --run R",
    "blend": "invoke stack --run R",
}


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder (nothing is read or made by constructing it)."""

    dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    @property
    def record(self) -> Path:
        return self.dir / RUN_RECORD

    @property
    def spec_copy(self) -> Path:
        return self.dir / SPEC_COPY

    @property
    def folds(self) -> Path:
        return self.dir / FOLDS

    @property
    def report(self) -> Path:
        return self.dir / REPORT

    @property
    def final(self) -> Path:
        return self.stage("stack") / FINAL

    @property
    def unembedded_ids(self) -> Path:
        """`<run>/unembedded-ids.csv`: the ids a stage wanted that the feature store lacks."""
        return self.dir / UNEMBEDDED

    def stage(self, name: str) -> Path:
        """`<run>/<name>/` (not created)."""
        return self.dir / name

    def make_stage(self, name: str) -> Path:
        """`<run>/<name>/`, created if absent."""
        path = self.stage(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- a stage written beside the old one and swapped in whole

    def in_progress(self, name: str, resumable: bool = False) -> Path:
        """Where stage `name` is being rewritten: `<name>.new/` (resumable) or
        `<name>.new-<pid>/`."""
        return self.dir / (f"{name}.new" if resumable else f"{name}.new-{os.getpid()}")

    @contextlib.contextmanager
    def rewriting(
        self, name: str, *, resumable: bool = False, carry: tuple[str, ...] = ()
    ) -> Iterator[Path]:
        """Yield a new, empty (or, when `resumable`, partly done) folder for stage `name`; swap it
        in as `<run>/<name>/` when the block ends without an error.

        `carry`: glob patterns of files of the old stage that live on in the new one (the
        default Optuna study, `optuna.db*`) when the new folder has none of that name; they are
        moved in just before the swap. When the block raises, the new folder is removed (kept
        when `resumable`, for the next run to resume from) and the old stage is untouched.

        Raises:
            OSError: the folder cannot be made or swapped (the caller reports it as a WriteError).
        """
        live = restore_dir(self.stage(name))
        self._sweep(name)
        new = self.in_progress(name, resumable)
        new.mkdir(parents=True, exist_ok=True)
        try:
            yield new
        except BaseException:
            if not resumable:
                shutil.rmtree(new, ignore_errors=True)
            raise
        for pattern in carry:
            for old in live.glob(pattern) if live.is_dir() else ():
                if not (new / old.name).exists():
                    os.replace(old, new / old.name)
        replace_dir(new, live)
        log.debug("run %s: stage '%s' swapped in", self.dir, name)

    def _sweep(self, name: str) -> None:
        """Remove `<name>.new-<pid>` folders of processes that no longer run (a killed rewrite)."""
        for path in self.dir.glob(f"{name}.new-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                log.info(
                    "run %s: removing %s, left by an interrupted rewrite of stage '%s'",
                    self.dir,
                    path,
                    name,
                )
                shutil.rmtree(path, ignore_errors=True)

    def oof(self, stage: str) -> Path:
        return self.stage(stage) / OOF

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / METRICS

    def store_record(self, stage: str) -> Path:
        return self.stage(stage) / STORE_RECORD

    def params(self, stage: str) -> Path:
        return self.stage(stage) / PARAMS

    def write_json(self, stage: str, name: str, document: dict, indent: int | None = 2) -> Path:
        """Write `<stage>/<name>` atomically (`metrics.json`, `params.json`, `final.json`): a
        half-written file is never read as the stage's record. `stage` may be a folder being
        rewritten (`rewriting`). Raises OSError when it cannot be written."""
        path = self.make_stage(stage) / name
        atomic_write_json(path, document, indent=indent)
        return path

    def write_metrics(self, stage: str, document: dict) -> Path:
        """`<stage>/metrics.json`, atomically (see `write_json`)."""
        return self.write_json(stage, METRICS, document)

    def write_params(self, stage: str, document: dict) -> Path:
        """`<stage>/params.json`, atomically (see `write_json`)."""
        return self.write_json(stage, PARAMS, document)

    def exists(self) -> bool:
        return self.record.is_file()

    # -- checks that say what to run

    def require(self) -> RunLayout:
        """Self; RunError when the folder holds no run."""
        if not self.exists():
            raise RunError(
                f"run {self.dir}: not found (no {RUN_RECORD}); start one with "
                "`invoke train-gbdt --spec S --run R` or `invoke train-fusion --spec S --run R`"
            )
        return self

    def require_file(self, stage: str, filename: str = OOF) -> Path:
        """`<run>/<stage>/<filename>`; RunError naming the stage and the command that makes it."""
        path = self.stage(stage) / filename
        if not path.is_file():
            restore_dir(self.stage(stage))  # a swap killed between its two renames
        if not path.is_file():
            command = MADE_BY.get(stage, f"the {stage} stage")
            raise RunError(
                f"run {self.dir}: stage '{stage}' is missing ({path} not found); make it with "
                f"`{command}`"
            )
        return path

    def read_json(self, stage: str, name: str) -> dict:
        """`<stage>/<name>`'s content; RunError naming the command that makes the stage when
        absent."""
        return json.loads(self.require_file(stage, name).read_text())

    def read_record(self) -> dict:
        """`run.json`'s content (RunError when there is no run)."""
        return json.loads(self.require().record.read_text())

    def read_final(self) -> dict:
        """`stack/final.json`'s content (RunError naming `invoke stack` when absent)."""
        return json.loads(self.require_file("stack", FINAL).read_text())

    # -- out-of-fold predictions: id, fold, target, p in the run's row order

    def write_oof(self, stage: str, ids, folds, target, p, name: str = OOF) -> Path:
        """Write `<stage>/<name>` (atomically: a half-written file would misalign the stack)."""
        frame = pd.DataFrame(
            {"id": ids, "fold": folds, "target": np.asarray(target).astype(int), "p": p}
        )
        path = self.make_stage(stage) / name
        atomic_write(path, lambda f: frame.to_csv(f, index=False))
        return path

    def read_oof(
        self, stage: str, ids: np.ndarray, folds: np.ndarray, target: np.ndarray | None = None
    ) -> np.ndarray:
        """A stage's out-of-fold predictions aligned to `ids` (shape (n,), float64).

        Raises:
            RunError: the stage's `oof.csv` is missing (names the command that makes it); it lacks
                a column; its ids differ from the run's; a row's fold or target differs from the
                run's `folds.csv` / metadata; a prediction is not a finite number.
        """
        path = self.require_file(stage)
        retrain = f"retrain the stage: `{MADE_BY.get(stage, stage)}`"
        oof = pd.read_csv(path, dtype={"id": str})
        missing = {"id", "fold", "p"} - set(oof.columns)
        if missing:
            raise RunError(f"{path}: not an out-of-fold file, missing column(s) {sorted(missing)}")
        if oof["id"].duplicated().any():
            raise RunError(
                f"{path}: duplicate ids {preview(oof.loc[oof['id'].duplicated(), 'id'].tolist())}"
            )
        by_id = oof.set_index("id")
        wanted = pd.Index(np.asarray(ids).astype(str))
        absent = wanted.difference(by_id.index)
        extra = by_id.index.difference(wanted)
        if len(absent) or len(extra):
            raise RunError(
                f"{path}: ids differ from the run's folds.csv (missing {preview(list(absent))}; "
                f"not in the run {preview(list(extra))}); {retrain}"
            )
        aligned = by_id.loc[wanted]
        wrong_fold = aligned["fold"].to_numpy() != folds
        if wrong_fold.any():
            raise RunError(
                f"{path}: folds differ from the run's folds.csv for ids "
                f"{preview(list(wanted[wrong_fold]))}; its predictions are not out of fold for "
                f"this run; {retrain}"
            )
        if target is not None and "target" in aligned.columns:
            wrong_target = aligned["target"].to_numpy() != target
            if wrong_target.any():
                raise RunError(
                    f"{path}: targets differ from the run's metadata for ids "
                    f"{preview(list(wanted[wrong_target]))}"
                )
        p = pd.to_numeric(aligned["p"], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(p)
        if bad.any():
            raise RunError(
                f"{path}: column 'p' is not a finite number for ids {preview(list(wanted[bad]))}"
            )
        return p


def run_layout(run_dir: Path | str) -> RunLayout:
    return RunLayout(Path(run_dir))


def require_stage_file(stage_dir: Path | str, name: str) -> Path:
    """`<stage_dir>/<name>` for a stage's own loader (`stage_dir` is `<run>/<stage>/`); RunError
    in `RunLayout.require_file`'s words (the stage, the path, the command that makes it)."""
    stage_dir = Path(stage_dir)
    return RunLayout(stage_dir.parent).require_file(stage_dir.name, name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
