"""Patient- (or lesion-) grouped, class-stratified folds, made once per run.

Every stage of a run reads the same `folds.csv`, so their out-of-fold predictions line up row for
row and can be stacked without leaking a label.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pandas as pd

from common.files import atomic_write
from tabular.errors import DataError
from tabular.spec import DatasetSpec

log = logging.getLogger(__name__)

__all__ = ["make_folds", "read_folds", "write_folds"]


def make_folds(
    frame: pd.DataFrame, spec: DatasetSpec, n_folds: int = 5, seed: int = 42
) -> pd.DataFrame:
    """Assign each row a fold so that no group straddles two folds.

    Args:
        frame: validated metadata (see `tabular.validate.read_metadata`), with the target.
        spec: the data set's spec (target and group columns).
        n_folds: number of folds, at least 2.
        seed: shuffling seed; the same seed and rows give the same folds.

    Returns:
        DataFrame with columns `id`, `group`, `fold` in the frame's row order.

    Raises:
        DataError: `n_folds` < 2, or fewer groups than folds.

    A fold that ends up with one class (tiny data sets) is allowed with a warning: its metrics
    are NaN rather than a crash.
    """
    if not isinstance(n_folds, int) or n_folds < 2:
        raise DataError(f"n_folds must be an integer >= 2, got: {n_folds!r}")
    groups = frame[spec.group].astype(str).to_numpy()
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise DataError(
            f"n_folds={n_folds} needs at least as many groups; column '{spec.group}' has {n_groups}"
        )
    target = frame[spec.target].to_numpy()
    # Imported here: scoring imports this module for its names, not for the splitter.
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = pd.Series(-1, index=range(len(frame)), dtype="int64")
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; the check below says it better.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, valid) in enumerate(splitter.split(groups, target, groups)):
            fold.iloc[valid] = k
    folds = pd.DataFrame(
        {"id": frame[spec.id].astype(str).to_numpy(), "group": groups, "fold": fold.to_numpy()}
    )
    for k in range(n_folds):
        classes = set(target[folds["fold"].to_numpy() == k].tolist())
        if len(classes) < 2:
            message = f"fold {k} has one class only ({sorted(classes)}); its metrics will be NaN"
            warnings.warn(message, stacklevel=2)
            log.warning(message)
    return folds


def write_folds(folds: pd.DataFrame, path: Path) -> None:
    """Write `folds.csv` atomically (a half-written fold file would misalign every stage)."""
    atomic_write(path, lambda f: folds.to_csv(f, index=False))


def read_folds(path: Path) -> pd.DataFrame:
    """Read a run's `folds.csv` (id and group as text)."""
    folds = pd.read_csv(path, dtype={"id": str, "group": str, "fold": "int64"})
    missing = {"id", "group", "fold"} - set(folds.columns)
    if missing:
        raise DataError(f"{path}: not a folds file, missing columns {sorted(missing)}")
    return folds
