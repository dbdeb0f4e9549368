"""`invoke demo`: the whole pipeline on a small synthetic data set in the ISIC 2024 layout."""

from __future__ import annotations

import logging
from pathlib import Path

from fuse import stages
from fuse.embedding import embed_spec
from fuse.paths import artifacts_root
from fuse.synthetic import make_isic2024_like

log = logging.getLogger(__name__)

DEMO_RUN = "demo"


def run_demo(rows: int = 600, trials: int = 3, root: Path | None = None, run: str | Path = DEMO_RUN,
             max_epochs: int = 15) -> Path:
    """Make the demo data (once), then embed, train-gbdt, train-fusion, stack and score.

    About 40 lesions per patient at 8% prevalence: enough positives for five grouped folds and a
    few per fold, small enough to run in a couple of minutes on two CPU cores.

    Returns:
        The report's path (`artifacts/runs/demo/report/report.md`).
    """
    root = root or artifacts_root() / "demo"
    data = root / "isic2024-synthetic"
    if not (data / "train-metadata.csv").exists() or not (data / "test-image.hdf5").exists():
        make_isic2024_like(data, n_rows=rows, n_patients=max(rows // 40, 10), prevalence=0.08, seed=0,
                           test_rows=max(rows // 10, 10))
    embed_spec(data)
    stages.train_gbdt(data, run, trials=trials)
    stages.train_fusion(data, run, max_epochs=max_epochs)
    report = stages.stack_and_report(run)
    predictions = root / "predictions.csv"
    stages.score_images(run, images=data / "test-image.hdf5", metadata=data / "test-metadata.csv",
                        out=predictions)
    print(f"predictions: {predictions}")
    return report
