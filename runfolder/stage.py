"""One shape for a stage: a class that loads a trained stage folder and predicts rows.

Every model a run keeps implements `Stage`: the LightGBM ensemble (`tabular.gbdt_model.GBDTModel`),
the fusion MLP (`fuse.fusion.FusionModel`), and the final models (`fuse.stacking.stack.StackModel`,
`BlendModel`, `GBDTFinal`). Scoring, stacking and the report load a stage through `load_stage`,
which checks the stage's marker file first, so that a missing stage is reported in one wording
only (`RunLayout.require_file`: the stage, the path and the command that makes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

from runfolder.layout import RunLayout

__all__ = ["Stage", "load_stage"]


@runtime_checkable
class Stage(Protocol):
    """A trained stage, loaded once to score many batches.

    `STAGE`: its folder's name in the run (`gbdt`, `fusion`, `stack`, `blend`).
    `MARKER`: the file whose presence means the stage is complete (written last), or "" for a
    stage whose folder is another's (the tabular-only final model reads nothing).
    `READS_METADATA`: whether `predict` reads the rows' metadata (`frame`); a final model that
    does not is given the base models' scores only.
    `NEEDS_FUSION`: whether a run with this final model needs the fusion stage (and images).
    `load(stage_dir, **options)`: the stage read back from `<run>/<STAGE>/` (RunError when a file
    is missing). `predict(frame, *inputs, encode=None)`: one float64 score per row of `frame`,
    shape (len(frame),); `inputs` are the stage's own (embeddings, or the base models' scores).
    """

    # Plain annotations rather than ClassVar: the stages set them in their class bodies, which
    # a type checker reads as attributes with class defaults.
    STAGE: str
    MARKER: str
    READS_METADATA: bool
    NEEDS_FUSION: bool

    # Options (the fusion MLP's `device`) are keywords with defaults, so a stage that takes
    # none still fits the protocol.
    @classmethod
    def load(cls, stage_dir: Path | str, /) -> Self: ...

    # Each stage names its own inputs (embeddings, base scores) and keywords (`encode`, `spec`);
    # `*args: Any, **kwargs: Any` lets every such signature fit.
    def predict(self, frame: Any, *args: Any, **kwargs: Any) -> Any: ...


_S = TypeVar("_S", bound=Stage)


def load_stage(run: RunLayout, kind: type[_S], **options: Any) -> _S:
    """`kind.load(<run>/<kind.STAGE>/, **options)` after checking that the stage is there.

    Raises:
        RunError: the stage's marker file is missing (names the stage and the command that makes
            it); or whatever `kind.load` raises for a file of its own.
    """
    if kind.MARKER:
        run.require_file(kind.STAGE, kind.MARKER)
    return kind.load(run.stage(kind.STAGE), **options)
