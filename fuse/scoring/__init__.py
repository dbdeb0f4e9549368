"""Scoring new lesions with a trained run (`invoke score`).

- `fuse.scoring.rows`: the scoring metadata read and checked (the same checks as training);
- `fuse.scoring.run_models`: a run's stages loaded once, each through its own `load`;
- `fuse.scoring.score`: `score`, the command's steps (check paths, load the run, read the rows,
  score them, write the predictions and the triage page);
- `fuse.scoring.loop`: embedding chunk by chunk, each chunk predicted in a worker thread while the
  next one embeds (in memory, or through a `--store`);
- `fuse.scoring.columns`: the output columns beyond the models' outputs (in_training,
  out_of_range, unlike_training / novelty, error);
- `fuse.scoring.predictions`: the output columns checked and written (spreadsheet-safe CSV);
- `fuse.scoring.saliency`: Grad-CAM overlays for the triage page.

The modules are imported by name, not through this package: importing it loads nothing.
"""

__all__: list[str] = []
