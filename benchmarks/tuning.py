"""The tuning bench: an Optuna trial's seconds with a short early-stopping patience for the
trials' models (`invoke train-gbdt --trial-patience 10`) beside the default (the ensembles' own
patience, 50 rounds), in the same run.

Both studies run `tabular.tuning.tune` as `invoke train-gbdt --trials N` does, on the same folds
built once (features and Datasets), each in a fresh SQLite storage, sampler seed 0; the two sides
alternate, round after round, so that a machine whose speed drifts disturbs both alike. The data:
ISIC 2020 (`../shared/data/isic2020/dataset.toml` beside the repository, the set the target
names) where it lies, else the synthetic ISIC 2024-like table at 25,000 rows, about its size.

Besides the time, each side's best trial (its mean fold pAUC80, as that side scored it) and
whether both chose the same parameters: a trial ranks parameter sets, and what the shorter
patience can cost is another choice (README "Shorter trials" measures what that choice does to
the tuned ensemble, which keeps 50 rounds on both sides).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ISIC2024_PATIENTS, ISIC2024_ROWS, REPO
from fuse.demo.synthetic import make_isic2024_like
from tabular.folds import make_folds
from tabular.gbdt_config import GBDTConfig
from tabular.gbdt_folds import build_folds
from tabular.spec import isic2024_spec, load_spec
from tabular.tuning import tune
from tabular.validate import read_metadata

__all__ = ["ISIC2020_SPEC", "SHORT_PATIENCE", "TARGET_TRIAL_RATIO", "bench_tuning", "tuning_rows"]

log = logging.getLogger(__name__)

ISIC2020_SPEC = REPO.parent / "shared" / "data" / "isic2020" / "dataset.toml"
# The short patience measured beside the default.
SHORT_PATIENCE = 10
# An Optuna trial at most half the default's time.
TARGET_TRIAL_RATIO = 0.5
SYNTHETIC_ROWS = 25_000


def bench_tuning(trials: int = 10, rounds: int = 2, spec_path: Path | None = None) -> dict:
    """Per-trial seconds of `trials` trials, the default patience and `SHORT_PATIENCE`, `rounds`
    times each, alternated; see the module's docstring."""
    config = GBDTConfig()
    with tempfile.TemporaryDirectory(prefix="bench-tuning-") as tmp:
        name, frame, spec = _data(Path(tmp), spec_path)
        fold_of_row = make_folds(frame, spec, n_folds=5, seed=42)["fold"].to_numpy()
        y = frame[spec.target].to_numpy().astype(np.int8)
        folds = build_folds(frame, spec, y, fold_of_row, config=config)
        sides: dict[str, list[dict]] = {"default": [], "short": []}
        for round_number in range(rounds):
            for side, patience in (("default", config.trial_patience), ("short", SHORT_PATIENCE)):
                log.info("bench: tuning, %s (patience %d), round %d", side, patience, round_number)
                folder = Path(tmp) / f"{side}-{round_number}"
                folder.mkdir()
                started = time.perf_counter()
                result = tune(
                    folds,
                    f"bench-{side}",
                    trials,
                    folder,
                    storage=f"sqlite:///{folder / 'study.db'}",
                    config=GBDTConfig(trial_early_stopping_rounds=patience),
                )
                seconds = time.perf_counter() - started
                sides[side].append(
                    {
                        "patience": patience,
                        "seconds_per_trial": seconds / trials,
                        "best_value": result.best_value,
                        "best_params": result.best_params,
                    }
                )
    ratios = [
        o["seconds_per_trial"] / b["seconds_per_trial"]
        for b, o in zip(sides["default"], sides["short"], strict=True)
    ]
    return {
        "data": name,
        "rows": len(frame),
        "trials": trials,
        "rounds": rounds,
        "default": _summary(sides["default"]),
        "short": _summary(sides["short"]),
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio": statistics.median(ratios),
        "same_best_params": all(
            b["best_params"] == o["best_params"]
            for b, o in zip(sides["default"], sides["short"], strict=True)
        ),
        "target_ratio": TARGET_TRIAL_RATIO,
    }


def _data(tmp: Path, spec_path: Path | None):
    """(name, validated metadata, spec): ISIC 2020 where it lies (or `spec_path`), else the
    synthetic ISIC 2024-like table."""
    path = spec_path or (ISIC2020_SPEC if ISIC2020_SPEC.exists() else None)
    if path is not None:
        spec = load_spec(path)
        return spec.name, read_metadata(spec).reset_index(drop=True), spec
    log.info("bench: tuning on the synthetic table (%s is absent)", ISIC2020_SPEC)
    make_isic2024_like(
        tmp,
        n_rows=SYNTHETIC_ROWS,
        n_patients=max(10, round(ISIC2024_PATIENTS * SYNTHETIC_ROWS / ISIC2024_ROWS)),
        prevalence=0.005,
        seed=0,
        write_images=False,
    )
    spec = isic2024_spec(tmp)
    return f"synthetic ISIC 2024-like, {SYNTHETIC_ROWS:,} rows", read_metadata(spec), spec


def _summary(runs: list[dict]) -> dict:
    return {
        "patience": runs[0]["patience"],
        "seconds_per_trial": [round(r["seconds_per_trial"], 3) for r in runs],
        "median_seconds_per_trial": statistics.median(r["seconds_per_trial"] for r in runs),
        "best_value": runs[0]["best_value"],
    }


def tuning_rows(t: dict) -> list[tuple[str, str, str, str, str]]:
    """The bench table's rows of the tuning part (figure, value, baseline, ratio, target)."""
    default, short = t["default"], t["short"]
    return [
        (
            f"optuna trial s ({t['data']}, {t['trials']} trials) --trial-patience "
            f"{short['patience']} vs the default {default['patience']}",
            f"{short['median_seconds_per_trial']:.2f}",
            f"{default['median_seconds_per_trial']:.2f}",
            f"{t['ratio']:.2f}",
            f"<= {t['target_ratio']}",
        ),
        (
            "optuna best trial's mean fold pAUC80, as each side scores it (same parameters "
            f"chosen: {'yes' if t['same_best_params'] else 'no'})",
            f"{short['best_value']:.4f}",
            f"{default['best_value']:.4f}",
            "",
            "",
        ),
    ]
