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

Everything is determined by `seed`: the same arguments give byte-identical CSVs and identical
HDF5 values. Each image has its own random stream (seed, split, row), so drawing images does not
change the table and any single image can be redrawn alone.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fuse.errors import RunError

log = logging.getLogger(__name__)

# The real train-metadata.csv header, in its order.
TRAIN_COLUMNS: tuple[str, ...] = (
    "isic_id", "target", "patient_id", "age_approx", "sex", "anatom_site_general",
    "clin_size_long_diam_mm", "image_type", "tbp_tile_type", "tbp_lv_A", "tbp_lv_Aext",
    "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H", "tbp_lv_Hext", "tbp_lv_L",
    "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio", "tbp_lv_color_std_mean",
    "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB", "tbp_lv_deltaLBnorm",
    "tbp_lv_eccentricity", "tbp_lv_location", "tbp_lv_location_simple", "tbp_lv_minorAxisMM",
    "tbp_lv_nevi_confidence", "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM",
    "tbp_lv_radial_color_std_max", "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis",
    "tbp_lv_symm_2axis_angle", "tbp_lv_x", "tbp_lv_y", "tbp_lv_z", "attribution",
    "copyright_license", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4",
    "iddx_5", "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)  # fmt: skip
# Absent from the real test-metadata.csv (the answer and what only a biopsy tells).
TRAIN_ONLY_COLUMNS: tuple[str, ...] = (
    "target", "lesion_id", "iddx_full", "iddx_1", "iddx_2", "iddx_3", "iddx_4", "iddx_5",
    "mel_mitotic_index", "mel_thick_mm", "tbp_lv_dnn_lesion_confidence",
)  # fmt: skip
TEST_COLUMNS: tuple[str, ...] = tuple(c for c in TRAIN_COLUMNS if c not in TRAIN_ONLY_COLUMNS)

FIELD_OF_VIEW_MM = 15.0
JPEG_QUALITY = 90

# Imaging sites: row shares of the real set (approximate) and the licence each site uses.
_ATTRIBUTIONS = (
    ("Memorial Sloan Kettering Cancer Center", "CC-BY", 129),
    ("Department of Dermatology, Hospital Clínic de Barcelona", "CC-BY-NC", 106),
    ("University Hospital of Basel", "CC-BY-NC", 65),
    ("Frazer Institute, The University of Queensland, Dermatology Research Centre", "CC-BY", 52),
    ("ACEMID MIA", "CC-0", 29),
    ("ViDIR Group, Department of Dermatology, Medical University of Vienna", "CC-BY-NC", 13),
    (
        "Department of Dermatology, University of Athens, Andreas Syggros Hospital of Skin and "
        "Venereal Diseases, Alexander Stratigos, Konstantinos Liopyris",
        "CC-BY",
        8,
    ),
)

# tbp_lv_location: share of rows, simple location, anatom_site_general, 3D box
# (x, y, z ranges in mm; x < 0 is the patient's left, y is height, z > 0 the back).
_LOCATIONS = (
    ("Torso Back Top Third", 71, "Torso Back", "posterior torso", (-180, 180), (1200, 1540), (90, 230)),
    ("Torso Back Middle Third", 46, "Torso Back", "posterior torso", (-170, 170), (980, 1200), (80, 210)),
    ("Torso Back Bottom Third", 8, "Torso Back", "posterior torso", (-160, 160), (820, 980), (70, 190)),
    ("Torso Back", 1, "Torso Back", "posterior torso", (-170, 170), (820, 1540), (70, 230)),
    ("Torso Front Top Half", 63, "Torso Front", "anterior torso", (-180, 180), (1150, 1450), (-90, 60)),
    ("Torso Front Bottom Half", 17, "Torso Front", "anterior torso", (-170, 170), (850, 1150), (-100, 80)),
    ("Torso Front", 1, "Torso Front", "anterior torso", (-170, 170), (850, 1450), (-100, 80)),
    ("Head & Neck", 12, "Head & Neck", "head/neck", (-100, 100), (1450, 1750), (-110, 90)),
    ("Left Arm - Upper", 23, "Left Arm", "upper extremity", (-380, -190), (1150, 1450), (-20, 90)),
    ("Left Arm - Lower", 17, "Left Arm", "upper extremity", (-470, -260), (850, 1250), (-20, 90)),
    ("Left Arm", 1, "Left Arm", "upper extremity", (-470, -190), (850, 1450), (-20, 90)),
    ("Right Arm - Upper", 23, "Right Arm", "upper extremity", (190, 380), (1150, 1450), (-20, 90)),
    ("Right Arm - Lower", 14, "Right Arm", "upper extremity", (260, 470), (850, 1250), (-20, 90)),
    ("Right Arm", 1, "Right Arm", "upper extremity", (190, 470), (850, 1450), (-20, 90)),
    ("Left Leg - Upper", 24, "Left Leg", "lower extremity", (-250, -60), (550, 850), (-60, 60)),
    ("Left Leg - Lower", 27, "Left Leg", "lower extremity", (-240, -60), (100, 550), (-20, 110)),
    ("Left Leg", 2, "Left Leg", "lower extremity", (-250, -60), (100, 850), (-60, 110)),
    ("Right Leg - Upper", 23, "Right Leg", "lower extremity", (60, 250), (550, 850), (-60, 60)),
    ("Right Leg - Lower", 25, "Right Leg", "lower extremity", (60, 280), (100, 550), (-20, 110)),
    ("Right Leg", 2, "Right Leg", "lower extremity", (60, 280), (100, 850), (-60, 110)),
    ("Unknown", 6, "Unknown", None, (-450, 450), (-150, 1750), (-160, 230)),
)  # fmt: skip

# Latent lesion traits, in this order.
_TRAITS = ("size", "dark", "varieg", "border", "asym", "red", "nevus", "yellow")
_SIGMA_PATIENT = 0.7  # spread of patients' typical lesions, per trait
_SIGMA_LESION = 0.7  # spread of one patient's lesions around that typical lesion
# How a malignant subtype (or a benign mimic) moves a lesion away from the patient's others,
# in trait units at severity 1.
_SHIFTS = {
    "melanoma": (0.9, 0.8, 1.1, 0.9, 0.8, 0.0, -0.9, -0.3),
    "bcc": (0.5, -0.5, 0.6, 0.5, 0.4, 1.1, -1.3, -0.6),
    "scc": (0.8, -0.3, 0.7, 0.7, 0.5, 1.0, -1.1, 0.3),
    "mimic": (0.8, 0.7, 0.8, 0.6, 0.4, 0.2, -0.6, 0.2),
}
_SEVERITY = (0.3, 1.8)  # uniform range: weak shifts leave malignant lesions looking benign
_MIMIC_SHARE = 0.04

_MEL = "Malignant::Malignant melanocytic proliferations (Melanoma)"
_BCC = "Malignant::Malignant adnexal epithelial proliferations - Follicular::Basal cell carcinoma"
_SCC = "Malignant::Malignant epidermal proliferations"
# subtype, share of malignant rows, iddx_full; the melanoma rows with "Melanoma Invasive" get
# mel_thick_mm and (mostly) mel_mitotic_index.
_MALIGNANT_DX = (
    ("bcc", 0.20, _BCC),
    ("bcc", 0.18, _BCC + "::Basal cell carcinoma, Nodular"),
    ("bcc", 0.10, _BCC + "::Basal cell carcinoma, Superficial"),
    ("bcc", 0.03, _BCC + "::Basal cell carcinoma, Infiltrating"),
    ("melanoma", 0.08, _MEL + "::Melanoma in situ"),
    ("melanoma", 0.04, _MEL + "::Melanoma in situ::Melanoma in situ, Lentigo maligna type"),
    ("melanoma", 0.04, _MEL + "::Melanoma in situ::Melanoma in situ, Superficial spreading"),
    ("melanoma", 0.04, _MEL + "::Melanoma Invasive"),
    ("melanoma", 0.05, _MEL + "::Melanoma Invasive::Melanoma Invasive, Superficial spreading"),
    ("melanoma", 0.02, _MEL + "::Melanoma Invasive::Melanoma Invasive, Associated with a nevus"),
    ("melanoma", 0.01, _MEL + "::Melanoma Invasive::Melanoma Invasive, Nodular"),
    ("scc", 0.10, _SCC + "::Squamous cell carcinoma in situ"),
    ("scc", 0.08, _SCC + "::Squamous cell carcinoma, Invasive"),
    (
        "scc",
        0.03,
        _SCC
        + "::Squamous cell carcinoma, Invasive::Squamous cell carcinoma, Invasive, "
        + "Keratoacanthoma-type",
    ),
)
# Benign rows that carry a lesion_id sometimes have a detailed diagnosis.
_BENIGN_DX = (
    "Benign::Benign melanocytic proliferations::Nevus",
    "Benign::Benign melanocytic proliferations::Nevus::Nevus, Atypical, Dysplastic, or Clark",
    "Benign::Benign epidermal proliferations::Seborrheic keratosis",
    "Benign::Benign epidermal proliferations::Solar lentigo",
    "Benign::Benign soft tissue proliferations - Vascular::Hemangioma",
    "Indeterminate::Indeterminate epidermal proliferations::Solar or actinic keratosis",
)
_MITOTIC = ("0/mm^2", "<1/mm^2", "1/mm^2", "2/mm^2", "3/mm^2", "4/mm^2", ">4/mm^2")


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
    test_patients = 0
    if test_rows:
        test_patients = min(test_rows, max(1, round(n_patients * test_rows / n_rows)))
    # Separate streams: the training rows are the same whether or not a test pair is made.
    seeds = np.random.SeedSequence(seed).spawn(4)
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
    isic_ids = _format_ids("ISIC_", isic_n, digits)
    patient_ids = _format_ids("IP_", patient_n, digits)
    lesion_ids = _format_ids("IL_", lesion_n, digits)

    train = _make_table(
        np.random.default_rng(seeds[1]),
        isic_ids[:n_rows],
        patient_ids[:n_patients],
        lesion_ids[:n_rows],
        prevalence,
    )
    train_csv = out_dir / "train-metadata.csv"
    _write_csv(train.loc[:, list(TRAIN_COLUMNS)], train_csv)
    test = None
    test_csv = truth_csv = None
    if test_rows:
        test = _make_table(
            np.random.default_rng(seeds[2]),
            isic_ids[n_rows:],
            patient_ids[n_patients:],
            lesion_ids[n_rows:],
            prevalence,
        )
        test_csv = out_dir / "test-metadata.csv"
        truth_csv = out_dir / "test-truth.csv"
        shown = test.loc[:, list(TEST_COLUMNS)].copy()
        # The real test file writes whole ages ("45"), the training file floats ("45.0").
        shown["age_approx"] = shown["age_approx"].astype("Int64")
        _write_csv(shown, test_csv)
        _write_csv(test.loc[:, ["isic_id", "target"]], truth_csv)
    seconds_metadata = time.perf_counter() - t0
    rows_per_s = total_rows / max(seconds_metadata, 1e-9)
    log.info("metadata: %d rows in %.2f s (%.0f rows/s)", total_rows, seconds_metadata, rows_per_s)

    train_h5 = test_h5 = None
    seconds_images = 0.0
    images_per_s = None
    if write_images:
        t1 = time.perf_counter()
        train_h5 = out_dir / "train-image.hdf5"
        _write_images(train, train_h5, seed, 0, (lo, hi))
        if test is not None:
            test_h5 = out_dir / "test-image.hdf5"
            _write_images(test, test_h5, seed, 1, (lo, hi))
        seconds_images = time.perf_counter() - t1
        images_per_s = total_rows / max(seconds_images, 1e-9)
        log.info("images: %d in %.2f s (%.0f images/s)", total_rows, seconds_images, images_per_s)

    n_positive = int(train["target"].sum())
    return SyntheticSummary(
        out_dir=out_dir,
        train_metadata=train_csv,
        train_images=train_h5,
        test_metadata=test_csv,
        test_images=test_h5,
        test_truth=truth_csv,
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


def _lesions_per_patient(rng: np.random.Generator, n_rows: int, n_patients: int) -> np.ndarray:
    """Counts summing to n_rows, each >= 1, heavy-tailed (a few patients have thousands)."""
    weights = rng.lognormal(0.0, 1.1, size=n_patients)
    extra = rng.multinomial(n_rows - n_patients, weights / weights.sum())
    return 1 + extra


def _trait_cholesky() -> np.ndarray:
    r = np.eye(len(_TRAITS))
    idx = {t: i for i, t in enumerate(_TRAITS)}
    for a, b, rho in (
        ("size", "varieg", 0.4),
        ("size", "border", 0.35),
        ("size", "asym", 0.2),
        ("varieg", "border", 0.4),
        ("dark", "varieg", 0.3),
        ("asym", "border", 0.35),
        ("nevus", "dark", 0.3),
        ("nevus", "red", -0.3),
        ("red", "yellow", -0.2),
    ):
        r[idx[a], idx[b]] = r[idx[b], idx[a]] = rho
    return np.linalg.cholesky(r)


def _choose_top(rng: np.random.Generator, log_weight: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of k rows drawn without replacement with probability ~ exp(log_weight)."""
    mask = np.zeros(len(log_weight), dtype=bool)
    if k <= 0:
        return mask
    keys = log_weight + rng.gumbel(size=len(log_weight))  # Gumbel top-k = weighted sampling
    mask[np.argpartition(-keys, k - 1)[:k]] = True
    return mask


def _make_table(
    rng: np.random.Generator,
    isic_ids: np.ndarray,
    patient_ids: np.ndarray,
    lesion_ids: np.ndarray,
    prevalence: float,
) -> pd.DataFrame:
    """All 55 training columns for len(isic_ids) rows of len(patient_ids) patients, sorted by id."""
    n, n_pat = len(isic_ids), len(patient_ids)
    counts = _lesions_per_patient(rng, n, n_pat)
    pat = np.repeat(np.arange(n_pat), counts)

    # Patients.
    age = np.clip(np.round(rng.normal(58.0, 13.5, n_pat) / 5.0) * 5.0, 15.0, 85.0)
    age[rng.random(n_pat) < 0.01] = np.nan
    sex = rng.choice(np.array(["male", "female", None], dtype=object), n_pat, p=[0.64, 0.33, 0.03])
    shares = np.array([a[2] for a in _ATTRIBUTIONS], dtype=float)
    site = rng.choice(len(_ATTRIBUTIONS), n_pat, p=shares / shares.sum())
    attribution = np.array([a[0] for a in _ATTRIBUTIONS], dtype=object)[site]
    licence = np.array([a[1] for a in _ATTRIBUTIONS], dtype=object)[site]
    xp = rng.random(n_pat) < 0.7
    tile = np.where(xp, "3D: XP", "3D: white").astype(object)
    skin_l = np.where(xp, 46.0, 61.0) + rng.normal(0, 6.5, n_pat)
    skin_a = rng.normal(15.5, 3.2, n_pat)
    skin_b = rng.normal(25.5, 3.2, n_pat)
    texture = rng.normal(0.0, 0.2, n_pat)
    height = rng.normal(1.0, 0.05, n_pat)
    chol = _trait_cholesky()
    phenotype = _SIGMA_PATIENT * rng.standard_normal((n_pat, len(_TRAITS))) @ chol.T
    age_filled = np.where(np.isnan(age), 58.0, age)
    risk = 0.045 * (age_filled - 58.0) + 0.3 * (sex == "male") + rng.normal(0, 0.5, n_pat)

    # Where each lesion is.
    loc_share = np.array([loc[1] for loc in _LOCATIONS], dtype=float)
    loc = rng.choice(len(_LOCATIONS), n, p=loc_share / loc_share.sum())
    location = np.array([x[0] for x in _LOCATIONS], dtype=object)[loc]
    simple = np.array([x[2] for x in _LOCATIONS], dtype=object)[loc]
    general = np.array([x[3] for x in _LOCATIONS], dtype=object)[loc]
    boxes = np.array([[*x[4], *x[5], *x[6]] for x in _LOCATIONS], dtype=float)[loc]
    u = rng.random((n, 3))
    pos_x = boxes[:, 0] + u[:, 0] * (boxes[:, 1] - boxes[:, 0])
    pos_y = (boxes[:, 2] + u[:, 1] * (boxes[:, 3] - boxes[:, 2])) * height[pat]
    pos_z = boxes[:, 4] + u[:, 2] * (boxes[:, 5] - boxes[:, 4])

    # Which lesions are malignant: exactly k, likelier for older patients and on the head/neck.
    k = round(prevalence * n)
    k = min(max(k, 1), n - 1) if n > 1 else k
    target = _choose_top(rng, risk[pat] + 1.0 * (general == "head/neck"), k)
    dx_share = np.array([d[1] for d in _MALIGNANT_DX])
    dx = rng.choice(len(_MALIGNANT_DX), n, p=dx_share / dx_share.sum())
    subtype = np.array([d[0] for d in _MALIGNANT_DX], dtype=object)[dx]
    benign = np.flatnonzero(~target)
    mimic = np.zeros(n, dtype=bool)
    mimic[benign[rng.random(len(benign)) < _MIMIC_SHARE]] = True

    # Traits = patient's phenotype + lesion noise + malignant (or mimic) shift.
    traits = phenotype[pat] + _SIGMA_LESION * rng.standard_normal((n, len(_TRAITS))) @ chol.T
    severity = rng.uniform(*_SEVERITY, n)
    shift = np.zeros((n, len(_TRAITS)))
    for name, vector in _SHIFTS.items():
        rows = mimic if name == "mimic" else target & (subtype == name)
        shift[rows] = np.asarray(vector) * severity[rows, None]
    traits = traits + shift
    t = dict(zip(_TRAITS, traits.T, strict=True))

    m = _measurements(rng, t, skin_l[pat], skin_a[pat], skin_b[pat], texture[pat], target)

    # Train-only columns: the diagnosis (consistent with target), histology, lesion ids.
    has_lesion_id = target | (rng.random(n) < np.where(mimic, 0.5, 0.04))
    lesion_id = np.where(has_lesion_id, lesion_ids, None).astype(object)
    iddx_full = np.full(n, "Benign", dtype=object)
    iddx_full[target] = np.array([d[2] for d in _MALIGNANT_DX], dtype=object)[dx[target]]
    detailed = has_lesion_id & ~target & (rng.random(n) < np.where(mimic, 0.8, 0.2))
    benign_dx = np.array(_BENIGN_DX, dtype=object)
    mimic_dx = rng.choice(np.array([1, 2, 3]), n)  # dysplastic nevus, keratosis, lentigo
    iddx_full[detailed] = benign_dx[
        np.where(mimic, mimic_dx, rng.choice(len(_BENIGN_DX), n))[detailed]
    ]
    levels = pd.Series(iddx_full).str.split("::", n=4, expand=True)
    levels = levels.reindex(columns=range(5))
    invasive_mel = target & pd.Series(iddx_full).str.contains("Melanoma Invasive").to_numpy()
    thick = np.round(np.clip(rng.lognormal(np.log(0.55), 0.6, n), 0.1, 6.0), 2)
    mel_thick = np.where(invasive_mel, thick, np.nan)
    mitotic_idx = np.minimum(rng.geometric(0.55, n) - 1, len(_MITOTIC) - 1)
    mitotic = np.array(_MITOTIC, dtype=object)[mitotic_idx]
    mel_mitotic = np.where(invasive_mel & (rng.random(n) < 0.85), mitotic, None).astype(object)
    dnn_logit = rng.normal(8.5, 3.5, n) - 2.0 * target
    dnn = 100.0 / (1.0 + np.exp(-dnn_logit))

    def nullable(values):
        return np.where(pd.isna(values), None, values).astype(object)

    frame = pd.DataFrame(
        {
            "isic_id": isic_ids,
            "target": target.astype(np.int64),
            "patient_id": patient_ids[pat],
            "age_approx": age[pat],
            "sex": sex[pat],
            "anatom_site_general": general,
            "clin_size_long_diam_mm": m["diam"],
            "image_type": np.full(n, "TBP tile: close-up", dtype=object),
            "tbp_tile_type": tile[pat],
            **{name: m[name] for name in _MEASURED},
            "tbp_lv_location": location,
            "tbp_lv_location_simple": simple,
            "tbp_lv_x": np.round(pos_x + rng.normal(0, 8, n), 4),
            "tbp_lv_y": np.round(pos_y + rng.normal(0, 8, n), 4),
            "tbp_lv_z": np.round(pos_z + rng.normal(0, 8, n), 4),
            "attribution": attribution[pat],
            "copyright_license": licence[pat],
            "lesion_id": lesion_id,
            "iddx_full": iddx_full,
            **{f"iddx_{i + 1}": nullable(levels[i].to_numpy(dtype=object)) for i in range(5)},
            "mel_mitotic_index": mel_mitotic,
            "mel_thick_mm": mel_thick,
            "tbp_lv_dnn_lesion_confidence": dnn,
        }
    )
    # The real file is sorted by isic_id; this also interleaves the patients.
    # Six decimals is more than any of these is measured to, and keeps the file small and fast.
    frame[list(_ROUNDED)] = frame[list(_ROUNDED)].round(6)
    frame = frame.sort_values("isic_id", kind="stable", ignore_index=True)
    return frame.loc[:, list(TRAIN_COLUMNS)]


_MEASURED = (
    "tbp_lv_A", "tbp_lv_Aext", "tbp_lv_B", "tbp_lv_Bext", "tbp_lv_C", "tbp_lv_Cext", "tbp_lv_H",
    "tbp_lv_Hext", "tbp_lv_L", "tbp_lv_Lext", "tbp_lv_areaMM2", "tbp_lv_area_perim_ratio",
    "tbp_lv_color_std_mean", "tbp_lv_deltaA", "tbp_lv_deltaB", "tbp_lv_deltaL", "tbp_lv_deltaLB",
    "tbp_lv_deltaLBnorm", "tbp_lv_eccentricity", "tbp_lv_minorAxisMM", "tbp_lv_nevi_confidence",
    "tbp_lv_norm_border", "tbp_lv_norm_color", "tbp_lv_perimeterMM", "tbp_lv_radial_color_std_max",
    "tbp_lv_stdL", "tbp_lv_stdLExt", "tbp_lv_symm_2axis", "tbp_lv_symm_2axis_angle",
)  # fmt: skip


# Written with 6 decimals; nevi_confidence keeps full precision (it has values like 1e-12).
_ROUNDED = tuple(
    c for c in _MEASURED if c not in ("tbp_lv_nevi_confidence", "tbp_lv_symm_2axis_angle")
) + ("tbp_lv_dnn_lesion_confidence",)


def _ellipse_perimeter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Ramanujan's approximation for semi-axes a, b."""
    return np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))


def _measurements(rng, t, skin_l, skin_a, skin_b, texture, target) -> dict[str, np.ndarray]:
    """The tbp_lv_* columns (and the diameter) from per-row traits and skin, keeping the real
    set's identities between columns."""
    n = len(skin_l)

    def noise(scale):
        return rng.normal(0.0, scale, n)

    diam = np.round(np.clip(np.exp(np.log(3.3) + 0.36 * t["size"] + noise(0.05)), 1.0, 40.0), 2)
    ecc = np.clip(0.72 + 0.1 * (0.6 * t["asym"] + 0.8 * rng.standard_normal(n)), 0.25, 0.985)
    minor = diam * np.sqrt(1.0 - ecc**2) * np.exp(noise(0.04))
    roughness = 0.16 * np.exp(0.4 * t["border"] + noise(0.1))  # perimeter beyond the ellipse's
    area = np.pi / 4.0 * diam * minor * np.exp(noise(0.04)) / (1.0 + 0.3 * roughness)
    perimeter = _ellipse_perimeter(diam / 2.0, minor / 2.0) * (1.0 + roughness)
    norm_border = np.clip(3.1 + 1.5 * (0.75 * t["border"] + 0.35 * t["asym"]) + noise(0.5), 0, 10)
    color_std = np.clip(np.exp(0.55 * t["varieg"] + noise(0.2)) - 0.15, 0.0, None)
    norm_color = np.clip(3.0 + 2.1 * t["varieg"] + noise(0.8), 0.0, 10.0)
    radial = np.clip(0.95 * np.exp(0.5 * t["varieg"] + noise(0.25)) - 0.1, 0.0, None)
    std_l = np.exp(np.log(2.5) + 0.4 * t["varieg"] + 0.15 * t["size"] + noise(0.2))
    std_l_ext = np.exp(np.log(2.2) + texture + noise(0.15))
    symm = np.clip(0.28 + 0.085 * t["asym"] + noise(0.03), 0.03, 0.9)
    angle = rng.integers(0, 36, n) * 5

    l_ext = np.clip(skin_l + noise(4.0), 15.0, 90.0)
    a_ext = skin_a + noise(2.2)
    b_ext = skin_b + noise(2.0)
    lum = np.clip(l_ext - np.exp(np.log(8.7) + 0.38 * t["dark"] + noise(0.1)), 3.0, 95.0)
    a = a_ext + 5.2 + 2.9 * t["red"] + noise(0.8)
    b = b_ext + 0.9 + 2.7 * t["yellow"] + noise(0.8)
    delta_l, delta_a, delta_b = lum - l_ext, a - a_ext, b - b_ext
    delta_lb = np.hypot(delta_l, delta_b) * (1.0 + np.abs(noise(0.02)))
    delta_lb_norm = delta_lb * np.clip(0.81 + noise(0.12), 0.5, 1.3)
    nevi = 100.0 / (1.0 + np.exp(-(-3.5 + 5.5 * t["nevus"] + noise(0.5))))
    return {
        "diam": diam,
        "tbp_lv_A": a,
        "tbp_lv_Aext": a_ext,
        "tbp_lv_B": b,
        "tbp_lv_Bext": b_ext,
        "tbp_lv_C": np.hypot(a, b),
        "tbp_lv_Cext": np.hypot(a_ext, b_ext),
        "tbp_lv_H": np.degrees(np.arctan2(b, a)),
        "tbp_lv_Hext": np.degrees(np.arctan2(b_ext, a_ext)),
        "tbp_lv_L": lum,
        "tbp_lv_Lext": l_ext,
        "tbp_lv_areaMM2": area,
        "tbp_lv_area_perim_ratio": perimeter**2 / area,
        "tbp_lv_color_std_mean": color_std,
        "tbp_lv_deltaA": delta_a,
        "tbp_lv_deltaB": delta_b,
        "tbp_lv_deltaL": delta_l,
        "tbp_lv_deltaLB": delta_lb,
        "tbp_lv_deltaLBnorm": delta_lb_norm,
        "tbp_lv_eccentricity": ecc,
        "tbp_lv_minorAxisMM": minor,
        "tbp_lv_nevi_confidence": nevi,
        "tbp_lv_norm_border": norm_border,
        "tbp_lv_norm_color": norm_color,
        "tbp_lv_perimeterMM": perimeter,
        "tbp_lv_radial_color_std_max": radial,
        "tbp_lv_stdL": std_l,
        "tbp_lv_stdLExt": std_l_ext,
        "tbp_lv_symm_2axis": symm,
        "tbp_lv_symm_2axis_angle": angle.astype(np.int64),
    }


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Images


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (D65) -> sRGB in [0, 1], for (..., 3) float32 arrays."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f**3, 3 * delta**2 * (f - 4.0 / 29.0))
    xyz *= np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    m = np.array(
        [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]],
        dtype=np.float32,
    )
    rgb = np.clip(xyz @ m.T, 0.0, 1.0)
    return np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.power(rgb, 1 / 2.4) - 0.055)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise, about unit variance, with blobs about size/cells wide."""
    cells = int(min(max(cells, 2), size // 2))
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    std = float(field.std())
    return field / std if std > 0 else field


def draw_lesion(row: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one lesion crop as a (size, size, 3) uint8 RGB array from its metadata `row`.

    `row` needs the training columns clin_size_long_diam_mm, tbp_lv_minorAxisMM,
    tbp_lv_symm_2axis(_angle), tbp_lv_area_perim_ratio, tbp_lv_L/A/B, tbp_lv_Lext/Aext/Bext,
    tbp_lv_stdL, tbp_lv_stdLExt, tbp_lv_color_std_mean and tbp_lv_radial_color_std_max.
    The crop covers FIELD_OF_VIEW_MM, so large lesions run off its edges as in real tiles.
    """
    px_per_mm = size / FIELD_OF_VIEW_MM
    a = max(row["clin_size_long_diam_mm"] * px_per_mm / 2.0, 1.5)
    b = max(row["tbp_lv_minorAxisMM"] * px_per_mm / 2.0, 1.2)
    angle = np.radians(row["tbp_lv_symm_2axis_angle"] + rng.normal(0, 10))
    centre = size / 2.0 + rng.normal(0, size * 0.03, 2)
    coords = np.arange(size, dtype=np.float32) + 0.5
    dy = coords[:, None] - np.float32(centre[0])
    dx = coords[None, :] - np.float32(centre[1])
    u = dx * np.float32(np.cos(angle)) + dy * np.float32(np.sin(angle))
    v = dy * np.float32(np.cos(angle)) - dx * np.float32(np.sin(angle))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = np.arctan2(v / b, u / a)

    # Border: asymmetry as a first harmonic, roughness (how far area_perim_ratio exceeds the
    # ellipse's) as higher harmonics.
    e = math.sqrt(max(1.0 - (b / a) ** 2, 0.0))
    ideal = float(_ellipse_perimeter(np.float64(1.0), np.float64(b / a)) ** 2 / (np.pi * b / a))
    rough = max(math.sqrt(row["tbp_lv_area_perim_ratio"] / ideal) - 1.0, 0.0)
    radius = np.ones_like(theta)
    asym = max(row["tbp_lv_symm_2axis"] - 0.15, 0.0) * 0.8
    radius += np.float32(asym) * np.cos(theta - np.float32(rng.uniform(0, 2 * np.pi)))
    for j in range(2, 8):
        amp = rough * 0.45 * rng.standard_normal() / j**0.7
        radius += np.float32(amp) * np.cos(j * theta + np.float32(rng.uniform(0, 2 * np.pi)))
    radius = np.maximum(radius, 0.3)
    edge = 0.08 + 0.1 * rng.random() + 0.05 * e
    alpha = np.clip((radius - rho) / np.float32(edge) + 0.5, 0.0, 1.0)[..., None]

    # Colour: the lesion's Lab mean, variegated blotches (stdL, color_std_mean) and a radial
    # gradient (radial_color_std_max); the skin's Lab with its own texture (stdLExt).
    cells = size / max(a / 1.5, 2.0)
    blot_l = _smooth_field(rng, size, round(cells))
    blot_ab = _smooth_field(rng, size, round(cells))
    centre_weight = np.clip(1.0 - rho / np.maximum(radius, 1e-3), 0.0, 1.0) - 0.5
    lesion = np.empty((size, size, 3), dtype=np.float32)
    lesion[..., 0] = row["tbp_lv_L"] + 1.3 * row["tbp_lv_stdL"] * blot_l
    lesion[..., 0] -= 3.0 * row["tbp_lv_radial_color_std_max"] * centre_weight
    # Chroma varies along red-brown, never into green, which no lesion shows.
    lesion[..., 1] = np.maximum(row["tbp_lv_A"] + 1.4 * row["tbp_lv_color_std_mean"] * blot_ab, 3.0)
    lesion[..., 2] = row["tbp_lv_B"] + 0.5 * row["tbp_lv_color_std_mean"] * blot_ab
    skin = np.empty_like(lesion)
    grain = _smooth_field(rng, size, size // 6) * 0.6 + _smooth_field(rng, size, 5) * 0.8
    skin[..., 0] = row["tbp_lv_Lext"] + row["tbp_lv_stdLExt"] * grain
    skin[..., 1] = row["tbp_lv_Aext"] + 0.6 * grain
    skin[..., 2] = row["tbp_lv_Bext"] - 0.4 * grain
    lab = skin + alpha * (lesion - skin)
    rgb = _lab_to_srgb(lab) * 255.0
    rgb += rng.normal(0.0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JFIF JPEG bytes of an (h, w, 3) uint8 array, as the real HDF5 files hold."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_images(
    frame: pd.DataFrame, path: Path, seed: int, split: int, size_range: tuple[int, int]
) -> None:
    """One JPEG per row into `path`: key = isic_id, value = a scalar `|S<n>` bytes dataset."""
    needed = [
        "isic_id", "clin_size_long_diam_mm", "tbp_lv_minorAxisMM", "tbp_lv_symm_2axis",
        "tbp_lv_symm_2axis_angle", "tbp_lv_area_perim_ratio", "tbp_lv_L", "tbp_lv_A", "tbp_lv_B",
        "tbp_lv_Lext", "tbp_lv_Aext", "tbp_lv_Bext", "tbp_lv_stdL", "tbp_lv_stdLExt",
        "tbp_lv_color_std_mean", "tbp_lv_radial_color_std_max",
    ]  # fmt: skip
    records = frame.loc[:, needed].to_dict("records")
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        for i, row in enumerate(tqdm(records, desc=path.name, unit="img", leave=False)):
            # Per-row stream: any image can be redrawn alone, and the table never depends on it.
            rng = np.random.default_rng([seed, split, i])
            size = int(rng.integers(size_range[0], size_range[1] + 1))
            data = encode_jpeg(draw_lesion(row, size, rng))
            h5.create_dataset(
                row["isic_id"], data=np.bytes_(data)
            )  # scalar |S<n>, as the real file
    os.replace(tmp, path)
