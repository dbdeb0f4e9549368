"""The final stage: the run's base models joined into one score, and that score as a probability.

- `fuse.stacking.stack`: `stack` (the stacker and the blend on the base models' out-of-fold
  scores, the final model chosen on pAUC80, its operating threshold, `<run>/stack/`,
  `<run>/blend/`);
- `fuse.stacking.stacker`: the stacker (LightGBM on metadata + the base predictions, out of fold);
- `fuse.stacking.blend`: the rank blend of the two base models and its saved weight and references;
- `fuse.stacking.patient_ranks`: each base score's rank within its patient, as stack features;
- `fuse.stacking.calibration`: the final score mapped to a `probability` that keeps its order
  (Platt, beta or isotonic joined between its steps, chosen out of fold on Brier).
"""

__all__: list[str] = []
