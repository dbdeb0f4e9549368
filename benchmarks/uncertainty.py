"""Cost of the group bootstrap that `invoke stack` runs for the report's 95% intervals.

`bench_bootstrap(rows)` builds a synthetic out-of-fold table (continuous scores, so every positive
score is distinct: the slowest case; a calibrated isotonic score has ties and is cheaper) and
times `tabular.uncertainty.bootstrap_figures` for `models` models x the 6 figures x
`n_resamples` resamples, in a fresh child interpreter so that peak memory is its own. Beside it,
the in-run baseline: the obvious way (for each resample, gather the drawn groups' rows and call
`tabular.metrics` per figure and model), timed on a few resamples and scaled to `n_resamples`.

Defaults follow the two data sets the figures are quoted for: at 100,000 rows or more, ISIC 2024
(0.098% positive, 1,042 patients); below, HAM10000 (19.3% positive, 6,000 lesions per 8,034
images). `python -m benchmarks.uncertainty 8034 401059` prints both.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from benchmarks.common import ISIC2024_PATIENTS, ISIC2024_ROWS, cpu_count, peak_rss_bytes, run_child

__all__ = ["bench_bootstrap", "measure_bootstrap"]

_ISIC2024_PREVALENCE = 0.00098
_HAM10000_PREVALENCE = 1552 / 8034
_HAM10000_GROUPS_PER_ROW = 6000 / 8034
_LARGE = 100_000


def _table(rows: int, positives: int, groups: int, models: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.zeros(rows, np.int8)
    y[rng.choice(rows, positives, replace=False)] = 1
    group = rng.integers(0, groups, rows)
    scores = {
        f"model{i}": 1.0 / (1.0 + np.exp(-(1.5 * y + rng.normal(size=rows) - 4.0)))
        for i in range(models)
    }
    return y, scores, group


def _naive(y, scores, group, threshold: float, resamples: int, seed: int) -> float:
    """Seconds per resample of the per-resample loop over `tabular.metrics`."""
    from tabular import metrics

    rng = np.random.default_rng(seed)
    n_groups = int(group.max()) + 1
    rows_of = np.split(
        np.argsort(group, kind="stable"), np.cumsum(np.bincount(group, minlength=n_groups))[:-1]
    )
    start = time.perf_counter()
    for _ in range(resamples):
        take = np.concatenate([rows_of[g] for g in rng.integers(0, n_groups, n_groups)])
        yy = y[take]
        for p in scores.values():
            pp = p[take]
            metrics.roc_auc(yy, pp), metrics.pauc80(yy, pp), metrics.pr_auc(yy, pp)
            metrics.brier(yy, pp), metrics.metrics_at_threshold(yy, pp, threshold)
    return (time.perf_counter() - start) / resamples


def measure_bootstrap(
    rows: int,
    positives: int,
    groups: int,
    models: int,
    n_resamples: int,
    seed: int,
    baseline_resamples: int,
) -> dict:
    """In this process: time `bootstrap_figures` once and the naive loop on a few resamples."""
    from tabular.uncertainty import bootstrap_figures

    y, scores, group = _table(rows, positives, groups, models, seed)
    threshold = 0.05
    cpu0, start = time.process_time(), time.perf_counter()
    result = bootstrap_figures(y, scores, group, threshold, n_resamples=n_resamples, seed=seed)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    naive = (
        _naive(y, scores, group, threshold, baseline_resamples, seed)
        if baseline_resamples
        else None
    )
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_seconds_per_resample": None if naive is None else round(naive, 4),
        "baseline_seconds_scaled": None if naive is None else round(naive * n_resamples, 1),
        "roc_auc_interval": result["models"]["model0"]["roc_auc"],
    }


def bench_bootstrap(
    rows: int = ISIC2024_ROWS,
    *,
    positives: int | None = None,
    groups: int | None = None,
    models: int = 3,
    n_resamples: int = 1000,
    seed: int = 0,
    baseline_resamples: int = 2,
) -> dict:
    """Seconds and peak memory of the report's bootstrap (models x 6 figures x n_resamples).

    Args:
        rows: rows of the synthetic out-of-fold table; default 401,059 (ISIC 2024).
        positives, groups: default ISIC 2024's prevalence and 1,042 patients at 100,000 rows or
            more, HAM10000's prevalence and lesions per image below.
        models: models sharing the resamples (final + base models); default 3.
        n_resamples: default 1,000.
        baseline_resamples: resamples of the naive loop timed and scaled (0 = skip it).

    Returns:
        JSON-ready: rows, positives, groups, models, figures, n_resamples, seconds, cpu_seconds,
        peak_rss_bytes, baseline_seconds_per_resample, baseline_seconds_scaled,
        roc_auc_interval, cores, load_average.
    """
    large = rows >= _LARGE
    if positives is None:
        positives = max(2, round(rows * (_ISIC2024_PREVALENCE if large else _HAM10000_PREVALENCE)))
    if groups is None:
        groups = ISIC2024_PATIENTS if large else max(2, round(rows * _HAM10000_GROUPS_PER_ROW))
    kwargs = {
        "rows": rows,
        "positives": positives,
        "groups": groups,
        "models": models,
        "n_resamples": n_resamples,
        "seed": seed,
        "baseline_resamples": baseline_resamples,
    }
    measured = run_child("benchmarks.uncertainty:measure_bootstrap", kwargs, label="bootstrap")
    return {
        **kwargs,
        "figures": 6,
        **measured,
        "cores": cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    for size in [int(a) for a in sys.argv[1:]] or [8034, ISIC2024_ROWS]:
        print(json.dumps(bench_bootstrap(size)))
