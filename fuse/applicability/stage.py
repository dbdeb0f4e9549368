"""The run's applicability stage, `<run>/applicability/`: fitted by `invoke stack`, read by scoring.

`fit_stage` gathers a run's training rows as the detector (`fuse.applicability.detector`) needs
them, in the run's `folds.csv` order: the embeddings from the feature store the run's image stages
recorded (`<stage>/store.json`; the fusion stage's first), the acquisition cues of the training
images (cached beside that store, `embed.cue_cache`, so a second `invoke stack` measures none),
and the metadata feature columns. A tabular-only run fits the metadata part alone.

The stage is written beside the old one (`RunLayout.rewriting`) and swapped in whole once
complete: a reader never sees half of a new detector beside half of the old one.

`load_detector` gives the fitted detector, or None (with one log line saying how to add it) for a
run stacked before this stage existed: such runs still score, without `novelty`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.files import reporting_write_errors
from fuse.applicability.detector import Applicability, fit_applicability, load
from runfolder.layout import RunLayout
from runfolder.records import store_records

__all__ = ["STAGE", "fit_stage", "load_detector"]

log = logging.getLogger(__name__)

STAGE = "applicability"
# Stages whose store record names the embeddings the run was trained on, in order of preference.
_IMAGE_STAGES = ("fusion", "gbdt")


def _store_of_run(layout: RunLayout) -> dict | None:
    """The store record (`FeatureStore.reference()`) of the run's image stages, or None."""
    records = store_records(layout)
    for stage in _IMAGE_STAGES:
        if stage in records:
            return records[stage]
    return None


def fit_stage(layout: RunLayout, run, *, progress: bool = True) -> Applicability:
    """Fit the applicability detector on `run`'s training rows and swap it into
    `<run>/applicability/`.

    Args:
        layout: the run's layout.
        run: the reopened run (`tabular.run.load_run`): spec, frame, folds in one row order.
        progress: a tqdm bar while cues are measured.

    Raises:
        RunError: the store the run's stages recorded cannot be opened or lacks training ids.
    """
    spec = run.spec
    ids = run.frame[spec.id].astype(str).tolist()
    features = set(spec.feature_columns)
    inputs: dict = {
        "metadata": run.frame,
        "numeric": [c for c in spec.numeric if c in features],
        "categorical": [c for c in spec.categorical if c in features],
    }
    record = _store_of_run(layout)
    if record is not None:
        inputs.update(_image_inputs(record, spec, ids, progress))
    with reporting_write_errors(STAGE, layout.dir), layout.rewriting(STAGE) as new:
        return fit_applicability(new, run.fold, **inputs)


def _image_inputs(record: dict, spec, ids: list[str], progress: bool) -> dict:
    """{embeddings, identity, cues} of the training images from the recorded store."""
    from embed.cue_cache import cached_cues
    from embed.errors import EmbedError
    from embed.sources import open_source
    from embed.store import FeatureStore
    from fuse.errors import RunError

    try:
        store = FeatureStore.open(record["store"])
        embeddings = store.read(ids)  # float16, (rows, views, dim): widened chunk by chunk later
    except EmbedError as error:
        raise RunError(
            "applicability: cannot read the feature store the run was trained on "
            f"({record['store']}, recorded in its stages' store.json): {error}; put the store "
            "back there, or make it again with `invoke embed --spec S`"
        ) from error
    source = None
    if spec.images and Path(spec.images).exists():
        source = open_source(spec.images)
    else:
        log.warning(
            "applicability: the spec's images (%s) are not there: only acquisition cues "
            "cached beside the store are used",
            spec.images,
        )
    cues = cached_cues(store.path, source, ids, store.fingerprints(ids), progress=progress)
    readable = np.isfinite(cues.frame.to_numpy()).all(axis=1).sum()
    out = {"embeddings": embeddings, "identity": store.reference()}
    if readable >= 10:
        out["cues"] = cues
    else:
        log.warning(
            "applicability: only %d training images have acquisition cues; the detector is "
            "fitted without its acquisition part",
            readable,
        )
    return out


def load_detector(layout: RunLayout) -> Applicability | None:
    """The run's detector, or None for a run stacked before it existed (logged once).

    Raises:
        RunError: the stage is there but unreadable (from `fuse.applicability.load`).
    """
    stage = layout.stage(STAGE)
    if not stage.is_dir():
        log.info(
            "run %s has no applicability stage (stacked by an older version): columns "
            "unlike_training and novelty are left empty; add it with `invoke stack --run %s`",
            layout.dir,
            layout.dir,
        )
        return None
    return load(stage)
