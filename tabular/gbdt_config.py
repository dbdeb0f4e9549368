"""Settings of the LightGBM ensemble: booster and Dataset parameters, `GBDTConfig`, threads.

- `DEFAULT_PARAMS`: the untuned booster parameters (also the Optuna study's first trial);
- `DATASET_PARAMS`: the binning parameters, fixed so that one binned Dataset serves every trial;
- `DEFAULT_NEG_RATIO`: negatives kept per positive in each training part by default;
- `GBDTConfig`: how the ensemble is trained (seeds, down-sampling, image PCA, early stopping,
  threads);
- `booster_params` / `lightgbm_threads` / `dataset_params`: the full parameters and threads of one
  model, and the binning parameters with those threads (for Datasets built while folds train);
- `usable_cpus`: the CPUs this process may run on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tabular.errors import DataError

__all__ = [
    "DATASET_PARAMS",
    "DEFAULT_NEG_RATIO",
    "DEFAULT_PARAMS",
    "GBDTConfig",
    "booster_params",
    "dataset_params",
    "lightgbm_threads",
    "usable_cpus",
]

# Booster parameters of the untuned model, inside the Optuna search space (tabular.tuning) so that
# they are also the study's first trial. Small trees: on the public metadata sets (HAM10000,
# ISIC 2020) deeper ones overfit within a few dozen rounds. Early stopping watches the log loss,
# which moves more smoothly than the AUC on validation parts with few positives.
DEFAULT_PARAMS: dict = {
    "objective": "binary",
    "metric": "binary_logloss",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "max_depth": 5,
    "min_child_samples": 40,
    "feature_fraction": 0.6,
    "bagging_fraction": 0.7,
    "bagging_freq": 1,
    "lambda_l1": 0.0,
    "lambda_l2": 1.0,
    "scale_pos_weight": 1.0,
    "verbosity": -1,
}
# Dataset (binning) parameters, fixed: a binned Dataset is built once per fold and reused with
# other booster parameters, which LightGBM allows only when these do not change.
# feature_pre_filter=False lets trials lower min_child_samples on the same Dataset. Bin edges
# from 50,000 sampled rows (LightGBM's default is 200,000) make binning 320,000 ISIC 2024 rows
# x 200 features take about 3 s instead of 8 s, with about 200 rows per bin still.
DATASET_PARAMS: dict = {
    "max_bin": 255,
    "bin_construct_sample_cnt": 50_000,
    "feature_pre_filter": False,
    "verbosity": -1,
}
# Negatives kept per positive in each training part unless told otherwise (GBDTConfig.neg_ratio).
# A training part with fewer negatives per positive is left whole, so this down-samples only below
# about 2% prevalence: ISIC 2024 (0.1%, ~1,000 negatives per positive) to a twentieth of its
# negatives, ISIC 2020 (1.7%, ~59 per positive) barely, HAM10000 (19%) not at all. Chosen from
# out-of-fold pAUC80 and fit time at 10-200 negatives per positive against every negative, three
# seeds a set and several seed sets (`python -m benchmarks.gbdt`): on the synthetic 401,059-row
# ISIC 2024-like table every ratio from 20 to 200 kept pAUC80 within the seed-to-seed noise of the
# unsampled ensemble (50: +0.0003, noise 0.0033), and 50 fits in about a quarter of its time (fold
# building, the same at every ratio, is then half the cost, so lower ratios gain little); on
# ISIC 2020, 50 and every negative score the same (0.0755 and 0.0753). `invoke bench` measures the
# default beside the unsampled ensemble in every run.
DEFAULT_NEG_RATIO: float = 50.0


@dataclass(frozen=True)
class GBDTConfig:
    """How the ensemble is trained (booster parameters are passed separately).

    seeds: one model per fold and seed; their predictions are averaged.
    neg_ratio: keep every positive and at most this many negatives per positive in each training
        part, a different random draw per seed and fold (validation parts are never sampled);
        default `DEFAULT_NEG_RATIO` (None means the default too); 0 keeps every negative. A part
        with fewer negatives per positive is left whole. As in the ISIC 2024 winning LightGBM
        ensembles, trees train on a fraction of the rows, and each seed sees other negatives,
        which makes the seeds a bagging ensemble. Early stopping then watches the validation log
        loss of probabilities moved back to the validation part's prevalence (an init score of
        log(kept share of negatives)), so that it stops on the ranking learnt and not on the
        shift of the base rate (without it, ~7x more rounds and a lower, noisier pAUC80 on the
        synthetic ISIC 2024-like table). Saved models and their predictions keep their form:
        probabilities at the sampled prevalence, in the same order as at the true one.
    extra_components: PCA components kept from the extra matrix (image embeddings); 0 = metadata
        only, when no extra matrix is given.
    pca_fit_rows: PCA is fitted on at most this many training rows (a seeded sample) to bound
        memory on ISIC-sized data; the projection is applied to every row.
    patient_context: with image features and a spec that names a patient column, also the
        image's distance to the patient's other lesions (`patient_context`).
    num_boost_round / early_stopping_rounds: boosting stops when the first validation metric
        (log loss by default) has not improved for `early_stopping_rounds` rounds; the model is
        saved at its best iteration.
    trial_early_stopping_rounds: the patience of an Optuna trial's models; None (the default) =
        `early_stopping_rounds`, the ensembles' own (`trial_patience` gives the value used). A
        trial only ranks parameter sets, and the rounds run after the best one to be sure of it
        are much of its work, but a shorter patience also ranks them otherwise: measured with 10
        against 50 (README "Shorter trials"), an ISIC 2020 trial took 0.57x the time and the study
        chose parameters as good, while on HAM10000 the tuned ensemble lost pAUC80 for 4 sampler
        seeds of 4. So the default stays the ensembles' patience; `--trial-patience` offers less.
    log_period: LightGBM evaluation log every N rounds (0 = quiet).
    num_threads: LightGBM threads; 0 = half the usable CPUs (LightGBM runs best with one thread
        per physical core, and its OpenMP threads slow down sharply on an oversubscribed machine).
    fold_workers: models trained at the same time, each in its own Python thread (of any fold:
        models of one fold share its validation Dataset, whose init score each sets under the
        fold's lock; a trial's one model a fold); 0 (the default) = the usable CPUs over
        `num_threads`'s threads (2 on a 2-CPU machine, where LightGBM gets 1 thread a model), at
        most the models; 1 = one after another. The models and their predictions are the same
        for any value. Safe because every LightGBM call made while models run side by side
        names the same `num_threads` (`booster_params`, `dataset_params`, the predictions):
        LightGBM keeps its thread count in one process-wide variable that each call with
        parameters sets, so a call without it (LightGBM's default: every CPU) made while another
        thread trains a one-thread model makes that model run two-thread loops over one-thread
        buffers, and the process crashes (a segmentation fault, reproduced; the likely cause of
        the one once seen in `invoke demo`, whose folds then predicted without `num_threads`).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    neg_ratio: float | None = DEFAULT_NEG_RATIO
    extra_components: int = 64
    pca_fit_rows: int = 50_000
    patient_context: bool = True
    num_boost_round: int = 5000
    early_stopping_rounds: int = 50
    trial_early_stopping_rounds: int | None = None
    log_period: int = 0
    num_threads: int = 0
    fold_workers: int = 0

    @property
    def negatives_per_positive(self) -> float:
        """`neg_ratio` as construction set it: a float, the default where None was given;
        0 = off."""
        return DEFAULT_NEG_RATIO if self.neg_ratio is None else float(self.neg_ratio)

    @property
    def trial_patience(self) -> int:
        """The early-stopping rounds of an Optuna trial's models."""
        trial = self.trial_early_stopping_rounds
        return int(self.early_stopping_rounds if trial is None else trial)

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int | np.integer) for s in self.seeds):
            raise DataError(f"seeds: expected a non-empty sequence of integers, got {self.seeds!r}")
        ratio = self.neg_ratio
        if ratio is None:
            object.__setattr__(self, "neg_ratio", DEFAULT_NEG_RATIO)
        elif (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float | np.integer | np.floating)
            or not (math.isfinite(ratio) and ratio >= 0)
        ):
            raise DataError(
                f"neg_ratio: expected a number >= 0 (negatives kept per positive; 0 keeps every "
                f"negative, None the default {DEFAULT_NEG_RATIO:g}), got {ratio!r}"
            )
        else:
            object.__setattr__(self, "neg_ratio", float(ratio))
        # 0 = metadata only: a tabular-only spec, or `invoke train-gbdt --image-pca 0`.
        if (
            isinstance(self.extra_components, bool)
            or not isinstance(self.extra_components, int | np.integer)
            or self.extra_components < 0
        ):
            raise DataError(
                f"extra_components: expected an integer >= 0, got {self.extra_components!r}"
            )
        if (
            isinstance(self.fold_workers, bool)
            or not isinstance(self.fold_workers, int | np.integer)
            or self.fold_workers < 0
        ):
            raise DataError(
                "fold_workers: expected an integer >= 0 (0 = one per CPU left), got "
                f"{self.fold_workers!r}"
            )
        if self.num_boost_round < 1 or self.early_stopping_rounds < 1:
            raise DataError(
                f"num_boost_round / early_stopping_rounds: expected >= 1, got "
                f"{self.num_boost_round!r} / {self.early_stopping_rounds!r}"
            )
        trial = self.trial_early_stopping_rounds
        if trial is not None and (
            isinstance(trial, bool) or not isinstance(trial, int | np.integer) or trial < 1
        ):
            raise DataError(
                "trial_early_stopping_rounds: expected an integer >= 1 (None = "
                f"early_stopping_rounds), got {trial!r}"
            )


def booster_params(params: Mapping, seed: int, config: GBDTConfig) -> dict:
    """Full LightGBM parameters for one model of the ensemble."""
    full = {**DEFAULT_PARAMS, **params}
    # Per-seed randomness without `seed`, which would also reset the Dataset's binning seed.
    for key in (
        "bagging_seed",
        "feature_fraction_seed",
        "extra_seed",
        "drop_seed",
        "objective_seed",
    ):
        full[key] = int(seed)
    full["num_threads"] = lightgbm_threads(config)
    full["verbosity"] = -1
    return full


def dataset_params(config: GBDTConfig) -> dict:
    """`DATASET_PARAMS` with the models' LightGBM threads (`lightgbm_threads`): the thread count
    does not change the bins, and naming it keeps LightGBM's process-wide thread count the same
    for every call while folds run side by side (see `GBDTConfig.fold_workers`)."""
    return {**DATASET_PARAMS, "num_threads": lightgbm_threads(config)}


def lightgbm_threads(config: GBDTConfig) -> int:
    """LightGBM threads of each model: `config.num_threads`, else half the usable CPUs."""
    return config.num_threads or max(1, usable_cpus() // 2)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one: a container or
    `taskset` can allow fewer than the machine has), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
