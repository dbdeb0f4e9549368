"""Synthetic skin-lesion data in the ISIC 2024 Kaggle layout: the demo data and benchmark table.

No real data may be committed, so the project makes its own: `make_isic2024_like` writes
`train-metadata.csv` (the 55 columns of the real file, in its order and value formats) and
`train-image.hdf5` (key = `isic_id`, value = the JPEG bytes as a scalar fixed-length bytes
dataset, as in the real file), and optionally the inference-time pair `test-metadata.csv` (the 44
columns of the real test file) + `test-image.hdf5`, with the answers kept apart in
`test-truth.csv` (`isic_id, target`) so a demo can check its scores.

How the data arise (one generative story serves the table and the images):

- Patients: heavy-tailed lesions per patient (log-normal weights, like the real set's ~1,042
  patients for 401,059 rows), age in 5-year steps, sex (a few missing), the imaging site
  (`attribution` with its `copyright_license`), the tile type (`3D: XP` crops are darker than
  `3D: white`), skin colour, and a "nevus phenotype": each patient's own typical lesion.
- Lesions: eight latent traits (size, darkness, colour variegation, border irregularity,
  asymmetry, redness, nevus-likeness, yellowness) = the patient's phenotype + correlated lesion
  noise. Malignant lesions (chosen with odds rising with age and on the head/neck) add a
  subtype-specific shift (melanoma: large, dark, variegated, asymmetric; basal and squamous cell
  carcinoma: red, light, not nevus-like) scaled by a random severity, so some look benign. About
  4% of benign lesions are atypical mimics (seborrhoeic keratoses, dysplastic nevi) that shift the
  same way. Because the shift is relative to the patient's own lesions, per-patient normalised
  features beat raw ones (the "ugly duckling" sign).
- Measurements: every `tbp_lv_*` column is computed from the traits with the real set's
  identities (C = hypot(A, B), H = atan2(B, A), delta = lesion - exterior, area/perimeter of an
  ellipse with a rough border, area_perim_ratio = perimeter^2 / area, ...).
- Images: a square crop of a fixed 15 mm field of view (real 3D-TBP tiles are fixed-size crops)
  of the patient's skin colour and texture, with the lesion drawn as a blob whose size, axes,
  orientation, border roughness (radial harmonics), Lab colour, and colour variegation are taken
  from that row's metadata, so image and table agree. Encoded as baseline JPEG, quality 90.

The table is drawn in `fuse.demo.lesion_table`, the images in `fuse.demo.lesion_images`; this
module chooses the ids, splits training and test rows, writes the files and says what it wrote.

Everything is determined by `seed`: the same arguments give byte-identical CSVs and identical
HDF5 values. Each image has its own random stream (seed, split, row), so drawing images does not
change the table and any single image can be redrawn alone.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fuse.demo.lesion_images import write_image_hdf5
from fuse.demo.lesion_table import TEST_COLUMNS, TRAIN_COLUMNS, TRAIN_ONLY_COLUMNS, make_table
from fuse.errors import RunError

__all__ = [
    "TEST_COLUMNS",
    "TRAIN_COLUMNS",
    "TRAIN_ONLY_COLUMNS",
    "SyntheticSummary",
    "make_isic2024_like",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticSummary:
    """What `make_isic2024_like` wrote, with its throughput.

    `images_per_s` is None when no image was drawn; `test_*` paths are None when `test_rows` is 0.
    """

    out_dir: Path
    train_metadata: Path
    train_images: Path | None
    test_metadata: Path | None
    test_images: Path | None
    test_truth: Path | None
    n_rows: int
    n_patients: int
    n_positive: int
    prevalence: float
    test_rows: int
    test_positive: int
    seed: int
    seconds_metadata: float
    seconds_images: float
    rows_per_s: float
    images_per_s: float | None


def make_isic2024_like(
    out_dir: Path,
    n_rows: int,
    n_patients: int,
    prevalence: float,
    seed: int = 0,
    write_images: bool = True,
    image_size_range: tuple[int, int] = (96, 160),
    test_rows: int = 0,
) -> SyntheticSummary:
    """Write a synthetic ISIC 2024-like data set in the Kaggle layout into `out_dir`.

    Args:
        out_dir: created if needed; existing files of the same names are replaced.
        n_rows: training rows (lesions), >= 1. The metadata of 401,059 rows takes seconds.
        n_patients: patients the training rows belong to, 1..n_rows; lesions per patient are
            heavy-tailed, every patient has at least one.
        prevalence: share of malignant rows, in (0, 1). The number of positives is
            round(prevalence * n_rows), kept to at least one and, where n_rows > 1, at most
            n_rows - 1 so the target has both classes.
        seed: non-negative; the same arguments give byte-identical CSVs and identical images.
        write_images: draw `train-image.hdf5` (and `test-image.hdf5`); about a few hundred
            images/s on one core.
        image_size_range: (smallest, largest) side in pixels of the square crops, inclusive,
            each at least 16.
        test_rows: rows of an inference-format pair (`test-metadata.csv` with the 44 test
            columns, `test-image.hdf5`, and `test-truth.csv` with `isic_id,target`), from
            patients not in the training rows, at the same prevalence. 0 writes none.

    Returns:
        A `SyntheticSummary` with the paths, counts and rows/s, images/s.

    Raises:
        RunError: an argument out of range; the message names it and the value received.
    """
    _check_arguments(n_rows, n_patients, prevalence, seed, image_size_range, test_rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = int(image_size_range[0]), int(image_size_range[1])

    t0 = time.perf_counter()
    train, test, train_csv, test_csvs = _write_tables(
        out_dir, seed, n_rows, n_patients, prevalence, test_rows
    )
    total_rows = n_rows + test_rows
    seconds_metadata = time.perf_counter() - t0
    rows_per_s = total_rows / max(seconds_metadata, 1e-9)
    log.info("metadata: %d rows in %.2f s (%.0f rows/s)", total_rows, seconds_metadata, rows_per_s)

    train_h5 = test_h5 = None
    seconds_images = 0.0
    images_per_s = None
    if write_images:
        t1 = time.perf_counter()
        train_h5, test_h5 = _write_image_files(out_dir, train, test, seed, (lo, hi))
        seconds_images = time.perf_counter() - t1
        images_per_s = total_rows / max(seconds_images, 1e-9)
        log.info("images: %d in %.2f s (%.0f images/s)", total_rows, seconds_images, images_per_s)

    n_positive = int(train["target"].sum())
    return SyntheticSummary(
        out_dir=out_dir,
        train_metadata=train_csv,
        train_images=train_h5,
        test_metadata=test_csvs[0] if test_csvs else None,
        test_images=test_h5,
        test_truth=test_csvs[1] if test_csvs else None,
        n_rows=n_rows,
        n_patients=n_patients,
        n_positive=n_positive,
        prevalence=n_positive / n_rows,
        test_rows=test_rows,
        test_positive=int(test["target"].sum()) if test is not None else 0,
        seed=seed,
        seconds_metadata=seconds_metadata,
        seconds_images=seconds_images,
        rows_per_s=rows_per_s,
        images_per_s=images_per_s,
    )


def _write_tables(
    out_dir: Path, seed: int, n_rows: int, n_patients: int, prevalence: float, test_rows: int
) -> tuple[pd.DataFrame, pd.DataFrame | None, Path, tuple[Path, Path] | None]:
    """Draw and write the training table (and the test pair's, with `test_rows`) into `out_dir`.

    Returns (training table, test table or None, `train-metadata.csv`, (`test-metadata.csv`,
    `test-truth.csv`) or None).
    """
    test_patients = 0
    if test_rows:
        test_patients = min(test_rows, max(1, round(n_patients * test_rows / n_rows)))
    # Separate streams: the training rows are the same whether or not a test pair is made.
    seeds = np.random.SeedSequence(seed).spawn(4)
    isic_ids, patient_ids, lesion_ids = _ids(seeds, n_rows, n_patients, test_rows, test_patients)
    train = make_table(
        np.random.default_rng(seeds[1]),
        isic_ids[:n_rows],
        patient_ids[:n_patients],
        lesion_ids[:n_rows],
        prevalence,
    )
    train_csv = out_dir / "train-metadata.csv"
    _write_csv(train.loc[:, list(TRAIN_COLUMNS)], train_csv)
    test = test_csvs = None
    if test_rows:
        test = make_table(
            np.random.default_rng(seeds[2]),
            isic_ids[n_rows:],
            patient_ids[n_patients:],
            lesion_ids[n_rows:],
            prevalence,
        )
        test_csvs = _write_test_tables(test, out_dir)
    return train, test, train_csv, test_csvs


def _write_image_files(
    out_dir: Path,
    train: pd.DataFrame,
    test: pd.DataFrame | None,
    seed: int,
    size_range: tuple[int, int],
) -> tuple[Path, Path | None]:
    """Draw `train-image.hdf5` (and `test-image.hdf5` when there is a test table) into
    `out_dir`; returns their paths (the test one None without a test table)."""
    train_h5 = out_dir / "train-image.hdf5"
    write_image_hdf5(train, train_h5, seed, 0, size_range)
    test_h5 = None
    if test is not None:
        test_h5 = out_dir / "test-image.hdf5"
        write_image_hdf5(test, test_h5, seed, 1, size_range)
    return train_h5, test_h5


def _ids(
    seeds: list[np.random.SeedSequence],
    n_rows: int,
    n_patients: int,
    test_rows: int,
    test_patients: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(isic ids, patient ids, lesion ids): the training rows' then the test rows', all distinct,
    drawn from `seeds[0]` (training) and `seeds[3]` (test)."""
    total_rows = n_rows + test_rows
    digits = max(7, len(str(4 * total_rows)))  # 7 like the real ids, more only when needed
    train_ids = np.random.default_rng(seeds[0])
    isic_n = _unique_numbers(train_ids, n_rows, digits)
    patient_n = _unique_numbers(train_ids, n_patients, digits)
    lesion_n = _unique_numbers(train_ids, n_rows, digits)
    test_ids = np.random.default_rng(seeds[3])
    isic_n = np.concatenate([isic_n, _unique_numbers(test_ids, test_rows, digits, isic_n)])
    patient_n = np.concatenate(
        [patient_n, _unique_numbers(test_ids, test_patients, digits, patient_n)]
    )
    lesion_n = np.concatenate([lesion_n, _unique_numbers(test_ids, test_rows, digits, lesion_n)])
    return (
        _format_ids("ISIC_", isic_n, digits),
        _format_ids("IP_", patient_n, digits),
        _format_ids("IL_", lesion_n, digits),
    )


def _write_test_tables(test: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write `test-metadata.csv` (the real test file's columns) and `test-truth.csv` (isic_id,
    target) into `out_dir`; returns their paths."""
    test_csv = out_dir / "test-metadata.csv"
    truth_csv = out_dir / "test-truth.csv"
    shown = test.loc[:, list(TEST_COLUMNS)].copy()
    # The real test file writes whole ages ("45"), the training file floats ("45.0").
    shown["age_approx"] = shown["age_approx"].astype("Int64")
    _write_csv(shown, test_csv)
    _write_csv(test.loc[:, ["isic_id", "target"]], truth_csv)
    return test_csv, truth_csv


def _check_arguments(n_rows, n_patients, prevalence, seed, image_size_range, test_rows) -> None:
    def whole(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise RunError(f"expected {name} to be an integer >= {minimum}, got {value!r}")

    whole("n_rows", n_rows, 1)
    whole("n_patients", n_patients, 1)
    if n_patients > n_rows:
        raise RunError(
            f"expected n_patients <= n_rows (every patient has a lesion), got "
            f"n_patients={n_patients!r} with n_rows={n_rows!r}"
        )
    try:
        p = float(prevalence)
    except (TypeError, ValueError):
        p = math.nan
    if not 0.0 < p < 1.0:  # also refuses NaN
        raise RunError(f"expected prevalence in (0, 1), got {prevalence!r}")
    whole("seed", seed, 0)
    whole("test_rows", test_rows, 0)
    try:
        lo, hi = (int(v) for v in image_size_range)
    except (TypeError, ValueError):
        lo, hi = 0, -1
    if not 16 <= lo <= hi:
        raise RunError(
            f"expected image_size_range (smallest, largest) with 16 <= smallest <= largest, "
            f"got {image_size_range!r}"
        )


def _unique_numbers(
    rng: np.random.Generator, n: int, digits: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """n distinct integers below 10**digits, in drawn order, none of them in `exclude`."""
    numbers = rng.choice(10**digits, size=n, replace=False)
    if exclude is None or not len(exclude):
        return numbers
    numbers = numbers[~np.isin(numbers, exclude)]
    while len(numbers) < n:  # a draw hit an excluded number: top up, keeping the order
        more = rng.choice(10**digits, size=n, replace=False)
        more = more[~np.isin(more, np.concatenate([numbers, exclude]))]
        numbers = np.concatenate([numbers, more])[:n]
    return numbers


def _format_ids(prefix: str, numbers: np.ndarray, digits: int) -> np.ndarray:
    """`ISIC_0123456`-style ids (zero-padded to `digits`) as an object array."""
    return np.char.add(prefix, np.char.zfill(numbers.astype(str), digits)).astype(object)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
