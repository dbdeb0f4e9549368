"""The run folder's layout: the one module that knows where a run keeps what.

    <run>/run.json               what the run was made from (spec, metadata columns, folds' seed)
    <run>/spec.toml              a copy of the spec
    <run>/folds.csv              id, group, fold: read by every stage
    <run>/<stage>/               one folder per stage: gbdt, fusion, stack, blend
    <run>/<stage>/oof.csv        its out-of-fold predictions (id, fold, target, p)
    <run>/<stage>/metrics.json   their figures
    <run>/<stage>/store.json     the feature store a stage that reads embeddings was trained on
    <run>/stack/final.json       the final model's name and operating threshold
    <run>/report/                report.md, index.html, metrics.json and the plots

Stages ask this module for paths and for "is it there" checks, which name the command that
makes what is missing; the files inside a stage's folder belong to that stage alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import RunError

RUN_RECORD = "run.json"
SPEC_COPY = "spec.toml"
FOLDS = "folds.csv"
OOF = "oof.csv"
METRICS = "metrics.json"
STORE_RECORD = "store.json"
FINAL = "final.json"
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

    def stage(self, name: str) -> Path:
        """`<run>/<name>/` (not created)."""
        return self.dir / name

    def make_stage(self, name: str) -> Path:
        """`<run>/<name>/`, created if absent."""
        path = self.stage(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def oof(self, stage: str) -> Path:
        return self.stage(stage) / OOF

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / METRICS

    def store_record(self, stage: str) -> Path:
        return self.stage(stage) / STORE_RECORD

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
            command = MADE_BY.get(stage, f"the {stage} stage")
            raise RunError(
                f"run {self.dir}: stage '{stage}' is missing ({path} not found); make it with `{command}`"
            )
        return path

    def read_record(self) -> dict:
        """`run.json`'s content (RunError when there is no run)."""
        return json.loads(self.require().record.read_text())

    def read_final(self) -> dict:
        """`stack/final.json`'s content (RunError naming `invoke stack` when absent)."""
        return json.loads(self.require_file("stack", FINAL).read_text())

    def read_store_records(self) -> dict[str, dict]:
        """{stage: the store record it wrote} for every stage trained on embeddings."""
        return {path.parent.name: json.loads(path.read_text())
                for path in sorted(self.dir.glob(f"*/{STORE_RECORD}"))}


def run_layout(run_dir: Path | str) -> RunLayout:
    return RunLayout(Path(run_dir))
