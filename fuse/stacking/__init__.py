"""The final stage: the run's base models joined into one score, and that score as a probability.

- `fuse.stacking.stack`: `stack_run` (the stacker and the blend on the base models' out-of-fold
  scores, the final model chosen on pAUC80, its operating threshold, `<run>/stack/`, `<run>/blend/`);
- `fuse.stacking.calibration`: the final score mapped to a `probability` that keeps its order
  (Platt, beta or isotonic joined between its steps, chosen out of fold on Brier).
"""
