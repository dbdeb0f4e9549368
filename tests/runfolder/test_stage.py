"""One shape for a stage: every trained stage loads from its folder and predicts rows."""

from pathlib import Path

import numpy as np
import pytest

from fuse.fusion import FusionModel
from fuse.stacking.stack import BlendModel, GBDTFinal, StackModel
from runfolder.errors import RunError
from runfolder.layout import MADE_BY, RunLayout
from runfolder.stage import Stage, load_stage
from tabular.gbdt_model import GBDTModel

STAGES = (GBDTModel, FusionModel, StackModel, BlendModel, GBDTFinal)


class Doubler:
    STAGE = "blend"
    MARKER = "doubler.json"
    READS_METADATA = False
    NEEDS_FUSION = True

    def __init__(self, stage_dir: Path, factor: float):
        self.stage_dir, self.factor = stage_dir, factor

    @classmethod
    def load(cls, stage_dir, factor: float = 2.0):
        return cls(Path(stage_dir), factor)

    def predict(self, frame, p, encode=None):
        return self.factor * np.asarray(p)


@pytest.mark.parametrize("kind", STAGES, ids=lambda kind: kind.__name__)
def test_every_stage_has_the_shape(kind):
    for name in ("STAGE", "MARKER", "READS_METADATA", "NEEDS_FUSION", "load", "predict"):
        assert hasattr(kind, name), f"{kind.__name__} lacks {name}"
    assert kind.STAGE in MADE_BY  # so that a missing one names its command


def test_the_final_models_say_what_they_read():
    assert (StackModel.READS_METADATA, BlendModel.READS_METADATA, GBDTFinal.READS_METADATA) == (
        True,
        False,
        False,
    )
    assert (StackModel.NEEDS_FUSION, BlendModel.NEEDS_FUSION, GBDTFinal.NEEDS_FUSION) == (
        True,
        True,
        False,
    )


def test_load_stage_checks_the_marker_then_loads_with_options(tmp_path):
    layout = RunLayout(tmp_path)
    with pytest.raises(
        RunError,
        match=r"stage 'blend' is missing \(.*blend/doubler.json not found\); make it "
        r"with `invoke stack --run R`",
    ):
        load_stage(layout, Doubler)
    layout.make_stage("blend")
    (layout.stage("blend") / "doubler.json").write_text("{}")
    model = load_stage(layout, Doubler, factor=3.0)
    assert isinstance(model, Stage)
    assert model.stage_dir == tmp_path / "blend"
    np.testing.assert_array_equal(model.predict(None, [1.0, 2.0]), [3.0, 6.0])


def test_a_stage_without_a_file_of_its_own_loads_without_a_check(tmp_path):
    final = load_stage(RunLayout(tmp_path), GBDTFinal)
    np.testing.assert_array_equal(final.predict(None, np.array([0.25])), [0.25])
