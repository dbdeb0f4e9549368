"""Small generic fixtures for the fuse tests: a tabular-only run with fake base-model predictions.

Keep these small and generic; a test that needs a trained run with images builds its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tabular.run import Run, open_run
from tabular.spec import load_spec

SPEC_TOML = """[dataset]
name = "tiny"
metadata = "metadata.csv"
id = "image_id"
target = "target"
group = "lesion_id"
categorical = ["sex", "site"]
numeric = ["age", "size"]
"""


def make_tabular_run(
    root: Path, n_rows: int = 300, seed: int = 0, n_folds: int = 5, signal: float = 1.0
) -> Run:
    """A run on a small metadata-only data set whose target depends on age and size.

    Two rows per lesion (the group), about 30% positives; `signal=0` makes the target independent
    of the metadata.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    n_groups = n_rows // 2
    group = np.repeat(np.arange(n_groups), 2)[:n_rows]
    age = rng.normal(55, 15, n_groups)[group].round()
    size = rng.gamma(2.0, 2.0, n_rows)
    signal = signal * (0.06 * (age - 55) + 0.3 * (size - 4)) + rng.normal(0, 1, n_rows)
    target = (signal > np.quantile(signal, 0.7)).astype(int)
    frame = pd.DataFrame(
        {
            "image_id": [f"IMG_{i:05d}" for i in range(n_rows)],
            "lesion_id": [f"L{g:04d}" for g in group],
            "age": age,
            "sex": rng.choice(["male", "female"], n_rows),
            "site": rng.choice(["back", "face", "leg", "arm"], n_rows),
            "size": size.round(2),
            "target": target,
        }
    )
    frame.to_csv(root / "metadata.csv", index=False)
    (root / "spec.toml").write_text(SPEC_TOML)
    return open_run(load_spec(root / "spec.toml"), root / "run", n_folds=n_folds, seed=seed)


def write_oof(run: Run, stage: str, p: np.ndarray) -> Path:
    """Write `<run>/<stage>/oof.csv` (id, fold, target, p) aligned with the run's rows."""
    path = run.stage_dir(stage) / "oof.csv"
    pd.DataFrame(
        {
            "id": run.frame[run.spec.id].astype(str),
            "fold": run.fold,
            "target": run.target,
            "p": p,
        }
    ).to_csv(path, index=False)
    return path


def fake_predictions(run: Run, strength: float, seed: int) -> np.ndarray:
    """Scores in (0, 1) that carry the label with the given strength (0 = pure noise)."""
    rng = np.random.default_rng(seed)
    logit = strength * (run.target - 0.5) * 4 + rng.normal(0, 1, len(run.frame))
    return 1 / (1 + np.exp(-logit))


@pytest.fixture
def tabular_run(tmp_path) -> Run:
    """A metadata-only run (300 rows, 5 folds) with fake `gbdt` and `fusion` out-of-fold files."""
    run = make_tabular_run(tmp_path / "data")
    write_oof(run, "gbdt", fake_predictions(run, 0.6, seed=1))
    write_oof(run, "fusion", fake_predictions(run, 0.5, seed=2))
    return run


@pytest.fixture
def run_factory(tmp_path):
    """`run_factory(name, n_rows=300, seed=0)`: a fresh `make_tabular_run` under tmp_path/name."""

    def factory(name: str = "data", **kwargs) -> Run:
        return make_tabular_run(tmp_path / name, **kwargs)

    return factory


@pytest.fixture
def oof_writer():
    """`oof_writer(run, stage, p)`: write a stage's out-of-fold file (see `write_oof`)."""
    return write_oof
