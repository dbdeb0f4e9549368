"""Scoring new lesions with a trained run (`invoke score`).

- `fuse.scoring.rows`: the scoring metadata read and checked (the same checks as training);
- `fuse.scoring.run_models`: a run's stages loaded once, each through its own `load`;
- `fuse.scoring.score`: the scoring loop (embed in chunks, predict, applicability, write);
- `fuse.scoring.predictions`: the output columns checked and written (spreadsheet-safe CSV);
- `fuse.scoring.saliency`: Grad-CAM overlays for the triage page.
"""
