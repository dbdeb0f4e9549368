"""Stacking and blending the two base models of a run, out of fold, and choosing the final one.

Two ways to join the LightGBM ensemble (`gbdt/`) and the fusion MLP (`fusion/`):

- "stack": LightGBM on the metadata features plus the two base models' predictions as two more
  features, `p_fusion` (the fusion MLP) and `p_gbdt` (the LightGBM ensemble, which also saw the
  image PCA components the stack itself lacks); the shape of the ISIC 2024 winners' second stage.
  Trained and evaluated with the run's own folds (`fuse.stacking.stacker`). With
  `StackConfig.patient_ranks` and a spec with a `patient` column the stack also gets each base
  prediction's rank among its patient's rows (`fuse.stacking.patient_ranks`).
- "blend": a weighted average of the two base models' ranks (`fuse.stacking.blend`). A rank is
  taken against a reference distribution (the out-of-fold predictions of the training part), not
  within the batch being scored, so one row scores the same alone or among thousands. The weight
  is chosen on the training folds only.

Both are evaluated out of fold; the better on pAUC80 becomes the run's final model, recorded in
`stack/final.json` with its operating threshold (chosen on its out-of-fold predictions for the
target sensitivity). Picking the better of two on the same rows flatters the winner a little;
with two candidates the bias is small, and the report shows both. The blend's output is a rank
score in [0, 1], ordered like a probability but not calibrated as one.

The stacker itself, and why stacking on out-of-fold predictions does not leak fold k's labels
into fold k's figures, is `fuse.stacking.stacker`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import atomic_write_json, reporting_write_errors, sha256_file
from fuse.applicability.ranges import write_ranges
from fuse.errors import RunError
from fuse.stacking.blend import (
    REFERENCE_POINTS,
    BlendModel,
    blend_scores,
    choose_blend_weight,
    oof_blend,
    rank_reference,
    to_rank,
)
from fuse.stacking.calibration import Calibrator, choose_calibrator
from fuse.stacking.patient_ranks import rank_feature
from fuse.stacking.stacker import (
    BASE_FEATURES,
    FUSION_FEATURE,
    GBDT_FEATURE,
    StackConfig,
    StackModel,
    fit_stack_model,
    load_encoder,
    oof_stack,
    stack_features,
    stack_patient,
)
from fuse.stores import run_identity
from runfolder.layout import FINAL, RunLayout
from runfolder.stage import load_stage
from tabular.errors import DataError
from tabular.gbdt_model import Encode
from tabular.metrics import MetricWarning, pauc80, summarize

__all__ = [
    "BASE_FEATURES",
    "BASE_STAGES",
    "CALIBRATED_OOF",
    "FUSION_FEATURE",
    "GBDT_FEATURE",
    "REFERENCE_POINTS",
    "TABULAR_FINAL",
    "BlendModel",
    "FinalModel",
    "GBDTFinal",
    "StackConfig",
    "StackModel",
    "blend_scores",
    "choose_blend_weight",
    "evaluate",
    "fit_stack_model",
    "load_encoder",
    "load_final",
    "oof_blend",
    "oof_stack",
    "rank_reference",
    "stack",
    "stack_features",
    "stack_patient",
    "tabular_only",
    "to_rank",
]

log = logging.getLogger(__name__)

BASE_STAGES = ("gbdt", "fusion")
# The final model's name in `final.json` when the run is tabular-only (see `tabular_only`).
TABULAR_FINAL = "gbdt"
# The final model's calibrated out-of-fold probabilities, beside the stack's own oof.csv.
CALIBRATED_OOF = "final_oof.csv"


@dataclass(frozen=True)
class FinalModel:
    """The run's final model (`stack/final.json`): its name, operating threshold, model and the
    calibrator that turns its score into `probability` (None for runs stacked before calibration:
    their `probability` is the raw score)."""

    name: str
    threshold: float
    sensitivity: float
    model: StackModel | BlendModel
    calibrator: Calibrator | None = None

    def probability(self, score: np.ndarray) -> np.ndarray:
        return score if self.calibrator is None else self.calibrator(score)


def load_final(run_dir: Path | str) -> FinalModel:
    """The final model `invoke stack` chose for the run.

    Raises:
        RunError: no `stack/final.json` (names `invoke stack`), or an unknown final model.
    """
    layout = RunLayout(Path(run_dir))
    record = layout.read_final()
    loaders = {"stack": StackModel, "blend": BlendModel, TABULAR_FINAL: GBDTFinal}
    name = record["final"]
    if name not in loaders:
        raise RunError(
            f"{layout.final}: unknown final model {name!r}; rerun `invoke stack --run R`"
        )
    calibration = record.get("calibration")
    if calibration is None:
        log.warning(
            "run %s was stacked before calibration: `probability` is the final model's raw "
            "score; rerun `invoke stack --run R` to calibrate it",
            layout.dir,
        )
    return FinalModel(
        name=name,
        threshold=float(record["threshold"]),
        sensitivity=float(record.get("sensitivity", math.nan)),
        model=load_stage(layout, loaders[name]),
        calibrator=Calibrator.from_json(calibration) if calibration else None,
    )


# ------------------------------------------------------------------------------------- entry


def stack(
    run_dir: Path | str, sensitivity: float = 0.95, config: StackConfig | None = None
) -> dict:
    """Stack and blend a run's base models out of fold and choose its final model.

    Reads `gbdt/oof.csv` and `fusion/oof.csv` (checked against the run's `folds.csv`), writes
    `stack/` (fold models `fold{k}.txt`, encoders, `stack.json`, `oof.csv`, `metrics.json`,
    `final.json`), `blend/` (`blend.json`, `oof.csv`, `metrics.json`) and `applicability/` (the
    detector of rows unlike the training rows, `fuse.applicability.stage`).

    Args:
        run_dir: the run folder.
        sensitivity: target sensitivity of the operating threshold, in (0, 1]; default 0.95.
        config: stack and blend settings; default `StackConfig()`.

    Returns:
        `stack/final.json`'s content: final model name, threshold, sensitivity, and the out-of-fold
        metrics of both candidates.

    The two folders are written beside the old ones (`stack.new-<pid>/`, `blend.new-<pid>/`) and
    swapped in only when both are complete (blend first, then stack, whose `final.json` names the
    final model): a failed or killed restack leaves the previous `stack/` and `blend/` whole.

    Raises:
        RunError: no run at `run_dir`; a base stage is missing (names the command that makes it);
            an `oof.csv` does not match the run's folds; `sensitivity` out of range.
        StoreMismatchError: the base stages read different embeddings, or different vectors of
            the same store (names both stages and the one to retrain).
        WriteError: the run folder cannot be written (read-only, full): names the path.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise RunError(f"sensitivity: expected a value in (0, 1], got {sensitivity!r}")
    config = config or StackConfig()
    layout = RunLayout(Path(run_dir)).require()
    if tabular_only(layout):
        return _stack_tabular_only(layout, sensitivity)
    run, p_gbdt, p_fusion = _base_predictions(layout)
    made_from = {
        "folds.csv": sha256_file(layout.folds),
        "gbdt/oof.csv": sha256_file(layout.oof("gbdt")),
        "fusion/oof.csv": sha256_file(layout.oof("fusion")),
    }
    ids = run.frame[run.spec.id].astype(str).to_numpy()
    y, folds = run.target, run.fold
    with (
        reporting_write_errors("stack", layout.dir),
        layout.rewriting("stack") as stack_dir,
        layout.rewriting("blend") as blend_dir,
    ):
        written = {"stack": stack_dir, "blend": blend_dir}
        p_stack = _fit_stack(stack_dir, run, p_gbdt, p_fusion, config, made_from)
        p_blend = _fit_blend(blend_dir, y, folds, p_gbdt, p_fusion, config, made_from)
        figures = {}
        for name, p in (("stack", p_stack), ("blend", p_blend)):
            layout.write_oof(written[name].name, ids, folds, y, p)
            figures[name] = {**evaluate(y, p, folds, sensitivity), "made_from": made_from}
            layout.write_metrics(written[name].name, figures[name])
        final = _choose_final(figures)
        record = _calibrate_final(
            layout,
            stack_dir,
            ids,
            y,
            folds,
            final,
            p_stack if final == "stack" else p_blend,
            figures,
            sensitivity,
            made_from,
        )
        write_ranges(stack_dir, run.frame, run.spec.numeric)
    _fit_applicability(layout, run)
    return record


def _fit_applicability(layout: RunLayout, run) -> None:
    """`<run>/applicability/`: how unlike the training rows a scored row is (image, acquisition,
    metadata; `fuse.applicability.stage`), fitted on the same rows and folds."""
    from fuse.applicability.stage import fit_stage

    fit_stage(layout, run)


def _base_predictions(layout: RunLayout):
    """The reopened run and its two base stages' out-of-fold predictions, checked against its
    folds."""
    from tabular.run import load_run

    for stage in BASE_STAGES:  # say what is missing before reading any metadata
        layout.require_file(stage)
    try:
        run = load_run(layout.dir)
    except DataError as error:
        raise RunError(f"run {layout.dir}: cannot be reopened: {error}") from error
    ids = run.frame[run.spec.id].astype(str).to_numpy()
    p_gbdt = layout.read_oof("gbdt", ids, run.fold, run.target)
    p_fusion = layout.read_oof("fusion", ids, run.fold, run.target)
    run_identity(layout)  # the base stages must have been trained on the same embeddings
    return run, p_gbdt, p_fusion


def _fit_stack(
    stack_dir: Path, run, p_gbdt, p_fusion, config: StackConfig, made_from: dict
) -> np.ndarray:
    """The stack's out-of-fold predictions; its fold models and encoders saved in `stack_dir`
    (the new `stack/` being written)."""
    log.info(
        "stack: LightGBM on metadata + fusion and gbdt predictions, %d folds",
        len(np.unique(run.fold)),
    )
    p_stack = oof_stack(
        run.frame, run.spec, run.target, run.fold, p_fusion, p_gbdt, config, out_dir=stack_dir
    )
    patient = stack_patient(run.spec, config)
    ranks = [rank_feature(name) for name in BASE_FEATURES] if patient else []
    atomic_write_json(
        stack_dir / "stack.json",
        {
            "folds": [int(k) for k in np.unique(run.fold)],
            "features": [*BASE_FEATURES, *ranks],
            "patient": patient,
            "config": asdict(config),
            "made_from": made_from,
        },
    )
    return p_stack


def _fit_blend(
    blend_dir: Path, y, folds, p_gbdt, p_fusion, config: StackConfig, made_from: dict
) -> np.ndarray:
    """The blend's out-of-fold scores; its weight and rank references (from every row) in
    `blend_dir` (the new `blend/` being written)."""
    p_blend, fold_weights = oof_blend(y, folds, p_gbdt, p_fusion, config.blend_weights)
    weight, references = choose_blend_weight(y, p_gbdt, p_fusion, config.blend_weights)
    atomic_write_json(
        blend_dir / "blend.json",
        {
            "weight_gbdt": weight,
            "fold_weights": fold_weights,
            "references": {name: values.tolist() for name, values in references.items()},
            "made_from": made_from,
        },
        indent=None,
    )
    return p_blend


def _choose_final(figures: dict) -> str:
    """The candidate with the higher out-of-fold pAUC80; ties go to the stack (listed first): it
    also carries the metadata signal the blend only sees through gbdt."""

    def key(name):
        value = figures[name]["pauc80"]
        return -math.inf if value is None else value

    return max(("stack", "blend"), key=key)


# ------------------------------------------------------------------ a tabular-only run (gbdt/ only)


class GBDTFinal:
    """The final model of a tabular-only run: the LightGBM stage's own fold-averaged score.

    The signature is `StackModel.predict`'s; `frame`, `p_fusion` and `encode` are not used.
    A `runfolder.stage.Stage` with no file of its own (the LightGBM stage is loaded as `gbdt`).
    """

    STAGE = TABULAR_FINAL
    MARKER = ""
    READS_METADATA = False
    NEEDS_FUSION = False
    encoders: list = []

    @classmethod
    def load(cls, stage_dir: Path | str) -> GBDTFinal:
        return cls()

    def predict(
        self,
        frame: pd.DataFrame | None,
        p_gbdt: np.ndarray,
        p_fusion: np.ndarray | None = None,
        encode: Encode | None = None,
    ) -> np.ndarray:
        return np.asarray(p_gbdt, dtype=np.float64)


def tabular_only(layout: RunLayout) -> bool:
    """True for a run whose spec names no images and which has no fusion stage: LightGBM on
    metadata is then its only model and becomes the final one."""
    from tabular.spec import spec_from_identity

    if layout.oof("fusion").is_file():
        return False
    return not spec_from_identity(layout.read_record()["spec"]).images


def _stack_tabular_only(layout: RunLayout, sensitivity: float) -> dict:
    """Make the LightGBM stage the final model of a tabular-only run: its out-of-fold scores
    calibrated, the operating threshold chosen on them, `stack/final.json` and `stack/ranges.json`.

    Nothing is stacked or blended (there is one base model); no `blend/` is written.
    """
    from tabular.run import load_run

    layout.require_file("gbdt")
    try:
        run = load_run(layout.dir)
    except DataError as error:
        raise RunError(f"run {layout.dir}: cannot be reopened: {error}") from error
    ids = run.frame[run.spec.id].astype(str).to_numpy()
    y, folds = run.target, run.fold
    p_gbdt = layout.read_oof("gbdt", ids, folds, y)
    made_from = {
        "folds.csv": sha256_file(layout.folds),
        "gbdt/oof.csv": sha256_file(layout.oof("gbdt")),
    }
    log.info("run %s has no images: LightGBM on metadata is its final model", layout.dir)
    figures = evaluate(y, p_gbdt, folds, sensitivity)
    calibrator, p_calibrated, calibration_figures = choose_calibrator(y, p_gbdt, folds)
    record = {
        "final": TABULAR_FINAL,
        "threshold": float(calibrator(np.array([figures["threshold"]]))[0]),
        "score_threshold": figures["threshold"],
        "sensitivity": sensitivity,
        "pauc80": {TABULAR_FINAL: figures["pauc80"]},
        "calibration": {**calibrator.to_json(), "out_of_fold": calibration_figures},
        "note": "a tabular-only run (its spec names no images): the LightGBM stage is the final "
        "model; "
        "its score is calibrated (the method with the lower out-of-fold Brier score), "
        "score_threshold is chosen on its out-of-fold scores for the target sensitivity, "
        "threshold is the same point on the probability scale",
        "made_from": made_from,
    }
    # Written beside the old stage and swapped in whole, as the stacked runs' stage is.
    with reporting_write_errors("stack", layout.dir), layout.rewriting("stack") as stack_dir:
        layout.write_oof(stack_dir.name, ids, folds, y, p_calibrated, name=CALIBRATED_OOF)
        layout.write_json(stack_dir.name, FINAL, record)
        write_ranges(stack_dir, run.frame, run.spec.numeric)
    _fit_applicability(layout, run)
    log.info(
        "final model: gbdt (tabular-only run; out-of-fold pAUC80 %s), calibrated by %s, "
        "threshold %.4g",
        figures["pauc80"],
        calibrator.method,
        record["threshold"],
    )
    return record


def _calibrate_final(
    layout: RunLayout,
    stack_dir: Path,
    ids,
    y,
    folds,
    final: str,
    p_final,
    figures: dict,
    sensitivity: float,
    made_from: dict,
) -> dict:
    """Calibrate the final model's score, write `final.json` and the calibrated out-of-fold file
    into `stack_dir` (the new `stack/` being written)."""
    calibrator, p_calibrated, calibration_figures = choose_calibrator(y, p_final, folds)
    layout.write_oof(stack_dir.name, ids, folds, y, p_calibrated, name=CALIBRATED_OOF)
    # The threshold chosen on the final score, carried through the (monotone) calibrator: the
    # lesions at or above it are the same ones, now compared on the probability scale.
    score_threshold = figures[final]["threshold"]
    record = {
        "final": final,
        "threshold": float(calibrator(np.array([score_threshold]))[0]),
        "score_threshold": score_threshold,
        "sensitivity": sensitivity,
        "pauc80": {name: figures[name]["pauc80"] for name in ("stack", "blend")},
        "calibration": {**calibrator.to_json(), "out_of_fold": calibration_figures},
        "note": "final = the candidate with the higher out-of-fold pAUC80; its score is calibrated "
        "(the method with the lower out-of-fold Brier score, fitted on all out-of-fold "
        "scores); score_threshold is chosen on its out-of-fold scores for the target "
        "sensitivity, threshold is the same point on the probability scale",
        "made_from": made_from,
    }
    layout.write_json(stack_dir.name, FINAL, record)
    log.info(
        "final model: %s (pAUC80 stack %s, blend %s), calibrated by %s (out-of-fold Brier %.4f, "
        "ECE %.4f), threshold %.4g",
        final,
        record["pauc80"]["stack"],
        record["pauc80"]["blend"],
        calibrator.method,
        calibration_figures[calibrator.method]["brier"],
        calibration_figures[calibrator.method]["ece"],
        record["threshold"],
    )
    return record


def evaluate(y: np.ndarray, p: np.ndarray, folds: np.ndarray, sensitivity: float) -> dict:
    """`summarize` on the pooled out-of-fold predictions, plus pAUC80 per fold."""
    figures = summarize(y, p, sensitivity=sensitivity)
    per_fold = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for k in np.unique(folds):
            rows = folds == k
            value = pauc80(y[rows], p[rows])
            per_fold[int(k)] = None if math.isnan(value) else value
    figures["pauc80_per_fold"] = per_fold
    return figures
